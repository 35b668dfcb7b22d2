"""slimserve's engine vs llama.cpp and transformers on SmolLM2-135M, CPU, one run, same threads.

Three measurements (PEERS.md method), greedy, ignore EOS so every engine makes the same count:
- bs1 decode tok/s = (N - 1) / (t(N tokens) - t(1 token)): prefill excluded for every engine;
- 32 concurrent requests (different prompts, 64 new tokens each): generated tokens / wall time;
- TTFT of one 128-token prompt (time to the first generated token).
Precisions side by side: slimserve fp32 / bf16 vs llama.cpp F32 / BF16 GGUFs requantized from the
same shipped weights, and llama.cpp Q8_0 / Q4_0 for reference. Writes benchmarks/results/engine_cpu.md.

    python benchmarks/engine_vs_peers_cpu.py [--threads 2] [--repeats 3]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from llamacpp_peer import LlamaCppPeer, requantize  # noqa: E402

from slimserve import LLM, SamplingParams  # noqa: E402
from slimserve.assets import cache_dir, fetch  # noqa: E402
from slimserve.eval.datasets import load_text  # noqa: E402
from slimserve.models.loader import DTYPES  # noqa: E402
from slimserve.eval.machine import machine_info  # noqa: E402

NEW_TOKENS = 64
NUM_CONCURRENT = 32
PRECISIONS = [("fp32", "f32"), ("bf16", "bf16")]  # slimserve dtype, llama.cpp GGUF type of the same weights
LLAMACPP_ONLY = ["q8_0", "q4_0"]


def prompts_from_corpus(tokenizer, count: int, length: int) -> list[list[int]]:
    ids = tokenizer.encode(load_text("sotu"))
    return [ids[i * length:(i + 1) * length] for i in range(count)]


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
    run([bs1_prompt], 4)  # warm-up
    row = {"engine": name, "bs1": decode_rate(run, bs1_prompt, repeats)}
    row["ttft_ms"] = 1e3 * statistics.median(timed(lambda: run([ttft_prompt], 1)) for _ in range(repeats))
    if batched:
        seconds = statistics.median(timed(lambda: run(concurrent, NEW_TOKENS)) for _ in range(max(1, repeats - 1)))
        row["concurrent"] = NUM_CONCURRENT * NEW_TOKENS / seconds
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "engine_cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = machine_info()
    gguf = fetch("smollm2-135m")
    rows = []
    for dtype, gguf_type in PRECISIONS:
        llm = LLM(str(gguf), dtype=dtype)
        bs1, ttft = prompts_from_corpus(llm.tokenizer, 1, 32)[0], prompts_from_corpus(llm.tokenizer, 1, 128)[0]
        concurrent = prompts_from_corpus(llm.tokenizer, NUM_CONCURRENT, 64)
        rows.append(measure(f"slimserve {dtype}", slimserve_runner(llm), bs1, concurrent, ttft, args.repeats))
        peer = LlamaCppPeer(requantize(gguf, gguf_type, cache_dir() / "bench"), args.threads, NUM_CONCURRENT)
        rows.append(measure(f"llama.cpp {gguf_type.upper()}", llamacpp_runner(peer), bs1, concurrent, ttft,
                            args.repeats))
        peer.close()
        hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=DTYPES[dtype])
        rows.append(measure(f"transformers {dtype}", hf_runner(hf.eval()), bs1, concurrent, ttft, args.repeats,
                            batched=False))
    for gguf_type in LLAMACPP_ONLY:
        peer = LlamaCppPeer(requantize(gguf, gguf_type, cache_dir() / "bench"), args.threads, NUM_CONCURRENT)
        rows.append(measure(f"llama.cpp {gguf_type.upper()}", llamacpp_runner(peer), bs1, concurrent, ttft,
                            args.repeats))
        peer.close()
    lines = [
        "# Engine vs peers on CPU: SmolLM2-135M-Instruct",
        "",
        machine.markdown(),
        "",
        f"All engines: {args.threads} threads, greedy, EOS ignored, {NEW_TOKENS} new tokens. The weights are the "
        "shipped Q4_1 GGUF dequantized (slimserve, transformers) or requantized by llama.cpp to the named type. "
        f"bs1 decode excludes prefill; 'concurrent' = {NUM_CONCURRENT} requests of 64-token prompts submitted "
        "together, generated tokens / wall time; TTFT = one 128-token prompt to its first token. Median of "
        f"{args.repeats} repetitions. transformers runs requests one by one (no batched concurrent row).",
        "",
        "| engine | bs1 decode tok/s | 32 concurrent tok/s | TTFT 128 ms |",
        "|---|---|---|---|",
    ]
    for r in rows:
        concurrent = f"{r['concurrent']:.1f}" if "concurrent" in r else "—"
        lines.append(f"| {r['engine']} | {r['bs1']:.1f} | {concurrent} | {r['ttft_ms']:.1f} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
