"""GPTQ: quantize a Linear column by column, correcting the columns not yet quantized.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (arXiv:2210.17323), Algorithm 1. For a layer's weight W
(out, in) and calibration inputs X, minimize ||W X - Q X||² with H = 2/n Σ x xᵀ:
quantize column j, spread its error (w_j - q_j) / [H⁻¹]_jj over the later columns along row j
of the upper Cholesky factor of H⁻¹, and apply updates lazily, one block of columns at a time.
Extras as in the reference implementations (AutoGPTQ, GPTQModel): dampening by damp_percent of
the mean diagonal, dead inputs (H_jj = 0) fixed to zero weight, act-order (columns by
decreasing H_jj, with g_idx mapping each column to its group) and static groups (group scales
fixed up front, so act-order keeps contiguous groups).

gptq_quantize drives a whole Llama-family model layer by layer, so only one decoder layer's
input activations and its Hessians are alive at a time.
"""

import math

import torch
from torch import Tensor, nn
from tqdm import tqdm

from slimserve.config import QuantConfig
from slimserve.models.attention import AttentionMetadata
from slimserve.quant.qlinear import QuantLinear
from slimserve.quant.rtn import (
    check_bits,
    check_finite,
    check_group_size,
    compute_scales,
    quantize_to_grid,
)


