"""One-row matrix-vector products for the batch-1 decode graph: kernels/gemv.cpp, else torch.

At one row (batch-1 decode) a linear layer's time is the time to read its weight. gemv.cpp
(AVX512) streams the plain (out, in) weight, fp32, bf16 or int8, widening it to fp32 in registers;
registered from C++ as the torch operator slimserve::gemv, a compiled graph's C++ wrapper calls it
without Python. Where it cannot be built (no AVX512, no compiler, torch before 2.13), the same sum is
written as a multiply and a sum over in_features, for which inductor emits a vectorized loop per
output row. SmolLM2-135M's 121 layers, one row, 2 Zen 4 cores reading ~40 GB/s
(benchmarks/results/quant_kernels_cpu.md): int8 weights 3.6 ms against 9.9 for inductor's loop;
bf16 7.5 against 6.8 when the loops are compiled alone, but inside the bf16 decode graph inductor
fused its loops with their neighbours and the step took 16.3 ms, 7.8 with the operator.

Run eagerly, the torch expression would build the whole (out, in) product in memory, so layers use
gemv only while torch.compile traces them (`use_gemv`). At two rows or more the layers' own
kernels serve them.
"""

import torch
from torch import Tensor

from slimserve.kernels import native

native.define_operator("gemv(Tensor x, Tensor w, Tensor? scales=None, Tensor? bias=None) -> Tensor",
                       lambda x, w, scales=None, bias=None: x.new_empty(x.shape[0], w.shape[0]))


@torch.compiler.assume_constant_result  # traced gemv calls take it as a constant, read once
def available() -> bool:
    return native.load_operators("gemv.cpp", (), frozenset())


def use_gemv(x: Tensor) -> bool:
    """True for one CPU row while torch.compile is tracing: the case gemv is written for."""
    return x.shape[0] == 1 and x.device.type == "cpu" and torch.compiler.is_compiling()


def gemv(x: Tensor, weight: Tensor, scales: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """x (rows, in) @ (weight (out, in) * scales (out,)).T + bias, summed in fp32, returned in x's dtype."""
    if available():
        return torch.ops.slimserve.gemv(x, weight, scales, bias)
    return gemv_reference(x, weight, scales, bias)


def gemv_reference(x: Tensor, weight: Tensor, scales: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """gemv in torch: what the operator computes, and inductor's loop when compiled."""
    y = (x.float()[:, None, :] * weight.float()).sum(-1)
    if scales is not None:
        y = y * scales.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
