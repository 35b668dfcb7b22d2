"""Quantized checkpoints: save -> load gives the same model in every format, and the GPTQ / AWQ files
follow their published layouts, read and written here by code independent of slimserve.quant.packing
(transcribed from AutoGPTQ's QuantLinear.pack and AutoAWQ's WQLinear_GEMM.from_linear)."""

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tiny_gguf import CHAT_TEMPLATE, random_state_dict, write_gguf

from slimserve.config import QuantConfig
from slimserve.errors import CheckpointError
from slimserve.models.attention import AttentionMetadata
from slimserve.models.gguf import read_gguf
from slimserve.models.loader import load_config, load_model, load_tokenizer
from slimserve.quant.formats import save_model, save_tokenizer, tie_quantized_embeddings
from slimserve.quant.gptq import gptq_quantize
from slimserve.quant.qlinear import QuantLinear, quantize_model
from slimserve.tokenizer import Tokenizer

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
DENSE_HEAD = ["embed_tokens", "lm_head"]  # what GPTQ and AWQ readers expect: lm_head stays dense
CASES = {
    "slimserve-w4-g32-sym": ("slimserve", QuantConfig(bits=4, group_size=32)),
    "slimserve-w3-g32-asym": ("slimserve", QuantConfig(bits=3, group_size=32, sym=False)),
    "slimserve-w8a8": ("slimserve", QuantConfig(bits=8, group_size=-1, act_bits=8)),
    "slimserve-w8-tensor": ("slimserve", QuantConfig(bits=8, group_size=0)),
    "slimserve-mixed": ("slimserve", QuantConfig(bits=4, group_size=32, skip=["embed_tokens", "down_proj"],
                                                 modules={"lm_head": {"bits": 8, "group_size": -1}})),
    "gptq-w4-g32-sym": ("gptq", QuantConfig(bits=4, group_size=32, skip=DENSE_HEAD)),
    "gptq-w4-g32-asym": ("gptq", QuantConfig(bits=4, group_size=32, sym=False, skip=DENSE_HEAD)),
    "gptq-w3-g32-sym": ("gptq", QuantConfig(bits=3, group_size=32, skip=DENSE_HEAD)),
    "gptq-w2-g32-asym": ("gptq", QuantConfig(bits=2, group_size=32, sym=False, skip=DENSE_HEAD)),
    "gptq-w8-channel": ("gptq", QuantConfig(bits=8, group_size=-1, skip=DENSE_HEAD)),
    "awq-w4-g32-asym": ("awq", QuantConfig(bits=4, group_size=32, sym=False, skip=DENSE_HEAD)),
    "awq-w4-g64-sym": ("awq", QuantConfig(bits=4, group_size=64, skip=DENSE_HEAD)),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny random Llama folders written by transformers: untied and tied embeddings."""
    folders = {}
    for tied in (False, True):
        torch.manual_seed(0)
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, tie_word_embeddings=tied))
        folders[tied] = tmp_path_factory.mktemp(f"tied{tied}")
        hf.save_pretrained(folders[tied])
    return folders


def quantized(folder, config: QuantConfig, dtype=torch.bfloat16):
    model = load_model(folder, dtype)
    quantize_model(model, config)
    tie_quantized_embeddings(model)
    return model


def logits(model) -> torch.Tensor:
    ids = torch.randint(0, 128, (19,), generator=torch.Generator().manual_seed(1))
    return model.compute_logits(model(ids, torch.arange(19), AttentionMetadata.without_cache([19])))


def quant_layers(model) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_save_load_gives_identical_outputs(sources, tmp_path, case, tied):
    format, config = CASES[case]
    model = quantized(sources[tied], config)
    save_model(model, load_config(sources[tied]), tmp_path, format, config)
    loaded = load_model(tmp_path, torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == format
    assert torch.equal(logits(loaded), logits(model))
    before, after = quant_layers(model), quant_layers(loaded)
    assert set(after) == set(before) - ({"lm_head"} if format != "slimserve" else set())
    for name, module in after.items():
        assert (module.bits, module.kernel) == (before[name].bits, before[name].kernel)
        assert torch.equal(module.dequantize(), before[name].dequantize())


@pytest.mark.parametrize("tied", [False, True])
def test_unquantized_model_round_trips(sources, tmp_path, tied):
    model = load_model(sources[tied], torch.bfloat16)
    save_model(model, load_config(sources[tied]), tmp_path)
    assert torch.equal(logits(load_model(tmp_path, torch.bfloat16)), logits(model))


def test_act_order_gptq_round_trips(sources, tmp_path):
    model = load_model(sources[False])
    batches = [torch.randint(0, 128, (64,), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    config = QuantConfig(method="gptq", bits=4, group_size=32, act_order=True, skip=DENSE_HEAD)
    gptq_quantize(model, batches, config)
    assert any(m.perm is not None for m in quant_layers(model).values())  # g_idx is not trivial
    save_model(model, load_config(sources[False]), tmp_path, "gptq", config)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["desc_act"] is True
    check_gptq_layout(tmp_path, model)
    loaded = load_model(tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-3, atol=1e-3)  # fp16 scales of an fp32 model


def test_quantized_tied_head_exports_dense(sources, tmp_path):
    """GPTQ readers keep lm_head dense: the tied matrix is written as the dequantized head."""
    config = QuantConfig(bits=4, group_size=32)
    model = quantized(sources[True], config)
    save_model(model, load_config(sources[True]), tmp_path, "gptq", config)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors and not any(k.startswith("lm_head.") for k in tensors)
    assert torch.equal(tensors["model.embed_tokens.weight"], model.lm_head.dequantize())
    loaded = load_model(tmp_path, torch.bfloat16)
    assert isinstance(loaded.lm_head, torch.nn.Linear) and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(logits(loaded), logits(model), rtol=2e-2, atol=2e-2)  # dense vs int4 kernel


# --- GPTQ v1 and AWQ GEMM, independently -------------------------------------------------------------


def gptq_unpack_rows(packed: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ packs along axis 0: for 2/4/8 bits, word r holds values r*k .. r*k+k-1 (k = 32/bits) at
    bits*j; for 3 bits, 3 words hold 32 values, value 10 split 2+1 bits and value 21 split 1+2 bits."""
    words = packed.view(np.uint32).astype(np.int64)
    mask = (1 << bits) - 1
    if bits in (2, 4, 8):
        per_word = 32 // bits
        return np.stack([(words >> (bits * j)) & mask for j in range(per_word)], axis=1).reshape(-1, words.shape[1])
    w0, w1, w2 = words[0::3], words[1::3], words[2::3]
    values = [(w0 >> (3 * j)) & 7 for j in range(10)]
    values.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))
    values += [(w1 >> (3 * j + 1)) & 7 for j in range(10)]
    values.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))
    values += [(w2 >> (3 * j + 2)) & 7 for j in range(10)]
    return np.stack(values, axis=1).reshape(-1, words.shape[1])


