"""Quantize a model into a folder, and the seed's experiment: a sweep of precisions, measured and reported.

quantize: load in fp32 (methods see full-precision weights and activations), calibrate, quantize,
cast to the storage dtype, save; cached_quantize does it once per model and config, into the cache.
quantize_test: one folder per precision under out_dir, each
loaded back from disk in a fresh process and measured (bytes on disk, peak RAM, perplexity,
decode speed).
"""

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from slimserve.assets import cache_dir, resolve_model
from slimserve.config import QuantConfig
from slimserve.engine.sampling_params import SamplingParams
from slimserve.eval.datasets import load_text
from slimserve.eval.evaluate import disk_bytes, peak_rss_bytes, reset_peak_rss
from slimserve.eval.machine import in_fresh_process
from slimserve.eval.perplexity import perplexity, window_size
from slimserve.eval.report import QuantRow, write_report
from slimserve.generate import GenerationProfile, Generator
from slimserve.models.inference_linear import prepare_for_inference
from slimserve.models.loader import DTYPES, load_config, load_model, load_tokenizer
from slimserve.quant.awq import awq_quantize
from slimserve.quant.calibrate import calibration_batches
from slimserve.quant.formats import FORMATS, save_model, tie_quantized_embeddings
from slimserve.quant.gptq import gptq_quantize
from slimserve.quant.qat import qat_finetune
from slimserve.quant.qlinear import quantize_model
from slimserve.quant.smoothquant import smoothquant
from slimserve.tokenizer import Tokenizer


def _rtn(model: nn.Module, calib_batches: list[Tensor], config: QuantConfig, progress: bool) -> None:
    quantize_model(model, config)


def _gptq(model: nn.Module, calib_batches: list[Tensor], config: QuantConfig, progress: bool) -> None:
    gptq_quantize(model, calib_batches, config, progress=progress)


def _awq(model: nn.Module, calib_batches: list[Tensor], config: QuantConfig, progress: bool) -> None:
    awq_quantize(model, calib_batches, config, progress=progress)


def _qat(model: nn.Module, calib_batches: list[Tensor], config: QuantConfig, progress: bool) -> None:
    qat_finetune(model, calib_batches, config, progress=progress)  # distils from the float model, then RTN


# method -> quantizes the fp32 model in place, after SmoothQuant's scales where config.smooth_alpha is
# set (always for "smoothquant", RTN once smoothed); every method but RTN gets calibration batches
METHODS: dict[str, Callable[[nn.Module, list[Tensor], QuantConfig, bool], None]] = {
    "rtn": _rtn, "gptq": _gptq, "awq": _awq, "smoothquant": _rtn, "qat": _qat,
}
DECODE_TOKENS = 64  # tokens generated per decode-speed measurement
DECODE_PROMPT_TOKENS = 32


@dataclass
class QuantizeResult:
    out_dir: Path
    seconds: float  # calibration + quantization, without loading and saving
    peak_rss_bytes: int  # process peak resident memory during the whole call
    disk_bytes: int  # the written folder
    num_calib_samples: int  # 0 when the method needs no calibration
    calib_seq_len: int