class GPTQ:
    """Accumulates the Hessian of one nn.Linear from its inputs, then quantizes its weight."""

    def __init__(self, layer: nn.Linear) -> None:
        self.layer = layer
        self.num_samples = 0
        in_features = layer.in_features
        self.hessian = torch.zeros(in_features, in_features, device=layer.weight.device)

    def add_batch(self, inp: Tensor) -> None:
        """inp (..., in_features): every row is one sample (token)."""
        x = inp.reshape(-1, self.layer.in_features).float()
        total = self.num_samples + x.shape[0]
        if total == 0:
            return
        # H is kept as the running mean of 2 x xᵀ, so its scale does not grow with n.
        self.hessian *= self.num_samples / total
        x = x * math.sqrt(2 / total)
        self.hessian.addmm_(x.t(), x)
        self.num_samples = total

    def quantize(
        self,
        bits: int,
        group_size: int,
        sym: bool,
        act_order: bool = False,
        static_groups: bool = False,
        damp_percent: float = 0.01,
        block_size: int = 128,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> q (out, in) uint8, scales (rows, num_groups) float32, zeros uint8, g_idx (in,) int32.

        Shapes as rtn.quantize_weight; dequantize with rtn.dequantize_weight(q, scales, zeros, g_idx).
        """
        check_bits(bits)
        out_features, in_features = self.layer.weight.shape
        check_group_size(group_size, in_features)
        if not 0 < damp_percent <= 1 or block_size < 1:
            raise ValueError(
                f"need 0 < damp_percent <= 1 and block_size >= 1, got {damp_percent}, {block_size}"
            )
        if self.num_samples == 0:
            raise ValueError("GPTQ has no calibration samples: add_batch() was never given any tokens")
        W = self.layer.weight.detach().float().clone()
        check_finite(W, "weight")
        H = self.hessian.clone()
        check_finite(H, "Hessian (from the calibration activations)")
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        fixed: list[tuple[Tensor, Tensor]] = []  # per group, computed before any update
        if group_size <= 0:
            fixed.append(compute_scales(W if group_size == -1 else W.reshape(1, -1), bits, sym))
        elif static_groups:
            for start in range(0, in_features, group_size):
                fixed.append(compute_scales(W[:, start : start + group_size], bits, sym))
        perm = torch.arange(in_features, device=W.device)
        if act_order:
            perm = torch.argsort(torch.diag(H), descending=True)
            W, H = W[:, perm], H[perm][:, perm]
        Hinv = _inverse_hessian_factor(H, damp_percent)

        Q = torch.zeros_like(W)
        found: list[tuple[Tensor, Tensor]] = []  # per group in quantization order
        scales, zeros = fixed[0] if group_size <= 0 else (None, None)
        for i1 in range(0, in_features, block_size):
            i2 = min(i1 + block_size, in_features)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if group_size > 0 and static_groups:
                    scales, zeros = fixed[int(perm[col]) // group_size]
                elif group_size > 0 and col % group_size == 0:
                    # The group's columns as updated so far: this block's from W1, later ones from W.
                    end = col + group_size
                    span = torch.cat([W1[:, i : i + group_size], W[:, i2:end]], dim=1)
                    scales, zeros = compute_scales(span, bits, sym)
                    found.append((scales, zeros))
                w = W1[:, i : i + 1]
                q = quantize_to_grid(w, scales, zeros, bits)
                Q[:, col] = q[:, 0]
                err = (w - scales * (q - zeros)) / Hinv1[i, i]
                W1[:, i:] -= err @ Hinv1[i : i + 1, i:]
                Err1[:, i : i + 1] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        groups = fixed if group_size <= 0 or static_groups else found
        scales = torch.cat([s for s, _ in groups], dim=1)
        zeros = torch.cat([z for _, z in groups], dim=1)
        columns = torch.arange(in_features, device=W.device)
        inverse = torch.argsort(perm)
        if group_size <= 0:
            g_idx = torch.zeros_like(columns)
        elif static_groups:
            g_idx = columns // group_size
        else:
            g_idx = (columns // group_size)[inverse]  # column perm[p] sits at position p
        return Q[:, inverse].to(torch.uint8), scales, zeros.to(torch.uint8), g_idx.to(torch.int32)


def _inverse_hessian_factor(H: Tensor, damp_percent: float) -> Tensor:
    """Upper Cholesky factor of (H + damp I)⁻¹, as Algorithm 1 uses it."""
    damp = damp_percent * torch.mean(torch.diag(H))
    H = H + damp * torch.eye(H.shape[0], device=H.device)
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        L, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) != 0:
        raise ValueError(
            f"the damped Hessian is not positive definite (damp_percent={damp_percent}); "
            "use more calibration tokens or a larger damp_percent"
        )
    return L


def gptq_quantize(
    model: nn.Module, calib_batches: list[Tensor], config: QuantConfig, progress: bool = False
) -> nn.Module:
    """Quantize a Llama-family model in place with GPTQ, one decoder layer at a time.

    model: model.model.{embed_tokens, rotary_emb, layers, norm} and model.lm_head (models/llama.py).
    calib_batches: 1-D int64 token-id tensors, one sequence each. Each layer sees the outputs of
    the already quantized layers before it. Inside a layer, linears sharing one input (q/k/v,
    gate/up) are quantized together, in the order the layer calls them (true-sequential), so
    o_proj's Hessian comes from the quantized q/k/v. Modules for which config.for_module(name)
    is None stay in full precision.
    """
    if not calib_batches or any(ids.numel() == 0 for ids in calib_batches):
        raise ValueError(f"GPTQ needs non-empty calibration sequences, got {len(calib_batches)} sequences")
    inner = model.model
    with torch.no_grad():
        hidden = [inner.embed_tokens(ids) for ids in calib_batches]
        contexts = [_context(inner, len(ids), ids.device) for ids in calib_batches]
        layers = tqdm(inner.layers, desc="GPTQ", unit="layer", disable=not progress)
        num_probe = min(8, len(calib_batches[0]))  # a few tokens suffice to see the call order
        probe_context = _context(inner, num_probe, calib_batches[0].device)
        for index, layer in enumerate(layers):
            quantized: dict[str, QuantLinear] = {}
            for group in _input_groups(layer, hidden[0][:num_probe], probe_context):
                kept = [(n, config.for_module(f"model.layers.{index}.{n}")) for n in group]
                kept = [(n, c) for n, c in kept if c is not None]
                if not kept:
                    continue
                hessian = _layer_input_hessian(layer, layer.get_submodule(kept[0][0]), hidden, contexts)
                for name, module_config in kept:
                    module = _gptq_module(layer.get_submodule(name), hessian, module_config)
                    quantized[name] = module
                    # Later groups and the next layer see these weights; a plain Linear holding the
                    # dequantized weight runs them faster than the packed kernels at prefill sizes.
                    _replace(layer, name, _dequantized_linear(module))
            hidden = [layer(h, *context) for h, context in zip(hidden, contexts)]
            for name, module in quantized.items():
                _replace(layer, name, module)
        head_config = config.for_module("lm_head")
        if head_config is not None:
            hessian = GPTQ(model.lm_head)
            for h in hidden:
                hessian.add_batch(inner.norm(h))
            model.lm_head = _gptq_module(model.lm_head, hessian, head_config)
    return model


def _context(inner: nn.Module, num_tokens: int, device: torch.device) -> tuple:
    positions = torch.arange(num_tokens, device=device)
    return inner.rotary_emb(positions), AttentionMetadata.without_cache([num_tokens])


def _input_groups(layer: nn.Module, probe: Tensor, context: tuple) -> list[list[str]]:
    """The layer's nn.Linear names grouped by shared input, in the order the layer calls them."""
    calls: list[tuple[str, Tensor]] = []  # holding the inputs keeps their identities distinct
    hooks = [
        module.register_forward_pre_hook(lambda m, args, name=name: calls.append((name, args[0])))
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear)
    ]
    layer(probe, *context)
    for hook in hooks:
        hook.remove()
    groups: list[list[str]] = []
    last_input = None
    for name, inp in calls:
        if inp is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = inp
    return groups


def _layer_input_hessian(
    layer: nn.Module, linear: nn.Linear, hidden: list[Tensor], contexts: list[tuple]
) -> GPTQ:
    """A GPTQ collector fed with `linear`'s inputs while `layer` runs over the calibration set."""
    collector = GPTQ(linear)
    hook = linear.register_forward_pre_hook(lambda m, args: collector.add_batch(args[0]))
    for h, context in zip(hidden, contexts):
        layer(h, *context)
    hook.remove()
    return collector


def _gptq_module(linear: nn.Linear, collected: GPTQ, config: QuantConfig) -> QuantLinear:
    """GPTQ-quantize `linear` with the Hessian in `collected` (shared by layers with one input)."""
    gptq = GPTQ(linear)
    gptq.hessian, gptq.num_samples = collected.hessian, collected.num_samples
    q, scales, zeros, g_idx = gptq.quantize(
        config.bits,
        config.group_size,
        config.sym,
        config.act_order,
        config.static_groups,
        config.damp_percent,
        config.block_size,
    )
    return QuantLinear.from_linear(linear, config, q, scales, zeros, g_idx)


def _dequantized_linear(module: QuantLinear) -> nn.Linear:
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(module.dequantize(), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias, requires_grad=False)
    return linear


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name), child, module)