def gptq_pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of gptq_unpack_rows for 4 bits: word r |= value[8r + j] << 4j."""
    assert bits == 4
    v = values.astype(np.uint32).reshape(-1, 8, values.shape[1])
    words = np.zeros((v.shape[0], values.shape[1]), dtype=np.uint32)
    for j in range(8):
        words |= v[:, j] << np.uint32(4 * j)
    return words.view(np.int32)


AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def awq_unpack_columns(packed: np.ndarray) -> np.ndarray:
    """AutoAWQ: word c of a row holds columns 8c + AWQ_PACK_ORDER[i] at bits 4i."""
    words = packed.view(np.uint32).astype(np.int64)
    out = np.empty((words.shape[0], words.shape[1] * 8), dtype=np.int64)
    for i, column in enumerate(AWQ_PACK_ORDER):
        out[:, column::8] = (words >> (4 * i)) & 15
    return out


def awq_pack_columns(values: np.ndarray) -> np.ndarray:
    words = np.zeros((values.shape[0], values.shape[1] // 8), dtype=np.uint32)
    for i, column in enumerate(AWQ_PACK_ORDER):
        words |= values[:, column::8].astype(np.uint32) << np.uint32(4 * i)
    return words.view(np.int32)


def gptq_weight(t: dict, name: str, bits: int) -> torch.Tensor:
    """W (out, in) = scales[g_idx[i], o] * (q[i, o] - (qzeros[g_idx[i], o] + 1)), float32."""
    q = gptq_unpack_rows(t[f"{name}.qweight"].numpy(), bits)  # (in, out)
    zeros = gptq_unpack_rows(t[f"{name}.qzeros"].numpy().T, bits).T + 1  # (G, out)
    g_idx = t[f"{name}.g_idx"].numpy()
    scales = t[f"{name}.scales"].float().numpy()
    return torch.from_numpy((scales[g_idx] * (q - zeros[g_idx])).T.astype(np.float32))


def awq_weight(t: dict, name: str, group_size: int) -> torch.Tensor:
    q = awq_unpack_columns(t[f"{name}.qweight"].numpy())  # (in, out)
    zeros = awq_unpack_columns(t[f"{name}.qzeros"].numpy())  # (G, out)
    groups = np.arange(q.shape[0]) // group_size
    scales = t[f"{name}.scales"].float().numpy()
    return torch.from_numpy((scales[groups] * (q - zeros[groups])).T.astype(np.float32))


def assert_same_weight(weight: torch.Tensor, module: QuantLinear) -> None:
    """Exact for bf16 layers (their scales are fp16-exact); fp32 scales were rounded to fp16 in the file."""
    tolerance = dict(rtol=0, atol=0) if module.dtype == torch.bfloat16 else dict(rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(weight.to(module.dtype), module.dequantize(), **tolerance)


def check_gptq_layout(folder, model) -> None:
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert {k: config[k] for k in ("quant_method", "checkpoint_format")} == {"quant_method": "gptq",
                                                                            "checkpoint_format": "gptq"}
    t = load_file(folder / "model.safetensors")
    for name, module in quant_layers(model).items():
        bits, out_features, in_features = config["bits"], module.out_features, module.in_features
        assert t[f"{name}.qweight"].dtype == torch.int32
        assert t[f"{name}.qweight"].shape == (in_features * bits // 32, out_features)
        assert t[f"{name}.qzeros"].dtype == torch.int32 and t[f"{name}.scales"].dtype == torch.float16
        assert t[f"{name}.g_idx"].dtype == torch.int32 and t[f"{name}.g_idx"].shape == (in_features,)
        assert_same_weight(gptq_weight(t, name, bits), module)


@pytest.mark.parametrize("case", [c for c in sorted(CASES) if CASES[c][0] == "gptq"])
def test_gptq_export_matches_published_layout(sources, tmp_path, case):
    _, config = CASES[case]
    model = quantized(sources[False], config)
    save_model(model, load_config(sources[False]), tmp_path, "gptq", config)
    check_gptq_layout(tmp_path, model)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (saved["bits"], saved["group_size"], saved["sym"], saved["desc_act"]) == (
        config.bits, config.group_size, config.sym, False)


@pytest.mark.parametrize("case", [c for c in sorted(CASES) if CASES[c][0] == "awq"])
def test_awq_export_matches_published_layout(sources, tmp_path, case):
    _, config = CASES[case]
    model = quantized(sources[False], config)
    save_model(model, load_config(sources[False]), tmp_path, "awq", config)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved == {"quant_method": "awq", "bits": 4, "group_size": config.group_size, "zero_point": True,
                     "version": "gemm", "modules_to_not_convert": None}
    t = load_file(tmp_path / "model.safetensors")
    for name, module in quant_layers(model).items():
        assert t[f"{name}.qweight"].shape == (module.in_features, module.out_features // 8)
        assert t[f"{name}.qzeros"].shape == (module.num_groups, module.out_features // 8)
        assert_same_weight(awq_weight(t, name, config.group_size), module)


def write_foreign_checkpoint(source, folder, format: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A 4-bit g32 checkpoint written with this file's packers, as another tool would; -> reference weights."""
    rng = np.random.default_rng(seed)
    tensors = load_file(source / "model.safetensors")
    weights = {}
    for name in [k.removesuffix(".weight") for k in tensors if k.startswith("model.layers.") and "proj" in k]:
        out_features, in_features = tensors.pop(f"{name}.weight").shape
        num_groups = in_features // 32
        q = rng.integers(0, 16, (in_features, out_features))
        zeros = rng.integers(1, 16, (num_groups, out_features))
        scales = (rng.random((num_groups, out_features)) * 0.01 + 0.001).astype(np.float16)
        g_idx = rng.permutation(np.arange(in_features) // 32)  # act-order: groups scattered over columns
        if format == "gptq":
            packed = {"qweight": gptq_pack_rows(q, 4), "qzeros": gptq_pack_rows((zeros - 1).T, 4).T.copy(),
                      "g_idx": g_idx.astype(np.int32)}
        else:
            g_idx = np.arange(in_features) // 32
            packed = {"qweight": awq_pack_columns(q), "qzeros": awq_pack_columns(zeros)}
        tensors |= {f"{name}.{k}": torch.from_numpy(v) for k, v in packed.items()}
        tensors[f"{name}.scales"] = torch.from_numpy(scales)
        weights[name] = torch.from_numpy((scales.astype(np.float32)[g_idx] * (q - zeros[g_idx])).T.astype(np.float32))
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    if format == "gptq":
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True,
                                         "sym": False, "checkpoint_format": "gptq"}
    else:
        config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                         "version": "gemm"}
    (folder / "config.json").write_text(json.dumps(config))
    return weights


