"""Where GPTQ's time and memory go on the CPU: quant_report's W4 GPTQ row by part, per calibration dtype.

Issue 4 asks for GPTQ on SmolLM2-135M in under 60 s on a 2-core CPU, with its peak RAM; quant_report
times it inside a half-hour report, this in minutes. Each run, in a fresh process, loads the fp32 model,
quantizes it as the report's "W4 GPTQ" row (32 x 512 calibration tokens by default) and splits the time
into the Hessians' and the drift's sums (GPTQ.add_batch), the fp target's solves (GPTQ.target_weight),
the column loops with their Cholesky factorizations (gptq_quantize_weight), and the rest: the
calibration forward passes, both streams. Memory: the process's peak RSS, and how far it rose above
the RSS before GPTQ started (the loaded model, the runtime, the calibration tokens): GPTQ's own
working set, one decoder layer's activations and Hessians at a time. The column steps run in
kernels/gptq.cpp and, side by side in the same rounds, in the torch loop it replaced
(kernels.gptq.gptq_columns_reference). Writes benchmarks/results/gptq_time_cpu_<model>.md.

    python benchmarks/gptq_time_cpu.py [--model smollm2-135m] [--calib 32x512] [--calib-dtypes fp32,bf16]
        [--column-steps kernel,torch] [--repeat 2] [--threads 2]
"""

import argparse
import itertools
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from slimserve.assets import resolve_model
from slimserve.config import QuantConfig
from slimserve.eval.evaluate import module_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes
from slimserve.eval.machine import in_fresh_process, machine_info
from slimserve.kernels.gptq import gptq_columns_reference
from slimserve.models.loader import load_config, load_model, load_tokenizer
from slimserve.quant import gptq
from slimserve.quant.calibrate import calibration_batches
from slimserve.quant.pipeline import default_group_size

from quant_report import low_bit_scheme  # this folder's

MB = 2**20
PARTS = {"Hessians and drift": (gptq.GPTQ, "add_batch"), "fp target solves": (gptq.GPTQ, "target_weight"),
         "column loops": (gptq, "gptq_quantize_weight")}


@contextmanager
def timed(owner: object, name: str, totals: dict[str, float], part: str) -> Iterator[None]:
    """owner.<name> replaced by a wrapper adding its run time to totals[part]."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[part] += time.perf_counter() - start

    with mock.patch.object(owner, name, wrapper):
        yield


@dataclass
class Run:
    total_s: float
    parts_s: list[float]  # as PARTS
    start_rss_bytes: int  # before GPTQ: runtime, fp32 model, calibration tokens
    peak_rss_bytes: int
    model_bytes: int  # the fp32 model's tensors


def gptq_run(model_name: str, samples: int, seq_len: int, calib_dtype: str, steps: str, threads: int) -> Run:
    """Load the fp32 model and quantize it as the report's W4 GPTQ row, timed by part; run in a fresh process."""
    torch.set_num_threads(threads)
    path = resolve_model(model_name)
    calib = calibration_batches(load_tokenizer(path), num_samples=samples, seq_len=seq_len)
    model = load_model(path, torch.float32)
    config = QuantConfig(method="gptq", bits=4, act_order=True, calib_dtype=calib_dtype, num_calib_samples=samples,
                         calib_seq_len=seq_len, **low_bit_scheme(default_group_size(load_config(path))))
    model_bytes = module_bytes(model)
    totals: dict[str, float] = defaultdict(float)
    with ExitStack() as stack:
        for part, (owner, name) in PARTS.items():
            stack.enter_context(timed(owner, name, totals, part))
        if steps == "torch":
            stack.enter_context(mock.patch.object(gptq, "gptq_columns", gptq_columns_reference))
        reset_peak_rss()
        start_rss = rss_bytes()
        start = time.perf_counter()
        gptq.gptq_quantize(model, calib, config)
        total = time.perf_counter() - start
    return Run(total, [totals[part] for part in PARTS], start_rss, peak_rss_bytes(), model_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default="32x512", help="samples x tokens")
    parser.add_argument("--calib-dtypes", default="fp32,bf16")
    parser.add_argument("--column-steps", default="kernel,torch", help="kernel (gptq.cpp) and/or torch (its reference)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = machine_info()
    samples, seq_len = map(int, args.calib.split("x"))
    scheme = low_bit_scheme(default_group_size(load_config(resolve_model(args.model))))
    rows = []
    for calib_dtype, run, steps in itertools.product(args.calib_dtypes.split(","), range(args.repeat),
                                                     args.column_steps.split(",")):
        r = in_fresh_process(gptq_run, args.model, samples, seq_len, calib_dtype, steps, args.threads)
        parts = [*r.parts_s, r.total_s - sum(r.parts_s)]
        rows.append(f"| {calib_dtype} | {steps} | {run + 1} | {r.total_s:.1f} | "
                    + " | ".join(f"{t:.1f} ({t / r.total_s:.0%})" for t in parts)
                    + f" | {r.peak_rss_bytes / MB:.0f} | {(r.peak_rss_bytes - r.start_rss_bytes) / MB:.0f} |")
        print(rows[-1], flush=True)
    model_mb = r.model_bytes / MB  # every run loads the same model

    text = "\n".join([
        f"# GPTQ's time and memory on the CPU: {args.model}",
        "",
        machine.markdown(),
        "",
        f"quant_report's W4 GPTQ row (g{scheme['group_size']} asym, act-order, lm_head W8 per channel, sink weight "
        f"{QuantConfig.sink_weight:g}, fp target {QuantConfig.fp_target:g}) on {samples} x {seq_len} calibration "
        "tokens of `sotu-calib`, from the fp32 model; seconds of calibration and quantization, without loading or "
        "saving. Parts: the Hessians' and the drift's sums (GPTQ.add_batch), the fp target's solves "
        "(GPTQ.target_weight), the column loops with their Cholesky factorizations (gptq_quantize_weight), and the "
        "rest, mostly the calibration forward passes of the quantized and the float stream. Column steps: "
        "kernels/gptq.cpp (kernel) or the torch loop it replaced (torch), side by side in each round. Each run in "
        "a fresh process; peak RSS is that process's, and GPTQ's own is how far it rose above the RSS before "
        f"GPTQ began, which held the runtime, the calibration tokens and the fp32 model ({model_mb:.0f} MB "
        "of weights): the calibration activations of both streams, the copies of the layer being quantized, its "
        "Hessians and drift sums.",
        "",
        "| calibration dtype | column steps | run | total s | " + " | ".join(PARTS)
        + " | forward passes and the rest | peak RSS MB | GPTQ's own MB |",
        "|---|---|---|---|" + "---|" * (len(PARTS) + 3),
        *rows,
        "",
    ])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gptq_time_cpu_{args.model}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
