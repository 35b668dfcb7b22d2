"""Serving load on SmolLM2-135M, CPU: `slimserve serve` in a child process, the load generator here.

Concurrency 1 / 8 / 32 / 100, streamed /v1/completions of ~input_len words (108 words: 128 tokens
on average, the prompt length of the engine's TTFT target) and exactly output_len tokens
(ignore_eos), vLLM benchmark_serving definitions (slimserve.eval.serve_bench). Baseline in the same
run: the server's AsyncLLMEngine without HTTP, one request at a time, for TTFT and decode speed.
Writes benchmarks/results/<name>.md and <name>.png (serve_cpu by default).

    python benchmarks/serve_cpu.py [--model smollm2-135m] [--input-len 108] [--output-len 32] [--dtype fp32]
        [--compile] [--name serve_cpu]
"""
import argparse
import asyncio
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx

from slimserve.config import EngineConfig
from slimserve.engine.async_engine import AsyncLLMEngine
from slimserve.engine.sampling_params import SamplingParams
from slimserve.eval.machine import in_fresh_process, machine_info
from slimserve.eval.serve_bench import ServeBenchConfig, make_prompts, markdown_table, plot, run_serve_bench

LEVELS = {1: 20, 8: 32, 32: 64, 100: 200}  # concurrency -> requests at that level
RESULTS = Path(__file__).parent / "results"
PORT = 8765


def engine_alone(model: str, prompts: list[str], output_len: int, engine_options: dict) -> tuple[float, float]:
    """(TTFT ms, decode tok/s) of single requests through the server's AsyncLLMEngine without HTTP:
    the floor the server adds its overhead to. prompts[0] warms up; best of the others, since
    other jobs share the cores. Distinct prompts, so none is answered from the prefix cache."""
    engine = AsyncLLMEngine.load(EngineConfig(model=model, kv_cache_memory=256 * 2**20, max_model_len=2048,
                                              **engine_options))
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=output_len)

    async def one_request(request_id: str, prompt: str) -> tuple[float, float]:
        start = time.perf_counter()
        first = None
        async for _ in await engine.add_request(request_id, prompt, params):
            first = first or time.perf_counter()
        return first - start, (output_len - 1) / (time.perf_counter() - first)

    async def measure() -> list[tuple[float, float]]:
        engine.start()
        runs = [await one_request(f"run-{i}", prompt) for i, prompt in enumerate(prompts)]
        await engine.shutdown()
        return runs[1:]

    runs = asyncio.run(measure())
    return 1000 * min(ttft for ttft, _ in runs), max(rate for _, rate in runs)


def start_server(model: str, engine_options: dict) -> subprocess.Popen:
    code = ("from slimserve.config import ServeConfig; from slimserve.serve.server import serve; "
            f"serve({model!r}, ServeConfig(port={PORT}, max_waiting=1000), **{engine_options!r}, "
            "kv_cache_memory=1024 * 2**20, max_model_len=2048)")
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 600  # a compiled engine compiles before it is ready
    while True:
        assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/ready", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="short name or quantized folder")
    parser.add_argument("--input-len", type=int, default=108)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--compile", action="store_true", help="serve a compiled engine")
    parser.add_argument("--name", default="serve_cpu", help="results file stem")
    args = parser.parse_args()
    engine_options = {"dtype": args.dtype, "compile": args.compile}
    config = ServeBenchConfig(base_url=f"http://127.0.0.1:{PORT}", input_len=args.input_len,
                              output_len=args.output_len)
    machine = machine_info()
    load_before = os.getloadavg()[0]
    server = start_server(args.model, engine_options)
    try:
        # Measured while the server idles, right before its concurrency-1 level, so the two compare.
        # In a process of its own, like the server: torch work on this process's main thread (the
        # bandwidth probe) would give the engine's thread a second OpenMP pool (see async_engine.py).
        baseline_ttft, baseline_tps = in_fresh_process(engine_alone, args.model, make_prompts(config, 4, 0),
                                                       args.output_len, engine_options)
        results, first_prompt = [], 4  # slices 0-3 were the baseline's prompts
        for concurrency, num_prompts in LEVELS.items():
            results += run_serve_bench(replace(config, concurrencies=[concurrency], num_prompts=num_prompts,
                                               first_prompt=first_prompt))
            first_prompt += num_prompts + 1
            print(markdown_table(results[-1:]), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=120)
    table = markdown_table(results)
    report = "\n".join([
        f"# Serving load: {Path(args.model).name} ({args.dtype}{', compiled' if args.compile else ''}) on the CPU",
        "",
        machine.markdown(),
        f"Load average (1 min) of this shared machine: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after.",
        "",
        f"Streamed /v1/completions, ~{args.input_len} words (mean {results[0].mean_input_tokens:.0f} tokens) in, "
        f"{args.output_len} tokens out (ignore_eos), greedy, a distinct prompt per request (no prefix-cache hits); "
        "requests per level: "
        + ", ".join(f"{c}: {n}" for c, n in LEVELS.items()) + ". vLLM benchmark_serving definitions.",
        "",
        table,
        "",
        "Baseline, the server's engine without HTTP (AsyncLLMEngine.load in a process of its own, one request "
        f"at a time, best of 3): TTFT {baseline_ttft:.0f} ms, "
        f"decode {baseline_tps:.1f} tok/s (TPOT {1000 / baseline_tps:.1f} ms).",
        "",
        *[f"Errors at concurrency {r.concurrency}: {r.errors}\n" for r in results if r.errors],
        f"![serving latency and throughput]({args.name}.png)",
        "",
    ])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(report)
    plot(results, RESULTS / f"{args.name}.png")
    print(report)


if __name__ == "__main__":
    main()
