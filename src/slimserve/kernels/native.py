"""The C++ CPU kernels beside this file: compiled on first use, cached, loaded with ctypes.

Each kernel is one .cpp file (with the shared headers here) of `extern "C"` functions returning int,
compiled with the system's C++ compiler (`$CXX`, else `c++`) and the kernel's ISA flags into the
cache folder, under a name that hashes the sources, compiler and flags, and loaded with ctypes.
OpenMP's runtime is torch's own (the same libgomp.so.1 soname, already loaded), so the kernels'
threads are torch's. Where the CPU lacks the ISA, no compiler is found or the build fails, `load`
returns None and callers keep torch's kernels.
"""

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

from slimserve.assets import cache_dir

log = logging.getLogger(__name__)

BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")
BASE_NEEDS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})  # cpuinfo's names for those ISAs


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())


@cache
def load(source: str, function: str, flags: tuple[str, ...], needs: frozenset[str], argtypes: tuple):
    """`function` of the file `source` built with BASE_FLAGS + flags, as a ctypes function, or None
    where the CPU lacks one of `needs` (cpuinfo flags), no compiler is found or the build fails."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if not BASE_NEEDS | needs <= cpu_flags() or compiler is None:
        return None
    path = Path(__file__).with_name(source)
    command = [compiler, *BASE_FLAGS, *flags]
    headers = b"".join(header.read_bytes() for header in sorted(path.parent.glob("*.h")))
    key = hashlib.sha256(path.read_bytes() + headers + " ".join(command).encode()).hexdigest()[:12]
    library = cache_dir() / "kernels" / f"{path.stem}-{key}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        partial = library.with_name(f"{library.name}.{os.getpid()}.partial")
        build = subprocess.run([*command, str(path), "-o", str(partial)], capture_output=True, text=True)
        if build.returncode != 0:
            log.warning("building %s failed, torch's kernels stay in use:\n%s", source, build.stderr)
            return None
        os.replace(partial, library)  # atomic: a concurrent build or reader never sees half a file
        for stale in library.parent.glob(f"{path.stem}-*.so"):  # earlier versions' builds
            if stale != library:
                stale.unlink(missing_ok=True)
    loaded = getattr(ctypes.CDLL(str(library)), function)
    loaded.restype = ctypes.c_int
    loaded.argtypes = list(argtypes)
    return loaded
