"""`serve(model, ServeConfig)`: build the engine and the app, run uvicorn, drain on SIGTERM.

On the first SIGTERM (or Ctrl-C) the server keeps listening: /ready answers 503, new generation
requests get 503, admitted ones finish within drain_timeout (then they are aborted), and serve()
returns, so the process exits 0. A second signal exits at once.
"""
import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import FrameType

import uvicorn

from slimserve.config import EngineConfig, ServeConfig
from slimserve.engine.async_engine import AsyncLLMEngine
from slimserve.serve.app import create_app

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 5  # after the drain: time for responses already complete to leave
LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "default": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        "json_line": {"format": "%(message)s"},  # the access log's lines are JSON objects already
    },
    "handlers": {
        "default": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"},
        "access": {"class": "logging.StreamHandler", "formatter": "json_line", "stream": "ext://sys.stdout"},
    },
    "loggers": {
        "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
        "slimserve": {"handlers": ["default"], "level": "INFO", "propagate": False},
        "slimserve.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
    },
}


def serve(model: str, config: ServeConfig, **engine_options) -> None:
    """Serve `model` (short name, HF folder or .gguf) until SIGTERM/SIGINT and a drain.

    engine_options: any EngineConfig field (dtype, device, kv_cache_memory, max_model_len, ...).
    """
    engine = AsyncLLMEngine.load(EngineConfig.from_options(model, **engine_options))
    app = create_app(engine, engine.engine.tokenizer, config)
    uvicorn_config = uvicorn.Config(app, host=config.host, port=config.port, log_config=LOG_CONFIG,
                                    access_log=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    DrainingServer(uvicorn_config, drain=lambda: app.state.client.drain(config.drain_timeout)).run()


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with the first exit signal starting a drain instead of closing the listener."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]):
        super().__init__(config)
        self.drain = drain
        self.drain_requested = False
        self.drain_task: asyncio.Task | None = None  # held so the running drain is not garbage-collected

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's handler: that one re-raises the signal after shutdown, which kills the process
        # with the signal's status instead of 0.
        if self.drain_requested or self.should_exit:
            self.should_exit = self.force_exit = True
            return
        self.drain_requested = True
        loop = asyncio.get_running_loop()
        loop.call_soon_threadsafe(self._start_drain, loop)

    def _start_drain(self, loop: asyncio.AbstractEventLoop) -> None:
        logger.info("draining: refusing new requests, waiting for admitted ones")
        self.drain_task = loop.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        await self.drain()
        self.should_exit = True
