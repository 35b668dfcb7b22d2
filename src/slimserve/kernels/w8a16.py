"""W8A16 matmul for the few rows of a decode step: bf16 activations times int8 weights, in C++.

torch's own kernel for this (aten._weight_int8pack_mm) converts and multiplies one fp32 lane at a
time and takes blocks of 4 rows per thread, so at 8 rows each thread reads the whole weight. w8a16.cpp
widens each int8 weight to bf16 once and multiplies it with up to 8 rows by AVX512-BF16 dot products,
prefetching the weight; on AVX512 CPUs without BF16 it is built to multiply the same bf16 values as
fp32 lanes by FMAs. SmolLM2-135M's 121 layers on 2 Zen 4 cores (benchmarks/results/
quant_kernels_cpu.md): 4.4 ms at 1 row and 5.5 at 8, where torch's int8 kernel takes 5.3 and 9.6
and oneDNN's bf16 GEMM 8.7 and 10.1; engine figures in benchmarks/results/quant_speed_cpu.md.

With zero points and groups (8-bit asymmetric or grouped layouts), each 32 weights are dequantized
to bf16 as they are widened, scale * (q - zero), rounded as torch rounds the dequantized weight; past
48 rows (a prefill) the operator dequantizes the whole weight so, once, and calls torch's bf16 matmul.

The operator slimserve::w8a16_matmul is registered from C++ through torch's stable API, so a compiled
graph's C++ wrapper calls it without Python. Built on first use by kernels/native.py; where it cannot
be (no AVX512, no compiler, torch before 2.13), `available()` is False and callers keep torch's
kernel (grouped layers: the reference path). w8a16_reference is the torch oracle.
"""

import torch
from torch import Tensor

from slimserve.kernels import native
from slimserve.quant.rtn import dequantize_weight

K_MULTIPLE = 32  # in_features (and a group's columns) must be a multiple: the kernel reads 32 weights at a time

native.define_operator("w8a16_matmul(Tensor x, Tensor w, Tensor scale, Tensor? zero=None) -> Tensor",
                       lambda x, w, scale, zero=None: x.new_empty(x.shape[0], w.shape[0]))


def available() -> bool:
    if "avx512_bf16" in native.cpu_flags():
        return native.load_operators("w8a16.cpp", ("-mavx512bf16",), frozenset({"avx512_bf16"}))
    return native.load_operators("w8a16.cpp", (), frozenset())


def takes(weight: Tensor, scales: Tensor) -> bool:
    """True if w8a16_matmul takes this int8 weight and these per-row scales here (their layouts, and the
    kernel built); a layer decides it once, when its weight is set. Grouped layers: QuantLinear checks
    that their groups are a multiple of K_MULTIPLE columns."""
    return (weight.dtype == torch.int8 and scales.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and scales.dim() == 1 and weight.shape[1] % K_MULTIPLE == 0 and weight.is_contiguous()
            and scales.is_contiguous() and available())


def w8a16_matmul(x: Tensor, weight: Tensor, scales: Tensor, zeros: Tensor | None = None) -> Tensor:
    """x (rows, in) bf16 @ weight (out, in) int8ᵀ * scales (out,) bf16 -> (rows, out) bf16, products
    summed in fp32; with zeros, x @ dequantize_weight(weight + 128, scales, zeros)ᵀ for scales and uint8
    zeros (out, groups). For per-row operands that takes() accepts, or grouped ones whose groups are a
    multiple of K_MULTIPLE columns; anything else raises a RuntimeError naming the operand."""
    return torch.ops.slimserve.w8a16_matmul(x, weight, scales, zeros)


def w8a16_reference(x: Tensor, weight: Tensor, scales: Tensor, zeros: Tensor | None = None) -> Tensor:
    """The same product in plain torch, fp32."""
    if zeros is None:
        return (x.float() @ weight.float().t()) * scales.float()
    dequantized = dequantize_weight(weight.to(torch.int16) + 128, scales, zeros).to(torch.bfloat16)
    return x.float() @ dequantized.float().t()
