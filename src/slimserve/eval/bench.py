"""`slimserve bench latency|throughput`: the engine under fixed batch shapes, tables and a plot.

latency: B requests of L prompt tokens submitted together, each generating output_len tokens
(greedy, EOS ignored). TTFT = time until every request has its first token (the batch's
prefill); decode tok/s = tokens generated after that / time after that.
throughput: num_prompts requests submitted at once; generated tokens / wall time.
Prompts are consecutive slices of the SOTU evaluation text.
"""

import time
from dataclasses import dataclass
from pathlib import Path

from slimserve.engine.llm_engine import LLMEngine
from slimserve.engine.sampling_params import SamplingParams
from slimserve.eval.datasets import load_text


@dataclass
class LatencyRow:
    batch_size: int
    seq_len: int
    output_len: int
    ttft_s: float
    decode_tokens_per_s: float  # all sequences together
    e2e_s: float


@dataclass
class ThroughputResult:
    num_prompts: int
    input_len: int
    output_len: int
    seconds: float

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_prompts * self.output_len / self.seconds

    @property
    def requests_per_s(self) -> float:
        return self.num_prompts / self.seconds


def corpus_prompts(engine: LLMEngine, count: int, length: int) -> list[list[int]]:
    ids = engine.tokenizer.encode_corpus(load_text("sotu"))
    if count * length > len(ids):
        raise ValueError(f"{count} prompts of {length} tokens need {count * length} tokens; the corpus has {len(ids)}")
    return [ids[i * length:(i + 1) * length] for i in range(count)]


def run_batch(engine: LLMEngine, prompts: list[list[int]], output_len: int) -> tuple[float, float]:
    """(seconds until every request has a token, seconds until all finished)."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{i}", prompt, params)
    started: set[str] = set()
    ttft = None
    while engine.has_unfinished():
        for output in engine.step():
            started.add(output.request_id)
        if ttft is None and len(started) == len(prompts):
            ttft = time.perf_counter() - start
    return ttft, time.perf_counter() - start


def warm_up(engine: LLMEngine) -> None:
    """One short run, after a compiled engine has compiled its decode graphs."""
    engine.warm_up()
    run_batch(engine, corpus_prompts(engine, 1, 16), 4)


def bench_latency(engine: LLMEngine, batch_sizes: list[int], seq_lens: list[int], output_len: int) -> list[LatencyRow]:
    warm_up(engine)
    rows = []
    for seq_len in seq_lens:
        for batch_size in batch_sizes:
            ttft, e2e = run_batch(engine, corpus_prompts(engine, batch_size, seq_len), output_len)
            decode = batch_size * (output_len - 1) / (e2e - ttft)
            rows.append(LatencyRow(batch_size, seq_len, output_len, ttft, decode, e2e))
    return rows


def bench_throughput(engine: LLMEngine, num_prompts: int, input_len: int, output_len: int) -> ThroughputResult:
    warm_up(engine)
    _, seconds = run_batch(engine, corpus_prompts(engine, num_prompts, input_len), output_len)
    return ThroughputResult(num_prompts, input_len, output_len, seconds)


def latency_table(rows: list[LatencyRow]) -> str:
    lines = ["| batch | prompt len | output len | TTFT ms | decode tok/s (all seqs) | e2e s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r.batch_size} | {r.seq_len} | {r.output_len} | {r.ttft_s * 1e3:.1f} | "
              f"{r.decode_tokens_per_s:.1f} | {r.e2e_s:.2f} |" for r in rows]
    return "\n".join(lines)


def plot_latency(rows: list[LatencyRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for seq_len in sorted({r.seq_len for r in rows}):
        picked = [r for r in rows if r.seq_len == seq_len]
        ax.plot([r.batch_size for r in picked], [r.decode_tokens_per_s for r in picked], marker="o",
                label=f"prompt {seq_len}")
    ax.set(xlabel="batch size", ylabel="decode tok/s (all sequences)", xscale="log", title="slimserve decode")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
