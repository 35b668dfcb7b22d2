"""The web playground in a real headless Chromium: loads, takes an API key, streams a chat reply."""
import shutil
from pathlib import Path

import pytest
from live_server import server_in_thread

from slimserve import assets
from slimserve.config import EngineConfig, ServeConfig

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.real_model

SCREENSHOT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "playground.png"
KEY = "playground-key"
WAIT_S = 90


@pytest.fixture(scope="module")
def url():
    engine_config = EngineConfig(model=str(assets.fetch("smollm2-135m")), max_model_len=1024,
                                 kv_cache_memory=64 * 2**20)
    with server_in_thread(engine_config, ServeConfig(api_keys=[KEY], max_tokens_limit=64)) as (base_url, _):
        yield base_url


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("needs Debian's chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                 "--disable-dev-shm-usage", "--window-size=1280,800"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    yield browser
    browser.quit()


def test_playground_streams_a_chat_reply(url, browser):
    browser.get(url)
    wait = WebDriverWait(browser, WAIT_S)
    model = browser.find_element(By.ID, "model")
    wait.until(lambda _: model.text.startswith("models:"))  # no key yet: the API answers 401
    assert "API key" in model.text

    key = browser.find_element(By.ID, "api-key")
    key.send_keys(KEY)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    wait.until(lambda _: model.text == "SmolLM2-135M-Instruct.Q4_1.gguf")

    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("24")
    browser.find_element(By.ID, "seed").send_keys("1")
    # Count text updates of the reply as they land: more than one means it streamed.
    browser.execute_script("""
        window.replyUpdates = 0;
        new MutationObserver(() => { window.replyUpdates += 1; })
            .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});""")
    browser.find_element(By.ID, "prompt").send_keys("What is the capital of France?")
    browser.find_element(By.ID, "send").click()

    finish = browser.find_element(By.ID, "finish")
    wait.until(lambda _: finish.text in ("stop", "length", "error"))
    reply = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
    assert finish.text in ("stop", "length") and len(reply) == 1 and reply[0].text.strip()
    assert browser.execute_script("return window.replyUpdates") > 3
    assert browser.find_element(By.ID, "ttft").text.endswith(" ms")
    assert browser.find_element(By.ID, "tps").text.endswith(" tok/s")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))
