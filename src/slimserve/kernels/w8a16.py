"""W8A16 matmul for the few rows of a decode step: bf16 activations times int8 weights, in C++.

torch's own kernel for this (aten._weight_int8pack_mm) converts and multiplies one fp32 lane at a
time and takes blocks of 4 rows per thread, so at 8 rows each thread reads the whole weight: on
SmolLM2-135M's layers (2 Zen 4 cores) it is 1.7x slower than oneDNN's bf16 GEMM at 8 rows. w8a16.cpp
widens each int8 weight to bf16 once and multiplies it with up to 8 rows by AVX512-BF16 dot
products, prefetching the weight: 1.9x faster than the bf16 GEMM at 1 and 8 rows (figures in
benchmarks/results/quant_speed_cpu.md).

The source is compiled on first use with the system's C++ compiler (`$CXX`, else `c++`) into the
cache folder and loaded with ctypes; OpenMP's runtime is torch's own (the same libgomp.so.1), so
its threads are torch's. Where the CPU lacks AVX512-BF16, no compiler is found or the build fails,
`available()` is False and callers keep torch's kernel. w8a16_reference is the torch oracle.
"""

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from slimserve.assets import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("w8a16.cpp")
FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
         "-mavx512bf16"]
CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}  # as /proc/cpuinfo names them
K_MULTIPLE = 32  # in_features must be a multiple: the kernel reads 32 weights at a time


def _cpu_flags() -> set[str]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())


@cache
def _kernel():
    """The loaded C function, or None where it cannot run here."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if not CPU_FLAGS <= _cpu_flags() or compiler is None:
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:12]
    library = cache_dir() / "kernels" / f"w8a16-{key}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        partial = library.with_name(f"{library.name}.{os.getpid()}.partial")
        build = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial)], capture_output=True, text=True)
        if build.returncode != 0:
            log.warning("building %s failed, int8 layers keep torch's kernel:\n%s", SOURCE.name, build.stderr)
            return None
        os.replace(partial, library)  # atomic: a concurrent build or reader never sees half a file
    function = ctypes.CDLL(str(library)).w8a16_matmul
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    return function


def available() -> bool:
    return _kernel() is not None


def supports(x: Tensor, weight: Tensor, scales: Tensor) -> bool:
    """True if w8a16_matmul takes these operands here (its layouts, and the kernel built)."""
    return (x.dtype == torch.bfloat16 and scales.dtype == torch.bfloat16 and weight.dtype == torch.int8
            and x.device.type == "cpu" and x.dim() == 2 and weight.shape[1] % K_MULTIPLE == 0
            and x.is_contiguous() and weight.is_contiguous() and scales.is_contiguous() and available())


def w8a16_matmul(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """x (rows, in) bf16 @ weight (out, in) int8ᵀ * scales (out,) bf16 -> (rows, out) bf16, products
    summed in fp32. Check supports() first."""
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
