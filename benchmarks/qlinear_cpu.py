"""Microbenchmark: one bf16 Linear vs int8 and int4 QuantLinear on the CPU, SmolLM2-135M shapes.

Prints a markdown table of µs per call (batch 1 and 8; the best of several repetitions, as
neighbours on a shared machine only ever add time) with the speedup over bf16 F.linear, the
baseline. Usage: python benchmarks/qlinear_cpu.py [--repeats 9] [--calls 50]
"""

import argparse
import os
import platform
import subprocess
import time

import torch
import torch.nn.functional as F
from torch import nn

from slimserve.config import QuantConfig
from slimserve.quant.qlinear import QuantLinear

# (in_features, out_features): q_proj/o_proj, k_proj/v_proj, gate/up_proj, down_proj, lm_head
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]
BATCHES = [1, 8]
SCHEMES = {
    "int8": QuantConfig(bits=8, group_size=-1, sym=True),
    "int4 g64": QuantConfig(bits=4, group_size=64, sym=False),  # SmolLM2's 576 is 9 x 64, not x 128
}


def time_call(fn, x: torch.Tensor, repeats: int, calls: int) -> float:
    """Minimum over `repeats` of the mean µs per call over `calls` calls, after a warm-up."""
    for _ in range(calls):
        fn(x)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn(x)
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return min(samples)


def nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() or "uncommitted"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
          f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}, commit {commit()}")
    print()
    names = list(SCHEMES)
    print("| shape (in x out) | batch | bf16 F.linear µs | "
          + " | ".join(f"{n} µs (speedup)" for n in names)
          + " | weight KiB bf16 / " + " / ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names) + "---|")
    with torch.no_grad():
        for in_features, out_features in SHAPES:
            linear = nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)
            modules = {n: QuantLinear.from_linear(linear, c) for n, c in SCHEMES.items()}
            sizes = " / ".join(f"{nbytes(m) / 1024:.0f}" for m in [linear, *modules.values()])
            calls = max(5, args.calls * 576 * 576 // (in_features * out_features))
            for batch in BATCHES:
                x = torch.randn(batch, in_features, dtype=torch.bfloat16)
                base = time_call(lambda t: F.linear(t, linear.weight), x, args.repeats, calls)
                cells = []
                for module in modules.values():
                    us = time_call(module, x, args.repeats, calls)
                    cells.append(f"{us:.1f} ({base / us:.2f}x, {module.kernel.value})")
                print(f"| {in_features} x {out_features} | {batch} | {base:.1f} | " + " | ".join(cells)
                      + f" | {sizes} |")


if __name__ == "__main__":
    main()