@pytest.mark.parametrize("format", ["gptq", "awq"])
def test_checkpoint_written_by_another_tool_loads(sources, tmp_path, format):
    weights = write_foreign_checkpoint(sources[False], tmp_path / format, format)
    model = load_model(tmp_path / format)
    layers = quant_layers(model)
    assert set(layers) == set(weights) and len(layers) == 14
    for name, module in layers.items():
        torch.testing.assert_close(module.dequantize(), weights[name], rtol=0, atol=0)
    assert torch.isfinite(logits(model)).all()


def test_transformers_loads_our_gptq_export(sources, tmp_path):
    pytest.importorskip("optimum", reason="transformers needs optimum to load GPTQ checkpoints")
    pytest.importorskip("gptqmodel", reason="transformers needs gptqmodel to load GPTQ checkpoints")
    config = QuantConfig(bits=4, group_size=32, skip=DENSE_HEAD)
    model = quantized(sources[False], config, torch.float16)
    save_model(model, load_config(sources[False]), tmp_path, "gptq", config)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float16).eval()
    ids = torch.randint(0, 128, (19,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = hf(ids[None]).logits[0].float()
    torch.testing.assert_close(logits(model), reference, rtol=2e-2, atol=2e-2)


# --- errors -----------------------------------------------------------------------------------------


def test_export_refusals(sources, tmp_path):
    hf_config = load_config(sources[False])
    w4 = QuantConfig(bits=4, group_size=32, skip=DENSE_HEAD)
    with pytest.raises(ValueError, match="format must be one of"):
        save_model(quantized(sources[False], w4), hf_config, tmp_path, "exl2", w4)
    w3 = QuantConfig(bits=3, group_size=32, skip=DENSE_HEAD)
    with pytest.raises(ValueError, match="AWQ GEMM stores 4-bit"):
        save_model(quantized(sources[False], w3), hf_config, tmp_path, "awq", w3)
    w8a8 = QuantConfig(bits=8, group_size=-1, act_bits=8, skip=DENSE_HEAD)
    with pytest.raises(ValueError, match="weight-only"):
        save_model(quantized(sources[False], w8a8), hf_config, tmp_path, "gptq", w8a8)
    mixed = QuantConfig(bits=4, group_size=32, modules={"down_proj": {"bits": 8}}, skip=DENSE_HEAD)
    with pytest.raises(ValueError, match="one \\(bits, group_size"):
        save_model(quantized(sources[False], mixed), hf_config, tmp_path, "gptq", mixed)
    with pytest.raises(ValueError, match="needs a quantized model"):
        save_model(load_model(sources[False]), hf_config, tmp_path, "gptq")
    with pytest.raises(ValueError, match="does not describe"):
        save_model(quantized(sources[False], w4), hf_config, tmp_path, "slimserve", w3)


def test_gptq_refuses_a_zero_point_of_zero(sources, tmp_path):
    config = QuantConfig(bits=4, group_size=32, sym=False, skip=DENSE_HEAD)
    model = load_model(sources[False], torch.bfloat16)
    quantize_model(model, config)
    down = model.model.layers[1].mlp.down_proj
    q, scales, zeros, g_idx = down.quantized()
    zeros[3, 1] = 0  # a group whose weights are all >= 0
    down.set_quantized(q, scales, zeros, g_idx, None)
    with pytest.raises(ValueError, match="down_proj has a zero point of 0"):
        save_model(model, load_config(sources[False]), tmp_path, "gptq", config)


def test_tied_embedding_must_match_quantized_head(sources, tmp_path):
    model = load_model(sources[True], torch.bfloat16)
    config = QuantConfig(bits=4, group_size=32)
    quantize_model(model, config)  # the embedding still holds the float matrix
    with pytest.raises(ValueError, match="tie_quantized_embeddings"):
        save_model(model, load_config(sources[True]), tmp_path, "slimserve", config)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(quant_method="exl2"), "quant_method 'exl2' is not supported"),
    (lambda c: c.update(checkpoint_format="gptq_v2"), "checkpoint_format 'gptq_v2'"),
    (lambda c: c.update(bits=3), "qweight of shape"),
    (lambda c: c.pop("bits"), "needs integer bits and group_size, got None"),
])
def test_bad_quantized_checkpoints_are_named(sources, tmp_path, edit, message):
    config = QuantConfig(bits=4, group_size=32, skip=DENSE_HEAD)
    save_model(quantized(sources[False], config), load_config(sources[False]), tmp_path, "gptq", config)
    saved = json.loads((tmp_path / "config.json").read_text())
    edit(saved["quantization_config"])
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path)


