"""Requests in, outputs out: schedule, run, update, detokenize — one step at a time."""
import itertools
import time
from dataclasses import dataclass, replace

from slimserve.config import EngineConfig
from slimserve.engine.model_runner import ModelRunner
from slimserve.engine.sampling_params import SamplingParams
from slimserve.engine.scheduler import Scheduler, SchedulerOutput
from slimserve.engine.sequence import Sequence, SequenceStatus
from slimserve.models.loader import load_tokenizer
from slimserve.tokenizer import StreamDecoder


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None  # per token when SamplingParams.logprobs is set
    finish_reason: str | None  # "stop", "length", "abort"; None while running


@dataclass
class RequestOutput:
    """A request's state after a step. text and token_ids are cumulative, and text only ever grows:
    while a sequence runs, the tail that could still begin a stop string is held back."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, float] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    arrival_time: float  # time.monotonic() seconds
    first_scheduled_time: float | None  # end of queueing


@dataclass
class EngineStats:
    """Gauges now and totals since start-up, for the server's Prometheus metrics."""
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks held by sequences
    num_prompt_tokens: int  # total, counted once per request when its first token is out
    num_generation_tokens: int
    num_preemptions: int
    prefix_cache_queries: int  # tokens looked up in the prefix cache
    prefix_cache_hits: int  # tokens found there


class SequenceText:
    """A sequence's incrementally decoded text, cut at the first stop string."""

    def __init__(self, seq: Sequence, decoder: StreamDecoder):
        self.seq = seq
        self.decoder = decoder
        self.text = ""
        self.num_decoded = 0  # output tokens already fed to the decoder
        self.holdback = max((len(s) for s in seq.sampling_params.stop), default=1) - 1

    def update(self) -> bool:
        """Decode the new output tokens; True if a stop string appeared (text is then cut before it)."""
        new_ids = self.seq.output_token_ids[self.num_decoded:]
        self.num_decoded += len(new_ids)
        if self.seq.finish_reason == "stop":  # by EOS or a stop token id, whose text is not output
            new_ids = new_ids[:-1]
        search_from = max(0, len(self.text) - self.holdback)
        self.text += "".join(self.decoder.step(token_id) for token_id in new_ids)
        stops = [i for i in (self.text.find(s, search_from) for s in self.seq.sampling_params.stop) if i >= 0]
        if stops:
            self.text = self.text[:min(stops)]
        return bool(stops)

    def output(self, index: int) -> CompletionOutput:
        seq = self.seq
        text = self.text if seq.is_finished else self.text[:max(0, len(self.text) - self.holdback)]
        logprobs = list(seq.output_logprobs) if seq.sampling_params.logprobs is not None else None
        return CompletionOutput(index, text, seq.output_token_ids, logprobs, seq.finish_reason)


