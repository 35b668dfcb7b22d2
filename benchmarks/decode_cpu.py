"""bs1 greedy decode speed: `slimserve generate` path vs transformers `generate`, same process.

SmolLM2-135M (the shipped Q4_1 GGUF, dequantized), fp32 and bf16, the same prompts, the same
thread count, several repetitions. transformers' decode rate follows PEERS.md:
new tokens / (time(generate N+1) - time(generate 1)), so prefill is excluded from both.
Writes benchmarks/results/decode_cpu.md.

    python benchmarks/decode_cpu.py [--new-tokens 64] [--repeats 3] [--threads 2]
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
import transformers

from slimserve.assets import fetch
from slimserve.engine.sampling_params import SamplingParams
from slimserve.eval.evaluate import module_bytes
from slimserve.eval.machine import machine_info
from slimserve.generate import GenerationProfile, Generator
from slimserve.models.loader import DTYPES, load_model, load_tokenizer

PROMPTS = [
    "The history of the United States Congress began",
    "Write a short poem about the sea:",
    "def fibonacci(n):",
]


def slimserve_rate(generator: Generator, prompt_ids: list[int], new_tokens: int) -> float:
    profile = GenerationProfile()
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for _ in generator.stream(prompt_ids, params, profile):
        pass
    return (profile.num_generated_tokens - 1) / profile.decode_s


def hf_rate(model, prompt_ids: list[int], new_tokens: int) -> float:
    ids = torch.tensor([prompt_ids])

    def timed(n: int) -> float:
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    return new_tokens / (timed(new_tokens + 1) - timed(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, the same for both engines")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode_cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    machine = machine_info()
    gguf = fetch("smollm2-135m")
    tokenizer = load_tokenizer(gguf)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    hf_fp32 = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    rows = []
    for dtype_name in ("fp32", "bf16"):
        dtype = DTYPES[dtype_name]
        ours = Generator(load_model(gguf, dtype), tokenizer)
        hf = hf_fp32.to(dtype).eval()
        floor = machine.read_gb_s * 1e9 / module_bytes(ours.model)
        for p in prompts:  # warm-up both
            slimserve_rate(ours, p, 8), hf_rate(hf, p, 4)
        ours_rates, hf_rates = [], []
        for _ in range(args.repeats):
            for p in prompts:
                ours_rates.append(slimserve_rate(ours, p, args.new_tokens))
                hf_rates.append(hf_rate(hf, p, args.new_tokens))
        o, h = statistics.median(ours_rates), statistics.median(hf_rates)
        rows.append(f"| {dtype_name} | {o:.1f} | {h:.1f} | {o / h:.2f}× | {floor:.0f} | {100 * o / floor:.0f} % |")
        print(rows[-1], flush=True)
    table = "\n".join([
        "# bs1 decode on CPU: slimserve vs transformers",
        "",
        machine.markdown(),
        "",
        f"SmolLM2-135M-Instruct (the shipped Q4_1 GGUF, dequantized to the dtype), greedy, {args.new_tokens} new "
        f"tokens after each of {len(PROMPTS)} prompts, {args.repeats} repetitions, median tok/s. transformers "
        f"{transformers.__version__} `generate`; decode rate excludes prefill for both. Floor = read bandwidth ÷ "
        "weight bytes (every weight read once per token).",
        "",
        "| dtype | slimserve tok/s | transformers tok/s | ratio | floor tok/s | % of floor |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
