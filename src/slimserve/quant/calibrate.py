"""Calibration data: random, non-overlapping windows of a text the model is not evaluated on.

The default text is "sotu-calib", the State of the Union addresses before 1990; evaluation uses
those from 1990 on (eval/datasets.py), so calibration never sees an evaluation token.
"""

import torch
from torch import Tensor

from slimserve.eval.datasets import load_text
from slimserve.tokenizer import Tokenizer


def calibration_batches(
    tokenizer: Tokenizer, dataset: str = "sotu-calib", *, num_samples: int, seq_len: int, seed: int = 0
) -> list[Tensor]:
    """num_samples windows of seq_len token ids (1-D int64 tensors), drawn without overlap.

    The text is tokenized once and cut into consecutive windows after a random offset; a seeded
    random subset of them is returned, so the same seed gives the same batches.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 tokens, got {seq_len}")
    token_ids = tokenizer.encode_corpus(load_text(dataset))
    needed = num_samples * seq_len
    if len(token_ids) < needed:
        raise ValueError(
            f"calibration text {dataset!r} has {len(token_ids)} tokens, fewer than num_samples x seq_len = "
            f"{num_samples} x {seq_len} = {needed}; ask for fewer or shorter samples, or use a larger text"
        )
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor(token_ids, dtype=torch.long)
    num_windows = len(ids) // seq_len
    offset = int(torch.randint(0, len(ids) - num_windows * seq_len + 1, (1,), generator=generator))
    windows = ids[offset : offset + num_windows * seq_len].view(num_windows, seq_len)
    chosen = torch.randperm(num_windows, generator=generator)[:num_samples]
    return [windows[i].clone() for i in chosen.tolist()]
