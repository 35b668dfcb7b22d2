"""SmoothQuant: move activation outliers into the weights, then quantize both to int8 (W8A8).

Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", ICML 2023 (arXiv:2211.10438). A few input channels of
a linear carry activations far larger than the rest, so one int8 scale per token wastes its
range on them. With s_j = max|X_j|^α / max|W_j|^(1-α) (Eq. 4), Y = (X diag(s)⁻¹)(diag(s) W)
is the same product with a flatter X; diag(s)⁻¹ folds into the op that produces X (an RMSNorm;
for down_proj the up_proj rows, since silu(gate)·up is linear in up's output; for o_proj the
v_proj rows, since attention averages v), diag(s) into the weight columns of every linear reading
X. The fold is exact in real arithmetic; in floating point outputs move by rounding only.

The smoothed model is then quantized by RTN (method "smoothquant") or GPTQ (QuantConfig.smooth_alpha
with method "gptq": SmoothQuant + GPTQ, llm-compressor's W8A8 recipe); see quant/pipeline.py.
"""

import torch
from torch import Tensor, nn

from slimserve.models.attention import AttentionMetadata
from slimserve.quant.gptq import check_llama


def smoothquant(model: nn.Module, calib_batches: list[Tensor], alpha: float) -> None:
    """Fold SmoothQuant's scales, from the activations of calib_batches, into a Llama-family model in
    place; its outputs stay the same until a method quantizes it (QuantConfig.smooth_alpha)."""
    smooth(model, activation_max(model, calib_batches), alpha)


def activation_max(model: nn.Module, calib_batches: list[Tensor]) -> dict[str, Tensor]:
    """max |x_j| over every calibration token of each nn.Linear's input: name -> (in_features,) float32.

    calib_batches: 1-D int64 token-id tensors, one sequence each.
    """
    check_llama(model, "SmoothQuant")
    if not calib_batches or any(ids.dim() != 1 or ids.numel() == 0 for ids in calib_batches):
        raise ValueError(f"SmoothQuant needs non-empty 1-D calibration sequences, got {len(calib_batches)}")
    maxima: dict[str, Tensor] = {}

    def record(name: str, x: Tensor) -> None:
        current = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        maxima[name] = torch.maximum(maxima[name], current) if name in maxima else current

    hooks = [
        module.register_forward_pre_hook(lambda m, args, name=name: record(name, args[0]))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        with torch.no_grad():
            for ids in calib_batches:
                model(ids, torch.arange(len(ids), device=ids.device), AttentionMetadata.without_cache([len(ids)]))
    finally:
        for hook in hooks:
            hook.remove()
    return maxima


def smooth(model: nn.Module, act_max: dict[str, Tensor], alpha: float) -> None:
    """Fold SmoothQuant scales into every decoder layer of a Llama-family model, in place.

    act_max: activation_max's result for this model before smoothing. Smoothed inputs: q/k/v
    (scales folded into input_layernorm), gate/up (post_attention_layernorm), o_proj (v_proj's
    rows, see _smooth_attention_output) and down_proj (up_proj's rows).
    """
    check_llama(model, "SmoothQuant")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            prefix = f"model.layers.{index}."
            attn, mlp = layer.self_attn, layer.mlp
            qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
            _smooth(layer.input_layernorm, qkv, act_max[prefix + "self_attn.q_proj"], alpha)
            _smooth_attention_output(attn, act_max[prefix + "self_attn.o_proj"], alpha)
            gate_up = [mlp.gate_proj, mlp.up_proj]
            _smooth(layer.post_attention_layernorm, gate_up, act_max[prefix + "mlp.gate_proj"], alpha)
            _smooth(mlp.up_proj, [mlp.down_proj], act_max[prefix + "mlp.down_proj"], alpha)


def _smooth(previous: nn.Module, linears: list[nn.Linear], act_max: Tensor, alpha: float) -> None:
    """s_j = max|X_j|^α / max|W_j|^(1-α) over the linears reading X; X /= s in `previous`, W *= s."""
    weight_max = torch.cat([linear.weight.detach().abs().float() for linear in linears]).amax(dim=0)
    fold_scales(previous, linears, _scales(act_max, weight_max, alpha))


def _scales(act_max: Tensor, weight_max: Tensor, alpha: float) -> Tensor:
    """s = max|X|^α / max|W|^(1-α), clamped as the reference code does: a channel that never fires
    or has no weight keeps s > 0."""
    return (act_max.clamp(min=1e-5).pow(alpha) / weight_max.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)


def _smooth_attention_output(attn: nn.Module, act_max: Tensor, alpha: float) -> None:
    """Smooth o_proj's input by folding 1/s into v_proj's output rows.

    o_proj's input channel (query head h, d) is a softmax-weighted average of v's channel
    (h's KV head, d), so it scales with that v_proj row. Query heads h = g·group .. (g+1)·group - 1
    share KV head g: one s per (KV head, d), from the largest activation and weight among them.
    """
    num_kv_heads, head_dim = attn.num_kv_heads, attn.head_dim
    group = attn.num_heads // num_kv_heads
    o_weight, v_proj = attn.o_proj.weight, attn.v_proj
    act = act_max.view(num_kv_heads, group, head_dim).amax(dim=1)
    weight_max = o_weight.detach().abs().float().view(-1, num_kv_heads, group, head_dim).amax(dim=(0, 2))
    scales = _scales(act, weight_max, alpha)
    fold_scales(v_proj, [], scales.view(-1))  # o_proj's columns are per query head: multiplied below
    o_weight.view(-1, num_kv_heads, group, head_dim).mul_(scales[:, None, :].to(o_weight.dtype))


def fold_scales(previous: nn.Module, linears: list[nn.Linear], scales: Tensor) -> None:
    """previous's output channel j divided by s_j, every linear's input column j multiplied by it.

    previous: an RMSNorm (y = x / rms(x) · weight) or an nn.Linear; scales (in_features,) > 0.
    """
    if isinstance(previous, nn.Linear):
        previous.weight.div_(scales[:, None].to(previous.weight.dtype))
        if previous.bias is not None:
            previous.bias.div_(scales.to(previous.bias.dtype))
    else:
        previous.weight.div_(scales.to(previous.weight.dtype))
    for linear in linears:
        linear.weight.mul_(scales.to(linear.weight.dtype))
