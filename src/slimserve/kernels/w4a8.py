"""W4A8 in C++ (w4a8.cpp): bf16 activations quantized to int8 per row and weight group, times a 4-bit
weight two nibbles a byte, summed exactly in int32 by AVX512-VNNI dot products; what llama.cpp's
Q4_0 product does with activations in Q8_0 blocks. On SmolLM2-135M's 121 layers in groups of 32
(2 Zen 4 cores, benchmarks/results/quant_kernels_cpu.md): 3.2 / 5.0 / 11.9 / 36.1 ms at 1 / 8 / 32 /
128 rows, where torch's int4 kernel (W4A16; dequantized + bf16 GEMM past 48 rows) takes 3.8 / 8.3 /
28.0 / 133.6 and oneDNN's bf16 GEMM 8.7 / 10.1 / 17.1 / 43.9.

The operator slimserve::w4a8_linear is registered from C++ through torch's stable API, so a compiled
graph's C++ wrapper calls it without Python (the batch-1 decode graph; models/opaque.py's operators
call back into Python). The layer's weight is stored once, in the kernel's order (`pack`). Built on
first use by kernels/native.py; where it cannot be (no AVX512-VNNI, no compiler, torch before 2.13),
`available()` is False and layers take `w4a8_reference`, the torch oracle of the same arithmetic.
"""

import torch
from torch import Tensor

from slimserve.kernels import native

native.define_operator("w4a8_linear(Tensor x, Tensor w, Tensor scale, Tensor zero) -> Tensor",
                       lambda x, w, scale, zero: x.new_empty(x.shape[0], w.shape[0] * 16))
# x (rows, in) bf16 times pack's weight -> (rows, out) bf16, as w4a8_reference computes it; runs once
# available() has loaded the C++ kernel.
w4a8_linear = torch.ops.slimserve.w4a8_linear


def available() -> bool:
    return native.load_operators("w4a8.cpp", ("-mavx512vnni",), frozenset({"avx512_vnni"}))


def packable(out_features: int, in_features: int, num_groups: int) -> bool:
    """True if pack takes such a weight here: out a multiple of 16, groups of a multiple of 16 columns."""
    return (out_features % 16 == 0 and in_features % (16 * num_groups) == 0 and available())


def pack(q: Tensor, scales: Tensor, zeros: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q (out, in) in 0..15, scales (out, groups) bf16 and zeros (out, groups) -> the operator's
    weight (out / 16, in / 8, 16, 4) uint8, scales and zeros (out / 16, groups, 16)."""
    out_features, in_features = q.shape
    halves = q.to(torch.uint8).reshape(out_features // 16, 16, in_features // 8, 2, 4)
    w = (halves[:, :, :, 0] | (halves[:, :, :, 1] << 4)).transpose(1, 2).contiguous()

    def blocked(t: Tensor) -> Tensor:
        return t.reshape(out_features // 16, 16, -1).transpose(1, 2).contiguous()

    return w, blocked(scales.to(torch.bfloat16)), blocked(zeros.to(torch.uint8))


def unpack(w: Tensor, scales: Tensor, zeros: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of pack: (q (out, in) uint8, scales (out, groups), zeros (out, groups))."""
    blocks, octets = w.shape[:2]
    halves = torch.stack([w & 15, w >> 4], dim=2)  # (blocks, octets, 2, 16, 4)
    q = halves.permute(0, 3, 1, 2, 4).reshape(blocks * 16, octets * 8)

    def unblocked(t: Tensor) -> Tensor:
        return t.transpose(1, 2).reshape(blocks * 16, -1)

    return q, unblocked(scales), unblocked(zeros)


def quantize_activations(x: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """x (rows, in) -> (int8 values as fp32 (rows, groups, in / groups), scales (rows, groups, 1)):
    scale max|x| / 127 per row and group (at least 1e-12 / 127), rounded half to even."""
    groups = x.float().reshape(x.shape[0], num_groups, -1)
    x_scales = groups.abs().amax(dim=2, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(groups / x_scales).clamp(-127, 127), x_scales


def w4a8_reference(x: Tensor, q: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    """The same product in plain torch on any device, fp32 (rows, out): per group, the int8
    activations times q - zeros (exact in fp32 for groups of up to 8,800 columns: |sum| < 2^24), times
    the weight and activation scales."""
    num_groups = scales.shape[1]
    x_q, x_scales = quantize_activations(x, num_groups)
    weight = (q.float() - zeros.float().repeat_interleave(q.shape[1] // num_groups, dim=1))
    weight = weight.reshape(q.shape[0], num_groups, -1)
    y = x.new_zeros(x.shape[0], q.shape[0], dtype=torch.float32)
    for g in range(num_groups):
        y += (x_q[:, g] @ weight[:, g].t()) * (x_scales[:, g] * scales[:, g].float())
    return y
