"""AWQ: activation-aware weight quantization by per-channel scaling and weight clipping.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", MLSys 2024 (arXiv:2306.00978). The few
weights fed by large activations matter most; scaling input channel j of W up by s_j (and the
input down by s_j, folded into the op before) shrinks their relative rounding error:
Q(W·diag(s))·(diag(s)⁻¹·X) ≈ W·X. Per layer, for each group of linears sharing an input:
s = mean|x|^α with α on a grid in [0, 1], keeping the α whose quantized block output is closest
to the float one (§3.2), then folding s into the previous RMSNorm or Linear. (AutoAWQ's default,
duo_scaling, divides by mean|w / group max|^(1-α) too; on Qwen2.5-Coder-0.5B at W4 g128 it did
not help: +9.8 % without clipping and +15.8 % with, in a one-off run of quant_report's protocol
with an fp32 compute dtype, where its rows read +9.8 % and +15.4 %.) Then, per linear, each
group's weight range is clipped to the shrink factor minimizing its output error, unless
QuantConfig.awq_clip is off (for the model or per module). Layout, grids and the choices below
follow the reference implementation (AutoAWQ): the block inspected for q/k/v is the whole
attention, for gate/up the whole MLP; q/k are not clipped (their errors pass through the q·kᵀ
product); o_proj is scaled through v_proj only when their shapes match (no grouped-query
attention); the next layer sees the float (scaled) layer's output. benchmarks/awq_reference.py
runs AutoAWQ's own quantizer beside this one on the same weights, calibration and harness.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from slimserve.config import QuantConfig
from slimserve.models.attention import AttentionMetadata
from slimserve.quant.gptq import (
    GATE_UP,
    QKV,
    CalibrationChunk,
    check_llama,
    embed_calibration,
    layer_stages,
    replace_module,
)
from slimserve.quant.qlinear import QuantLinear
from slimserve.quant.rtn import dequantize_weight, quantize_weight
from slimserve.quant.smoothquant import fold_scales

SCALE_GRID = 20  # α in {0, 1/20, ..., 1}; α = 0 is plain RTN, so the search never does worse on calibration
CLIP_GRID = 20  # clip to max|w| · (1 - i/20) ...
CLIP_MAX_SHRINK = 0.5  # ... for i < 0.5 · 20
# Tokens whose block output the scale search compares (the block runs 21 times per group); on
# 4 SmolLM2 layers, 512 instead of 4096 changed the output error by < 5 % at an eighth of the time.
SEARCH_TOKENS = 512
CLIP_TOKENS = 512  # calibration tokens the clip search reads
CLIP_ROWS = 1024  # output channels per clip-search step, bounding its (groups, tokens, rows) products
NOT_CLIPPED = ("self_attn.q_proj", "self_attn.k_proj")

Block = Callable[[Tensor, CalibrationChunk], Tensor]


def awq_quantize(
    model: nn.Module,
    calib_batches: list[Tensor],
    config: QuantConfig,
    progress: bool = False,
    search_tokens: int = SEARCH_TOKENS,
) -> nn.Module:
    """Quantize a Llama-family model in place with AWQ, one decoder layer at a time.

    model: models/llama.py LlamaForCausalLM. calib_batches: 1-D int64 token-id tensors, one
    sequence each. Modules for which config.for_module(name) is None stay in full precision
    (but are still rescaled with their group, which leaves their outputs unchanged); lm_head
    is quantized by RTN when kept (its weight may be tied to the embedding, so it is not scaled).
    The activation statistics use every calibration token; the scale search compares block
    outputs on the first whole sequences holding search_tokens tokens (at least one sequence).
    """
    check_llama(model, "AWQ")
    if config.group_size == 0:
        raise ValueError("AWQ needs group_size -1 (per channel) or > 0 (per group), got 0 (per tensor)")
    with torch.no_grad():
        chunks = embed_calibration(model, calib_batches, "AWQ")
        for index, layer in enumerate(tqdm(model.model.layers, desc="AWQ", unit="layer", disable=not progress)):
            prefix = f"model.layers.{index}."
            kept_configs: dict[str, QuantConfig] = {}
            clip_inputs: dict[str, Tensor] = {}
            for names, inputs in layer_stages(layer, chunks):
                configs = {name: config.for_module(prefix + name) for name in names}
                kept_configs |= {name: c for name, c in configs.items() if c is not None}
                kept = [(layer.get_submodule(n), c) for n, c in configs.items() if c is not None]
                previous, block = _scaling_plan(layer, names)
                if kept and previous is not None:
                    scales = _search_scales(block, inputs, chunks, kept, search_tokens)
                    fold_scales(previous, [layer.get_submodule(n) for n in names], scales)
                    for x in inputs:
                        x.div_(scales.to(x.dtype))
                clipped = [n for n, c in configs.items() if c is not None and c.awq_clip and n not in NOT_CLIPPED]
                if clipped:
                    sample = _token_sample(inputs, CLIP_TOKENS)
                    clip_inputs |= {name: sample for name in clipped}
            # Clipping and quantization wait for every fold of the layer: down_proj's scales
            # change up_proj's rows after the gate/up group was searched.
            for name, module_config in kept_configs.items():
                linear = layer.get_submodule(name)
                weight = _clip(linear.weight, clip_inputs[name], module_config) if name in clip_inputs else linear.weight
                quantized = quantize_weight(weight, module_config.bits, module_config.group_size, module_config.sym)
                replace_module(layer, name, QuantLinear.from_linear(linear, module_config, *quantized))
        head_config = config.for_module("lm_head")
        if head_config is not None:
            model.lm_head = QuantLinear.from_linear(model.lm_head, head_config)
    return model


def _scaling_plan(layer: nn.Module, names: list[str]) -> tuple[nn.Module | None, Block]:
    """The op the group's input scales fold into (None: not scaled) and the block whose output
    the scale search compares."""
    attn, mlp = layer.self_attn, layer.mlp
    if names == QKV:
        return layer.input_layernorm, lambda x, chunk: attn(x, chunk.rope, chunk.meta)
    if names == ["self_attn.o_proj"]:
        # v_proj's output channel j is o_proj's input channel j only without grouped-query attention.
        same = attn.v_proj.out_features == attn.o_proj.in_features
        return (attn.v_proj if same else None), lambda x, chunk: attn.o_proj(x)
    if names == GATE_UP:
        return layer.post_attention_layernorm, lambda x, chunk: mlp(x)
    assert names == ["mlp.down_proj"], names
    return mlp.up_proj, lambda x, chunk: mlp.down_proj(x)


def _search_scales(
    block: Block,
    inputs: list[Tensor],
    chunks: list[CalibrationChunk],
    kept: list[tuple[nn.Linear, QuantConfig]],
    search_tokens: int,
) -> Tensor:
    """s (in_features,) float32 minimizing the block's output error with the kept linears quantized."""
    num_tokens = sum(x.shape[0] for x in inputs)
    x_mean = sum(x.abs().float().sum(dim=0) for x in inputs) / num_tokens
    inputs, chunks = _leading_sequences(inputs, chunks, search_tokens)
    reference = [block(x, chunk) for x, chunk in zip(inputs, chunks)]
    originals = [linear.weight.detach().clone() for linear, _ in kept]
    best_error, best_scales = math.inf, None
    for step in range(SCALE_GRID + 1):
        scales = x_mean.pow(step / SCALE_GRID).clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()  # centred around 1 in log scale
        for (linear, module_config), weight in zip(kept, originals):
            linear.weight.copy_(_fake_quantize(weight.float() * scales, module_config) / scales)
        error = sum(
            float((block(x, chunk) - ref).float().pow(2).sum()) for x, chunk, ref in zip(inputs, chunks, reference)
        )
        if error < best_error:
            best_error, best_scales = error, scales
    for (linear, _), weight in zip(kept, originals):
        linear.weight.copy_(weight)
    assert best_scales is not None, "the block output error is NaN"
    return best_scales


