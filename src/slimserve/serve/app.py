"""The FastAPI app: OpenAI endpoints, probes, metrics and the playground over one AsyncLLMEngine.

Its lifespan starts the engine's stepping task and stops it; handlers only queue requests and read
their streams, so none of them ever blocks a step.
"""
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from slimserve.config import ServeConfig
from slimserve.engine.async_engine import AsyncLLMEngine
from slimserve.serve.chat import create_chat_completion
from slimserve.serve.completions import create_completion
from slimserve.serve.context import ServingContext
from slimserve.serve.errors import APIError, add_error_handlers
from slimserve.serve.generation import EngineClient
from slimserve.serve.metrics import ServeMetrics
from slimserve.serve.middleware import HTTPGuard
from slimserve.serve.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                      CompletionResponse, ErrorResponse, ModelCard, ModelList)
from slimserve.tokenizer import Tokenizer

ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)}


def create_app(engine: AsyncLLMEngine, tokenizer: Tokenizer, config: ServeConfig) -> FastAPI:
    """The app serving `engine`; it starts the engine on start-up and shuts it down on exit.
    app.state.client is its EngineClient (server.py drains it on SIGTERM)."""
    engine_config = engine.engine.config
    runner = engine.engine.model_runner
    model_name = config.served_model_name or Path(engine_config.model).name
    metrics = ServeMetrics(model_name, engine.stats, _gpu_utilization(engine_config.device))
    client = EngineClient(engine, metrics, config.max_waiting)
    ctx = ServingContext(tokenizer, config, client, model_name, runner.max_model_len, runner.vocab_size)
    started = int(time.time())
    playground = resources.files("slimserve.serve").joinpath("static/index.html").read_text()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="slimserve", summary="OpenAI-compatible LLM server", lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # the docs pages load scripts from a CDN
    app.state.client = client
    add_error_handlers(app)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """OpenAI completions; `stream: true` answers text/event-stream chunks ending with `data: [DONE]`."""
        return await create_completion(body, request, ctx)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """OpenAI chat completions; `stream: true` answers text/event-stream chunks ending with `data: [DONE]`."""
        return await create_chat_completion(body, request, ctx)

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=started, max_model_len=ctx.max_model_len)])

    @app.get("/health", responses=ERROR_RESPONSES)
    async def health() -> dict:
        """Liveness: the process answers and its engine loop is alive."""
        if not engine.is_running and not client.draining:
            raise APIError(503, "the engine loop has stopped", code="engine_dead")
        return {"status": "ok"}

    @app.get("/ready", responses=ERROR_RESPONSES)
    async def ready() -> dict:
        """Readiness: the engine is loaded and stepping, and the server is not draining."""
        if client.draining:
            raise APIError(503, "the server is draining before shutdown", code="shutting_down")
        if not engine.is_running:
            raise APIError(503, "the engine is not running", code="engine_not_running")
        return {"status": "ready"}

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground_page() -> HTMLResponse:
        return HTMLResponse(playground)

    # The probes and the page itself hold nothing secret; the page sends the key with each API call.
    public_paths = {"/health", "/ready", "/"} | ({"/metrics"} if config.metrics_public else set())
    app.add_middleware(HTTPGuard, config=config, metrics=metrics, public_paths=public_paths,
                       route_paths={route.path for route in app.routes})
    return app


def _gpu_utilization(device: str) -> Callable[[], float] | None:
    if not device.startswith("cuda"):
        return None
    import torch

    torch.cuda.utilization(device)  # fails here, at start-up, if NVML (pynvml) is missing
    return lambda: float(torch.cuda.utilization(device))
