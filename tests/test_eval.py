"""Perplexity protocol against a direct transformers computation, and the eval/generate commands."""

import math

import pytest
import torch
import transformers
from typer.testing import CliRunner

from slimserve.cli import app
from slimserve.eval.datasets import load_text
from slimserve.eval.perplexity import perplexity

# SmolLM2-135M-Instruct (Q4_1 GGUF dequantized), fp32, first 2 windows of 2048 tokens of the SOTU
# evaluation text (addresses from 1990 on); measured when this test was written.
PINNED_PPL_2_WINDOWS = 23.87


@torch.no_grad()
def test_perplexity_protocol_matches_direct_computation():
    """Non-overlapping windows, final partial window dropped, mean NLL over every predicted token."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    hf = transformers.LlamaForCausalLM(config).eval()
    from slimserve.models.llama import LlamaArgs, LlamaForCausalLM

    ours = LlamaForCausalLM(LlamaArgs.from_dict(config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict())
    token_ids = torch.randint(0, 128, (3 * 50 + 17,)).tolist()  # 3 windows of 50 and a partial one
    result = perplexity(ours, token_ids, window=50, progress=False)
    losses = [hf(torch.tensor([token_ids[i * 50:(i + 1) * 50]]), labels=torch.tensor([token_ids[i * 50:(i + 1) * 50]]))
              .loss.item() for i in range(3)]  # each window predicts 49 tokens: equal weights
    assert result.num_windows == 3 and result.num_predicted == 3 * 49
    assert result.ppl == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)


def test_text_shorter_than_a_window_is_refused():
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(None, [1, 2, 3], window=50, progress=False)


def test_sotu_evaluation_and_calibration_texts_are_disjoint():
    evaluation, calibration = load_text("sotu"), load_text("sotu-calib")
    assert evaluation.startswith("Mr. President")  # Bush, 1990
    assert calibration.startswith("Fellow-Citizens of the Senate")  # Washington, 1790
    assert evaluation[:2000] not in calibration and calibration[-2000:] not in evaluation


@pytest.mark.real_model
def test_eval_command_writes_report(tmp_path):
    result = CliRunner().invoke(app, ["eval", "smollm2-135m", "--dataset", "sotu", "--dtypes", "fp32,bf16",
                                      "--max-windows", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = [line.split("|") for line in (tmp_path / "report.md").read_text().splitlines()[2:]]
    ppl = {row[2].strip(): float(row[6]) for row in rows}
    assert ppl["fp32"] == pytest.approx(PINNED_PPL_2_WINDOWS, abs=0.02)
    assert ppl["bf16"] == pytest.approx(ppl["fp32"], rel=0.01)


@pytest.mark.real_model
def test_generate_command_streams_and_profiles():
    result = CliRunner().invoke(app, ["generate", "smollm2-135m", "--prompt", "The capital of France is",
                                      "--max-tokens", "8", "--profile"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("The capital of France is")
    for stage in ("tokenize", "prefill", "decode", "detokenize"):
        assert f"| {stage} |" in result.output


@pytest.mark.real_model
def test_generate_command_refuses_prompt_over_context():
    result = CliRunner().invoke(app, ["generate", "smollm2-135m", "--prompt", load_text("sotu")[:60000]])
    assert result.exit_code == 2
    assert "8192" in result.output