@dataclass
class Request:
    request_id: str
    prompt: str | None
    texts: dict[int, SequenceText]  # by seq_id, in completion index order
    pending: list[Sequence]  # completions 1..n-1 until completion 0 has its first token
    first_scheduled_time: float | None = None

    @property
    def first(self) -> Sequence:
        return next(iter(self.texts.values())).seq

    @property
    def finished(self) -> bool:
        return not self.pending and all(t.seq.is_finished for t in self.texts.values())

    def output(self) -> RequestOutput:
        first = self.first
        prompt_logprobs = list(first.prompt_logprobs) if first.sampling_params.prompt_logprobs is not None else None
        return RequestOutput(self.request_id, self.prompt, first.prompt_token_ids, prompt_logprobs,
                             [t.output(i) for i, t in enumerate(self.texts.values())], self.finished,
                             first.arrival_time, self.first_scheduled_time)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.tokenizer = load_tokenizer(config.model)
        self.model_runner = ModelRunner(config, self.tokenizer.eos_token_ids)
        self.scheduler = Scheduler(num_blocks=self.model_runner.num_blocks, block_size=config.block_size,
                                   max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   max_model_len=self.model_runner.max_model_len,
                                   enable_prefix_caching=config.enable_prefix_caching,
                                   eos_token_ids=self.tokenizer.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.seq_ids = itertools.count()
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_preemptions = 0

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Queue a request; n > 1 makes n sequences that share the prompt's KV through the prefix cache."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not prompt_ids:
            raise ValueError(f"prompt must not be empty, got {prompt!r}")
        vocab_size = self.model_runner.vocab_size
        for field_name, token_ids in (("prompt", prompt_ids), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in token_ids if not (isinstance(t, int) and 0 <= t < vocab_size)]
            if bad:  # out of range ids would fail the whole step, and every request in it
                raise ValueError(f"{field_name} token ids must be ints in [0, {vocab_size}), got {bad[:5]}")
        seqs = []
        for i in range(params.n):
            # vLLM's convention: completion i of a seeded request samples with seed + i. Prompt
            # logprobs come from completion 0 (the others skip the prompt through the prefix cache).
            seq_params = params if i == 0 else replace(params, prompt_logprobs=None,
                                                       seed=None if params.seed is None else params.seed + i)
            seqs.append(Sequence(next(self.seq_ids), prompt_ids, seq_params, request_id))
        self.scheduler.add(seqs[0])  # raises ContextLengthError for a prompt that does not fit
        # Siblings join once the first sequence has computed the prompt, so they hit its cached blocks.
        self.requests[request_id] = Request(request_id, prompt if isinstance(prompt, str) else None,
                                            {seq.seq_id: SequenceText(seq, self.tokenizer.decode_stream())
                                             for seq in seqs}, seqs[1:])

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks; unknown or finished ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.model_runner.free(self.scheduler.abort(request_id))

    def warm_up(self) -> None:
        """Compile what compile=True compiles before the first request (a no-op otherwise)."""
        self.model_runner.warm_up()

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        """One forward pass over the scheduled batch; outputs of the requests that advanced."""
        scheduled = self.scheduler.schedule()
        now = time.monotonic()
        for seq in scheduled.seqs:  # queue time ends here, before this step's prefill runs
            request = self.requests[seq.request_id]
            request.first_scheduled_time = request.first_scheduled_time or now
        sampled = self.model_runner.execute(scheduled)
        num_outputs_before = [seq.num_output_tokens for seq in scheduled.seqs]
        self.scheduler.update_from_output(scheduled, sampled.token_ids, sampled.logprobs)
        self.num_preemptions += len(scheduled.preempted)
        return self._process(scheduled, num_outputs_before)

    def _process(self, scheduled: SchedulerOutput, num_outputs_before: list[int]) -> list[RequestOutput]:
        """Detokenize new tokens, apply stop strings, admit siblings, and report requests that advanced."""
        advanced: dict[str, Request] = {}
        for seq, num_before in zip(scheduled.seqs, num_outputs_before):
            request = self.requests[seq.request_id]
            if seq.num_output_tokens == num_before:
                continue  # a prefill chunk that did not reach the prompt's end
            self.num_generation_tokens += 1
            if request.texts[seq.seq_id].update():
                if seq.is_finished:  # by length, on the very token that completed the stop string
                    seq.status = SequenceStatus.FINISHED_STOPPED
                else:
                    self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
            if seq.is_finished:
                self.model_runner.free([seq])
            if num_before == 0 and seq is request.first:
                self.num_prompt_tokens += seq.num_prompt_tokens
                for sibling in request.pending:
                    self.scheduler.add(sibling)
                request.pending.clear()
            advanced[seq.request_id] = request
        outputs = [request.output() for request in advanced.values()]
        for output in outputs:
            if output.finished:
                del self.requests[output.request_id]
        return outputs

    def stats(self) -> EngineStats:
        manager = self.scheduler.block_manager
        return EngineStats(self.scheduler.num_running, self.scheduler.num_waiting, manager.usage,
                           self.num_prompt_tokens, self.num_generation_tokens, self.num_preemptions,
                           manager.num_prefix_cache_queries, manager.num_prefix_cache_hits)
