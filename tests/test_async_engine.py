"""AsyncLLMEngine on the tiny random Llama of test_engine: streamed deltas, abort, failures, shutdown."""
import asyncio
import threading
from collections import defaultdict

import pytest
from test_engine import GREEDY, one_torch_thread, random_prompts, tiny, tiny_engine  # noqa: F401 (fixtures)

from slimserve.config import EngineConfig
from slimserve.engine.async_engine import AsyncLLMEngine
from slimserve.engine.llm_engine import LLMEngine, RequestOutput
from slimserve.engine.sampling_params import SamplingParams
from slimserve.errors import ContextLengthError


def workload() -> list[tuple[str, list[int], SamplingParams]]:
    prompts = random_prompts(5, 5, 40, seed=20)
    params = [SamplingParams(max_tokens=12, **GREEDY),
              SamplingParams(max_tokens=9, n=2, temperature=1.0, seed=3),
              SamplingParams(max_tokens=20, temperature=0.8, top_k=20, seed=4, logprobs=2),
              SamplingParams(max_tokens=7, **GREEDY),
              SamplingParams(max_tokens=15, **GREEDY)]
    return [(f"q{i}", prompt, p) for i, (prompt, p) in enumerate(zip(prompts, params))]


def run_sync(engine: LLMEngine, requests) -> dict[str, RequestOutput]:
    for request in requests:
        engine.add_request(*request)
    finished = {}
    while engine.has_unfinished():
        finished |= {o.request_id: o for o in engine.step() if o.finished}
    return finished


async def collect(engine: AsyncLLMEngine, request) -> tuple[dict, int]:
    """Concatenated deltas per completion index: {index: (text, token_ids, logprobs, finish_reason)}."""
    joined = defaultdict(lambda: ["", [], [], None])
    num_deltas = 0
    async for delta in await engine.add_request(*request):
        num_deltas += 1
        for completion in delta.outputs:
            entry = joined[completion.index]
            entry[0] += completion.text
            entry[1] += completion.token_ids
            entry[2] += completion.logprobs or []
            entry[3] = completion.finish_reason
    return {index: tuple(entry) for index, entry in joined.items()}, num_deltas


def test_concurrent_streams_concatenate_to_the_sync_output(tiny):
    folder, _ = tiny
    engine = tiny_engine(folder, block_size=4, max_num_batched_tokens=16)
    requests = workload()
    expected = run_sync(engine, requests)

    async def main():
        async_engine = AsyncLLMEngine(engine)
        async_engine.start()
        results = await asyncio.gather(*(collect(async_engine, request) for request in requests))
        await async_engine.shutdown()
        return results

    for (request_id, _, params), (joined, num_deltas) in zip(requests, asyncio.run(main())):
        assert num_deltas > 1
        assert sorted(joined) == list(range(params.n))
        for completion in expected[request_id].outputs:
            text, token_ids, logprobs, finish_reason = joined[completion.index]
            assert (text, token_ids, finish_reason) == (completion.text, completion.token_ids, completion.finish_reason)
            # Same tokens; the values may differ in the last bits when the batch differs.
            assert [entry.keys() for entry in logprobs] == [entry.keys() for entry in completion.logprobs or []]
            for entry, reference in zip(logprobs, completion.logprobs or []):
                assert entry == pytest.approx(reference, abs=1e-4)
    assert engine.stats().kv_cache_usage == 0.0


def test_abort_mid_stream_frees_blocks(tiny):
    folder, _ = tiny
    engine = tiny_engine(folder, block_size=4)
    long_a, long_b, short = random_prompts(3, 30, 30, seed=21)

    async def main():
        async_engine = AsyncLLMEngine(engine)
        async_engine.start()
        stream_a = await async_engine.add_request("a", long_a, SamplingParams(max_tokens=200, **GREEDY))
        stream_b = await async_engine.add_request("b", long_b, SamplingParams(max_tokens=200, **GREEDY))
        await anext(stream_a)
        usage_both = async_engine.stats().kv_cache_usage
        await async_engine.abort("a")
        assert 0.0 < async_engine.stats().kv_cache_usage < usage_both  # a's blocks are back, b's are held
        assert [delta async for delta in stream_a] == []  # a's stream ends
        await anext(stream_b)
        await stream_b.aclose()  # the reader leaves: b is aborted too
        assert async_engine.stats().kv_cache_usage == 0.0 and not engine.has_unfinished()
        joined, _ = await collect(async_engine, ("c", short, SamplingParams(max_tokens=5, **GREEDY)))
        await async_engine.shutdown()
        return joined

    assert len(asyncio.run(main())[0][1]) == 5
    assert engine.stats().kv_cache_usage == 0.0


