"""The quantization report: one row per precision or method, as a markdown table and two PNG plots."""

from dataclasses import dataclass
from pathlib import Path

MB = 1 << 20


@dataclass
class QuantRow:
    """One model variant, measured from the folder it was saved to."""

    name: str  # e.g. "W4 g64 GPTQ"
    method: str  # "none" for float precisions, else the QuantConfig method
    dtype: str  # compute dtype: fp32, bf16, fp16
    bits: int  # weight bits: 32 / 16 for float precisions
    group_size: int | None  # None for float precisions; -1 per channel, 0 per tensor
    disk_bytes: int
    peak_rss_bytes: int  # peak resident memory of a fresh process loading and evaluating the folder
    ppl: float
    num_windows: int  # perplexity windows evaluated, of `window` tokens
    window: int
    decode_tokens_per_second: float  # batch 1, greedy
    quantize_seconds: float | None  # None for float precisions


def delta_ppl_percent(row: QuantRow, baseline: QuantRow) -> float:
    return 100 * (row.ppl / baseline.ppl - 1)


def _group(row: QuantRow) -> str:
    if row.group_size is None:
        return "—"
    return {-1: "channel", 0: "tensor"}.get(row.group_size, str(row.group_size))


def markdown_table(rows: list[QuantRow], baseline: QuantRow, targets: dict[str, str] | None = None) -> str:
    """Δppl is relative to `baseline`; `targets` maps a row name to a target column entry."""
    header = "| method | bits | group | MB on disk | peak RAM MB | ppl | Δppl % | decode tok/s | quantize s |"
    rule = "|---|---|---|---|---|---|---|---|---|"
    if targets is not None:
        header, rule = header + " target |", rule + "---|"
    lines = [header, rule]
    for r in rows:
        quantize_s = "—" if r.quantize_seconds is None else f"{r.quantize_seconds:.1f}"
        line = (f"| {r.name} | {r.bits} | {_group(r)} | {r.disk_bytes / MB:.1f} | {r.peak_rss_bytes / MB:.0f} | "
                f"{r.ppl:.4f} | {delta_ppl_percent(r, baseline):+.2f} | {r.decode_tokens_per_second:.1f} | "
                f"{quantize_s} |")
        if targets is not None:
            line += f" {targets.get(r.name, '')} |"
        lines.append(line)
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def plot_size_vs_ppl(rows: list[QuantRow], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    markers = "os^vDP*Xph<>"
    for i, r in enumerate(rows):  # a legend, not labels: rows of one size sit on top of each other
        ax.scatter(r.disk_bytes / MB, r.ppl, marker=markers[i % len(markers)], s=50, label=r.name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("size on disk (MB, log scale)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("Size vs perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_speed(rows: list[QuantRow], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [r.name for r in rows]
    ax.barh(names, [r.decode_tokens_per_second for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("decode tokens/s (batch 1)")
    ax.set_title("Decode speed")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[QuantRow], baseline: QuantRow, report: Path, preamble: str,
                 targets: dict[str, str] | None = None) -> None:
    """The markdown report (preamble, then the table) and, beside it, <stem>_size_vs_ppl.png and <stem>_speed.png."""
    report.parent.mkdir(parents=True, exist_ok=True)
    size_plot, speed_plot = f"{report.stem}_size_vs_ppl.png", f"{report.stem}_speed.png"
    plot_size_vs_ppl(rows, report.parent / size_plot)
    plot_speed(rows, report.parent / speed_plot)
    report.write_text(f"{preamble}\n\n{markdown_table(rows, baseline, targets)}\n\n"
                      f"![size vs perplexity]({size_plot})\n![decode speed]({speed_plot})\n")
