"""W4A16 in C++ (w4a16.cpp): bf16 activations times a 4-bit weight two nibbles a byte, in groups with
a bf16 scale and a uint8 zero point each, summed in fp32 by AVX512-BF16 dot products. The weight is
w4a8.py's `pack`, the order w4a8.cpp reads: a layer holds one copy, whichever activations it takes.

Past 256 rows (prefill) the operator dequantizes the weight to bf16 itself and calls torch's matmul,
faster there than its dot products, which decode the nibbles again for every 4 rows (SmolLM2-135M's
120 layers without the head, one-off: 749-837 ms at 2048 rows with the dot products, 626-628 so).
Against torch's int4 CPU path (aten._weight_int4pack_mm_for_cpu up to 48 rows, then the weight
dequantized for a bf16 GEMM), which 4-bit layers ran before: see benchmarks/results/quant_kernels_cpu.md;
one-off, the same 120 layers: 89-91 vs 117-118 ms at 257 rows, 152-156 vs 186 at 512, 626-628 vs
672-675 at 2048.

The operator slimserve::w4a16_linear is registered from C++ through torch's stable API, so a compiled
graph's C++ wrapper calls it without Python. Built on first use by kernels/native.py; where it cannot
be (no AVX512-BF16, no compiler, torch before 2.13), `available()` is False and layers keep torch's
int4 kernel. w4a16_reference is the torch oracle.
"""

import torch
from torch import Tensor

from slimserve.kernels import native
from slimserve.quant.rtn import dequantize_weight

native.define_operator("w4a16_linear(Tensor x, Tensor w, Tensor scale, Tensor zero) -> Tensor",
                       lambda x, w, scale, zero: x.new_empty(x.shape[0], w.shape[0] * 16))
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
