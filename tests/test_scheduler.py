import random
from collections import defaultdict

import pytest

from slimserve.engine.sampling_params import SamplingParams
from slimserve.engine.scheduler import Scheduler, SchedulerOutput
from slimserve.engine.sequence import Sequence, SequenceStatus
from slimserve.errors import ContextLengthError

EOS = 0


def make_scheduler(**overrides) -> Scheduler:
    knobs = dict(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=4096,
                 eos_token_ids=[EOS])
    return Scheduler(**(knobs | overrides))


def next_token(token_ids: list[int]) -> int:
    """A deterministic stand-in for the model: the next token depends on the whole prefix (never EOS)."""
    return (sum(t * (i + 1) for i, t in enumerate(token_ids)) % 97) + 1


class FakeRunner:
    """Writes KV into the scheduled slots and checks that every attended slot holds this sequence's prefix."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.kv: dict[int, dict[int, tuple]] = defaultdict(dict)

    def run(self, out: SchedulerOutput) -> list[int]:
        manager, block_size = self.scheduler.block_manager, self.scheduler.block_manager.block_size
        sampled = []
        for seq, num_tokens in zip(out.seqs, out.num_scheduled_tokens):
            start = seq.num_computed_tokens
            assert len(seq.block_table) * block_size >= start + num_tokens, seq
            for pos in range(start):
                assert self.kv[seq.block_table[pos // block_size]][pos % block_size] == tuple(seq.token_ids[:pos + 1])
            for pos in range(start, start + num_tokens):
                block_id = seq.block_table[pos // block_size]
                assert manager.blocks[block_id].ref_count == 1
                self.kv[block_id][pos % block_size] = tuple(seq.token_ids[:pos + 1])
            sampled.append(next_token(seq.token_ids) if start + num_tokens == len(seq) else -1)
        return sampled

    def step(self) -> tuple[SchedulerOutput, list[Sequence]]:
        out = self.scheduler.schedule()
        assert out.num_batched_tokens <= self.scheduler.max_num_batched_tokens
        assert len(out.seqs) == len({seq.seq_id for seq in out.seqs}) <= self.scheduler.max_num_seqs
        assert self.scheduler.num_running <= self.scheduler.max_num_seqs
        return out, self.scheduler.update_from_output(out, self.run(out))

    def run_to_completion(self, max_steps: int = 10_000) -> list[SchedulerOutput]:
        history = []
        while self.scheduler.has_unfinished():
            assert len(history) < max_steps, "no progress"
            history.append(self.step()[0])
        assert self.scheduler.block_manager.usage == 0.0
        return history


def reference_output(prompt: list[int], max_tokens: int) -> list[int]:
    token_ids = list(prompt)
    for _ in range(max_tokens):
        token_ids.append(next_token(token_ids))
    return token_ids[len(prompt):]


def test_chunked_prefill_splits_a_long_prompt_under_the_token_budget():
    scheduler = make_scheduler(max_num_batched_tokens=32)
    seq = Sequence(1, list(range(1, 101)), SamplingParams(max_tokens=3))
    scheduler.add(seq)
    runner = FakeRunner(scheduler)
    history = runner.run_to_completion()
    assert [out.num_scheduled_tokens for out in history] == [[32], [32], [32], [4], [1], [1]]
    assert seq.output_token_ids == reference_output(list(range(1, 101)), 3)
    assert seq.finish_reason == "length"


def test_decodes_and_prefill_chunks_share_a_step():
    scheduler = make_scheduler(max_num_batched_tokens=32)
    runner = FakeRunner(scheduler)
    short = Sequence(1, [5, 6, 7], SamplingParams(max_tokens=20))
    scheduler.add(short)
    runner.step()
    long, later = Sequence(2, list(range(1, 61))), Sequence(3, list(range(100, 110)))
    scheduler.add(long)
    scheduler.add(later)

    out, _ = runner.step()
    assert out.seqs == [short, long] and out.num_scheduled_tokens == [1, 31]
    out, _ = runner.step()  # the partial prefill goes on before the waiting sequence is admitted
    assert out.seqs == [short, long, later] and out.num_scheduled_tokens == [1, 29, 2]
    out, _ = runner.step()
    assert out.seqs == [short, long, later] and out.num_scheduled_tokens == [1, 1, 8]
    runner.run_to_completion()
    assert short.output_token_ids == reference_output([5, 6, 7], 20)


def test_preemption_takes_the_newest_and_it_later_completes():
    scheduler = make_scheduler(num_blocks=6, block_size=4)
    runner = FakeRunner(scheduler)
    older = Sequence(1, [1, 2, 3, 4, 5, 6, 7, 8], SamplingParams(max_tokens=10))
    newer = Sequence(2, [8, 7, 6, 5, 4, 3, 2, 1], SamplingParams(max_tokens=10))
    queued = Sequence(3, list(range(20, 40)), SamplingParams(max_tokens=2))  # needs 5 blocks: waits
    for seq in (older, newer, queued):
        scheduler.add(seq)
    while True:
        out, _ = runner.step()
        if out.preempted:
            break
    assert out.preempted == [newer]
    assert newer.status is SequenceStatus.WAITING and not newer.block_table and newer.num_computed_tokens == 0
    assert list(scheduler.waiting) == [newer, queued] and newer not in out.seqs
    assert older in out.seqs
    runner.run_to_completion()
    assert older.output_token_ids == reference_output(older.prompt_token_ids, 10)
    assert newer.output_token_ids == reference_output(newer.prompt_token_ids, 10)
    assert queued.output_token_ids == reference_output(queued.prompt_token_ids, 2)
    assert scheduler.block_manager.num_prefix_cache_hits > 0  # the recompute reused its cached blocks


def test_abort_frees_blocks_at_any_stage():
    scheduler = make_scheduler(num_blocks=40, max_num_batched_tokens=16)
    runner = FakeRunner(scheduler)
    decoding = Sequence(1, [1, 2, 3], request_id="decoding")
    scheduler.add(decoding)
    runner.step()
    prefilling = Sequence(2, list(range(1, 60)), request_id="prefilling")
    waiting = Sequence(3, list(range(1, 100)), request_id="waiting")
    scheduler.add(prefilling)
    scheduler.add(waiting)
    runner.step()
    assert decoding.num_computed_tokens and 0 < prefilling.num_computed_tokens < len(prefilling)
    assert waiting.status is SequenceStatus.WAITING

    assert scheduler.abort("waiting") == [waiting]
    assert scheduler.abort("prefilling") == [prefilling]
    fresh = Sequence(4, [9], request_id="fresh")  # its first step completes its prefill
    scheduler.add(fresh)
    out = scheduler.schedule()
    assert fresh in out.seqs
    sampled = runner.run(out)
    num_tokens = len(decoding)
    assert scheduler.abort("decoding") == [decoding]  # after their step ran, before the update
    assert scheduler.abort("fresh") == [fresh]
    assert scheduler.update_from_output(out, sampled) == []
    assert len(decoding) == num_tokens and len(fresh) == 1
    assert scheduler.abort("decoding") == []
    for seq in (decoding, prefilling, waiting, fresh):
        assert seq.finish_reason == "abort" and not seq.block_table
    assert scheduler.block_manager.usage == 0.0 and not scheduler.has_unfinished()
    assert scheduler.schedule().seqs == []


def test_max_num_seqs_is_respected():
    scheduler = make_scheduler(max_num_seqs=3, max_num_batched_tokens=64)
    seqs = [Sequence(i, [i + 1] * (i + 2), SamplingParams(max_tokens=4)) for i in range(10)]
    for seq in seqs:
        scheduler.add(seq)
    runner = FakeRunner(scheduler)
    history = runner.run_to_completion()  # FakeRunner.step asserts the limit every step
    assert max(len(out.seqs) for out in history) == 3
    assert all(seq.output_token_ids == reference_output(seq.prompt_token_ids, 4) for seq in seqs)


def test_mixed_length_workload_keeps_the_cache_busy_and_outputs_exact():
    rng = random.Random(0)
    scheduler = make_scheduler(num_blocks=48, block_size=8, max_num_seqs=16, max_num_batched_tokens=64)
    runner = FakeRunner(scheduler)
    seqs = []
    for i in range(40):
        prompt = [rng.randrange(1, 50) for _ in range(rng.randrange(1, 120))]
        seqs.append(Sequence(i, prompt, SamplingParams(max_tokens=rng.randrange(1, 40))))
        scheduler.add(seqs[-1])
    usage_with_backlog, num_preempted = [], 0
    while scheduler.has_unfinished():
        backlog = scheduler.num_waiting > 0
        out, _ = runner.step()
        num_preempted += len(out.preempted)
        if backlog:
            usage_with_backlog.append(scheduler.block_manager.usage)
    for seq in seqs:
        assert seq.output_token_ids == reference_output(seq.prompt_token_ids, seq.sampling_params.max_tokens)
    assert scheduler.block_manager.usage == 0.0
    assert num_preempted > 0  # the workload does stress the cache
    # While requests queue, the cache is mostly in use (whole prompts are reserved at admission).
    assert sum(usage_with_backlog) / len(usage_with_backlog) > 0.75


def test_prompt_that_can_never_fit_is_rejected_at_add():
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_model_len=100)
    with pytest.raises(ValueError, match="17 tokens needs 5 KV cache blocks of 4 tokens, but only 4 exist"):
        scheduler.add(Sequence(1, list(range(17))))
    with pytest.raises(ContextLengthError, match="100 tokens, but max_model_len is 100"):
        make_scheduler(max_model_len=100).add(Sequence(2, list(range(100))))
    scheduler.add(Sequence(3, list(range(16))))  # fills the cache exactly: one token, then "length"
    runner = FakeRunner(scheduler)
    runner.run_to_completion()


def test_sequence_longer_than_the_cache_finishes_with_length():
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    seq = Sequence(1, [1, 2, 3], SamplingParams(max_tokens=None))
    scheduler.add(seq)
    FakeRunner(scheduler).run_to_completion()
    assert len(seq) == 17 and seq.finish_reason == "length"


def run_scripted(params: SamplingParams, script: list[int], max_model_len: int = 4096) -> Sequence:
    scheduler = make_scheduler(max_model_len=max_model_len)
    seq = Sequence(1, [1, 2, 3], params)
    scheduler.add(seq)
    tokens = iter(script)
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        scheduler.update_from_output(out, [next(tokens)])
    return seq


@pytest.mark.parametrize("params, script, expected, reason", [
    (SamplingParams(max_tokens=5), [7, 8, EOS, 9], [7, 8, EOS], "stop"),
    (SamplingParams(max_tokens=5, min_tokens=4), [EOS, 8, EOS, 9, EOS], [EOS, 8, EOS, 9, EOS], "length"),
    (SamplingParams(max_tokens=9, min_tokens=2), [EOS, 8, EOS, 9], [EOS, 8, EOS], "stop"),
    (SamplingParams(max_tokens=5, ignore_eos=True), [EOS, EOS, 7, 7, 7, 7], [EOS, EOS, 7, 7, 7], "length"),
    (SamplingParams(max_tokens=5, stop_token_ids=[42]), [7, 42, 7], [7, 42], "stop"),
    (SamplingParams(max_tokens=3), [7, 7, EOS, 7], [7, 7, EOS], "length"),  # length wins, as in vLLM
])
def test_finishing_rules(params, script, expected, reason):
    seq = run_scripted(params, script)
    assert seq.output_token_ids == expected
    assert seq.finish_reason == reason


def test_max_model_len_caps_prompt_plus_output():
    seq = run_scripted(SamplingParams(max_tokens=None), [7] * 10, max_model_len=8)
    assert len(seq) == 8 and seq.finish_reason == "length"


def test_stop_string_hook_and_logprobs_storage():
    scheduler = make_scheduler()
    seq = Sequence(1, [1, 2, 3], SamplingParams(max_tokens=10, logprobs=1))
    scheduler.add(seq)
    out = scheduler.schedule()
    assert scheduler.update_from_output(out, [7], [{7: -0.5, 8: -1.0}]) == []
    assert seq.output_logprobs == [{7: -0.5, 8: -1.0}]
    # The caller found a stop string in the detokenized text.
    scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
    assert seq.finish_reason == "stop" and not seq.block_table
    assert scheduler.block_manager.usage == 0.0 and not scheduler.has_unfinished()


def test_repeated_prompt_hits_the_prefix_cache():
    scheduler = make_scheduler(block_size=4)
    runner = FakeRunner(scheduler)
    prompt = list(range(1, 23))
    first = Sequence(1, prompt, SamplingParams(max_tokens=2))
    scheduler.add(first)
    runner.run_to_completion()
    second = Sequence(2, prompt, SamplingParams(max_tokens=2))
    scheduler.add(second)
    out, _ = runner.step()
    assert out.num_scheduled_tokens == [2]  # 20 of 22 prompt tokens came from the cache
    runner.run_to_completion()
    assert second.output_token_ids == first.output_token_ids
    assert scheduler.block_manager.num_prefix_cache_hits == 20
    assert scheduler.block_manager.num_prefix_cache_queries == 44


def test_token_budget_below_max_num_seqs_is_rejected():
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= max_num_seqs"):
        make_scheduler(max_num_seqs=8, max_num_batched_tokens=4)
