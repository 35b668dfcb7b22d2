"""`slimserve quantize` writes a folder the other commands load; bad settings exit 2 with the reason."""

import json

import pytest
import torch
from typer.testing import CliRunner

from slimserve.cli import app
from slimserve.config import SMOOTH_ALPHA
from slimserve.models.loader import load_model

pytestmark = pytest.mark.real_model


def test_quantize_then_generate_from_the_folder(tmp_path):
    result = CliRunner().invoke(app, ["quantize", "smollm2-135m", "--method", "rtn", "--bits", "4",
                                      "--group-size", "64", "--asym", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "config.json").exists()
    result = CliRunner().invoke(app, ["generate", str(tmp_path), "--prompt", "The capital of France is",
                                      "--max-tokens", "4", "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("The capital of France is") and len(result.output) > 26


def test_smoothquant_writes_a_w8a8_model(tmp_path):
    result = CliRunner().invoke(app, ["quantize", "smollm2-135m", "--method", "smoothquant", "--bits", "8",
                                      "--group-size", "-1", "--num-calib-samples", "2", "--calib-seq-len", "64",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["act_bits"] == 8 and saved["smooth_alpha"] == SMOOTH_ALPHA
    model = load_model(tmp_path, torch.bfloat16)
    assert model.model.layers[0].mlp.down_proj.act_bits == 8


def test_group_size_not_dividing_in_features_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["quantize", "smollm2-135m", "--group-size", "128", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "group_size 128 does not divide in_features 576" in result.output


def test_mse_reaches_the_config(tmp_path):
    """--mse is QuantConfig.mse: refused with AWQ, whose clip search is its own."""
    result = CliRunner().invoke(app, ["quantize", "smollm2-135m", "--method", "awq", "--mse", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "mse searches RTN's and GPTQ's ranges; awq has its own" in result.output


def test_smooth_alpha_reaches_the_config(tmp_path):
    result = CliRunner().invoke(app, ["quantize", "smollm2-135m", "--method", "awq", "--smooth-alpha", "0.5",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "smooth_alpha applies before rtn, gptq, smoothquant; awq cannot take it" in result.output
