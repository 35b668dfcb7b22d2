"""Inference-time rewrites of a loaded model's linear layers: fuse, then prepack.

- Fusing: projections that read the same input (q/k/v, gate/up) become one layer whose output is
  theirs stacked along out_features, so a step makes one larger matmul instead of several small ones.
- Prepacking (CPU, fp32/bf16): oneDNN's blocked weight layout, reordered once at load, the way
  torch.compile's freezing does it. At batch 1 torch's F.linear runs fp32 GEMV on one thread;
  the prepacked inner product uses every thread and streams the weights in order: SmolLM2's layers
  decode 1.5x (fp32) and 1.3x (bf16) faster (benchmarks/results/engine_cpu.md).
- For a compiled engine (EngineConfig.compile), whose batch-1 decode step is one torch.compile
  graph, packed layers keep their plain weight as well: kernels.gemv reads it inside that graph.

The model keeps its module names for the layers that were not fused; fused and packed models are
for running only (no state_dict round trip, no quantization afterwards).
"""

import torch
from torch import nn

from slimserve.kernels.gemv import gemv, use_gemv
from slimserve.models import opaque
from slimserve.quant.qlinear import QuantLinear

PACKED_DTYPES = (torch.float32, torch.bfloat16)


def merge_linears(layers: list[nn.Module]) -> nn.Module | None:
    """One layer computing the layers' outputs concatenated, or None when they cannot be merged."""
    if all(type(layer) is nn.Linear for layer in layers):
        biases = [layer.bias for layer in layers]
        if any(b is None for b in biases) and any(b is not None for b in biases):
            return None
        first = layers[0].weight
        merged = nn.Linear(first.shape[1], sum(layer.out_features for layer in layers), bias=biases[0] is not None,
                           device=first.device, dtype=first.dtype)
        merged.weight.data = torch.cat([layer.weight.data for layer in layers])
        if merged.bias is not None:
            merged.bias.data = torch.cat([b.data for b in biases])
        return merged
    if all(isinstance(layer, QuantLinear) for layer in layers):
        try:
            return QuantLinear.concat(layers)
        except ValueError:  # different schemes per projection (mixed precision): keep them apart
            return None
    return None


class PackedLinear(nn.Module):
    """y = x Wᵀ + b with W held in oneDNN's prepacked layout (CPU, fp32 or bf16).

    With keep_weight (a compiled engine), the plain weight stays too, for the one-row decode graph:
    there kernels.gemv streams it (SmolLM2-135M's bf16 layers in 7.5 ms where oneDNN's GEMV takes
    8.7), and a compiled graph cannot take the opaque packed tensor. The layer then holds its weight
    twice.
    """

    def __init__(self, linear: nn.Linear, keep_weight: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.weight = linear.weight.detach() if keep_weight else None
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.opaque_handle: int | None = None  # see models/opaque.py

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and use_gemv(x):
            return gemv(x, self.weight, bias=self.bias)
        if torch.compiler.is_compiling():
            return opaque.linear(x, self.opaque_handle)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, packed={self.packed.dtype}, "
                f"plain_weight={self.weight is not None}")


def can_pack(module: nn.Module) -> bool:
    return (type(module) is nn.Linear and module.weight.device.type == "cpu"
            and module.weight.dtype in PACKED_DTYPES and torch.backends.mkldnn.is_available())


def pack_linears(model: nn.Module, keep_weights: bool = False) -> None:
    """Replace every plain CPU fp32/bf16 nn.Linear by a PackedLinear, in place."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if can_pack(child):
                setattr(parent, name, PackedLinear(child, keep_weights))


def prepare_for_inference(model: nn.Module, compiled: bool = False) -> nn.Module:
    """Fuse the projections the architecture allows, then prepack for the CPU (keeping the plain
    weights too, float or int8, for a compiled engine's one-row graph); returns the model."""
    for module in model.modules():
        if hasattr(module, "fuse_projections"):
            module.fuse_projections()
    pack_linears(model, keep_weights=compiled)
    if compiled:
        for module in model.modules():
            if hasattr(module, "keep_plain_weight"):  # quantized layers (QuantLinear)
                module.keep_plain_weight()
    return model
