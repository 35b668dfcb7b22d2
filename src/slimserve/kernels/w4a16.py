"""W4A16 in C++ (w4a16.cpp): bf16 activations times a 4-bit weight two nibbles a byte, in groups with
a bf16 scale and a uint8 zero point each, summed in fp32 by AVX512-BF16 dot products. The weight is
w4a8.py's `pack`, the order w4a8.cpp reads: a layer holds one copy, whichever activations it takes.

Against torch's int4 CPU kernel (aten._weight_int4pack_mm_for_cpu; above 48 rows the weight
dequantized for a bf16 GEMM), which 4-bit layers ran before, on SmolLM2-135M's 121 layers in groups of
32 (2 threads, benchmarks/results/quant_kernels_cpu.md): 3.2 vs 3.6 ms at 1 row, 6.0 vs 8.0 at 8,
18.5 vs 26.8 at 32, 60.7 vs 110.1 at 128, 239 vs 223 at 512; at 2048 rows (a long prompt's prefill
chunk) 749-837 vs 516-524 ms, 120 layers, one-off: a dequantized GEMM from this layout past ~256 rows
is not written yet. w4a8.cpp, whose int8 activations need half the instructions, takes 2.9 / 4.9 /
12.3 / 38.4 / 141.4 ms at 1 to 512 rows.

The operator slimserve::w4a16_linear is registered from C++ through torch's stable API, so a compiled
graph's C++ wrapper calls it without Python. Built on first use by kernels/native.py; where it cannot
be (no AVX512-BF16, no compiler, torch before 2.13), `available()` is False and layers keep torch's
int4 kernel. w4a16_reference is the torch oracle.
"""

import torch
from torch import Tensor

from slimserve.kernels import native
from slimserve.quant.rtn import dequantize_weight

_library = torch.library.Library("slimserve", "FRAGMENT")
_library.define("w4a16_linear(Tensor x, Tensor w, Tensor scale, Tensor zero) -> Tensor")
torch.library.register_fake(
    "slimserve::w4a16_linear", lambda x, w, scale, zero: x.new_empty(x.shape[0], w.shape[0] * 16), lib=_library)
# x (rows, in) bf16 times w4a8.pack's weight, scales and zeros -> (rows, out) bf16, as
# w4a16_reference computes it; runs once available() has loaded the C++ kernel.
w4a16_linear = torch.ops.slimserve.w4a16_linear


def available() -> bool:
    return native.load_operators("w4a16.cpp", ("-mavx512bf16",), frozenset({"avx512_bf16"}))


def packable(out_features: int, in_features: int, num_groups: int) -> bool:
    """True if the operator takes such a weight here: out a multiple of 16, groups of a multiple of 8 columns."""
    return out_features % 16 == 0 and in_features % (8 * num_groups) == 0 and available()


def w4a16_reference(x: Tensor, q: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    """The same product in plain torch on any device, fp32 (rows, out): x times scales * (q - zeros)."""
    return x.float() @ dequantize_weight(q, scales, zeros).t()
