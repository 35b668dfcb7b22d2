"""W8A8 in C++ (w8a8.cpp) on int8 weights held in VNNI order: the integer product of uint8 activations
(w8a8_matmul), or the whole layer from bf16 activations, quantized in the same call (w8a8_linear).

w8a8.cpp multiplies 4 activations with 4 weights of 16 output rows per vpdpbusd, runs 8 activation
rows per pass over 3 blocks of 16 weight rows and prefetches the weight. Against oneDNN's prepacked
u8 x s8 GEMM, which W8A8 layers ran before, on SmolLM2-135M's 121 layers (2 Zen 5 cores, best of 3,
benchmarks/results/quant_kernels_cpu.md): 3.7 vs 5.8 ms at 1 row, 4.3 vs 7.0 at 8, 7.5 vs 10.6 at
32, 21.7 vs 26.3 at 128 and 98.7 vs 104.2 at 512 (131.8 in the run before).

The layer's int8 weight is stored once, in the kernel's order (`pack`), with 128 times its row sums
(the activations arrive offset by 128 as uint8). Built on first use by kernels/native.py; where it
cannot be (no AVX512-VNNI, no compiler), `available()` is False and layers keep oneDNN.
w8a8_reference is the torch oracle.
"""

import ctypes

import torch
from torch import Tensor

from slimserve.kernels import native

ARGTYPES = {  # function -> its C signature: pointers, then M, N, K, then threads
    "w8a8_matmul": (ctypes.c_void_p,) * 5 + (ctypes.c_int64,) * 3 + (ctypes.c_int,),
    "w8a8_linear": (ctypes.c_void_p,) * 7 + (ctypes.c_int64,) * 3 + (ctypes.c_int,),
}


def _kernel(function: str = "w8a8_matmul"):
    return native.load("w8a8.cpp", function, ("-mavx512vnni",), frozenset({"avx512_vnni"}), ARGTYPES[function])


def available() -> bool:
    return _kernel() is not None


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


def w8a8_matmul(x_u8: Tensor, vnni: Tensor, corrections: Tensor, scales: Tensor) -> Tensor:
    """x_u8 (rows, in) uint8 (int8 activations + 128) times pack's weight -> (rows, out) fp32: the
    signed integer product, exact in int32, times scales (out,) fp32."""
    rows, in_features = x_u8.shape
    out_features = vnni.shape[0] * 16
    if vnni.shape[1] * 4 != in_features or x_u8.dtype != torch.uint8 or not x_u8.is_contiguous():
        raise ValueError(f"w8a8_matmul needs contiguous uint8 activations of {vnni.shape[1] * 4} columns, "
                         f"got {x_u8.dtype} {tuple(x_u8.shape)}")
    y = torch.empty(rows, out_features)
    _kernel()(x_u8.data_ptr(), vnni.data_ptr(), corrections.data_ptr(), scales.data_ptr(), y.data_ptr(),
              rows, out_features, in_features, torch.get_num_threads())
    return y


def w8a8_linear(x: Tensor, vnni: Tensor, corrections: Tensor, scales: Tensor) -> Tensor:
    """W8A8 of bf16 activations x (rows, in) in one call: quantized per row as QuantLinear does it in
    torch (scale max|x| / 127, round half to even, clamp to +-127), multiplied as w8a8_matmul, times
    the row scales, rounded to bf16 -> (rows, out)."""
    rows, in_features = x.shape
    if vnni.shape[1] * 4 != in_features or x.dtype != torch.bfloat16 or not x.is_contiguous():
        raise ValueError(f"w8a8_linear needs contiguous bf16 activations of {vnni.shape[1] * 4} columns, "
                         f"got {x.dtype} {tuple(x.shape)}")
    y = torch.empty(rows, vnni.shape[0] * 16, dtype=torch.bfloat16)
    x_u8, row_scales = torch.empty(rows, in_features, dtype=torch.uint8), torch.empty(rows)
    _kernel("w8a8_linear")(x.data_ptr(), vnni.data_ptr(), corrections.data_ptr(), scales.data_ptr(), y.data_ptr(),
                           x_u8.data_ptr(), row_scales.data_ptr(), rows, y.shape[1], in_features,
                           torch.get_num_threads())
    return y


def w8a8_reference(x_u8: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """The same product in plain torch: (x_u8 - 128) @ weightᵀ in int64, times scales, fp32."""
    return ((x_u8.long() - 128) @ weight.long().t()).float() * scales.float()
