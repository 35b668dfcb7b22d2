"""The server under bad input, load, disconnects, a full queue, missing keys, fuzzing and SIGTERM.

A tiny random-weight model keeps steps short; what is tested is the server, not the text.
"""
import asyncio
import json
import random
import signal
import time

import httpx
import pytest
from typer.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from live_server import assert_openai_error, metric, server_in_subprocess, server_in_thread, sse_data
from tiny_gguf import random_state_dict, write_gguf

from slimserve.cli import app
from slimserve.config import EngineConfig, ServeConfig

schemathesis = pytest.importorskip("schemathesis")
GenerationMode = schemathesis.GenerationMode

LIMITS = dict(max_tokens_limit=128, max_n=8, max_logprobs=5, max_body_bytes=2**20)
MAX_MODEL_LEN = 512
WAIT_S = 30  # bound on every wait for the server to settle


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf", "llama", random_state_dict("llama"))


@pytest.fixture(scope="module")
def url(tiny_model):
    engine_config = EngineConfig(model=str(tiny_model), max_model_len=MAX_MODEL_LEN, kv_cache_memory=32 * 2**20)
    with server_in_thread(engine_config, ServeConfig(**LIMITS)) as (base_url, _):
        yield base_url


def wait_for_metric(url: str, name: str, value: float) -> None:
    deadline = time.monotonic() + WAIT_S
    while metric(httpx.get(f"{url}/metrics").text, name) != value:
        assert time.monotonic() < deadline, f"{name} did not reach {value}"
        time.sleep(0.05)


