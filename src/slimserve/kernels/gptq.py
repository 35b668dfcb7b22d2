"""GPTQ's column steps in C++ (gptq.cpp), and the torch loop they replace (the reference).

quant/gptq.py quantizes a block of columns one column at a time, each step a few vector operations
over the weight's output rows: in torch about ten operator calls a column, whose overhead outweighs
their arithmetic. gptq.cpp runs a whole run of columns sharing their scales in one call, each thread
through its own range of rows: SmolLM2-135M's W4 GPTQ spent 6.9-7.9 s in its column loops (Cholesky
factorizations included) against 11.5-12.4 s in torch on a 2-core Xeon, 5.6-6.3 against 8.0-8.5 s
on 2 threads of a lent H200's host (benchmarks/results/gptq_time_cpu_smollm2-135m*.md). Built on
first use by kernels/native.py; where it cannot be (no AVX512, no compiler) or the tensors are not
on the CPU, the reference runs.
"""

import ctypes

import torch
from torch import Tensor

from slimserve.kernels import native
from slimserve.quant.rtn import quantize_to_grid

ARGTYPES = (ctypes.c_void_p,) * 6 + (ctypes.c_int64,) * 5 + (ctypes.c_int, ctypes.c_int)


def _kernel():
    return native.load("gptq.cpp", "gptq_columns", (), frozenset(), ARGTYPES)


def available() -> bool:
    return _kernel() is not None


def gptq_columns(wt: Tensor, qt: Tensor, delta: Tensor, spread: Tensor, scale: Tensor, zero: Tensor, bits: int,
                 i1: int, c0: int, c1: int, i2: int) -> None:
    """Quantize columns c0 <= col < c1 of the block [i1, i2) in place, all with the per-row scale and
    zero (out,): qt[col] the integers, delta[col - i1] the errors, and each error spread over the
    block's later columns of wt (in, out) by spread (i2 - i1, i2 - i1). float32 throughout."""
    kernel = _kernel() if wt.device.type == "cpu" else None
    if kernel is None:
        return gptq_columns_reference(wt, qt, delta, spread, scale, zero, bits, i1, c0, c1, i2)
    tensors = (wt, qt, delta, spread, scale, zero)
    if not all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
        raise ValueError("gptq_columns needs contiguous float32 tensors")
    kernel(*(t.data_ptr() for t in tensors), wt.shape[1], i1, c0, c1, i2, bits, torch.get_num_threads())


def gptq_columns_reference(wt: Tensor, qt: Tensor, delta: Tensor, spread: Tensor, scale: Tensor, zero: Tensor,
                           bits: int, i1: int, c0: int, c1: int, i2: int) -> None:
    """gptq_columns in torch."""
    for col in range(c0, c1):
        i = col - i1
        w, q, err = wt[col], qt[col], delta[i]
        quantize_to_grid(w, scale, zero, bits, out=q)
        torch.addcmul(w, torch.sub(q, zero, out=err), scale, value=-1, out=err)  # w - dequantized
        wt[col + 1 : i2].addr_(spread[i, i + 1 :], err, alpha=-1)