class FailingOnceEngine(LLMEngine):
    """Injects one failure into a real engine's step, as a device error would."""

    failed = False

    def step(self) -> list[RequestOutput]:
        if self.stats().num_running and not self.failed:
            self.failed = True
            raise RuntimeError("injected step failure")
        return super().step()


def test_failed_step_fails_its_requests_and_the_loop_lives_on(tiny):
    folder, _ = tiny
    engine = FailingOnceEngine(EngineConfig(str(folder), kv_cache_memory=2**22, max_num_seqs=16))
    prompt = random_prompts(1, 10, 10, seed=22)[0]

    async def main():
        async_engine = AsyncLLMEngine(engine)
        async_engine.start()
        with pytest.raises(RuntimeError, match="injected step failure"):
            await collect(async_engine, ("x", prompt, SamplingParams(max_tokens=5, **GREEDY)))
        assert async_engine.is_running and engine.stats().kv_cache_usage == 0.0
        joined, _ = await collect(async_engine, ("y", prompt, SamplingParams(max_tokens=5, **GREEDY)))
        with pytest.raises(ContextLengthError):  # bad input raises at add_request, before any stream
            await async_engine.add_request("z", [1] * 600, SamplingParams())
        stream = await async_engine.add_request("w", prompt, SamplingParams(max_tokens=200, **GREEDY))
        await anext(stream)
        await async_engine.shutdown()
        with pytest.raises(RuntimeError, match="shut down"):
            await anext(stream)
        return joined

    assert len(asyncio.run(main())[0][1]) == 5
    assert not engine.has_unfinished() and engine.stats().kv_cache_usage == 0.0


def test_stream_read_after_its_request_finished(tiny):
    """Regression: the stream looked its queue up on first read, after a finished request had removed it."""
    folder, _ = tiny
    engine = tiny_engine(folder)
    prompt = random_prompts(1, 10, 10, seed=23)[0]

    async def main():
        async_engine = AsyncLLMEngine(engine)
        async_engine.start()
        stream = await async_engine.add_request("quick", prompt, SamplingParams(max_tokens=2, **GREEDY))
        while engine.has_unfinished():
            await asyncio.sleep(0.01)
        deltas = [delta async for delta in stream]
        await async_engine.shutdown()
        return deltas

    deltas = asyncio.run(main())
    assert [len(d.outputs[0].token_ids) for d in deltas] == [2] and deltas[-1].finished  # coalesced into one


def test_load_builds_warms_up_and_steps_on_one_thread(tiny, monkeypatch):
    """Loading on the thread that steps keeps torch to one OpenMP pool (see async_engine's docstring)."""
    folder, _ = tiny
    threads = []
    original_init, original_warm_up, original_step = LLMEngine.__init__, LLMEngine.warm_up, LLMEngine.step

    def record(method):
        def wrapper(self, *args, **kwargs):
            threads.append(threading.current_thread().name)
            return method(self, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(LLMEngine, "__init__", record(original_init))
    monkeypatch.setattr(LLMEngine, "warm_up", record(original_warm_up))
    monkeypatch.setattr(LLMEngine, "step", record(original_step))
    engine = AsyncLLMEngine.load(EngineConfig(str(folder), kv_cache_memory=2**22, compile=True))
    request = ("q", random_prompts(1, 5, 5, seed=23)[0], SamplingParams(max_tokens=3, **GREEDY))

    async def main():
        engine.start()
        result = await collect(engine, request)
        await engine.shutdown()
        return result

    (joined, _) = asyncio.run(main())
    assert len(joined[0][1]) == 3
    assert len(threads) > 3 and len(set(threads)) == 1 and threads[0].startswith("engine-step")
    assert threads[0] != threading.main_thread().name
