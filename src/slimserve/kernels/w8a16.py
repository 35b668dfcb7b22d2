"""W8A16 matmul for the few rows of a decode step: bf16 activations times int8 weights, in C++.

torch's own kernel for this (aten._weight_int8pack_mm) converts and multiplies one fp32 lane at a
time and takes blocks of 4 rows per thread, so at 8 rows each thread reads the whole weight. w8a16.cpp
widens each int8 weight to bf16 once and multiplies it with up to 8 rows by AVX512-BF16 dot products,
prefetching the weight. SmolLM2-135M's 121 layers on 2 Zen 4 cores (benchmarks/results/
quant_kernels_cpu.md): 4.4 ms at 1 row and 5.5 at 8, where torch's int8 kernel takes 5.3 and 9.6
and oneDNN's bf16 GEMM 8.7 and 10.1; engine figures in benchmarks/results/quant_speed_cpu.md.

Built on first use by kernels/native.py; where it cannot be (no AVX512-BF16, no compiler),
`available()` is False and callers keep torch's kernel. w8a16_reference is the torch oracle.
"""

import ctypes

import torch
from torch import Tensor

from slimserve.kernels import native

K_MULTIPLE = 32  # in_features must be a multiple: the kernel reads 32 weights at a time
ARGTYPES = (ctypes.c_void_p,) * 4 + (ctypes.c_int64,) * 3 + (ctypes.c_int,)


def _kernel():
    return native.load("w8a16.cpp", "w8a16_matmul", ("-mavx512bf16",), frozenset({"avx512_bf16"}), ARGTYPES)


def available() -> bool:
    return _kernel() is not None


def takes(weight: Tensor, scales: Tensor) -> bool:
    """True if w8a16_matmul takes this weight and these scales here (their layouts, and the kernel
    built); a layer decides it once, when its weight is set."""
    return (weight.dtype == torch.int8 and scales.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and weight.shape[1] % K_MULTIPLE == 0 and weight.is_contiguous() and scales.is_contiguous()
            and available())


def w8a16_matmul(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """x (rows, in) bf16 @ weight (out, in) int8ᵀ * scales (out,) bf16 -> (rows, out) bf16, products
    summed in fp32, for a weight and scales that takes() accepts."""
    if x.dtype != torch.bfloat16 or x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"w8a16_matmul needs contiguous 2-D bf16 activations, got {x.dtype} {tuple(x.shape)}")
    rows, out = x.shape[0], weight.shape[0]
    y = torch.empty(rows, out, dtype=torch.bfloat16)
    failed = _kernel()(x.data_ptr(), weight.data_ptr(), scales.data_ptr(), y.data_ptr(), rows, out, x.shape[1],
                       torch.get_num_threads())
    if failed:
        raise ValueError(f"w8a16_matmul needs in_features divisible by {K_MULTIPLE}, got {x.shape[1]}")
    return y


def w8a16_reference(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """The same product in plain torch, fp32."""
    return (x.float() @ weight.float().t()) * scales.float()
