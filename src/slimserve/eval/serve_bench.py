"""Load generator for an OpenAI-compatible server: TTFT, TPOT, ITL, E2E latency and throughput per concurrency.

Definitions follow vLLM's benchmark_serving.py, so numbers compare:
- TTFT: request sent -> first chunk with text.
- TPOT: (E2E - TTFT) / (output tokens - 1), per request with more than one output token.
- ITL: the gaps between successive chunks with text, over all requests.
- E2E: request sent -> last byte.
- throughput: completed requests, output tokens, and input + output tokens per second of the
  level's duration (first request sent -> last one done). Failed requests count as errors only.
Each request streams a /v1/completions with ignore_eos, so every one makes exactly output_len tokens.
"""
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from slimserve.eval.datasets import load_text


@dataclass
class ServeBenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first model the server lists
    api_key: str | None = None
    concurrencies: list[int] = field(default_factory=lambda: [1, 8, 32, 100])
    num_prompts: int = 100  # requests per concurrency level
    input_len: int = 128  # words of corpus text per prompt (the server reports the exact token count)
    output_len: int = 64
    dataset: str = "sotu"
    first_prompt: int = 0  # index of the first corpus slice used; later runs start past earlier ones
    request_timeout: float = 600.0

    def __post_init__(self) -> None:
        checks = [
            ("concurrencies", bool(self.concurrencies) and all(c >= 1 for c in self.concurrencies),
             "must be a non-empty list of counts >= 1"),
            ("num_prompts", self.num_prompts >= 1, "must be >= 1"),
            ("input_len", self.input_len >= 1, "must be >= 1"),
            ("output_len", self.output_len >= 1, "must be >= 1"),
            ("first_prompt", self.first_prompt >= 0, "must be >= 0"),
            ("request_timeout", self.request_timeout > 0, "must be > 0 seconds"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} {expected}, got {getattr(self, name)!r}")


@dataclass
class RequestTiming:
    ok: bool
    input_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class Percentiles:
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: list[float], scale: float = 1.0) -> "Percentiles":
        if not values:
            return cls(float("nan"), float("nan"), float("nan"), float("nan"))
        ordered = sorted(v * scale for v in values)

        def percentile(q: float) -> float:  # linear interpolation, as numpy.percentile
            position = (len(ordered) - 1) * q
            low = int(position)
            high = min(low + 1, len(ordered) - 1)
            return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

        return cls(statistics.fmean(ordered), percentile(0.5), percentile(0.9), percentile(0.99))


@dataclass
class ServeBenchResult:
    concurrency: int
    num_requests: int
    num_errors: int
    duration_s: float
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (input + output) tokens / s
    mean_input_tokens: float
    mean_output_tokens: float
    ttft_ms: Percentiles
    tpot_ms: Percentiles
    itl_ms: Percentiles
    e2e_s: Percentiles
    errors: list[str] = field(default_factory=list)  # the first few messages, to say what failed


def make_prompts(config: ServeBenchConfig, count: int, first: int) -> list[str]:
    """`count` prompts of input_len words: corpus slices first, first + 1, ... (wrapping around).
    Every request of a run gets its own slice, so none is answered from the prefix cache."""
    words = load_text(config.dataset).split()
    num_slices = len(words) // config.input_len
    if num_slices < 1:
        raise ValueError(f"dataset {config.dataset!r} has {len(words)} words, fewer than input_len={config.input_len}")
    starts = [(i % num_slices) * config.input_len for i in range(first, first + count)]
    return [" ".join(words[start:start + config.input_len]) for start in starts]


