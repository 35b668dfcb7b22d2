"""The quantized matmul kernels on CPU, one run, side by side: SmolLM2-135M's 121 fused linear layers.

Random weights of the real shapes (q/k/v 960 x 576, o 576 x 576, gate/up 3072 x 576, down 576 x 1536,
per layer x 30, and the 49152 x 576 head), each layer its own weight so they come from memory, as
in a decode step. Time of one pass over all 121 layers at each row count, best of 3:
- W8A16 (bf16 activations): oneDNN's bf16 GEMM on its prepacked bf16 weight (the bf16 model),
  torch's `_weight_int8pack_mm`, the int8 weight dequantized to bf16 + GEMM, and kernels/w8a16.cpp;
- 8-bit weights in groups of 32 with zero points (bf16 activations): kernels/w8a16.cpp dequantizing
  each 32 weights as it widens them (INT8_GROUPED_CPU; past 48 rows the whole weight, in C++, for a
  bf16 GEMM), and the weight dequantized in torch + bf16 GEMM (what such layers ran before);
- W8A8 (uint8 activations, the integer product only): oneDNN's prepacked u8 x s8 GEMM and
  kernels/w8a8.cpp;
- 4-bit weights in groups of 32 (bf16 activations): an INT4_CPU QuantLinear (torch's
  `_weight_int4pack_mm_for_cpu` up to 48 rows, the weight dequantized + bf16 GEMM above; what
  4-bit layers run where kernels/w4a16.cpp cannot be built), a W4A16_CPU one (kernels/w4a16.cpp) and
  a W4A8_CPU one (kernels/w4a8.cpp, activations quantized to int8 per group in the same call).
One row, as the batch-1 decode graph runs it: kernels/gemv.cpp on the plain bf16 and int8 weights
against the torch expression it replaced there (kernels.gemv.gemv_reference, all 121 layers compiled
into one torch.compile graph), with the weight bytes each reads per second.
Writes benchmarks/results/quant_kernels_cpu.md.

    python benchmarks/quant_kernels_cpu.py [--threads 2]
"""

import argparse
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from slimserve.config import QuantConfig
from slimserve.eval.machine import machine_info
from slimserve.kernels import gemv, w4a8, w4a16, w8a8, w8a16
from slimserve.quant.qlinear import PACKED_CPU_MAX_ROWS, Kernel, QuantLinear
from slimserve.quant.rtn import dequantize_weight

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]  # (out, in)
ROWS = (1, 8, 32, 128, 512)


