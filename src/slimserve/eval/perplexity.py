"""Perplexity under the fixed protocol of DESIGN.md, so numbers compare across runs and tools.

Tokenize the whole text once; cut non-overlapping windows of min(2048, context) tokens; drop the
final partial window; mean NLL over every predicted token (window_len - 1 per window);
ppl = exp(mean).
"""

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from slimserve.models.attention import AttentionMetadata

MAX_WINDOW = 2048
LOGITS_CHUNK = 512  # positions per lm_head call: bounds logits memory to 512 × vocab floats


@dataclass
class PerplexityResult:
    ppl: float
    mean_nll: float
    num_tokens: int  # tokens of the whole text
    num_windows: int
    window: int
    num_predicted: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.num_windows * self.window / self.seconds


def window_size(max_position_embeddings: int) -> int:
    return min(MAX_WINDOW, max_position_embeddings)


@torch.inference_mode()
def window_nll(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Summed NLL (float64 scalar) of tokens 1..T-1 of one window (T,) given their prefixes."""
    T = window.shape[0]
    hidden = model(window, torch.arange(T), AttentionMetadata.without_cache([T]))
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, T - 1, LOGITS_CHUNK):
        end = min(start + LOGITS_CHUNK, T - 1)
        logits = model.compute_logits(hidden[start:end])
        total += F.cross_entropy(logits, window[start + 1 : end + 1], reduction="sum").double()
    return total


def perplexity(model: nn.Module, token_ids: list[int], window: int, max_windows: int | None = None,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of `model` on a tokenized text; `max_windows` evaluates only the first windows."""
    num_windows = len(token_ids) // window
    if num_windows == 0:
        raise ValueError(f"the text has {len(token_ids)} tokens, fewer than one window of {window}")
    if max_windows is not None:
        num_windows = min(num_windows, max_windows)
    ids = torch.tensor(token_ids[: num_windows * window]).view(num_windows, window)
    total_nll = 0.0
    start = time.perf_counter()
    for w in tqdm(range(num_windows), desc="perplexity", unit="window", disable=not progress):
        total_nll += window_nll(model, ids[w]).item()
    seconds = time.perf_counter() - start
    num_predicted = num_windows * (window - 1)
    mean_nll = total_nll / num_predicted
    return PerplexityResult(math.exp(mean_nll), mean_nll, len(token_ids), num_windows, window, num_predicted, seconds)
