"""`slimserve eval`: load each model at each dtype, measure perplexity, size and speed, report."""

import platform
import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from slimserve.assets import resolve_model
from slimserve.eval.datasets import load_text
from slimserve.eval.perplexity import perplexity, window_size
from slimserve.models.loader import load_model, load_tokenizer, torch_dtype



@dataclass
class EvalRow:
    model: str
    dtype: str
    dataset: str
    num_tokens: int
    num_windows: int
    window: int
    ppl: float
    file_bytes: int  # the checkpoint on disk
    weight_bytes: int  # parameters and buffers in memory
    peak_rss_bytes: int  # process peak resident memory while loading and evaluating this row
    tokens_per_second: float  # perplexity forward throughput (prefill-like)


def disk_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def module_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor the model holds: parameters and buffers, and tensors kept in plain
    attributes (alone or in a tuple), such as the prepacked oneDNN weights of PackedLinear and W8A8
    QuantLinear. Each once: tied weights share a data pointer; prepacked ones have none."""
    held = [t for module in model.modules() for value in vars(module).values()
            for t in (value if isinstance(value, tuple) else (value,)) if isinstance(t, torch.Tensor)]
    tensors = {id(t) if t.is_mkldnn else t.data_ptr(): t for t in [*model.parameters(), *model.buffers(), *held]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM) of this process."""
    clear_refs = Path("/proc/self/clear_refs")
    if clear_refs.exists():
        clear_refs.write_text("5")


def _status_bytes(field: str) -> int | None:
    """A size field of Linux's /proc/self/status (VmRSS, VmHWM, ...) in bytes; None elsewhere."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    line = next(l for l in status.read_text().splitlines() if l.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


def peak_rss_bytes() -> int:
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def rss_bytes() -> int:
    """This process's resident memory now (Linux)."""
    rss = _status_bytes("VmRSS")
    if rss is None:
        raise OSError("the resident set size is read from /proc/self/status, which this system lacks")
    return rss


def evaluate(model_spec: str, dtype: str, dataset: str, max_windows: int | None = None) -> EvalRow:
    reset_peak_rss()
    path = resolve_model(model_spec)
    model = load_model(path, torch_dtype(dtype))
    token_ids = load_tokenizer(path).encode(load_text(dataset))
    result = perplexity(model, token_ids, window_size(model.max_model_len), max_windows)
    return EvalRow(model_spec, dtype, dataset, result.num_tokens, result.num_windows, result.window, result.ppl,
                   disk_bytes(path), module_bytes(model), peak_rss_bytes(), result.tokens_per_second)


def markdown_table(rows: list[EvalRow]) -> str:
    lines = ["| model | dtype | dataset | tokens | windows × len | ppl | file MB | weights MB | peak RSS MB | tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    mb = 1 << 20
    for r in rows:
        lines.append(f"| {r.model} | {r.dtype} | {r.dataset} | {r.num_tokens} | {r.num_windows} × {r.window} | "
                     f"{r.ppl:.4f} | {r.file_bytes / mb:.1f} | {r.weight_bytes / mb:.1f} | "
                     f"{r.peak_rss_bytes / mb:.0f} | {r.tokens_per_second:.0f} |")
    return "\n".join(lines)