async def _one_request(client: httpx.AsyncClient, model: str, prompt: str, config: ServeBenchConfig) -> RequestTiming:
    body = {"model": model, "prompt": prompt, "max_tokens": config.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    timing = RequestTiming(ok=False)
    last = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                timing.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return timing
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    timing.error = chunk["error"]["message"]
                    return timing
                now = time.perf_counter()
                if chunk.get("usage"):
                    timing.input_tokens = chunk["usage"]["prompt_tokens"]
                    timing.output_tokens = chunk["usage"]["completion_tokens"]
                if any(choice.get("text") for choice in chunk["choices"]):
                    if last is None:
                        timing.ttft = now - start
                    else:
                        timing.itls.append(now - last)
                    last = now
    except httpx.HTTPError as error:
        timing.error = f"{type(error).__name__}: {error}"
        return timing
    timing.e2e = time.perf_counter() - start
    timing.ok = last is not None
    if not timing.ok:
        timing.error = "the stream ended without text"
    return timing


async def _run_level(config: ServeBenchConfig, model: str, prompts: list[str], concurrency: int) -> ServeBenchResult:
    """prompts[0] warms up, the others are measured."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    # A fresh connection per request, as vLLM's benchmark opens one session per request: a reused
    # keep-alive connection can race the server closing it, an error of the client, not the server.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=config.base_url, headers=headers, limits=limits,
                                 timeout=config.request_timeout) as client:

        async def limited(prompt: str) -> RequestTiming:
            async with semaphore:
                return await _one_request(client, model, prompt, config)

        await _one_request(client, model, prompts[0], config)
        start = time.perf_counter()
        timings = await asyncio.gather(*(limited(p) for p in prompts[1:]))
        duration = time.perf_counter() - start
    return summarize(timings, concurrency, duration)


def summarize(timings: list[RequestTiming], concurrency: int, duration: float) -> ServeBenchResult:
    done = [t for t in timings if t.ok]
    input_tokens = sum(t.input_tokens for t in done)
    output_tokens = sum(t.output_tokens for t in done)
    tpots = [(t.e2e - t.ttft) / (t.output_tokens - 1) for t in done if t.output_tokens > 1]
    return ServeBenchResult(
        concurrency=concurrency, num_requests=len(timings), num_errors=len(timings) - len(done),
        duration_s=duration, request_throughput=len(done) / duration, output_throughput=output_tokens / duration,
        total_token_throughput=(input_tokens + output_tokens) / duration,
        mean_input_tokens=input_tokens / len(done) if done else 0.0,
        mean_output_tokens=output_tokens / len(done) if done else 0.0,
        ttft_ms=Percentiles.of([t.ttft for t in done], 1000), tpot_ms=Percentiles.of(tpots, 1000),
        itl_ms=Percentiles.of([gap for t in done for gap in t.itls], 1000), e2e_s=Percentiles.of([t.e2e for t in done]),
        errors=[t.error for t in timings if not t.ok][:5])


def run_serve_bench(config: ServeBenchConfig) -> list[ServeBenchResult]:
    """One result per concurrency level, each from num_prompts streamed requests after one warm-up.
    Uses corpus slices first_prompt .. first_prompt + len(concurrencies) * (num_prompts + 1) - 1."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    model = config.model
    if model is None:
        response = httpx.get(f"{config.base_url}/v1/models", headers=headers, timeout=30)
        response.raise_for_status()
        model = response.json()["data"][0]["id"]
    results = []
    for level, concurrency in enumerate(config.concurrencies):
        first = config.first_prompt + level * (config.num_prompts + 1)
        prompts = make_prompts(config, config.num_prompts + 1, first)
        results.append(asyncio.run(_run_level(config, model, prompts, concurrency)))
    return results


def markdown_table(results: list[ServeBenchResult]) -> str:
    header = ("| concurrency | requests | errors | req/s | output tok/s | total tok/s | TTFT p50/p90/p99 ms "
              "| TPOT p50/p90/p99 ms | ITL p50/p90/p99 ms | E2E p50/p90/p99 s |")
    rows = [header, "|" + "---|" * 10]

    def triple(p: Percentiles, digits: int) -> str:
        return f"{p.p50:.{digits}f} / {p.p90:.{digits}f} / {p.p99:.{digits}f}"

    for r in results:
        rows.append(f"| {r.concurrency} | {r.num_requests} | {r.num_errors} | {r.request_throughput:.2f} "
                    f"| {r.output_throughput:.1f} | {r.total_token_throughput:.1f} | {triple(r.ttft_ms, 0)} "
                    f"| {triple(r.tpot_ms, 1)} | {triple(r.itl_ms, 1)} | {triple(r.e2e_s, 2)} |")
    return "\n".join(rows)


def plot(results: list[ServeBenchResult], path: Path) -> None:
    """Latency percentiles and throughput against concurrency, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r.concurrency for r in results]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [("TTFT (ms)", "ttft_ms"), ("TPOT (ms)", "tpot_ms"), ("E2E latency (s)", "e2e_s")]
    for ax, (title, name) in zip(axes.flat, panels):
        for q in ("p50", "p90", "p99"):
            ax.plot(x, [getattr(getattr(r, name), q) for r in results], marker="o", label=q)
        ax.set_title(title)
    throughput = axes.flat[3]
    throughput.plot(x, [r.output_throughput for r in results], marker="o", label="output tok/s")
    throughput.plot(x, [r.total_token_throughput for r in results], marker="o", label="total tok/s")
    throughput.set_title("Throughput (tokens/s)")
    for ax in axes.flat:
        ax.set_xscale("log")
        ax.set_xticks(x, [str(c) for c in x])
        ax.set_xlabel("concurrent requests")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
