"""One sequence at a time with a KV cache: the simple path behind `slimserve generate`.

It drives the same model and PagedAttention as the batched engine, with one sequence whose block
table is simply 0, 1, 2, ...: prefill the prompt in one forward pass, then one token per step.
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from slimserve.engine.sampler import sample
from slimserve.engine.sampling_params import SamplingParams
from slimserve.errors import ContextLengthError
from slimserve.models.attention import AttentionMetadata
from slimserve.tokenizer import Tokenizer

BLOCK_SIZE = 16


@dataclass
class GenerationProfile:
    """Where the time of one generation went (seconds), as `--profile` prints it."""

    tokenize_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    detokenize_s: float = 0.0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0

    def table(self) -> str:
        decode_steps = max(self.num_generated_tokens - 1, 0)  # the first token comes from prefill
        rows = [
            ("tokenize", self.tokenize_s, ""),
            ("prefill", self.prefill_s, f"{self.num_prompt_tokens / self.prefill_s:.1f} tok/s" if self.prefill_s else ""),
            ("decode", self.decode_s, f"{decode_steps / self.decode_s:.1f} tok/s" if self.decode_s else ""),
            ("detokenize", self.detokenize_s, ""),
        ]
        lines = ["| stage | ms | rate |", "|---|---|---|"]
        lines += [f"| {name} | {seconds * 1e3:.1f} | {rate} |" for name, seconds, rate in rows]
        return "\n".join(lines)


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or stop token) or "length"
    profile: GenerationProfile = field(default_factory=GenerationProfile)


class Generator:
    def __init__(self, model: nn.Module, tokenizer: Tokenizer, max_model_len: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len or model.max_model_len
        weight = next(model.parameters())
        self.dtype, self.device = weight.dtype, weight.device

    def check_prompt(self, num_prompt_tokens: int) -> None:
        if num_prompt_tokens == 0:
            raise ValueError("the prompt is empty")
        if num_prompt_tokens >= self.max_model_len:
            raise ContextLengthError(f"the prompt has {num_prompt_tokens} tokens; this model's context is "
                                     f"{self.max_model_len} tokens, including at least one generated token")

    def stop_token_ids(self, params: SamplingParams) -> set[int]:
        return set(params.stop_token_ids) | (set() if params.ignore_eos else self.tokenizer.eos_token_ids)

    @torch.inference_mode()
    def stream(self, prompt_ids: list[int], params: SamplingParams, profile: GenerationProfile | None = None
               ) -> Iterator[int]:
        """Yields sampled token ids; stops at EOS / stop token ids, max_tokens or the context limit."""
        self.check_prompt(len(prompt_ids))
        profile = profile or GenerationProfile()
        profile.num_prompt_tokens = len(prompt_ids)
        max_new = self.max_model_len - len(prompt_ids)
        if params.max_tokens is not None:
            max_new = min(max_new, params.max_tokens)
        num_blocks = -(-(len(prompt_ids) + max_new) // BLOCK_SIZE)
        kv_cache = torch.zeros(self.model.kv_cache_shape(num_blocks, BLOCK_SIZE), dtype=self.dtype, device=self.device)
        block_table = torch.arange(num_blocks, device=self.device)[None]
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        stop_ids = self.stop_token_ids(params)
        output_ids: list[int] = []
        new_ids, start = prompt_ids, 0
        while len(output_ids) < max_new:
            tick = time.perf_counter()
            end = start + len(new_ids)
            meta = AttentionMetadata(cu_seqlens_q=[0, len(new_ids)], context_lens=[end],
                                     slot_mapping=torch.arange(start, end, device=self.device),
                                     block_tables=block_table, kv_cache=kv_cache, num_decode_seqs=int(start > 0))
            ids = torch.tensor(new_ids, device=self.device)
            hidden = self.model(ids, torch.arange(start, end, device=self.device), meta)
            logits = self.model.compute_logits(hidden[-1:])
            token = sample(logits, [params], [output_ids], [prompt_ids], [generator],
                           self.tokenizer.eos_token_ids).token_ids[0]
            elapsed = time.perf_counter() - tick
            if start == 0:
                profile.prefill_s += elapsed
            else:
                profile.decode_s += elapsed
            output_ids.append(token)
            profile.num_generated_tokens += 1
            yield token
            if token in stop_ids and len(output_ids) >= params.min_tokens:
                return
            new_ids, start = [token], end

    def generate(self, prompt: str | list[int], params: SamplingParams,
                 on_text: Callable[[str], None] | None = None) -> GenerationResult:
        """Generate for a prompt (text or token ids); `on_text` receives text as it is decoded."""
        profile = GenerationProfile()
        tick = time.perf_counter()
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        profile.tokenize_s = time.perf_counter() - tick
        decoder = self.tokenizer.decode_stream()
        token_ids: list[int] = []
        for token in self.stream(prompt_ids, params, profile):
            token_ids.append(token)
            if on_text is not None:
                tick = time.perf_counter()
                piece = decoder.step(token)
                profile.detokenize_s += time.perf_counter() - tick
                if piece:
                    on_text(piece)
        finish_reason = "stop" if token_ids and token_ids[-1] in self.stop_token_ids(params) else "length"
        tick = time.perf_counter()
        text = self.tokenizer.decode(token_ids)
        profile.detokenize_s += time.perf_counter() - tick
        return GenerationResult(token_ids, text, finish_reason, profile)