def test_missing_packed_tensor_is_named(sources, tmp_path):
    config = QuantConfig(bits=4, group_size=32)
    save_model(quantized(sources[False], config), load_config(sources[False]), tmp_path, "slimserve", config)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.scales"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.o_proj.scales"):
        load_model(tmp_path)


# --- tokenizer ----------------------------------------------------------------------------------------


def test_gguf_tokenizer_is_carried_along(tmp_path):
    gguf_path = write_gguf(tmp_path / "tiny.gguf", "llama", random_state_dict("llama"), add_bos=True)
    folder = tmp_path / "out"
    folder.mkdir()
    save_tokenizer(gguf_path, folder)
    original, carried = Tokenizer.from_gguf(read_gguf(gguf_path)), load_tokenizer(folder)
    text = "<|im_start|>user\nthe world 12 héllo<|im_end|>"
    assert carried.encode(text) == original.encode(text) and carried.encode(text)[0] == 1  # BOS kept
    assert carried.decode(original.encode(text)) == original.decode(original.encode(text))
    assert (carried.bos_token_id, carried.eos_token_ids, carried.chat_template) == (1, {2}, CHAT_TEMPLATE)
    messages = [{"role": "user", "content": "hi"}]
    assert carried.apply_chat_template(messages) == original.apply_chat_template(messages)
