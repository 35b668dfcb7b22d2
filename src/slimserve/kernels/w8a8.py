"""W8A8 in C++ (w8a8.cpp) on int8 weights held in VNNI order: the integer product of uint8 activations
(w8a8_matmul), or the whole layer from bf16 activations, quantized in the same call (w8a8_linear).

w8a8.cpp multiplies 4 activations with 4 weights of 16 output rows per vpdpbusd, runs 8 activation
rows per pass over 3 blocks of 16 weight rows and prefetches the weight. Against oneDNN's prepacked
u8 x s8 GEMM, which W8A8 layers ran before, on SmolLM2-135M's 121 layers (2 Zen 5 cores, best of 3,
benchmarks/results/quant_kernels_cpu.md): 3.7 vs 5.8 ms at 1 row, 4.3 vs 7.0 at 8, 7.5 vs 10.6 at
32, 21.7 vs 26.3 at 128 and 98.7 vs 104.2 at 512 (131.8 in the run before).

The layer's int8 weight is stored once, in the kernel's order (`pack`), with 128 times its row sums
(the activations arrive offset by 128 as uint8). Registered from C++ through torch's stable API as the
operators slimserve::w8a8_matmul and slimserve::w8a8_linear, so a compiled graph's C++ wrapper calls
them without Python. Built on first use by kernels/native.py; where it cannot be (no AVX512-VNNI, no
compiler, torch before 2.13), `available()` is False and layers keep oneDNN. w8a8_reference is the
torch oracle.
"""

import torch
from torch import Tensor

from slimserve.kernels import native

native.define_operator("w8a8_matmul(Tensor x_u8, Tensor w, Tensor corrections, Tensor scales) -> Tensor",
                       lambda x_u8, w, *args: x_u8.new_empty(x_u8.shape[0], w.shape[0] * 16, dtype=torch.float32))
native.define_operator("w8a8_linear(Tensor x, Tensor w, Tensor corrections, Tensor scales) -> Tensor",
                       lambda x, w, *args: x.new_empty(x.shape[0], w.shape[0] * 16))
# x_u8 (rows, in) uint8 (int8 activations + 128) times pack's weight -> (rows, out) fp32: the signed
# integer product, exact in int32, times scales (out,) fp32.
w8a8_matmul = torch.ops.slimserve.w8a8_matmul
# W8A8 of bf16 activations x (rows, in) in one call: quantized per row as QuantLinear does it in torch
# (scale max|x| / 127, round half to even, clamp to +-127), multiplied as w8a8_matmul, times the row
# scales, rounded to bf16 -> (rows, out). Both run once available() has loaded the C++ kernel.
w8a8_linear = torch.ops.slimserve.w8a8_linear


def available() -> bool:
    return native.load_operators("w8a8.cpp", ("-mavx512vnni",), frozenset({"avx512_vnni"}))


def packable(weight: Tensor) -> bool:
    """True if pack takes this weight (out, in) here: out a multiple of 16, in of 4, on the CPU."""
    out_features, in_features = weight.shape
    return weight.device.type == "cpu" and out_features % 16 == 0 and in_features % 4 == 0 and available()


def pack(weight: Tensor) -> tuple[Tensor, Tensor]:
    """int8 weight (out, in) -> (the same bytes in VNNI order (out / 16, in / 4, 16, 4), 128 x row sums int32)."""
    out_features, in_features = weight.shape
    vnni = weight.reshape(out_features // 16, 16, in_features // 4, 4).transpose(1, 2).contiguous()
    return vnni, 128 * weight.sum(dim=1, dtype=torch.int32)


def unpack(vnni: Tensor) -> Tensor:
    """Inverse of pack's first part: (out / 16, in / 4, 16, 4) -> int8 weight (out, in)."""
    blocks, quads = vnni.shape[:2]
    return vnni.transpose(1, 2).reshape(blocks * 16, quads * 4)


def w8a8_reference(x_u8: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """The same product in plain torch: (x_u8 - 128) @ weightᵀ in int64, times scales, fp32."""
    return ((x_u8.long() - 128) @ weight.long().t()).float() * scales.float()
