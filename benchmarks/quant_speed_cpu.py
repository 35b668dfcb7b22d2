"""Decode and prefill speed of SmolLM2-135M quantized (RTN) vs bf16 on the CPU, one run, same threads.

Through the public LLM API only, greedy, EOS ignored (PEERS.md method):
- decode tok/s at batch B = B * (N - 1) / (t(B prompts, N tokens) - t(B prompts, 1 token)), so
  prefill cancels out; B = 1 and B = 8 (8 different prompts submitted together);
- prefill: time to the first token of one 512-token prompt.
Each repetition measures every model in turn, so a neighbour's load hits all of them alike; the
table gives medians and each row's ratio to bf16. Writes benchmarks/results/quant_speed_cpu.md.

    python benchmarks/quant_speed_cpu.py [--threads 2] [--repeats 5]
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from slimserve import LLM, SamplingParams
from slimserve.config import QuantConfig
from slimserve.eval.datasets import load_text
from slimserve.eval.machine import machine_info
from slimserve.quant.pipeline import quantize
from slimserve.quant.qlinear import PACKED_CPU_MAX_ROWS, Kernel

MODEL = "smollm2-135m"
NEW_TOKENS = 64
DECODE_PROMPT_TOKENS = 32
PREFILL_TOKENS = 512
BATCH_SIZES = (1, 8)
KV_CACHE_MEMORY = 2**28  # bytes per model: 8 x (512 + 64) tokens fit many times over
LM_HEAD_8BIT = {"lm_head": {"bits": 8, "group_size": -1, "sym": True}}
# name -> RTN config (None: the bf16 model itself); SmolLM2's 576 columns are 9 groups of 64
VARIANTS = {
    "bf16": None,
    "int8 W8A16 per-channel sym": QuantConfig(bits=8, group_size=-1, sym=True),
    "int4 g64 sym, lm_head int8": QuantConfig(bits=4, group_size=64, sym=True, modules=LM_HEAD_8BIT),
    "int4 g64 asym, lm_head int8": QuantConfig(bits=4, group_size=64, sym=False, modules=LM_HEAD_8BIT),
    "int4 g64 asym": QuantConfig(bits=4, group_size=64, sym=False),
    "int8 W8A8 dynamic": QuantConfig(bits=8, group_size=-1, sym=True, act_bits=8),
}
COLUMNS = [f"bs{b} decode tok/s" for b in BATCH_SIZES] + [f"prefill {PREFILL_TOKENS} ms"]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def runner(llm: LLM):
    def run(prompts: list[list[int]], new_tokens: int) -> None:
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        llm.generate(prompts, params, use_tqdm=False)
    return run


def measure(llm: LLM, decode_prompts: list[list[int]], prefill_prompt: list[int]) -> dict[str, float]:
    """One repetition of every column for one model."""
    run = runner(llm)
    row = {}
    for batch, column in zip(BATCH_SIZES, COLUMNS):
        prompts = decode_prompts[:batch]
        seconds = timed(lambda: run(prompts, NEW_TOKENS)) - timed(lambda: run(prompts, 1))
        row[column] = batch * (NEW_TOKENS - 1) / seconds
    row[COLUMNS[-1]] = 1e3 * timed(lambda: run([prefill_prompt], 1))
    return row


def verdict(ratios: dict[str, float]) -> str:
    """Decode must not be slower than bf16; prefill is reported, not judged."""
    slower = [f"{column.split()[0]} {ratio:.2f}x" for column, ratio in ratios.items()
              if "decode" in column and ratio < 1.0]
    return "yes" if not slower else "no: " + ", ".join(slower)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quant_speed_cpu.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    machine = machine_info()
    with tempfile.TemporaryDirectory() as folders:
        llms = {}
        for name, config in VARIANTS.items():
            path = MODEL
            if config is not None:
                path = Path(folders) / name.replace(" ", "-").replace(",", "")
                quantize(MODEL, config, path, progress=False, dtype="bf16")
            # no prefix caching: every repetition's prefill must compute its prompt again
            llms[name] = LLM(str(path), dtype="bf16", kv_cache_memory=KV_CACHE_MEMORY,
                             enable_prefix_caching=False)
        ids = llms["bf16"].tokenizer.encode(load_text("sotu"))
        decode_prompts = [ids[i * DECODE_PROMPT_TOKENS:(i + 1) * DECODE_PROMPT_TOKENS] for i in range(8)]
        prefill_prompt = ids[-PREFILL_TOKENS:]
        samples = {name: {column: [] for column in COLUMNS} for name in llms}
        loads = []
        for llm in llms.values():  # warm-up: first calls allocate buffers and set up kernels
            runner(llm)(decode_prompts, 4)
            runner(llm)([prefill_prompt], 1)
        for repeat in range(args.repeats):
            loads.append(os.getloadavg()[0])
            for name, llm in llms.items():
                for column, value in measure(llm, decode_prompts, prefill_prompt).items():
                    samples[name][column].append(value)
            print(f"repetition {repeat + 1}/{args.repeats} done, load average {loads[-1]:.2f}", flush=True)
    medians = {name: {c: statistics.median(v) for c, v in row.items()} for name, row in samples.items()}
    base = medians["bf16"]
    lines = [
        f"# Quantized vs bf16 speed on CPU: {MODEL}",
        "",
        machine.markdown(),
        "",
        f"{args.threads} threads; RTN-quantized folders written by slimserve.quant.pipeline, loaded with "
        f"`LLM(folder, dtype=\"bf16\", enable_prefix_caching=False)`. Greedy, EOS ignored, {NEW_TOKENS} "
        f"new tokens after "
        f"{DECODE_PROMPT_TOKENS}-token prompts; bs8 = 8 different prompts submitted together; decode "
        f"excludes prefill (a 1-token run is subtracted); prefill = time to the first token of one "
        f"{PREFILL_TOKENS}-token prompt. Median of {args.repeats} repetitions, every model measured in "
        f"each; load average (1 min) at the start of each repetition: "
        + ", ".join(f"{load:.2f}" for load in loads) + ". Ratios are vs bf16 (> 1 is faster; for prefill, "
        "bf16 time / model time).",
        "",
        f"Kernels: bf16 layers run oneDNN matmuls; int8 W8A16 layers run `_weight_int8pack_mm` up to "
        f"{PACKED_CPU_MAX_ROWS[Kernel.INT8_CPU]} rows and int4 layers `_weight_int4pack_mm_for_cpu` up to "
        f"{PACKED_CPU_MAX_ROWS[Kernel.INT4_CPU]} rows (decode), above that (prefill) the weight dequantized to "
        "bf16 and a bf16 GEMM; W8A8 layers quantize activations per token and run `torch._int_mm`.",
        "",
        *([f"**Load average above {os.cpu_count()} cores: neighbours shared the CPU, so ratios are noisy.**", ""]
          if max(loads) > os.cpu_count() else []),
        "| model | " + " | ".join(f"{c} (vs bf16)" for c in COLUMNS) + " | decode not slower than bf16 |",
        "|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for name, row in medians.items():
        ratios = {c: row[c] / base[c] if "decode" in c else base[c] / row[c] for c in COLUMNS}
        cells = " | ".join(f"{row[c]:.1f} ({ratios[c]:.2f}x)" for c in COLUMNS)
        lines.append(f"| {name} | {cells} | {'—' if name == 'bf16' else verdict(ratios)} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
