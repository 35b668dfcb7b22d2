"""The first two decoder layers of the real SmolLM2-135M (under its lm_head) with calibration and held-out text."""

import torch

from slimserve.eval.datasets import load_text
from slimserve.models.loader import load_model, load_tokenizer


def smollm2_two_layers(num_calib: int = 4, calib_len: int = 256) -> tuple:
    """(model, calibration sequences from SOTU before 1990, 2 held-out sequences of 256 tokens from 1990 on)."""
    model = load_model("smollm2-135m", torch.float32)
    model.model.layers = model.model.layers[:2]
    tokenizer = load_tokenizer("smollm2-135m")
    calib_ids = tokenizer.encode(load_text("sotu-calib")[:20000], add_special_tokens=False)
    eval_ids = tokenizer.encode(load_text("sotu")[:8000], add_special_tokens=False)
    calib = [torch.tensor(calib_ids[i * calib_len:(i + 1) * calib_len]) for i in range(num_calib)]
    held_out = [torch.tensor(eval_ids[i * 256:(i + 1) * 256]) for i in range(2)]
    return model, calib, held_out
