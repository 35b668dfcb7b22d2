"""The C++ CPU kernels beside this file: compiled on first use, cached, loaded.

Each kernel is one .cpp file (with the shared headers here), compiled with the system's C++ compiler
(`$CXX`, else `c++`) and the kernel's ISA flags into the cache folder, under a name that hashes the
sources, compiler and flags. Two kinds: `extern "C"` functions returning int, loaded with ctypes
(`load`), and torch operators registered through torch's stable C++ API (`load_operators`), which
a compiled graph's C++ wrapper calls through the dispatcher without Python.
OpenMP's runtime is torch's own (the same libgomp.so.1 soname, already loaded), so the kernels'
threads are torch's. Where the CPU lacks the ISA, no compiler is found or the build fails, `load`
returns None (`load_operators` False) and callers keep torch's kernels.
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

from slimserve.assets import cache_dir

log = logging.getLogger(__name__)

BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")
BASE_NEEDS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})  # cpuinfo's names for those ISAs
STABLE_API_VERSION = 0x020A000000000000  # torch 2.10, the first whose stable C++ API has what w4a8.cpp uses
# torch 2.11 ends the process (SIGSEGV) when such an operator raises on bad input; 2.13 raises a
# RuntimeError with the kernel's message (both seen here; 2.12 not tried).
OPERATORS_MIN_TORCH = "2.13"


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    return next((frozenset(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), frozenset())


def _build(source: str, flags: tuple[str, ...], needs: frozenset[str], libraries: tuple[str, ...] = (),
           key_extra: str = "") -> Path | None:
    """The shared library of the file `source` built with BASE_FLAGS + flags and linked with
    `libraries` (cached), or None where the CPU lacks one of `needs` (cpuinfo flags), no compiler is
    found or the build fails."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if not BASE_NEEDS | needs <= cpu_flags() or compiler is None:
        return None
    path = Path(__file__).with_name(source)
    command = [compiler, *BASE_FLAGS, *flags]
    headers = b"".join(header.read_bytes() for header in sorted(path.parent.glob("*.h")))
    key = hashlib.sha256(path.read_bytes() + headers + " ".join([*command, *libraries, key_extra]).encode())
    key = key.hexdigest()[:12]
    library = cache_dir() / "kernels" / f"{path.stem}-{key}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        partial = library.with_name(f"{library.name}.{os.getpid()}.partial")
        build = subprocess.run([*command, str(path), *libraries, "-o", str(partial)], capture_output=True, text=True)
        if build.returncode != 0:
            log.warning("building %s failed, torch's kernels stay in use:\n%s", source, build.stderr)
            return None
        os.replace(partial, library)  # atomic: a concurrent build or reader never sees half a file
        for stale in library.parent.glob(f"{path.stem}-*.so"):  # earlier versions' builds
            if stale != library:
                stale.unlink(missing_ok=True)
    return library


@cache
def load(source: str, function: str, flags: tuple[str, ...], needs: frozenset[str], argtypes: tuple):
    """`function` of `source` built as _build does, as a ctypes function, or None where it cannot be."""
    library = _build(source, flags, needs)
    if library is None:
        return None
    loaded = getattr(ctypes.CDLL(str(library)), function)
    loaded.restype = ctypes.c_int
    loaded.argtypes = list(argtypes)
    return loaded


_library = torch.library.Library("slimserve", "FRAGMENT")


def define_operator(schema: str, fake) -> None:
    """Declare the operator slimserve::<name> of `schema`, whose kernel a C++ file registers once
    load_operators has loaded it, and its output for tracing (`fake`, from the inputs' shapes)."""
    _library.define(schema)
    torch.library.register_fake(f"slimserve::{schema.split('(')[0]}", fake, lib=_library)


@cache
def load_operators(source: str, flags: tuple[str, ...], needs: frozenset[str]) -> bool:
    """Build `source`, which registers torch operators through torch's stable C++ API, against the
    running torch and load it; False where it cannot be built or torch is older than OPERATORS_MIN_TORCH."""
    if torch.__version__ < OPERATORS_MIN_TORCH:
        return False
    torch_dir = Path(torch.__file__).parent
    torch_flags = ("-std=c++17", f"-I{torch_dir / 'include'}", f"-DTORCH_TARGET_VERSION={STABLE_API_VERSION:#x}")
    libraries = (f"-L{torch_dir / 'lib'}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}")
    library = _build(source, (*flags, *torch_flags), needs, libraries, key_extra=torch.__version__)
    if library is None:
        return False
    torch.ops.load_library(str(library))
    return True
