"""Next-token sampling for a batch: penalties, temperature, min-p, top-k, top-p, exponential race."""
from collections.abc import Collection
from dataclasses import dataclass

import torch

from slimserve.engine.sampling_params import SamplingParams


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per sequence: {token id: logprob} for the sampled token and the top-N tokens, None when
    # logprobs was not requested. These are raw model logprobs (log_softmax of the logits before
    # penalties, temperature and truncation), like vLLM's default logprobs mode "raw_logprobs".
    logprobs: list[dict[int, float] | None]


def sample(logits: torch.Tensor, sampling_params: list[SamplingParams], output_token_ids: list[list[int]],
           prompt_token_ids: list[list[int]], generators: list[torch.Generator | None],
           eos_token_ids: Collection[int] = ()) -> SamplerOutput:
    """Pick one token per row of logits (S, V) float32; the other arguments hold one entry per row.

    generators[i] draws row i's noise (None: torch's default generator). A seeded sequence with its
    own generator gets the same tokens whatever else is in the batch.
    """
    S = logits.shape[0]
    assert logits.dtype == torch.float32, logits.dtype
    assert len(sampling_params) == len(output_token_ids) == len(prompt_token_ids) == len(generators) == S
    processed = apply_penalties(logits, sampling_params, output_token_ids, prompt_token_ids, eos_token_ids)
    token_ids = processed.argmax(dim=-1)
    if not all(p.is_greedy for p in sampling_params):
        is_greedy = torch.tensor([p.is_greedy for p in sampling_params], device=logits.device)
        probs = sampling_probs(processed, sampling_params)
        noise = torch.empty_like(probs).exponential_()
        for i, generator in enumerate(generators):
            if generator is not None:
                noise[i].exponential_(generator=generator)
        # argmax(p / E), E ~ Exp(1) i.i.d., picks token i with probability p_i (Gumbel-max in disguise).
        # The clamp keeps a zero draw from turning a forbidden token's 0 / 0 into a NaN that argmax picks.
        random_ids = probs.div(noise.clamp_min_(1e-20)).argmax(dim=-1)
        token_ids = torch.where(is_greedy, token_ids, random_ids)

    logprobs: list[dict[int, float] | None] = [None] * S
    rows = [i for i, p in enumerate(sampling_params) if p.logprobs is not None]
    if rows:
        row_index = torch.tensor(rows, device=logits.device)
        entries = _logprob_entries(logits[row_index].log_softmax(dim=-1), token_ids[row_index],
                                   [sampling_params[i].logprobs for i in rows])
        for i, entry in zip(rows, entries):
            logprobs[i] = entry
    return SamplerOutput(token_ids=token_ids.tolist(), logprobs=logprobs)


def apply_penalties(logits: torch.Tensor, sampling_params: list[SamplingParams], output_token_ids: list[list[int]],
                    prompt_token_ids: list[list[int]], eos_token_ids: Collection[int] = ()) -> torch.Tensor:
    """Repetition, presence and frequency penalties (vLLM / OpenAI), and min_tokens; (S, V) -> (S, V).

    repetition_penalty r divides positive logits and multiplies negative ones of every token in
    the prompt or output; logit -= frequency_penalty * count + presence_penalty * (count > 0) over
    output tokens. Before min_tokens outputs exist, EOS and stop_token_ids are impossible.
    """
    V = logits.shape[1]
    device = logits.device
    if any(p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
           for p in sampling_params):
        output_counts = _token_counts(output_token_ids, V, device)
        if any(p.repetition_penalty != 1.0 for p in sampling_params):
            repetition = torch.tensor([p.repetition_penalty for p in sampling_params], device=device)[:, None]
            seen = (output_counts > 0) | (_token_counts(prompt_token_ids, V, device) > 0)
            logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
        presence = torch.tensor([p.presence_penalty for p in sampling_params], device=device)[:, None]
        frequency = torch.tensor([p.frequency_penalty for p in sampling_params], device=device)[:, None]
        logits = logits - frequency * output_counts - presence * (output_counts > 0)

    rows, cols = [], []
    for i, p in enumerate(sampling_params):
        if len(output_token_ids[i]) < p.min_tokens:
            stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
            rows += [i] * len(stop_ids)
            cols += sorted(stop_ids)
    if rows:
        index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
        logits = logits.index_put(index, torch.tensor(float("-inf"), device=device))
    return logits


def sampling_probs(logits: torch.Tensor, sampling_params: list[SamplingParams]) -> torch.Tensor:
    """The distribution a non-greedy row samples from: temperature, then min-p, top-k, top-p (vLLM's
    order); (S, V) -> (S, V) probabilities. Greedy rows are computed at temperature 1."""
    V = logits.shape[1]
    device = logits.device
    temperature = torch.tensor([p.temperature if not p.is_greedy else 1.0 for p in sampling_params], device=device)
    logits = logits / temperature[:, None]
    if any(p.min_p > 0.0 for p in sampling_params):
        min_p = torch.tensor([p.min_p for p in sampling_params], device=device)[:, None]
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    if any(0 < p.top_k < V or p.top_p < 1.0 for p in sampling_params):
        top_k = torch.tensor([p.top_k if 0 < p.top_k < V else V for p in sampling_params], device=device)
        top_p = torch.tensor([p.top_p for p in sampling_params], device=device)[:, None]
        sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
        sorted_logits = sorted_logits.masked_fill(torch.arange(V, device=device) >= top_k[:, None], float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # Keep the smallest prefix whose mass reaches top_p; top_p == 1 keeps all (cumsum can round past 1).
        cut = (mass_before > top_p) & (top_p < 1.0)
        logits = torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits.masked_fill(cut, float("-inf")))
    return logits.softmax(dim=-1)


def prompt_logprobs(logits: torch.Tensor, next_token_ids: list[int], num_logprobs: int) -> list[dict[int, float]]:
    """Raw logprobs of prompt tokens: logits (T, V) float32 at positions t, next_token_ids[t] the
    prompt token at t + 1. Each entry holds that token and the top num_logprobs alternatives; the
    caller puts None before them for the first prompt token, which nothing predicts."""
    assert logits.dtype == torch.float32 and logits.shape[0] == len(next_token_ids), (logits.shape, logits.dtype)
    targets = torch.tensor(next_token_ids, device=logits.device)
    return _logprob_entries(logits.log_softmax(dim=-1), targets, [num_logprobs] * len(next_token_ids))


def _logprob_entries(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: list[int]) -> list[dict[int, float]]:
    """logprobs (R, V), token_ids (R,): per row {token id: logprob} of token_ids[r] and the top num_top[r]."""
    chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1).tolist()
    top_values, top_ids = logprobs.topk(min(max(num_top), logprobs.shape[1]), dim=-1)
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    entries = []
    for r, (token_id, n) in enumerate(zip(token_ids.tolist(), num_top)):
        entry = dict(zip(top_ids[r][:n], top_values[r][:n]))
        entry[token_id] = chosen[r]
        entries.append(entry)
    return entries


def _token_counts(token_lists: list[list[int]], V: int, device: torch.device) -> torch.Tensor:
    """(S, V) float counts of each token id per row; rows are padded with the out-of-range id V."""
    longest = max((len(tokens) for tokens in token_lists), default=0)
    padded = torch.tensor([tokens + [V] * (longest - len(tokens)) for tokens in token_lists],
                          dtype=torch.long, device=device).reshape(len(token_lists), longest)
    counts = torch.zeros(len(token_lists), V + 1, device=device)
    counts.scatter_add_(1, padded, torch.ones(padded.shape, device=device))
    return counts[:, :V]
