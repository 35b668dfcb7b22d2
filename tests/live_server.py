"""Helpers for tests against a real server on loopback: start one (in a thread or a subprocess), read metrics."""
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from slimserve.config import EngineConfig, ServeConfig
from slimserve.engine.async_engine import AsyncLLMEngine
from slimserve.engine.llm_engine import LLMEngine
from slimserve.serve import create_app

STARTUP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_in_thread(engine_config: EngineConfig, config: ServeConfig) -> Iterator[tuple[str, LLMEngine]]:
    """(base url, engine) of a uvicorn server running create_app in a background thread."""
    async_engine = AsyncLLMEngine.load(engine_config)  # as slimserve serve does
    engine = async_engine.engine
    app = create_app(async_engine, engine.tokenizer, config)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def server_in_subprocess(model: Path, config_kwargs: dict, engine_kwargs: dict) -> Iterator[tuple[str, subprocess.Popen]]:
    """(base url, process) of `slimserve.serve.server.serve` in a child process, for signal tests."""
    port = free_port()
    code = ("import sys, json; from slimserve.config import ServeConfig; from slimserve.serve.server import serve; "
            "c, e = json.loads(sys.argv[1]), json.loads(sys.argv[2]); serve(sys.argv[3], ServeConfig(**c), **e)")
    args = [sys.executable, "-c", code, json.dumps({**config_kwargs, "port": port}), json.dumps(engine_kwargs),
            str(model)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            assert process.poll() is None, f"the server exited: {process.stdout.read()}"
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (labels may be a subset of the sample's)."""
    for line in text.splitlines():
        match = re.fullmatch(r"([^\s{]+)(?:\{(.*)\})? (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        sample_labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    raise KeyError(f"no sample {name}{labels} in the metrics")


def sse_data(lines: list[str]) -> list[dict | str]:
    """The payloads of `data:` events: parsed JSON objects, and the final "[DONE]" as a string."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    return error
