"""The engine behind the server: one asyncio task steps it, each request streams its deltas.

The blocking step runs in a one-thread executor so the event loop keeps serving. Everything that
touches the engine (step, add_request, abort) holds one asyncio.Lock, so the engine is never used
from two threads at once; a request added or aborted during a step waits for that step to end.

`AsyncLLMEngine.load` builds the engine on that same thread. torch's CPU kernels run on OpenMP,
which keeps one pool of worker threads per thread that starts parallel work: a model loaded (or
warmed up) on the main thread and stepped on another makes two pools, 4 threads on 2 cores. GNU
OpenMP then stops spinning between parallel regions and every region pays a wake-up: a compiled
bf16 SmolLM2-135M decode step took 29 ms instead of 14, on the main thread too.
"""
import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from slimserve.config import EngineConfig
from slimserve.engine.llm_engine import CompletionOutput, EngineStats, LLMEngine, RequestOutput
from slimserve.engine.sampling_params import SamplingParams

_END = None  # queued after a request's last output, or when it is aborted


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, executor: ThreadPoolExecutor | None = None):
        """executor: the one-thread executor that steps the engine (see load); a new one if None."""
        self.engine = engine
        self._lock = asyncio.Lock()
        self._has_work = asyncio.Event()
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException | None]] = {}
        self._executor = executor or _step_executor()
        self._task: asyncio.Task | None = None
        self._stopping = False

    @classmethod
    def load(cls, config: EngineConfig) -> "AsyncLLMEngine":
        """Load the engine and compile its graphs (LLMEngine.warm_up) on the thread that will step it."""
        executor = _step_executor()

        def build() -> LLMEngine:
            engine = LLMEngine(config)
            engine.warm_up()
            return engine

        return cls(executor.submit(build).result(), executor)

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the stepping task on the running event loop."""
        assert self._task is None, "already started"
        self._task = asyncio.get_running_loop().create_task(self._run_loop(), name="engine-loop")
        self._task.add_done_callback(self._loop_exited)

    async def shutdown(self) -> None:
        """Stop after the current step; open streams end with a RuntimeError and their blocks are freed."""
        self._stopping = True
        self._has_work.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail_all(RuntimeError("the engine was shut down"))
        self._executor.shutdown(wait=True)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def add_request(self, request_id: str, prompt: str | list[int],
                          params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Queue a request (bad input raises here) and return its stream of deltas.

        Each item holds the completions that advanced, with only their new text, token ids and
        logprobs; concatenated they give the final output. Leaving the stream early aborts the request.
        """
        assert self.is_running, "call start() first"
        queue: asyncio.Queue[RequestOutput | BaseException | None] = asyncio.Queue()
        async with self._lock:
            self.engine.add_request(request_id, prompt, params)
            self._queues[request_id] = queue
        self._has_work.set()
        # The queue is bound now: the request may finish before the reader's first look.
        return self._stream(request_id, queue)

    async def abort(self, request_id: str) -> None:
        """End the request's stream and free its KV blocks (after the step now running, if any)."""
        async with self._lock:
            self.engine.abort(request_id)
            queue = self._queues.pop(request_id, None)
            if queue is not None:
                queue.put_nowait(_END)

    async def _stream(self, request_id: str,
                      queue: asyncio.Queue[RequestOutput | BaseException | None]) -> AsyncIterator[RequestOutput]:
        sent: dict[int, tuple[int, int, bool]] = {}  # completion index -> (chars, tokens, finished) sent
        done = False
        try:
            while not done:
                item = await queue.get()
                while not queue.empty() and isinstance(item, RequestOutput):
                    item = queue.get_nowait()  # outputs are cumulative: a slow reader skips to the latest
                done = not isinstance(item, RequestOutput) or item.finished
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield _delta(item, sent)
        finally:
            if not done:  # the reader left early (disconnect, break, cancellation)
                await self.abort(request_id)

    async def _run_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            await self._has_work.wait()
            async with self._lock:
                if self._stopping or not self.engine.has_unfinished():
                    self._has_work.clear()
                    continue
                try:
                    outputs = await loop.run_in_executor(self._executor, self.engine.step)
                except Exception as error:  # the loop must outlive a failed step; its requests get the error
                    self._fail_all(error)
                    continue
                for output in outputs:
                    queue = self._queues[output.request_id]
                    queue.put_nowait(output)
                    if output.finished:
                        del self._queues[output.request_id]

    def _loop_exited(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:  # a bug outside step: no stream may hang
            self._fail_all(task.exception())

    def _fail_all(self, error: BaseException) -> None:
        """Abort every open request and raise error in its stream (a failed step may have left any of
        them half-updated, so none is trusted to continue)."""
        for request_id, queue in self._queues.items():
            self.engine.abort(request_id)
            queue.put_nowait(error)
        self._queues.clear()


def _step_executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")


def _delta(output: RequestOutput, sent: dict[int, tuple[int, int, bool]]) -> RequestOutput:
    """The completions of a cumulative output that advanced, cut to what was not sent yet; updates sent."""
    completions = []
    for completion in output.outputs:
        num_chars, num_tokens, finished = sent.get(completion.index, (0, 0, False))
        is_finished = completion.finish_reason is not None
        if len(completion.token_ids) == num_tokens and is_finished == finished:
            continue  # no new token and no news of its end
        sent[completion.index] = (len(completion.text), len(completion.token_ids), is_finished)
        logprobs = None if completion.logprobs is None else completion.logprobs[num_tokens:]
        completions.append(CompletionOutput(completion.index, completion.text[num_chars:],
                                            completion.token_ids[num_tokens:], logprobs, completion.finish_reason))
    return replace(output, outputs=completions)