def _leading_sequences(
    inputs: list[Tensor], chunks: list[CalibrationChunk], num_tokens: int
) -> tuple[list[Tensor], list[CalibrationChunk]]:
    """The first whole sequences until they hold num_tokens tokens (so at least one), as (inputs, chunks)."""
    kept_inputs, kept_chunks, total = [], [], 0
    for x, chunk in zip(inputs, chunks):
        cu, num_seqs = chunk.meta.cu_seqlens_q, 0
        while num_seqs < chunk.meta.num_seqs and total < num_tokens:
            total += cu[num_seqs + 1] - cu[num_seqs]
            num_seqs += 1
        if num_seqs == 0:
            break
        end = cu[num_seqs]
        rope = (chunk.rope[0][:end], chunk.rope[1][:end])
        meta = AttentionMetadata.without_cache(chunk.meta.context_lens[:num_seqs])
        kept_inputs.append(x[:end])
        kept_chunks.append(CalibrationChunk(chunk.hidden[:end], rope, meta))
    return kept_inputs, kept_chunks


def _token_sample(inputs: list[Tensor], num_tokens: int) -> Tensor:
    """About num_tokens rows spread evenly over all chunks' tokens, float32 (n, in_features)."""
    step = max(1, sum(x.shape[0] for x in inputs) // num_tokens)
    return torch.cat([x[::step] for x in inputs])[:num_tokens].float()


def _clip(weight: Tensor, x: Tensor, config: QuantConfig) -> Tensor:
    """weight (out, in) with each quantization group clipped to ±max|w|·(1 - i/CLIP_GRID), i chosen
    per (row, group) to minimize that group's share of the output error on the tokens x (n, in)."""
    out_features, in_features = weight.shape
    group = config.group_size if config.group_size > 0 else in_features
    num_groups = in_features // group
    x_groups = x.reshape(-1, num_groups, group).transpose(0, 1)  # (groups, n, group)
    clipped = []
    for start in range(0, out_features, CLIP_ROWS):
        w = weight[start : start + CLIP_ROWS].float()
        w_groups = w.reshape(-1, num_groups, group)  # (rows, groups, group)
        reference = torch.bmm(x_groups, w_groups.permute(1, 2, 0))  # (groups, n, rows)
        original_max = w_groups.abs().amax(dim=-1, keepdim=True)
        best_max = original_max.clone()
        best_error = torch.full_like(original_max, math.inf)
        for step in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
            max_val = original_max * (1 - step / CLIP_GRID)
            candidate = _fake_quantize(torch.clamp(w_groups, -max_val, max_val).reshape(w.shape), config)
            out = torch.bmm(x_groups, candidate.reshape(-1, num_groups, group).permute(1, 2, 0))
            error = (out - reference).pow(2).mean(dim=1).t()[..., None]  # (rows, groups, 1)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_max = torch.where(better, max_val, best_max)
        clipped.append(torch.clamp(w_groups, -best_max, best_max).reshape(w.shape))
    return torch.cat(clipped).to(weight.dtype)


def _fake_quantize(weight: Tensor, config: QuantConfig) -> Tensor:
    """RTN quantize-dequantize, float32 (out, in)."""
    return dequantize_weight(*quantize_weight(weight, config.bits, config.group_size, config.sym))
