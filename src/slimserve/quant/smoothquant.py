"""SmoothQuant: move activation outliers into the weights, then quantize both to int8 (W8A8).

Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", ICML 2023 (arXiv:2211.10438). A few input channels of
a linear carry activations far larger than the rest, so one int8 scale per token wastes its
range on them. With s_j = max|X_j|^α / max|W_j|^(1-α) (Eq. 4), Y = (X diag(s)⁻¹)(diag(s) W)
is the same product with a flatter X; diag(s)⁻¹ folds into the op that produces X (an RMSNorm,
or for down_proj the up_proj rows, since silu(gate)·up is linear in up's output), diag(s) into
the weight columns of every linear reading X. The fold is exact in real arithmetic; in floating
point outputs move by rounding only.
"""

import torch
from torch import Tensor, nn

from slimserve.config import QuantConfig
from slimserve.models.attention import AttentionMetadata
from slimserve.quant.gptq import check_llama
from slimserve.quant.qlinear import quantize_model

DEFAULT_ALPHA = 0.65  # SmolLM2 W8A8, fp32, 4 windows: +1.36 % at the paper's 0.5, +0.91 % at 0.65, +1.68 % at 0.8
W8A8 = QuantConfig(method="smoothquant", bits=8, group_size=-1, sym=True, act_bits=8)


def smoothquant(
    model: nn.Module, calib_batches: list[Tensor], alpha: float = DEFAULT_ALPHA, config: QuantConfig = W8A8
) -> nn.Module:
    """Smooth a Llama-family model in place, then quantize its linears with `config` (W8A8)."""
    smooth(model, activation_max(model, calib_batches), alpha)
    return quantize_model(model, config)


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


def smooth(model: nn.Module, act_max: dict[str, Tensor], alpha: float = DEFAULT_ALPHA) -> None:
    """Fold SmoothQuant scales into every decoder layer of a Llama-family model, in place.

    act_max: activation_max's result for this model before smoothing. Smoothed inputs: q/k/v
    (scales folded into input_layernorm), gate/up (post_attention_layernorm) and down_proj
    (up_proj's rows). o_proj's input comes from attention over v, whose channels only match
    o_proj's without grouped-query attention; it is left alone, as in the paper.
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
            gate_up = [mlp.gate_proj, mlp.up_proj]
            _smooth(layer.post_attention_layernorm, gate_up, act_max[prefix + "mlp.gate_proj"], alpha)
            _smooth(mlp.up_proj, [mlp.down_proj], act_max[prefix + "mlp.down_proj"], alpha)


def _smooth(previous: nn.Module, linears: list[nn.Linear], act_max: Tensor, alpha: float) -> None:
    """s_j = max|X_j|^α / max|W_j|^(1-α) over the linears reading X; X /= s in `previous`, W *= s."""
    weight_max = torch.cat([linear.weight.detach().abs().float() for linear in linears]).amax(dim=0)
    # Clamped as the reference code does: a channel that never fires or has no weight keeps s > 0.
    scales = (act_max.clamp(min=1e-5).pow(alpha) / weight_max.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
    fold_scales(previous, linears, scales)


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
