"""The real SmolLM2-135M (shipped as a Q4_1 GGUF) against transformers' own GGUF loader."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from slimserve.assets import fetch
from slimserve.engine.sampling_params import SamplingParams
from slimserve.errors import ContextLengthError
from slimserve.eval.datasets import load_text
from slimserve.generate import Generator
from slimserve.models.attention import AttentionMetadata
from slimserve.models.gguf import read_gguf
from slimserve.models.loader import load_model, load_tokenizer

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def gguf():
    return fetch("smollm2-135m")


@pytest.fixture(scope="module")
def hf(gguf):
    return transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(gguf):
    return load_model(gguf, torch.float32)


@pytest.fixture(scope="module")
def tokenizer(gguf):
    return load_tokenizer(gguf)


@torch.no_grad()
def test_logits_match_transformers_gguf_loader(hf, ours, tokenizer):
    ids = torch.tensor(tokenizer.encode(load_text("sotu")[:4000])[:512])
    assert len(ids) == 512
    ref = hf(ids[None]).logits[0]
    got = ours.compute_logits(ours(ids, torch.arange(512), AttentionMetadata.without_cache([512])))
    assert (ref.argmax(-1) == got.argmax(-1)).all()  # top-1 identical on all 512 positions
    assert (ref - got).abs().max().item() < 1e-3


def test_64_greedy_tokens_match_transformers(hf, ours, tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name three famous rivers."}])
    prompt_ids = tokenizer.encode(prompt)
    ref = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                      pad_token_id=min(tokenizer.eos_token_ids))
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    got = Generator(ours, tokenizer).generate(prompt_ids, params)
    assert got.token_ids == ref[0, len(prompt_ids):].tolist()
    assert got.finish_reason == "length"


def test_prompt_longer_than_context_is_refused(ours, tokenizer):
    generator = Generator(ours, tokenizer)
    with pytest.raises(ContextLengthError, match="8192"):
        generator.generate([1] * 8192, SamplingParams(max_tokens=4))


def test_max_tokens_past_context_stops_with_length(ours, tokenizer):
    generator = Generator(ours, tokenizer, max_model_len=40)
    got = generator.generate([1] * 36, SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    assert len(got.token_ids) == 4 and got.finish_reason == "length"


PEAK_SCRIPT = """
import sys, torch
from pathlib import Path
from slimserve.eval.evaluate import module_bytes, peak_rss_bytes, reset_peak_rss
from slimserve.models.loader import load_config, build_model, load_model
status = lambda: Path("/proc/self/status").read_text()
build_model(load_config(Path(sys.argv[1])))  # imports and one-off allocations before the baseline
rss0 = int(next(l for l in status().splitlines() if l.startswith("VmRSS:")).split()[1]) * 1024
reset_peak_rss()
model = load_model(sys.argv[1], torch.float32)
print((peak_rss_bytes() - rss0) / module_bytes(model))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_loading_streams_tensors_peak_memory(gguf, ours, tmp_path):
    """Peak RSS growth while loading fp32 stays under 1.3x the model's bytes, from GGUF and from safetensors."""
    save_file({k: v for k, v in ours.state_dict().items() if k != "lm_head.weight"}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(read_gguf(gguf).config))
    for path in (gguf, tmp_path):
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], capture_output=True, text=True, check=True)
        assert float(out.stdout) < 1.3, (path, out.stdout)
