"""Who runs this step: continuous batching with chunked prefill, preemption and abort."""
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field

from slimserve.engine.block_manager import BlockManager
from slimserve.engine.sequence import Sequence, SequenceStatus
from slimserve.errors import ContextLengthError


@dataclass
class SchedulerOutput:
    """One step's flat batch: seqs[i] computes its tokens [num_computed_tokens, +num_scheduled_tokens[i])."""
    seqs: list[Sequence] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)  # lost their blocks; recomputed later

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    def add(self, seq: Sequence, num_tokens: int) -> None:
        assert 0 < num_tokens <= len(seq) - seq.num_computed_tokens, (seq, num_tokens)
        self.seqs.append(seq)
        self.num_scheduled_tokens.append(num_tokens)


class Scheduler:
    """FCFS continuous batching under max_num_seqs and a token budget of max_num_batched_tokens per step.

    A running sequence holds blocks for all its tokens: the whole prompt is reserved at admission,
    so a prefill split into chunks never waits for blocks; decodes grow one block at a time and
    preempt the newest running sequence when none is free.
    """

    def __init__(self, *, num_blocks: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: Collection[int], enable_prefix_caching: bool = True):
        for name, value in [("max_num_seqs", max_num_seqs), ("max_model_len", max_model_len)]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if max_num_batched_tokens < max_num_seqs:  # else some decodes could starve every step
            raise ValueError(f"max_num_batched_tokens must be >= max_num_seqs ({max_num_seqs}), "
                             f"got {max_num_batched_tokens}")
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        # The last sampled token needs no KV slot, so a sequence may be one token longer than the cache.
        # Capping here means a sequence alone in the cache can always grow: preemption never livelocks.
        self.max_seq_len = min(max_model_len, num_blocks * block_size + 1)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is preempted first

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        num_tokens = len(seq)
        if num_tokens >= self.max_model_len:
            raise ContextLengthError(f"prompt has {num_tokens} tokens, but max_model_len is {self.max_model_len} "
                                     "(prompt and output together)")
        num_needed = self.block_manager.num_blocks_for(num_tokens)
        if num_needed > self.block_manager.num_blocks:
            raise ValueError(f"prompt of {num_tokens} tokens needs {num_needed} KV cache blocks of "
                             f"{self.block_manager.block_size} tokens, but only {self.block_manager.num_blocks} exist")
        assert seq.status is SequenceStatus.WAITING and not seq.block_table, seq
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # 1. Decodes first: one token each, a new block when the last one is full.
        for seq in [s for s in self.running if len(s) - s.num_computed_tokens == 1]:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted for an older decode in this loop
            while not self.block_manager.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    assert self.running, "a sequence alone in the cache must fit (see max_seq_len)"
                    break
            else:
                self.block_manager.may_append(seq)
                out.add(seq, 1)
                budget -= 1
        # 2. Chunks of running prefills (their blocks are reserved), oldest first.
        for seq in self.running:
            num_new = len(seq) - seq.num_computed_tokens
            if num_new > 1 and budget > 0:
                out.add(seq, min(num_new, budget))
                budget -= out.num_scheduled_tokens[-1]
        # 3. Admit waiting sequences, FCFS (a sequence preempted above is first, so it waits for its blocks).
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.add(seq, min(len(seq) - seq.num_computed_tokens, budget))
            budget -= out.num_scheduled_tokens[-1]
        assert budget >= 0
        return out

    def update_from_output(self, out: SchedulerOutput, sampled_token_ids: list[int],
                           sampled_logprobs: list[dict[int, float] | None] | None = None) -> list[Sequence]:
        """Advance each scheduled sequence past its computed tokens and append its sampled token.

        sampled_token_ids[i] (and sampled_logprobs[i], e.g. SamplerOutput's fields) belong to
        out.seqs[i]; a sequence whose prefill is still incomplete ignores them. Returns the sequences
        that finished. Stop strings need text: the caller detokenizes the new token and calls
        finish(seq, SequenceStatus.FINISHED_STOPPED) on a match.
        """
        assert len(sampled_token_ids) == len(out.seqs)
        if sampled_logprobs is None:
            sampled_logprobs = [None] * len(out.seqs)
        finished = []
        for seq, num_tokens, token_id, logprobs in zip(out.seqs, out.num_scheduled_tokens, sampled_token_ids,
                                                       sampled_logprobs):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            num_computed_before = seq.num_computed_tokens
            seq.num_computed_tokens += num_tokens
            self.block_manager.cache_full_blocks(seq, num_computed_before)
            if seq.num_computed_tokens < len(seq):
                continue
            seq.append_token(token_id, logprobs)
            status = self._check_stop(seq)
            if status is not None:
                self.finish(seq, status)
                finished.append(seq)
        return finished

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """End seq (stopped, length, aborted) wherever it is and free its blocks."""
        assert status.is_finished and not seq.is_finished, (seq, status)
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        else:
            self.waiting.remove(seq)
        seq.status = status

    def abort(self, request_id: str) -> list[Sequence]:
        """Abort every unfinished sequence of request_id; returns them."""
        seqs = [seq for seq in (*self.waiting, *self.running) if seq.request_id == request_id]
        for seq in seqs:
            self.finish(seq, SequenceStatus.FINISHED_ABORTED)
        return seqs

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and requeue it first; its KV is recomputed (mostly prefix-cache hits)."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _check_stop(self, seq: Sequence) -> SequenceStatus | None:
        """vLLM's order: length first; EOS and stop token ids only once min_tokens are out."""
        params = seq.sampling_params
        if len(seq) >= self.max_seq_len or (params.max_tokens is not None
                                            and seq.num_output_tokens >= params.max_tokens):
            return SequenceStatus.FINISHED_LENGTH
        if seq.num_output_tokens < params.min_tokens:
            return None
        token_id = seq.token_ids[-1]
        if (not params.ignore_eos and token_id in self.eos_token_ids) or token_id in params.stop_token_ids:
            return SequenceStatus.FINISHED_STOPPED
        return None