def quantize(
    model_spec: str | Path,
    config: QuantConfig,
    out_dir: Path,
    calib_dataset: str = "sotu-calib",
    format: str = "slimserve",
    progress: bool = True,
    dtype: str = "bf16",
) -> QuantizeResult:
    """Quantize the model at model_spec with config into out_dir; dtype is the storage and compute dtype."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    reset_peak_rss()
    path = resolve_model(str(model_spec))
    model = load_model(path, torch.float32)
    start = time.perf_counter()
    calib_batches = []
    if config.method != "rtn" or config.smooth_alpha is not None:
        if config.calib_seq_len > model.max_model_len:
            raise ValueError(f"calib_seq_len {config.calib_seq_len} exceeds the model's context {model.max_model_len}")
        calib_batches = calibration_batches(load_tokenizer(path), calib_dataset, num_samples=config.num_calib_samples,
                                            seq_len=config.calib_seq_len)
    quantize_in_place(model, calib_batches, config, progress)
    seconds = time.perf_counter() - start
    model.to(DTYPES[dtype])
    tie_quantized_embeddings(model)  # after the cast, so the embedding equals what is stored
    save_model(model, load_config(path), out_dir, format, config, tokenizer_source=path)
    return QuantizeResult(out_dir, seconds, peak_rss_bytes(), disk_bytes(out_dir),
                          len(calib_batches), config.calib_seq_len if calib_batches else 0)


def quantize_in_place(model: nn.Module, calib_batches: list[Tensor], config: QuantConfig,
                      progress: bool = False) -> None:
    """Quantize a loaded fp32 model with config: SmoothQuant's scales first where config.smooth_alpha
    is set, then config.method."""
    if config.smooth_alpha is not None:
        smoothquant(model, calib_batches, config.smooth_alpha)
    METHODS[config.method](model, calib_batches, config, progress)


def cached_quantize(model_spec: str | Path, config: QuantConfig, calib_dataset: str = "sotu-calib",
                    progress: bool = True) -> Path:
    """The folder of model_spec quantized with config (bf16 storage), written into the cache by the
    first call and returned as it is by later calls with the same model spec, config and calibration
    text. It is written under a temporary name and renamed once complete, so an interrupted run
    leaves nothing that a later call would take for finished."""
    key = json.dumps([str(model_spec), asdict(config), calib_dataset], sort_keys=True)
    name = f"{Path(str(model_spec)).name}-{config.method}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    folder = cache_dir() / "quantized" / name
    if not folder.exists():
        partial = folder.with_name(name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        quantize(model_spec, config, partial, calib_dataset, progress=progress)
        partial.rename(folder)
    return folder


@dataclass
class Variant:
    """One row of a sweep: a float precision (config None) or a quantization config, stored as dtype."""

    name: str
    dtype: str
    config: QuantConfig | None = None


def default_group_size(hf_config: dict) -> int:
    """128, or the largest of 64 and 32 dividing every layer's input width (SmolLM2's 576 = 9 x 64);
    -1 (per channel) if none does."""
    widths = [hf_config["hidden_size"], hf_config["intermediate_size"]]
    if "head_dim" in hf_config:
        widths.append(hf_config["head_dim"] * hf_config["num_attention_heads"])
    return next((g for g in (128, 64, 32) if all(w % g == 0 for w in widths)), -1)


def precision_variants(precisions: Sequence[str], hf_config: dict) -> list[Variant]:
    """fp32 / bf16 / fp16 as they are; int8 = W8A16 RTN per channel (symmetric); int4 = W4 RTN,
    asymmetric, in groups of default_group_size, with lm_head at 8 bits per channel, as llama.cpp's
    4-bit mixes keep the output matrix wider (on SmolLM2, 2 windows: +25 % ppl vs +42 % with a
    4-bit lm_head); w4a8 = int4 with int8 activations (per weight group; lm_head's per token)."""
    group_size = default_group_size(hf_config)
    group = f"g{group_size}" if group_size > 0 else "per-channel"
    head_8bit = {"lm_head": {"bits": 8, "group_size": -1, "sym": True}}
    int4 = QuantConfig(bits=4, group_size=group_size, sym=False, modules=head_8bit)
    known = {
        "fp32": Variant("fp32", "fp32"),
        "bf16": Variant("bf16", "bf16"),
        "fp16": Variant("fp16", "fp16"),
        "int8": Variant("int8 (W8A16 RTN)", "bf16", QuantConfig(bits=8, group_size=-1)),
        "int4": Variant(f"int4 (W4 {group} RTN, lm_head W8)", "bf16", int4),
        "w4a8": Variant(f"w4a8 (W4A8 {group} RTN, lm_head W8A8)", "bf16", replace(int4, act_bits=8)),
    }
    unknown = [p for p in precisions if p not in known]
    if unknown or not precisions:
        raise ValueError(f"precisions must be a non-empty selection of {', '.join(known)}, got {list(precisions)}")
    return [known[p] for p in precisions]


def run_variant(model_spec: str | Path, variant: Variant, out_dir: Path, eval_token_ids: list[int],
                max_windows: int | None, calib_dataset: str = "sotu-calib", progress: bool = True) -> QuantRow:
    """Write the variant's folder under out_dir, load it back from disk and measure it."""
    path = resolve_model(str(model_spec))
    folder = out_dir / "".join(c if c.isalnum() else "-" for c in variant.name.lower()).strip("-")
    quantize_seconds = None
    if variant.config is None:
        model = load_model(path, DTYPES[variant.dtype])
        save_model(model, load_config(path), folder, tokenizer_source=path)
    else:
        quantize_seconds = quantize(path, variant.config, folder, calib_dataset, progress=progress,
                                    dtype=variant.dtype).seconds
    # A process keeps memory it has freed, so a fresh one measures the folder's own peak RSS.
    m = in_fresh_process(measure_folder, folder, variant.dtype, eval_token_ids, max_windows, progress)
    config = variant.config
    return QuantRow(
        variant.name, "none" if config is None else config.method, variant.dtype,
        {"fp32": 32, "bf16": 16, "fp16": 16}[variant.dtype] if config is None else config.bits,
        None if config is None else config.group_size,
        m.disk_bytes, m.peak_rss_bytes, m.ppl, m.num_windows, m.window, m.decode_tokens_per_second, quantize_seconds,
    )


@dataclass
class FolderMeasurement:
    disk_bytes: int
    peak_rss_bytes: int  # the measuring process's peak: runtime, model, activations
    ppl: float
    num_windows: int
    window: int
    decode_tokens_per_second: float


def measure_folder(folder: Path, dtype: str, eval_token_ids: list[int], max_windows: int | None,
                   progress: bool = True) -> FolderMeasurement:
    """Load a model folder at dtype and measure it: perplexity (DESIGN.md protocol) and decode speed."""
    model = load_model(folder, DTYPES[dtype])
    result = perplexity(model, eval_token_ids, window_size(model.max_model_len), max_windows, progress)
    speed = decode_tokens_per_second(model, load_tokenizer(folder), eval_token_ids[:DECODE_PROMPT_TOKENS])
    return FolderMeasurement(disk_bytes(folder), peak_rss_bytes(), result.ppl, result.num_windows, result.window,
                             speed)


def decode_tokens_per_second(model: nn.Module, tokenizer: Tokenizer, prompt_ids: list[int]) -> float:
    """Greedy batch-1 decode speed over DECODE_TOKENS tokens, after a short warm-up; fuses and packs the
    model first, as the engine does (so the model is for running only afterwards)."""
    generator = Generator(prepare_for_inference(model), tokenizer)
    list(generator.stream(prompt_ids, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)))
    profile = GenerationProfile()
    params = SamplingParams(temperature=0.0, max_tokens=DECODE_TOKENS, ignore_eos=True)
    list(generator.stream(prompt_ids, params, profile))
    return (profile.num_generated_tokens - 1) / profile.decode_s  # the first token comes from prefill


