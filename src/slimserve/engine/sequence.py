"""A request's token stream and its place in the paged KV cache."""
import time
from enum import Enum, auto

from slimserve.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()  # holds no KV blocks: new, or preempted and to be recomputed
    RUNNING = auto()  # holds KV blocks for all of its tokens; prefilling or decoding
    FINISHED_STOPPED = auto()  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = auto()  # max_tokens or the context length reached
    FINISHED_ABORTED = auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}


class Sequence:
    """One generated continuation of a prompt (a request with n > 1 has n sequences).

    Work is counted as in vLLM v1: the tokens token_ids[num_computed_tokens:] have no KV yet.
    While prefilling (possibly in chunks) that is the rest of the prompt; while decoding it is the
    one token sampled last step. block_table[i] holds the KV of tokens [i*B, (i+1)*B), B the block size.
    """

    def __init__(self, seq_id: int, prompt_token_ids: list[int], sampling_params: SamplingParams | None = None,
                 request_id: str | None = None, arrival_time: float | None = None):
        if not prompt_token_ids:
            raise ValueError(f"prompt_token_ids must not be empty, got {prompt_token_ids!r}")
        self.seq_id = seq_id
        self.request_id = str(seq_id) if request_id is None else request_id
        self.sampling_params = SamplingParams() if sampling_params is None else sampling_params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = SequenceStatus.WAITING
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        # Chained prefix hashes of the full blocks of token_ids, filled lazily by the block manager.
        # They depend only on the tokens, so they survive preemption.
        self.block_hashes: list[int] = []
        # Per output token: {token id: raw logprob} for the sampled token and the top-N alternatives.
        self.output_logprobs: list[dict[int, float]] = []
        # Per prompt token (None for the first): filled by the model runner when prompt_logprobs is set.
        self.prompt_logprobs: list[dict[int, float] | None] = []

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (f"Sequence(seq_id={self.seq_id}, status={self.status.name}, num_tokens={len(self)}, "
                f"num_computed_tokens={self.num_computed_tokens}, block_table={self.block_table})")

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason: "stop", "length" or "abort"; None while unfinished."""
        return _FINISH_REASONS.get(self.status)

    def append_token(self, token_id: int, logprobs: dict[int, float] | None = None) -> None:
        self.token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)
