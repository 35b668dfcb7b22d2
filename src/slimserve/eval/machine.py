"""What machine a measurement ran on (every results file starts with this), and a fresh process to
measure in."""

import multiprocessing
import os
import platform
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch


@dataclass
class MachineInfo:
    cpu: str
    caches: str
    read_gb_s: float  # sum() over a 256 MiB fp32 tensor with torch's threads
    threads: int
    torch_version: str
    gpu: str | None
    commit: str
    load_average: float  # 1-minute load average when measured: these 2-core machines are shared

    def markdown(self) -> str:
        gpu = f", GPU {self.gpu}" if self.gpu else ""
        return (f"Machine: {self.cpu} ({self.caches}), {self.threads} torch threads, "
                f"read bandwidth {self.read_gb_s:.1f} GB/s{gpu}; torch {self.torch_version}; commit {self.commit}; "
                f"load average {self.load_average:.1f} at the start.")


def read_bandwidth_gb_s(num_bytes: int = 256 << 20, repeats: int = 5) -> float:
    x = torch.ones(num_bytes // 4)
    x.sum()
    start = time.perf_counter()
    for _ in range(repeats):
        x.sum()
    return num_bytes * repeats / (time.perf_counter() - start) / 1e9


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def machine_info() -> MachineInfo:
    cpu = _lscpu()
    caches = ", ".join(f"{k.split()[0]} {cpu[k]}" for k in ("L2 cache", "L3 cache") if k in cpu)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return MachineInfo(cpu.get("Model name", platform.processor() or "unknown CPU"), caches, read_bandwidth_gb_s(),
                       torch.get_num_threads(), torch.__version__, gpu, _commit(), os.getloadavg()[0])


def in_fresh_process(fn: Callable, *args):
    """fn(*args) run in a spawned process of its own; returns its result. A measurement there
    inherits nothing of this process: no compiled graphs, no OpenMP pool of another thread, no
    memory freed but kept (peak RSS)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()