def quantize_test(
    model_spec: str | Path,
    precisions: Sequence[str] = ("fp32", "bf16", "int8", "int4"),
    eval_dataset: str = "sotu",
    out_dir: Path = Path("quantize-test"),
    max_windows: int | None = None,
    progress: bool = True,
) -> list[QuantRow]:
    """The seed's experiment: each precision saved under out_dir, then measured; writes report.md and
    PNG plots (report_size_vs_ppl.png, report_speed.png) there. Δppl is relative to the fp32 row
    when there is one, else to the first row."""
    path = resolve_model(str(model_spec))
    variants = precision_variants(precisions, load_config(path))
    eval_token_ids = load_tokenizer(path).encode(load_text(eval_dataset))
    rows = [run_variant(path, v, out_dir, eval_token_ids, max_windows, progress=progress) for v in variants]
    baseline = next((r for r in rows if r.name == "fp32"), rows[0])
    preamble = (f"# quantize-test: {Path(str(model_spec)).name}\n\nPerplexity on {eval_dataset}: "
                f"{len(eval_token_ids)} tokens, {baseline.num_windows} windows x {baseline.window} tokens; Δppl "
                f"relative to {baseline.name}. Each row is measured on the folder written under this directory, "
                "loaded back from disk; decode speed is greedy at batch 1.")
    write_report(rows, baseline, out_dir / "report.md", preamble)
    return rows
