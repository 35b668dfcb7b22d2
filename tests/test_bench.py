"""`slimserve bench latency|throughput` on the real model at tiny sizes: tables, plot, sane numbers."""

import pytest
from typer.testing import CliRunner

from slimserve.cli import app

pytestmark = pytest.mark.real_model


def test_bench_latency_writes_table_and_plot(tmp_path):
    result = CliRunner().invoke(app, ["bench", "latency", "--batch-sizes", "1,3", "--seq-lengths", "16",
                                      "--output-len", "4", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = [line for line in (tmp_path / "latency.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "3"]
    assert all(float(row.split("|")[5]) > 0 for row in rows)
    assert (tmp_path / "latency.png").read_bytes().startswith(b"\x89PNG")


def test_bench_throughput_reports_rates(tmp_path):
    result = CliRunner().invoke(app, ["bench", "throughput", "--num-prompts", "3", "--input-len", "8",
                                      "--output-len", "3", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "3 requests (8 in, 3 out)" in result.output and "output tok/s" in result.output
    assert "3 requests (8 in, 3 out)" in (tmp_path / "throughput.md").read_text()


def test_bench_refuses_prompts_longer_than_the_corpus(tmp_path):
    result = CliRunner().invoke(app, ["bench", "throughput", "--num-prompts", "1000", "--input-len", "2048",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 2 and "corpus has" in result.output
