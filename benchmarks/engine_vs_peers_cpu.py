"""slimserve's engine vs llama.cpp and transformers on SmolLM2-135M, CPU, one run, same threads.

Three measurements (PEERS.md method), greedy, ignore EOS so every engine makes the same count:
- bs1 decode tok/s = (N - 1) / (t(N tokens) - t(1 token)): prefill excluded for every engine;
- 32 concurrent requests (different prompts, 64 new tokens each): generated tokens / wall time;
- TTFT of one 128-token prompt (time to the first generated token).
Precisions side by side, all from the same shipped weights: slimserve fp32 / bf16 / int8 / int4 / w4a8 /
w8a8 vs llama.cpp F32 / BF16 / Q8_0 / Q4_0 / Q4_0 / Q8_0. slimserve's int8 is RTN symmetric per output
channel and its int4 RTN symmetric in groups of 32 (Q4_0's grid), both with bf16 activations; its w4a8
is that int4 with int8 activations per group of 32 and its w8a8 SmoothQuant with int8 activations per
token, as llama.cpp's Q8_0 and Q4_0 products quantize activations to 8 bits (in blocks of 32);
transformers runs fp32 / bf16.
Profiles of slimserve's bf16 and w4a8 bs1 decode and 32-concurrent runs say where the time goes.
Writes benchmarks/results/engine_cpu.md.

    python benchmarks/engine_vs_peers_cpu.py [--threads 2] [--repeats 3]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from llamacpp_peer import LlamaCppPeer, requantize  # noqa: E402

from slimserve import LLM, SamplingParams  # noqa: E402
from slimserve.assets import cache_dir, fetch  # noqa: E402
from slimserve.eval.datasets import load_text  # noqa: E402
from slimserve.config import QuantConfig  # noqa: E402
from slimserve.models.loader import DTYPES, load_tokenizer  # noqa: E402
from slimserve.quant.pipeline import cached_quantize  # noqa: E402
from slimserve.quant.qlinear import W8A16_MAX_ROWS  # noqa: E402
from slimserve.eval.machine import in_fresh_process, machine_info  # noqa: E402

NEW_TOKENS = 64
NUM_CONCURRENT = 32
# slimserve precision: (its RTN config or None for plain weights, llama.cpp GGUF type of the same weights)
PRECISIONS = {
    "fp32": (None, "f32"),
    "bf16": (None, "bf16"),
    "int8": (QuantConfig(bits=8, group_size=-1), "q8_0"),
    "int4": (QuantConfig(bits=4, group_size=32), "q4_0"),
    "w4a8": (QuantConfig(bits=4, group_size=32, act_bits=8), "q4_0"),
    "w8a8": (QuantConfig(method="smoothquant", bits=8, group_size=-1, act_bits=8, num_calib_samples=32,
                         calib_seq_len=512), "q8_0"),
}
PROFILED_OPS = 8
PROFILED = ("bf16", "w4a8")  # the precisions whose profiles the results file shows


def benchmark_prompts(tokenizer) -> tuple[list[int], list[list[int]], list[int]]:
    """From the start of the corpus: the bs1 prompt (32 tokens), the concurrent prompts (64 tokens
    each) and the TTFT prompt (128)."""
    ids = tokenizer.encode(load_text("sotu"))

    def prompts(count: int, length: int) -> list[list[int]]:
        return [ids[i * length:(i + 1) * length] for i in range(count)]

    return prompts(1, 32)[0], prompts(NUM_CONCURRENT, 64), prompts(1, 128)[0]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_rate(run, prompt: list[int], repeats: int) -> float:
    """run(prompts, new_tokens) generates greedily; prefill is cancelled by the 1-token run."""
    rates = [(NEW_TOKENS - 1) / (timed(lambda: run([prompt], NEW_TOKENS)) - timed(lambda: run([prompt], 1)))
             for _ in range(repeats)]
    return statistics.median(rates)


def slimserve_runner(llm: LLM):
    def run(prompts, new_tokens):
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        return llm.generate(prompts, params, use_tqdm=False)
    return run


def llamacpp_runner(peer: LlamaCppPeer):
    return lambda prompts, new_tokens: peer.generate(prompts, new_tokens)


def hf_runner(model):
    def run(prompts, new_tokens):
        for prompt in prompts:
            model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0)
    return run


def measure(name: str, run, bs1_prompt, concurrent, ttft_prompt, repeats: int, batched: bool = True) -> dict:
    # Warm-up, which also compiles slimserve's batch-1 decode graph when compile=True.
    warmup = timed(lambda: (run([bs1_prompt], 4), batched and run(concurrent, 2)))
    row = {"engine": name, "warmup_s": warmup, "bs1": decode_rate(run, bs1_prompt, repeats)}
    row["ttft_ms"] = 1e3 * statistics.median(timed(lambda: run([ttft_prompt], 1)) for _ in range(repeats))
    if batched:
        seconds = statistics.median(timed(lambda: run(concurrent, NEW_TOKENS)) for _ in range(max(1, repeats - 1)))
        row["concurrent"] = NUM_CONCURRENT * NEW_TOKENS / seconds
    print(row, flush=True)
    return row


def slimserve_weights(gguf: Path, quant_config: QuantConfig | None) -> Path:
    """The shipped GGUF itself, or a folder quantized from it (written once, cached)."""
    return gguf if quant_config is None else cached_quantize(gguf, quant_config, progress=False)


def slimserve_row(weights: str, dtype: str, compiled: bool, name: str, prompts: tuple, threads: int,
                  repeats: int, profiled: bool) -> tuple[dict, list[str]]:
    """One slimserve engine's row (and its profiles), measured in the process of a spawned worker:
    a fresh process per engine, where none inherits what earlier engines left (compiled graphs,
    threads, allocated memory). Run in the benchmark's own process one after another, compiled
    engines measured slower than alone (bf16 TTFT 148 vs 105-113 ms)."""
    torch.set_num_threads(threads)
    # No prefix caching: the runs repeat their prompts, and llama.cpp clears its cache every run.
    start = time.perf_counter()
    llm = LLM(weights, dtype=dtype, enable_prefix_caching=False, compile=compiled)  # compiles its graphs
    load_s = time.perf_counter() - start
    bs1, concurrent, ttft = prompts
    run = slimserve_runner(llm)
    row = measure(name, run, bs1, concurrent, ttft, repeats)
    row["warmup_s"] += load_s
    profiles = []
    if profiled:
        profiles = [profile(f"{name}, bs1 decode of {NEW_TOKENS} tokens", lambda: run([bs1], NEW_TOKENS)),
                    profile(f"{name}, {NUM_CONCURRENT} concurrent", lambda: run(concurrent, NEW_TOKENS))]
    return row, profiles


def profile(title: str, fn) -> str:
    """The ops taking most of fn's time, as a markdown table."""
    with torch.profiler.profile() as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    lines = [f"**{title}** (torch profiler, self CPU time)", "", "| op | calls | ms | share |", "|---|---|---|---|"]
    lines += [f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e3:.1f} | {100 * e.self_cpu_time_total / total:.0f} % |"
              for e in events[:PROFILED_OPS]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "engine_cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # An empty inductor cache, so the warm-up column is a first start's compile time.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    machine = machine_info()
    gguf = fetch("smollm2-135m")
    rows = []
    profiles = []
    prompts = bs1, concurrent, ttft = benchmark_prompts(load_tokenizer(gguf))
    for precision, (quant_config, gguf_type) in PRECISIONS.items():
        dtype = precision if quant_config is None else "bf16"
        weights = str(slimserve_weights(gguf, quant_config))
        for compiled in (False, True):
            name = f"slimserve {precision}" + (" compiled" if compiled else "")
            row, row_profiles = in_fresh_process(slimserve_row, weights, dtype, compiled, name, prompts,
                                                 args.threads, args.repeats, precision in PROFILED)
            rows.append(row)
            profiles += row_profiles
        if not any(r["engine"] == f"llama.cpp {gguf_type.upper()}" for r in rows):  # Q8_0 serves two rows
            peer = LlamaCppPeer(requantize(gguf, gguf_type, cache_dir() / "bench"), args.threads, NUM_CONCURRENT)
            rows.append(measure(f"llama.cpp {gguf_type.upper()}", llamacpp_runner(peer), bs1, concurrent, ttft,
                                args.repeats))
            peer.close()
        if quant_config is None:
            hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                   dtype=DTYPES[precision])
            rows.append(measure(f"transformers {precision}", hf_runner(hf.eval()), bs1, concurrent, ttft,
                                args.repeats, batched=False))
            del hf
    lines = [
        "# Engine vs peers on CPU: SmolLM2-135M-Instruct",
        "",
        machine.markdown(),
        "",
        f"All engines: {args.threads} threads, greedy, EOS ignored, {NEW_TOKENS} new tokens. The weights are the "
        "shipped Q4_1 GGUF dequantized (slimserve, transformers) or requantized by llama.cpp to the named type. "
        f"bs1 decode excludes prefill; 'concurrent' = {NUM_CONCURRENT} requests of 64-token prompts submitted "
        "together, generated tokens / wall time; TTFT = one 128-token prompt to its first token. Median of "
        f"{args.repeats} repetitions. transformers runs requests one by one (no batched concurrent row). "
        "slimserve int8 / int4: RTN from the same fp32 weights, per output channel / groups of 32, symmetric, "
        f"bf16 activations (slimserve's W8A16 kernel `kernels/w8a16.cpp` up to {W8A16_MAX_ROWS} rows and its W4A16 "
        "kernel `kernels/w4a16.cpp` at every row count; the one-row compiled graph streams int8 weights through "
        "`kernels/gemv.py`); "
        "slimserve w8a8: SmoothQuant (32 x 512 "
        "calibration tokens of `sotu-calib`), int8 weights per output channel and int8 activations per token "
        "(slimserve's `kernels/w8a8.cpp`); slimserve w4a8: the int4 weights with int8 activations per group of "
        "32, Q4_0 x Q8_0's arithmetic (`kernels/w4a8.cpp`, at every row count); llama.cpp Q8_0 / Q4_0: blocks "
        "of 32, whose products quantize the activations to 8 bits too (the Q8_0 row serves int8 and w8a8, "
        "the Q4_0 row int4 and w4a8). "
        "'compiled' = `compile=True`: decode-only steps run as one torch.compile graph for one sequence and one "
        "for any number, and every other step as a third, for any token count, which calls the C++ operators "
        "of the w8a8, int4 and w4a8 layers as they are and the other linear layers (int8's among them) and "
        "attention as opaque operators (`models/opaque.py`); attention is `kernels/paged_attention.cpp`'s "
        "operators (decode, and prefill with every prompt of a step in one call) in every engine; "
        "the warm-up column holds the engine's load and first runs, for compiled engines with their compile "
        "time from an empty torch.compile cache (a first start; later starts reuse the on-disk cache), "
        "excluded from the other columns.",
        "",
        "| engine | bs1 decode tok/s | 32 concurrent tok/s | TTFT 128 ms | warm-up s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        concurrent = f"{r['concurrent']:.1f}" if "concurrent" in r else "—"
        lines.append(f"| {r['engine']} | {r['bs1']:.1f} | {concurrent} | {r['ttft_ms']:.1f} | {r['warmup_s']:.0f} |")
    lines += ["", "Ratios against the issue's targets (bs1 ≥ 1.0x llama.cpp and ≥ 3x transformers, 32 concurrent "
              "≥ 3x llama.cpp, TTFT < 100 ms):", "", "| precision | bs1 / llama.cpp | bs1 / transformers | "
              "concurrent / llama.cpp | TTFT ms |", "|---|---|---|---|---|"]
    by_name = {r["engine"]: r for r in rows}
    for precision, (_, gguf_type) in PRECISIONS.items():
        peer, hf = by_name[f"llama.cpp {gguf_type.upper()}"], by_name.get(f"transformers {precision}")
        for variant in (precision, f"{precision} compiled"):
            ours = by_name[f"slimserve {variant}"]
            vs_hf = f"{ours['bs1'] / hf['bs1']:.2f}x" if hf else "—"
            lines.append(f"| {variant} | {ours['bs1'] / peer['bs1']:.2f}x | {vs_hf} | "
                         f"{ours['concurrent'] / peer['concurrent']:.2f}x | {ours['ttft_ms']:.0f} |")
    lines += ["", "## Where slimserve's time goes", ""] + [p + "\n" for p in profiles]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
