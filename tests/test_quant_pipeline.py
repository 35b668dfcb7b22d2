"""Calibration windows, `quantize` into a loadable folder, and the quantize-test sweep with its report."""

import json
import random

import pytest
import torch
from tiny_gguf import random_state_dict, write_gguf

from slimserve.assets import resolve_model
from slimserve.config import QuantConfig
from slimserve.eval.evaluate import disk_bytes
from slimserve.models.attention import AttentionMetadata
from slimserve.models.loader import load_config, load_model, load_tokenizer
from slimserve.quant.calibrate import calibration_batches
from slimserve.quant.formats import save_model
from slimserve.quant import pipeline
from slimserve.quant.pipeline import cached_quantize, quantize, quantize_test

WORDS = "the world 12 turns on the hour and a war ends where the worn road runs to the sea".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tiny GGUF model, a text file of ~4,000 tokens for calibration and evaluation)."""
    folder = tmp_path_factory.mktemp("tiny")
    model = write_gguf(folder / "tiny.gguf", "llama", random_state_dict("llama"))
    rng = random.Random(0)  # not periodic, so every window occurs once in the text
    words = [rng.choice(WORDS) for _ in range(900)]
    text = folder / "text.txt"
    text.write_text(" ".join(words))
    return model, text


def find_offset(token_ids: list[int], window: list[int]) -> int:
    return next(i for i in range(len(token_ids) - len(window) + 1) if token_ids[i : i + len(window)] == window)


def test_calibration_windows_are_disjoint_slices_of_the_text(tiny):
    model, text = tiny
    tokenizer = load_tokenizer(model)
    token_ids = tokenizer.encode(text.read_text(), add_special_tokens=False)
    batches = calibration_batches(tokenizer, str(text), num_samples=5, seq_len=50, seed=3)
    assert len(batches) == 5 and all(b.shape == (50,) and b.dtype == torch.long for b in batches)
    offsets = sorted(find_offset(token_ids, b.tolist()) for b in batches)
    assert all(b - a >= 50 for a, b in zip(offsets, offsets[1:]))  # no overlap
    again = calibration_batches(tokenizer, str(text), num_samples=5, seq_len=50, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = calibration_batches(tokenizer, str(text), num_samples=5, seq_len=50, seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(batches, other))


def test_calibration_errors_name_the_problem(tiny, tmp_path):
    model, text = tiny
    tokenizer = load_tokenizer(model)
    with pytest.raises(ValueError, match="num_samples must be at least 1, got 0"):
        calibration_batches(tokenizer, str(text), num_samples=0, seq_len=50)
    with pytest.raises(ValueError, match=r"fewer than num_samples x seq_len = 100 x 2048"):
        calibration_batches(tokenizer, str(text), num_samples=100, seq_len=2048)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="has 0 tokens"):
        calibration_batches(tokenizer, str(empty), num_samples=1, seq_len=8)
    with pytest.raises(FileNotFoundError):
        calibration_batches(tokenizer, str(tmp_path / "missing.txt"), num_samples=1, seq_len=8)


@pytest.mark.real_model
def test_default_calibration_text_is_disjoint_from_the_evaluation_text():
    from slimserve.eval.datasets import load_text

    tokenizer = load_tokenizer("smollm2-135m")
    eval_text = load_text("sotu")
    for window in calibration_batches(tokenizer, num_samples=4, seq_len=64):
        assert tokenizer.decode(window.tolist()) not in eval_text


CONFIGS = {
    "rtn-slimserve": (QuantConfig(bits=4, group_size=128), "slimserve"),
    "gptq-slimserve": (QuantConfig(method="gptq", bits=4, group_size=64, num_calib_samples=4, calib_seq_len=64),
                       "slimserve"),
    "rtn-gptq": (QuantConfig(bits=4, group_size=128, skip=["embed_tokens", "lm_head"]), "gptq"),
    "awq-awq": (QuantConfig(method="awq", bits=4, group_size=64, sym=False, num_calib_samples=4, calib_seq_len=64,
                            skip=["embed_tokens", "lm_head"]), "awq"),
    "smoothquant-slimserve": (QuantConfig(method="smoothquant", bits=8, group_size=-1, act_bits=8,
                                          num_calib_samples=4, calib_seq_len=64), "slimserve"),
    "qat-slimserve": (QuantConfig(method="qat", bits=4, group_size=64, num_calib_samples=4, calib_seq_len=64),
                      "slimserve"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_quantize_writes_a_folder_that_loads(tiny, tmp_path, case):
    model_path, text = tiny
    config, format = CONFIGS[case]
    result = quantize(model_path, config, tmp_path / "out", calib_dataset=str(text), format=format, progress=False)
    assert result.disk_bytes == disk_bytes(tmp_path / "out") > 0 and result.peak_rss_bytes > 0 and result.seconds > 0
    assert result.num_calib_samples == (0 if config.method == "rtn" else 4)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == format and saved["torch_dtype"] == "bfloat16"
    model = load_model(tmp_path / "out", torch.bfloat16)
    ids = torch.tensor(load_tokenizer(tmp_path / "out").encode("the world turns"))
    logits = model.compute_logits(model(ids, torch.arange(len(ids)), AttentionMetadata.without_cache([len(ids)])))
    assert logits.shape == (len(ids), 273) and torch.isfinite(logits).all()


def test_quantize_rejects_bad_requests(tiny, tmp_path):
    model_path, text = tiny
    with pytest.raises(ValueError, match="format must be one of"):
        quantize(model_path, QuantConfig(), tmp_path, format="exl2", progress=False)
    with pytest.raises(ValueError, match="dtype must be one of"):
        quantize(model_path, QuantConfig(), tmp_path, dtype="int4", progress=False)
    too_long = QuantConfig(method="gptq", num_calib_samples=1, calib_seq_len=4096)
    with pytest.raises(ValueError, match="calib_seq_len 4096 exceeds the model's context 1024"):
        quantize(model_path, too_long, tmp_path, calib_dataset=str(text), progress=False)


def test_cached_quantize_writes_once_and_no_partial_folder_passes_for_finished(tiny, tmp_path, monkeypatch):
    """A run interrupted after saving, before it completes, leaves no folder that a later call would
    take for finished; the next call quantizes again, later calls return its folder untouched."""
    model_path, text = tiny
    monkeypatch.setenv("SLIMSERVE_CACHE", str(tmp_path))
    config = QuantConfig(bits=8, group_size=-1)
    save_model_now = pipeline.save_model

    def save_then_interrupt(*args, **kwargs):
        save_model_now(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "save_model", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        cached_quantize(model_path, config, str(text), progress=False)
    assert [p.suffix for p in (tmp_path / "quantized").iterdir()] == [".partial"]
    monkeypatch.setattr(pipeline, "save_model", save_model_now)
    folder = cached_quantize(model_path, config, str(text), progress=False)
    assert list((tmp_path / "quantized").iterdir()) == [folder]
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["bits"] == 8
    written = (folder / "config.json").stat().st_mtime_ns
    assert cached_quantize(model_path, config, str(text), progress=False) == folder
    assert (folder / "config.json").stat().st_mtime_ns == written
    assert cached_quantize(model_path, QuantConfig(bits=4, group_size=32), str(text), progress=False) != folder


def test_quantize_test_writes_table_and_plots(tiny, tmp_path):
    model_path, text = tiny
    rows = quantize_test(model_path, ["fp32", "int8", "int4", "w4a8"], str(text), tmp_path, max_windows=1,
                         progress=False)
    assert [r.name for r in rows] == ["fp32", "int8 (W8A16 RTN)", "int4 (W4 g128 RTN, lm_head W8)",
                                      "w4a8 (W4A8 g128 RTN, lm_head W8A8)"]
    sizes = [r.disk_bytes for r in rows]
    assert abs(sizes[3] - sizes[2]) < 1024 and sizes[2] < sizes[1] < 0.3 * sizes[0]  # w4a8 stores int4's integers
    assert rows[3].ppl != rows[2].ppl and abs(rows[3].ppl / rows[2].ppl - 1) < 0.05  # int8 activations: close
    assert all(r.ppl > 1 and r.decode_tokens_per_second > 0 and r.num_windows == 1 for r in rows)
    assert all(r.peak_rss_bytes > 2**20 for r in rows)
    assert [r.quantize_seconds is None for r in rows] == [True, False, False, False]
    report = (tmp_path / "report.md").read_text()
    assert "| method | bits | group | MB on disk | peak RAM MB | ppl | Δppl % | decode tok/s | quantize s |" in report
    assert "| fp32 | 32 | — |" in report and "| int4 (W4 g128 RTN, lm_head W8) | 4 | 128 |" in report
    assert "+0.00" in report
    for plot in ("report_size_vs_ppl.png", "report_speed.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="precisions must be"):
        quantize_test(model_path, precisions=["int5"], eval_dataset=str(text), out_dir=tmp_path)


@pytest.mark.real_model
@pytest.mark.parametrize("modules", [{}, {"lm_head": {"bits": 8, "group_size": -1}}], ids=["lm_head-w4", "lm_head-w8"])
def test_int4_g64_smollm2_folder_is_at_most_35_percent_of_bf16(tmp_path, modules):
    """Tied embeddings counted: the one embedding/lm_head matrix is stored once, quantized as lm_head."""
    path = resolve_model("smollm2-135m")
    save_model(load_model(path, torch.bfloat16), load_config(path), tmp_path / "bf16", tokenizer_source=path)
    int4 = quantize(path, QuantConfig(bits=4, group_size=64, modules=modules), tmp_path / "int4", progress=False)
    bf16_bytes = disk_bytes(tmp_path / "bf16")
    ratio = int4.disk_bytes / bf16_bytes
    print(f"int4 g64 {modules}: {int4.disk_bytes / 2**20:.1f} MB = {100 * ratio:.1f} % of bf16 "
          f"{bf16_bytes / 2**20:.1f} MB")
    assert ratio <= 0.35
