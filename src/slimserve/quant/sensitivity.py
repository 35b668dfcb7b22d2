"""Sensitivity: which parts of a model lose the most perplexity when quantized, one part at a time.

Each group of linears (a decoder layer, or one linear type across all layers, plus lm_head) is
RTN-quantized with its config.for_module scheme while the rest stays in float, the perplexity
is measured, and the originals are put back. The ranking says where mixed precision pays:
keep the top groups at more bits (QuantConfig.modules) and quantize the rest harder.
"""

import re
from typing import NamedTuple

from torch import nn
from tqdm import tqdm

from slimserve.config import QuantConfig
from slimserve.eval.perplexity import perplexity
from slimserve.quant.gptq import replace_module
from slimserve.quant.qlinear import QuantLinear

GROUPINGS = ("layer", "type")


class Sensitivity(NamedTuple):
    name: str  # "model.layers.3" (by layer), "self_attn.q_proj" (by type) or "lm_head"
    delta_ppl_percent: float  # 100 * (ppl with this group quantized / float ppl - 1)


def rank_sensitivity(
    model: nn.Module,
    config: QuantConfig,
    eval_token_ids: list[int],
    window: int,
    max_windows: int | None = None,
    group_by: str = "layer",
    progress: bool = False,
) -> list[Sensitivity]:
    """Groups of `model`'s linears, most sensitive first; `model` is left as it was.

    Perplexity follows eval/perplexity.py over `eval_token_ids` (windows of `window` tokens, the
    first `max_windows`). Linears that config.for_module skips belong to no group.
    """
    if group_by not in GROUPINGS:
        raise ValueError(f"group_by must be one of {GROUPINGS}, got {group_by!r}")
    groups = _groups(model, config, group_by)
    if not groups:
        raise ValueError("config quantizes none of the model's linears: nothing to rank")
    baseline = perplexity(model, eval_token_ids, window, max_windows, progress=False).ppl
    ranking = []
    for group, names in tqdm(groups.items(), desc="sensitivity", unit="group", disable=not progress):
        originals = {name: model.get_submodule(name) for name in names}
        for name, linear in originals.items():
            replace_module(model, name, QuantLinear.from_linear(linear, config.for_module(name)))
        try:
            ppl = perplexity(model, eval_token_ids, window, max_windows, progress=False).ppl
        finally:
            for name, linear in originals.items():
                replace_module(model, name, linear)
        ranking.append(Sensitivity(group, 100 * (ppl / baseline - 1)))
    return sorted(ranking, key=lambda s: s.delta_ppl_percent, reverse=True)


def _groups(model: nn.Module, config: QuantConfig, group_by: str) -> dict[str, list[str]]:
    """Group name -> names of the kept nn.Linear modules in it, in model order."""
    groups: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or config.for_module(name) is None:
            continue
        layer = re.match(r"(.*\.layers\.\d+)\.(.*)", name)
        if layer is None:
            group = name
        else:
            group = layer.group(1) if group_by == "layer" else layer.group(2)
        groups.setdefault(group, []).append(name)
    return groups