VALID = {"prompt": "the world", "max_tokens": 4}
BAD_BODIES = {
    "malformed json": b'{"prompt": "the world", "max_tokens": 4',
    "not an object": b"[1, 2, 3]",
    "no body": b"",
    "wrong type": json.dumps({**VALID, "max_tokens": "four"}).encode(),
    "wrong prompt type": json.dumps({**VALID, "prompt": {"text": "x"}}).encode(),
    "unknown field": json.dumps({**VALID, "best_of_all": 3}).encode(),
    "empty prompt": json.dumps({**VALID, "prompt": ""}).encode(),
    "empty prompt list": json.dumps({**VALID, "prompt": []}).encode(),
    "invalid utf-8": b'{"prompt": "\xff\xfe the world", "max_tokens": 4}',
    "n=10000": json.dumps({**VALID, "n": 10000}).encode(),
    "negative max_tokens": json.dumps({**VALID, "max_tokens": -5}).encode(),
    "max_tokens over the limit": json.dumps({**VALID, "max_tokens": 10**9}).encode(),
    "too many logprobs": json.dumps({**VALID, "logprobs": 50}).encode(),
    "NaN temperature": b'{"prompt": "the world", "temperature": NaN}',
    "top_p zero": json.dumps({**VALID, "top_p": 0}).encode(),
    "token id outside the vocabulary": json.dumps({**VALID, "prompt": [1, 10**12]}).encode(),
    "prompt over the context": json.dumps({**VALID, "prompt": [5] * (MAX_MODEL_LEN + 10)}).encode(),
    "prompt plus max_tokens over the context": json.dumps({**VALID, "prompt": [5] * (MAX_MODEL_LEN - 2)}).encode(),
    "unknown model": json.dumps({**VALID, "model": "gpt-9"}).encode(),
    "10 MB body": json.dumps({**VALID, "prompt": "the " * (10 * 2**20 // 4)}).encode(),
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_request_gets_openai_error_then_server_still_serves(url, body):
    response = httpx.post(f"{url}/v1/completions", content=body, headers={"Content-Type": "application/json"},
                          timeout=WAIT_S)
    assert 400 <= response.status_code < 500
    assert_openai_error(response, response.status_code)
    after = httpx.post(f"{url}/v1/completions", json=VALID, timeout=WAIT_S)
    assert after.status_code == 200 and after.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_bad_chat_requests(url):
    for body in ({"messages": []}, {"messages": [{"role": "wizard", "content": "hi"}]},
                 {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}):
        assert_openai_error(httpx.post(f"{url}/v1/chat/completions", json=body), 400)
    assert_openai_error(httpx.get(f"{url}/v1/nothing-here"), 404)
    assert_openai_error(httpx.get(f"{url}/v1/completions"), 405)


def test_access_log_line_is_json_with_the_request_id(url, caplog):
    caplog.set_level("INFO", logger="slimserve.access")
    response = httpx.post(f"{url}/v1/completions", json=VALID, headers={"X-Request-Id": "log-me-1"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "log-me-1"
    deadline = time.monotonic() + WAIT_S
    while not [r for r in caplog.records if r.name == "slimserve.access" and "log-me-1" in r.getMessage()]:
        assert time.monotonic() < deadline, "no access-log line"
        time.sleep(0.01)
    line = json.loads(next(r.getMessage() for r in caplog.records if "log-me-1" in r.getMessage()))
    assert line["status"] == 200 and line["path"] == "/v1/completions" and line["method"] == "POST"
    assert line["prompt_tokens"] > 0 and line["completion_tokens"] == response.json()["usage"]["completion_tokens"]
    assert line["ttft_s"] is not None and line["latency_s"] >= line["ttft_s"]


async def _stream_one(client: httpx.AsyncClient, disconnect: bool) -> tuple[int, dict | None]:
    """(status, final usage) of one streamed completion; a disconnecting client leaves after two chunks."""
    body = {"prompt": "the world", "max_tokens": 48, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return response.status_code, None
        lines = []
        async for line in response.aiter_lines():
            lines.append(line)
            if disconnect and len(sse_data(lines)) == 2:
                return response.status_code, None  # leaving the block closes the connection mid-stream
    events = sse_data(lines)
    assert events[-1] == "[DONE]"
    return response.status_code, events[-2]["usage"]


def finished_by_length(url: str) -> float:
    return metric(httpx.get(f"{url}/metrics").text, "slimserve:request_success_total", finished_reason="length")


def test_100_streaming_clients_with_10_percent_disconnecting(url):
    disconnects = set(random.Random(0).sample(range(100), 10))
    finished_before = finished_by_length(url)

    async def run() -> list[tuple[int, dict | None]]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=WAIT_S * 4) as client:
            return await asyncio.gather(*(_stream_one(client, i in disconnects) for i in range(100)))

    results = asyncio.run(asyncio.wait_for(run(), timeout=WAIT_S * 6))
    assert [status for status, _ in results] == [200] * 100
    for i, (_, usage) in enumerate(results):
        if i not in disconnects:
            assert usage["completion_tokens"] == 48
    wait_for_metric(url, "slimserve:kv_cache_usage_perc", 0.0)
    wait_for_metric(url, "slimserve:num_requests_running", 0.0)
    assert finished_by_length(url) - finished_before == 90  # the 10 that left were aborted, not run to the end


def test_non_streaming_client_that_leaves_is_aborted(url):
    finished_before = finished_by_length(url)

    async def leave_early() -> None:
        async with httpx.AsyncClient(base_url=url) as client:
            request = asyncio.create_task(client.post("/v1/completions", json={
                "prompt": "the world", "max_tokens": 128, "ignore_eos": True, "n": 8}))
            deadline = time.monotonic() + WAIT_S
            while metric((await client.get("/metrics")).text, "slimserve:kv_cache_usage_perc") == 0:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            request.cancel()

    asyncio.run(leave_early())
    wait_for_metric(url, "slimserve:kv_cache_usage_perc", 0.0)
    assert finished_by_length(url) == finished_before  # aborted, not run to the end


def test_fuzz_openapi_no_server_errors(url):
    """Schemathesis cases for every operation in /openapi.json, valid and (for bodies) invalid: never a 5xx."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    for operation in operations:
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.method.upper() == "POST" else [])
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def no_server_error(case):
                response = case.call(timeout=WAIT_S)
                assert response.status_code < 500, (operation.path, case.body, response.text)

            no_server_error()


# ---- a server in a subprocess: API keys, a small queue, SIGTERM ---------------------------------------

KEYS = ["key-one", "key-two"]


@pytest.fixture(scope="module")
def guarded(tiny_model):
    config = dict(LIMITS, api_keys=KEYS, max_waiting=2, drain_timeout=30, max_tokens_limit=MAX_MODEL_LEN)
    engine = dict(max_model_len=MAX_MODEL_LEN, kv_cache_memory=32 * 2**20, max_num_seqs=2)
    with server_in_subprocess(tiny_model, config, engine) as (url, process):
        yield url, process


PROTECTED = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
             ("GET", "/metrics"), ("GET", "/openapi.json")]


@pytest.mark.parametrize("method,path", PROTECTED)
def test_missing_or_wrong_key_is_401(guarded, method, path):
    url, _ = guarded
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-one"}):
        response = httpx.request(method, f"{url}{path}", headers=headers, json=VALID)
        assert assert_openai_error(response, 401)["code"] == "invalid_api_key"
    response = httpx.request(method, f"{url}{path}", headers={"Authorization": "Bearer key-two"}, json=VALID)
    assert response.status_code in (200, 400)  # let in (chat/completions reads VALID as a bad chat body)


def test_public_routes_need_no_key(guarded):
    url, _ = guarded
    for path in ("/health", "/ready", "/"):
        assert httpx.get(f"{url}{path}").status_code == 200


def test_full_queue_answers_429_with_retry_after(guarded):
    url, _ = guarded
    body = {"prompt": "the world", "max_tokens": 128, "ignore_eos": True}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer key-one"},
                                     timeout=WAIT_S * 4) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(12)))

    responses = asyncio.run(burst())
    refused = [r for r in responses if r.status_code == 429]
    assert refused and all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert_openai_error(refused[0], 429)
    assert sum(r.status_code == 200 for r in responses) == 12 - len(refused) >= 2


def test_sigterm_drains_then_exits_0(guarded):
    """Last here: it ends the subprocess server."""
    url, process = guarded
    auth = {"Authorization": "Bearer key-one"}
    body = {"prompt": "the world", "max_tokens": MAX_MODEL_LEN - 8, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=auth, timeout=WAIT_S * 2) as response:
        assert response.status_code == 200, response.read()
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + WAIT_S
        while httpx.get(f"{url}/ready").status_code != 503:
            assert time.monotonic() < deadline, "/ready did not turn 503"
            time.sleep(0.02)
        assert_openai_error(httpx.post(f"{url}/v1/completions", json=VALID, headers=auth), 503)
        assert httpx.get(f"{url}/health").status_code == 200
        events = sse_data([first, *lines])
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == MAX_MODEL_LEN - 8
    assert process.wait(timeout=WAIT_S) == 0


def test_serve_command_passes_its_options_to_the_checked_config():
    """`slimserve serve` refuses a bad option with the field's name and exit code 2, before loading anything."""
    result = CliRunner().invoke(app, ["serve", "no-such-model", "--served-model-name", " "])
    assert result.exit_code == 2 and "served_model_name must be None or a non-empty name" in result.output