def best_ms(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def int4_layer(linear: torch.nn.Linear, act_bits: int | None, kernel: Kernel) -> QuantLinear:
    # INT4_CPU: as where w4a16.cpp cannot be built
    with mock.patch.object(w4a16, "packable", return_value=False) if kernel is Kernel.INT4_CPU else nullcontext():
        layer = QuantLinear.from_linear(linear, QuantConfig(bits=4, group_size=32, act_bits=act_bits))
    assert layer.kernel is kernel, f"{kernel} does not run here"
    return layer


def layer(out_features: int, in_features: int) -> dict:
    linear = torch.nn.Linear(in_features, out_features, bias=False).to(torch.bfloat16)
    weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8)
    scales = (torch.rand(out_features) / 64).to(torch.bfloat16)
    group_scales = (torch.rand(out_features, in_features // 32) / 64).to(torch.bfloat16)
    zeros = torch.randint(0, 256, group_scales.shape, dtype=torch.uint8)
    return {
        "weight": weight, "scales": scales, "grouped": (weight, group_scales, zeros),
        "bf16": torch.ops.mkldnn._reorder_linear_weight(
            torch.randn(out_features, in_features).to(torch.bfloat16), None),
        "onednn": (torch.ops.onednn.qlinear_prepack(weight, None), scales.float(), torch.zeros(1, dtype=torch.long)),
        "vnni": (*w8a8.pack(weight), scales.float()),
        "int4": int4_layer(linear, None, Kernel.INT4_CPU),
        "w4a16": int4_layer(linear, None, Kernel.W4A16_CPU),
        "w4a8": int4_layer(linear, 8, Kernel.W4A8_CPU),
    }


KERNELS = {
    "bf16 GEMM (oneDNN)": lambda x, x_u8, l: torch.ops.mkldnn._linear_pointwise(x, l["bf16"], None, "none", [], ""),
    "int8pack_mm (torch)": lambda x, x_u8, l: torch._weight_int8pack_mm(x, l["weight"], l["scales"]),
    "dequantize + bf16 GEMM": lambda x, x_u8, l: F.linear(x, l["weight"].to(torch.bfloat16)) * l["scales"],
    "w8a16.cpp": lambda x, x_u8, l: w8a16.w8a16_matmul(x, l["weight"], l["scales"]),
    "W8 g32 asym dequantize + bf16 GEMM": lambda x, x_u8, l: F.linear(
        x, dequantize_weight(l["weight"].to(torch.int16) + 128, *l["grouped"][1:]).to(torch.bfloat16)),
    "W8 g32 asym w8a16.cpp": lambda x, x_u8, l: w8a16.w8a16_matmul(x, *l["grouped"]),
    "W8A8 u8 x s8 (oneDNN)": lambda x, x_u8, l: torch.ops.onednn.qlinear_pointwise(
        x_u8, 1.0, 128, *l["onednn"], None, 1.0, 0, torch.float32, "none", [], ""),
    "W8A8 w8a8.cpp": lambda x, x_u8, l: w8a8.w8a8_matmul(x_u8, *l["vnni"]),
    "W4 g32 int4pack_mm (torch) / dequantize + GEMM": lambda x, x_u8, l: int4_product(x, l["int4"]),
    "W4 g32 w4a16.cpp": lambda x, x_u8, l: w4a16.w4a16_linear(x, *l["w4a16"].nibbles),
    "W4A8 g32 w4a8.cpp": lambda x, x_u8, l: w4a8.w4a8_linear(x, *l["w4a8"].nibbles),
}


def int4_product(x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
    """What an INT4_CPU layer's forward runs on x, without its Python around it."""
    if x.shape[0] > PACKED_CPU_MAX_ROWS[Kernel.INT4_CPU]:
        return layer._dequantized_mm(x)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.qweight, 32, layer.scales_and_zeros)


def one_row(layers: list[dict]) -> list[str]:
    """Table rows: the one-row products of the bf16 and int8 weights, gemv.cpp vs inductor's loop."""
    x = {k: torch.randn(1, k).to(torch.bfloat16) for k in (576, 1536)}
    bf16 = [torch.randn(l["weight"].shape).to(torch.bfloat16) for l in layers]
    int8 = [(l["weight"], l["scales"]) for l in layers]

    @torch.compile
    def compiled(weights: list[tuple]) -> list[torch.Tensor]:
        return [gemv.gemv_reference(x[w[0].shape[1]], *w) for w in weights]

    rows = []
    for name, weights in (("bf16", [(w,) for w in bf16]), ("int8 x bf16 scale", int8)):
        size = sum(w[0].numel() * w[0].element_size() for w in weights)
        for kernel, fn in (("gemv.cpp", lambda: [gemv.gemv(x[w[0].shape[1]], *w) for w in weights]),
                           ("torch expression, compiled", lambda: compiled(weights))):
            ms = best_ms(fn, repeats=5)
            rows.append(f"| {name} | {kernel} | {ms:.2f} | {size / ms / 1e6:.1f} |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quant_kernels_cpu.md")
    args = parser.parse_args()
    if not all(kernel.available() for kernel in (w8a16, w8a8, w4a8, w4a16, gemv)):
        raise SystemExit("the C++ kernels do not build here (AVX512-BF16/VNNI, a C++ compiler, torch 2.13+ needed)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    machine = machine_info()
    layers = [layer(*shape) for shape in SHAPES]
    times = {name: [] for name in KERNELS}
    for rows in ROWS:
        x = {k: torch.randn(rows, k).to(torch.bfloat16) for k in (576, 1536)}
        x_u8 = {k: torch.randint(0, 256, (rows, k), dtype=torch.uint8) for k in (576, 1536)}
        for name, kernel in KERNELS.items():
            times[name].append(best_ms(lambda: [kernel(x[l["weight"].shape[1]], x_u8[l["weight"].shape[1]], l)
                                                for l in layers]))
        print(rows, {name: round(t[-1], 1) for name, t in times.items()}, flush=True)
    with torch.inference_mode():
        single = one_row(layers)
    lines = [
        "# Quantized matmul kernels on CPU: SmolLM2-135M's 121 layers",
        "",
        machine.markdown(),
        "",
        " ".join(__doc__.split("\n\n")[1].split()).removesuffix(" Writes benchmarks/results/quant_kernels_cpu.md."),
        "",
        "| kernel | " + " | ".join(f"{rows} rows ms" for rows in ROWS) + " |",
        "|---|" + "---|" * len(ROWS),
        *(f"| {name} | " + " | ".join(f"{t:.1f}" for t in row) + " |" for name, row in times.items()),
        "",
        "One row, the batch-1 decode graph's products:",
        "",
        "| weight | kernel | ms | GB/s |",
        "|---|---|---|---|",
        *single,
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
