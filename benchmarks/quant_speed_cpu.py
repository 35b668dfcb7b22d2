"""Decode and prefill speed of SmolLM2-135M quantized (RTN) vs bf16 on the CPU, one run, same threads.

Through the public LLM API only, greedy, EOS ignored (PEERS.md method):
- decode tok/s at batch B = B * (N - 1) / (t(B prompts, N tokens) - t(B prompts, 1 token)), so
  prefill cancels out; B = 1 and B = 8 (8 different prompts submitted together);
- prefill: time to the first token of one 512-token prompt.
Each repetition of each model runs in a fresh spawned process (compiled graphs and thread pools of
one engine slowed the next), round-robin over the models; the load average before each is recorded
beside the table, which gives medians and each row's ratio to bf16. Writes
benchmarks/results/quant_speed_cpu.md, or quant_speed_cpu_compiled.md with --compile.

    python benchmarks/quant_speed_cpu.py [--threads 2] [--repeats 5] [--compile]
"""

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from slimserve import LLM, SamplingParams
from slimserve.config import QuantConfig
from slimserve.eval.datasets import load_text
from slimserve.eval.machine import in_fresh_process, machine_info
from slimserve.kernels import w4a16, w8a8, w8a16
from slimserve.models.loader import load_tokenizer
from slimserve.quant.pipeline import cached_quantize
from slimserve.quant.qlinear import PACKED_CPU_MAX_ROWS, W8A16_MAX_ROWS, Kernel

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
    "int8 W8A16 g64 asym": QuantConfig(bits=8, group_size=64, sym=False),
    "int4 g64 sym, lm_head int8": QuantConfig(bits=4, group_size=64, sym=True, modules=LM_HEAD_8BIT),
    "int4 g64 asym, lm_head int8": QuantConfig(bits=4, group_size=64, sym=False, modules=LM_HEAD_8BIT),
    "int4 g64 asym": QuantConfig(bits=4, group_size=64, sym=False),
    "int3 g64 asym, lm_head int8": QuantConfig(bits=3, group_size=64, sym=False, modules=LM_HEAD_8BIT),
    "int8 W8A8 dynamic": QuantConfig(bits=8, group_size=-1, sym=True, act_bits=8),
}
COMPILED_NOTE = (" (batch-1 decode as one torch.compile graph, in which bf16, int8 and W8A8 layers "
                 "stream their plain weight through kernels/gemv.py, every other step as a second graph "
                 "calling the kernels below; compile time excluded)")
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


def measure_variant(path: str, compiled: bool, threads: int, decode_prompts: list[list[int]],
                    prefill_prompt: list[int]) -> tuple[dict[str, float], float]:
    """One repetition of every column for one model and the load average before it, measured in a
    spawned worker of its own: a fresh process per engine, where none inherits another's compiled
    graphs, threads or memory."""
    torch.set_num_threads(threads)
    # no prefix caching: every repetition's prefill must compute its prompt again
    llm = LLM(path, dtype="bf16", kv_cache_memory=KV_CACHE_MEMORY, enable_prefix_caching=False,
              compile=compiled)
    runner(llm)(decode_prompts, 4)  # warm-up: first calls allocate buffers, set up kernels, compile
    runner(llm)([prefill_prompt], 1)
    load = os.getloadavg()[0]
    return measure(llm, decode_prompts, prefill_prompt), load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="measure compiled engines (compile=True)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or Path(__file__).parent / "results" / f"quant_speed_cpu{'_compiled' if args.compile else ''}.md"
    torch.manual_seed(0)
    machine = machine_info()
    ids = load_tokenizer(MODEL).encode(load_text("sotu"))
    decode_prompts = [ids[i * DECODE_PROMPT_TOKENS:(i + 1) * DECODE_PROMPT_TOKENS] for i in range(8)]
    prefill_prompt = ids[-PREFILL_TOKENS:]
    paths = {name: MODEL if config is None else str(cached_quantize(MODEL, config, progress=False))
             for name, config in VARIANTS.items()}
    samples = {name: {column: [] for column in COLUMNS} for name in VARIANTS}
    loads = []
    # Round-robin: each round measures every model once, so a slow spell of this shared machine
    # slows all of them alike instead of one model's every repetition.
    for round_index in range(args.repeats):
        for name, path in paths.items():
            row, load = in_fresh_process(measure_variant, path, args.compile, args.threads, decode_prompts,
                                         prefill_prompt)
            for column, value in row.items():
                samples[name][column].append(value)
            loads.append(load)
        print(f"round {round_index + 1} done, load average {', '.join(f'{x:.2f}' for x in loads[-len(paths):])}",
              flush=True)
    medians = {name: {c: statistics.median(v) for c, v in row.items()} for name, row in samples.items()}
    base = medians["bf16"]
    int4 = ("`kernels/w4a16.cpp` (past 256 rows the weight dequantized to bf16 in C++ for torch's matmul)"
            if w4a16.available() else
            f"`_weight_int4pack_mm_for_cpu` up to {PACKED_CPU_MAX_ROWS[Kernel.INT4_CPU]} rows")
    lines = [
        f"# Quantized vs bf16 speed on CPU: {MODEL}",
        "",
        machine.markdown(),
        "",
        f"{args.threads} threads; RTN-quantized folders written by slimserve.quant.pipeline, loaded with "
        f"`LLM(folder, dtype=\"bf16\", enable_prefix_caching=False, compile={args.compile})` in a fresh "
        f"process each{COMPILED_NOTE if args.compile else ''}. Greedy, EOS ignored, {NEW_TOKENS} "
        f"new tokens after "
        f"{DECODE_PROMPT_TOKENS}-token prompts; bs8 = 8 different prompts submitted together; decode "
        f"excludes prefill (a 1-token run is subtracted); prefill = time to the first token of one "
        f"{PREFILL_TOKENS}-token prompt. Median of {args.repeats} rounds; each round measures every model "
        "once, in the order below, each in a fresh process (round-robin: a slow spell of this shared machine "
        "slows every model alike); load average (1 min) before each measurement, round by round: "
        + ", ".join(f"{load:.2f}" for load in loads) + ". Ratios are vs bf16 (> 1 is faster; for prefill, "
        "bf16 time / model time).",
        "",
        "Kernels: bf16 layers run oneDNN matmuls; int8 W8A16 layers run "
        + (f"slimserve's `kernels/w8a16.cpp` up to {W8A16_MAX_ROWS} rows (grouped asymmetric ones too, "
           "dequantizing each 32 weights as it widens them, up to 48 rows, then the whole weight in C++)"
           if w8a16.available() else
           f"`_weight_int8pack_mm` up to {PACKED_CPU_MAX_ROWS[Kernel.INT8_CPU]} rows")
        + ", above that the weight dequantized to bf16 and a bf16 GEMM; int4 and int3 layers (3-bit integers "
        f"one a nibble) {int4}; W8A8 layers quantize activations per token and run "
        + ("slimserve's `kernels/w8a8.cpp` on the weight in VNNI order" if w8a8.available() else
           "oneDNN's int8 GEMM on a prepacked weight (`onednn.qlinear_pointwise`)") + ".",
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
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
