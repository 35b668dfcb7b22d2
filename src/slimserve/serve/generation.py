"""The server's side of the engine: admission (bounded queue, drain) and one Generation per HTTP request.

A request's prompts become engine requests "<id>-<i>"; their delta streams are merged into one.
Whatever way a request ends (done, client gone, error), Generation.aclose aborts what still runs,
so its KV blocks are freed at once, and gives back its admission slot.
"""
import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from slimserve.engine.async_engine import AsyncLLMEngine
from slimserve.engine.llm_engine import RequestOutput
from slimserve.engine.sampling_params import SamplingParams
from slimserve.errors import ContextLengthError
from slimserve.serve.errors import APIError
from slimserve.serve.metrics import ServeMetrics
from slimserve.serve.protocol import Usage

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # told to clients turned away by a full queue; a decode step is far shorter


@dataclass
class RequestLog:
    """What the access-log line of one HTTP request reports about its generation."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    error: str | None = None  # what ended a stream early, when something did


class EngineClient:
    def __init__(self, engine: AsyncLLMEngine, metrics: ServeMetrics, max_waiting: int):
        self.engine = engine
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.num_waiting = 0  # admitted requests without a first token yet
        self.num_active = 0  # admitted requests not yet closed
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def generate(self, prompts: list[list[int]], params: SamplingParams, log: RequestLog) -> "Generation":
        """Admit one request and queue its prompts on the engine.

        Raises APIError: 503 while draining, 429 (with Retry-After) when max_waiting requests wait
        for their first token, 400 for a prompt the engine refuses.
        """
        if self.draining:
            raise APIError(503, "the server is shutting down; retry on another replica", code="shutting_down")
        if self.num_waiting >= self.max_waiting:
            raise APIError(429, f"the server is busy: {self.num_waiting} requests wait for their first token; "
                                "retry later", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
        generation = Generation(self, log)
        try:
            await generation.start(prompts, params)
        except BaseException:
            await generation.aclose()
            raise
        return generation

    async def drain(self, timeout: float) -> None:
        """Refuse new requests, let admitted ones finish for up to timeout seconds, then stop the engine
        (which ends whatever still runs)."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            logger.warning("drain timeout (%.1f s): aborting %d unfinished requests", timeout, self.num_active)
        await self.engine.shutdown()

    def on_admitted(self) -> None:
        self.num_waiting += 1
        self.num_active += 1
        self._idle.clear()

    def on_first_token(self) -> None:
        self.num_waiting -= 1

    def on_closed(self, still_waiting: bool) -> None:
        if still_waiting:
            self.num_waiting -= 1
        self.num_active -= 1
        assert self.num_waiting >= 0 and self.num_active >= 0, (self.num_waiting, self.num_active)
        if self.num_active == 0:
            self._idle.set()


class Generation:
    """One HTTP request on the engine: iterate it for (prompt index, delta) pairs, then aclose()."""

    def __init__(self, client: EngineClient, log: RequestLog):
        self.client = client
        self.request_id = uuid.uuid4().hex
        self.log = log
        self.created = int(time.time())
        self._queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []
        self._unfinished: set[str] = set()
        self._last_output: dict[int, float] = {}  # prompt index -> time.monotonic() of its last delta
        self._waiting = True
        self._closed = False
        client.on_admitted()

    def usage(self) -> Usage:
        """The token counts so far (final once the generation is done)."""
        log = self.log
        return Usage(prompt_tokens=log.prompt_tokens, completion_tokens=log.completion_tokens,
                     total_tokens=log.prompt_tokens + log.completion_tokens)

    async def start(self, prompts: list[list[int]], params: SamplingParams) -> None:
        # Queued all at once: each add waits for the engine's lock, and FIFO waiters all get it
        # before the stepping loop does, so a batch of prompts joins the same step.
        added = await asyncio.gather(*(self._add(i, ids, params) for i, ids in enumerate(prompts)),
                                     return_exceptions=True)
        errors = [result for result in added if isinstance(result, BaseException)]
        if errors:
            raise errors[0]

    async def _add(self, index: int, prompt_ids: list[int], params: SamplingParams) -> None:
        engine_id = f"{self.request_id}-{index}"
        try:
            stream = await self.client.engine.add_request(engine_id, prompt_ids, params)
        except ContextLengthError as error:
            raise APIError(400, str(error), "prompt", "context_length_exceeded") from error
        except ValueError as error:
            raise APIError(400, str(error), "prompt") from error
        self._unfinished.add(engine_id)
        self._pumps.append(asyncio.create_task(self._pump(index, stream), name=f"pump-{engine_id}"))

    async def _pump(self, index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                self._queue.put_nowait((index, output))
        except Exception as error:  # the engine failed this request: the reader raises it
            self._queue.put_nowait((index, error))
            return
        self._queue.put_nowait((index, None))

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        num_open = len(self._pumps)
        while num_open:
            index, item = await self._queue.get()
            if item is None:
                num_open -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            self._observe(index, item)
            yield index, item

    def _observe(self, index: int, output: RequestOutput) -> None:
        now = time.monotonic()
        metrics = self.client.metrics
        if index in self._last_output:
            metrics.observe_inter_token(now - self._last_output[index])
        else:
            queue_time = (output.first_scheduled_time or now) - output.arrival_time
            metrics.observe_first_token(now - output.arrival_time, queue_time)
            if self.log.ttft_s is None:
                self.log.ttft_s = now - output.arrival_time
            if self._waiting:
                self._waiting = False
                self.client.on_first_token()
        self._last_output[index] = now
        for completion in output.outputs:
            self.log.completion_tokens += len(completion.token_ids)
            if completion.finish_reason is not None:
                self.log.finish_reasons.append(completion.finish_reason)
                metrics.observe_finished(completion.finish_reason, now - output.arrival_time)
        if output.finished:
            self._unfinished.discard(output.request_id)

    async def aclose(self) -> None:
        """Abort the engine requests still running and give back the admission slot; idempotent.
        Callers inside a cancelled anyio scope must shield it."""
        if self._closed:
            return
        self._closed = True
        try:
            for pump in self._pumps:
                pump.cancel()
            await asyncio.gather(*self._pumps, return_exceptions=True)
            for engine_id in sorted(self._unfinished):
                await self.client.engine.abort(engine_id)
        finally:
            self.client.on_closed(self._waiting)
