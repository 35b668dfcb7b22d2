"""benchmarks/quant_report.py's targets and notes, on made-up rows: the whole report and the subsets --row measures."""

import sys
from pathlib import Path

import pytest

from slimserve.eval.report import QuantRow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quant_report  # noqa: E402

GROUP = 64
SMOLLM2 = quant_report.MODELS["smollm2-135m"]


def rows_for(names: list[str], deltas: dict[str, float]) -> list[QuantRow]:
    """A row per variant named, its perplexity deltas[name] % above fp32's 20 (default 2 %)."""
    variants = {v.name: v for v in quant_report.variants(dict(num_calib_samples=32, calib_seq_len=512), GROUP)}
    rows = []
    for name in names:
        config = variants[name].config
        ppl = 20 * (1 + deltas.get(name, 0.0 if name == "fp32" else 2.0) / 100)
        rows.append(QuantRow(name, "none" if config is None else config.method, "bf16",
                             32 if config is None else config.bits, None if config is None else config.group_size,
                             1, 1, ppl, 4, 2048, 100.0, None if config is None else 70.0))
    return rows


def test_every_target_row_of_the_full_report_gets_its_verdict():
    names = [v.name for v in quant_report.variants(dict(num_calib_samples=32, calib_seq_len=512), GROUP)]
    rows = rows_for(names, {"W8A8 SmoothQuant": 1.08, quant_report.SMOOTH_GPTQ: 0.78})
    found = quant_report.targets(rows, GROUP, timed=True)
    assert found["W8A8 SmoothQuant"] == "Δ < 1 %: missed"
    assert found[quant_report.SMOOTH_GPTQ] == "Δ < 1 %: met"
    assert found[f"W4 g{GROUP} GPTQ"].startswith("Δ < 4 %: met; recovers ≥ 50 % of RTN's loss: missed (0 %); < 60 s")
    notes = quant_report.notes(rows, GROUP, SMOLLM2)
    assert any(note.startswith("SmoothQuant + GPTQ") and "+0.78 % against SmoothQuant's RTN +1.08 %" in note
               for note in notes)


@pytest.mark.parametrize("subset", [
    ["fp32", quant_report.SMOOTH_GPTQ],
    ["fp32", "W8A8 naive RTN", "W8A8 SmoothQuant", quant_report.SMOOTH_HEAD_A16, quant_report.SMOOTH_GPTQ],
    ["fp32", f"W4 g{GROUP} GPTQ"],
    ["fp32", f"W3 g{GROUP} GPTQ", f"W3 g{GROUP} GPTQ mse"],
])
def test_a_subset_of_rows_gets_targets_and_notes_for_those_rows_only(subset):
    rows = rows_for(subset, {})
    assert set(quant_report.targets(rows, GROUP, timed=True)) <= set(subset)
    notes = quant_report.notes(rows, GROUP, SMOLLM2)
    assert not any("AWQ's weight clipping" in note for note in notes)  # no AWQ row, no AWQ note
    assert any("GPTQ" in note for note in notes) == any("GPTQ" in name for name in subset)
