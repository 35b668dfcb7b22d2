"""GGUF import: parity with transformers' GGUF loader, quantization round trips, corrupt files."""

import random
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tiny_gguf import TINY, random_k_quant_bytes, random_state_dict, write_gguf

from slimserve import assets
from slimserve.errors import CheckpointError
from slimserve.models.gguf import GGUFFile, iter_gguf_tensors, read_gguf

# config keys whose value must equal transformers' config attribute of the same name
SHARED_KEYS = {
    "llama": ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
              "bos_token_id", "eos_token_id", "attention_bias"],
    "qwen2": ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
              "bos_token_id", "eos_token_id"],
    "gpt2": ["model_type", "n_embd", "n_layer", "n_head", "n_ctx", "vocab_size", "tie_word_embeddings",
             "bos_token_id", "eos_token_id"],
}  # fmt: skip


def load_with_transformers(path):
    from transformers import AutoModelForCausalLM, GgufConfig

    gguf_config = GgufConfig(gguf_file=path.name, dequantize=True)
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, quantization_config=gguf_config)


def assert_matches_transformers(path, arch: str) -> GGUFFile:
    ours = dict(iter_gguf_tensors(path))
    gguf_file = read_gguf(path)
    config = gguf_file.config
    model = load_with_transformers(path)
    reference = model.state_dict()
    if config["tie_word_embeddings"]:  # transformers lists the tied head; the file (and we) do not
        head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
        assert head.data_ptr() == embedding.data_ptr()
        reference.pop("lm_head.weight")
    assert sorted(ours) == sorted(reference)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and tensor.shape == reference[name].shape, name
        # not torch.testing.assert_close: it takes ~20 s over SmolLM2's 135M values on these CPUs
        assert (tensor - reference[name]).abs().max().item() <= 1e-6, name

    hf = model.config
    for key in SHARED_KEYS[arch]:
        assert config[key] == getattr(hf, key), key
    assert config["architectures"] == [type(model).__name__]
    if arch != "gpt2":
        assert config["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps, rel=1e-6)
        assert config["rope_theta"] == hf.rope_parameters["rope_theta"]
    return gguf_file


@pytest.mark.real_model
def test_smollm2_matches_transformers():
    gguf_file = assert_matches_transformers(assets.fetch("smollm2-135m"), "llama")
    config = gguf_file.config
    # SmolLM2-135M-Instruct's own config.json values
    assert (config["rms_norm_eps"], config["rope_theta"], config["num_key_value_heads"]) == (1e-05, 100000.0, 3)
    assert gguf_file.tokenizer_metadata["tokenizer.ggml.pre"] == "smollm"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_tiny_model_matches_transformers(tmp_path, arch):
    # llama: every supported tensor type, on GQA q/k so the un-permutation is checked through each
    qtypes, raw = {}, {}
    if arch == "llama":
        p0, p1 = "model.layers.0", "model.layers.1"
        qtypes = {f"{p0}.self_attn.q_proj.weight": Q.Q8_0, f"{p0}.self_attn.k_proj.weight": Q.Q4_0,
                  f"{p0}.self_attn.v_proj.weight": Q.Q4_1, f"{p0}.self_attn.o_proj.weight": Q.F16,
                  f"{p0}.mlp.gate_proj.weight": Q.BF16, f"{p0}.mlp.up_proj.weight": Q.Q5_0,
                  "model.embed_tokens.weight": Q.Q8_0}  # fmt: skip
        H, F = TINY["hidden_size"], TINY["intermediate_size"]
        kv = TINY["num_key_value_heads"] * H // TINY["num_attention_heads"]
        raw = {f"{p1}.self_attn.q_proj.weight": (random_k_quant_bytes(Q.Q4_K, H, H), Q.Q4_K),
               f"{p1}.self_attn.k_proj.weight": (random_k_quant_bytes(Q.Q5_K, kv, H), Q.Q5_K),
               f"{p1}.mlp.down_proj.weight": (random_k_quant_bytes(Q.Q6_K, H, F), Q.Q6_K)}  # fmt: skip
    if arch == "qwen2":
        qtypes = {"model.layers.0.self_attn.q_proj.weight": Q.Q8_0}
    path = write_gguf(tmp_path / f"{arch}.gguf", arch, random_state_dict(arch), qtypes, raw)
    config = assert_matches_transformers(path, arch).config
    if arch != "gpt2":
        assert config["attention_bias"] is (arch == "qwen2")


def test_quantized_round_trip(tmp_path):
    """Dequantized weights equal the originals within each format's rounding error (per 32-wide block)."""
    original = random_state_dict("llama", seed=1)
    bound = {Q.Q8_0: 1 / 127, Q.Q4_0: 1 / 8, Q.Q4_1: 1 / 15, Q.F16: 1e-3, Q.BF16: 1 / 128}  # x amax of the block
    qtypes = {"model.layers.0.self_attn.q_proj.weight": Q.Q8_0, "model.layers.0.self_attn.k_proj.weight": Q.Q4_0,
              "model.layers.1.self_attn.q_proj.weight": Q.Q4_1, "model.layers.1.mlp.up_proj.weight": Q.F16,
              "model.layers.1.mlp.gate_proj.weight": Q.BF16}  # fmt: skip
    path = write_gguf(tmp_path / "q.gguf", "llama", original, qtypes)
    ours = dict(iter_gguf_tensors(path))
    assert sorted(ours) == sorted(original)
    for name, tensor in ours.items():
        expected = torch.from_numpy(original[name])
        assert tensor.shape == expected.shape, name
        if name not in qtypes:
            assert torch.equal(tensor, expected), name
            continue
        blocks = expected.reshape(expected.shape[0], -1, 32)
        amax = blocks.abs().amax(dim=-1, keepdim=True)
        error = (tensor.reshape(blocks.shape) - blocks).abs()
        assert (error <= amax * bound[qtypes[name]] * 1.01 + 1e-7).all(), name
        assert error.max() > 0, name  # it really was quantized


def test_tied_embeddings_and_rope_scaling(tmp_path):
    state = random_state_dict("llama")
    del state["lm_head.weight"]
    scaling = [("llama.rope.scaling.type", "linear", gguf.GGUFValueType.STRING),
               ("llama.rope.scaling.factor", 4.0, gguf.GGUFValueType.FLOAT32),
               ("llama.rope.scaling.original_context_length", 256, gguf.GGUFValueType.UINT32)]  # fmt: skip
    path = write_gguf(tmp_path / "tied.gguf", "llama", state, extra=scaling)
    config = read_gguf(path).config
    assert config["tie_word_embeddings"] is True
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0, "original_max_position_embeddings": 256}
    assert "lm_head.weight" not in dict(iter_gguf_tensors(path))


def test_unsupported_tensor_type_names_type_tensor_and_file(tmp_path):
    qtypes = {"model.layers.1.self_attn.v_proj.weight": Q.Q5_1}
    path = write_gguf(tmp_path / "q5.gguf", "llama", random_state_dict("llama"), qtypes)
    read_gguf(path)  # metadata alone is fine
    with pytest.raises(CheckpointError, match="Q5_1") as error:
        list(iter_gguf_tensors(path))
    assert "blk.1.attn_v.weight" in str(error.value) and str(path) in str(error.value)


def test_unknown_architecture_names_supported_ones(tmp_path):
    path = write_gguf(tmp_path / "falcon.gguf", "falcon", random_state_dict("llama"))
    with pytest.raises(CheckpointError, match="'falcon'.*llama, qwen2, gpt2") as error:
        read_gguf(path)
    assert str(path) in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_gguf(tmp_path / "absent.gguf")


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    return write_gguf(path, "llama", random_state_dict("llama"), {"model.layers.0.mlp.up_proj.weight": Q.Q8_0})


def corrupted_copy(source: Path, tmp_path: Path, edit) -> Path:
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(bytes(edit(bytearray(source.read_bytes()))))
    return path


def field_offsets(path) -> dict[str, int]:
    """Byte offsets of structural header fields, read with the stock gguf reader on the intact file."""
    reader = gguf.GGUFReader(path)
    token_types = reader.fields["tokenizer.ggml.token_type"]
    first_kv = reader.fields["general.architecture"]
    tensor = reader.tensors[3].field  # name_len, name, n_dims, dims, type, offset
    part_offset = lambda field, i: field.offset + sum(int(p.nbytes) for p in field.parts[:i])  # noqa: E731
    return {
        "magic": 0,
        "version": 4,
        "tensor_count_high": 8 + 7,
        "kv_count_high": 16 + 7,
        "first_key_length_high": first_kv.offset + 7,
        "first_value_type": part_offset(first_kv, 2),
        "array_length_bit40": part_offset(token_types, 4) + 5,
        "tensor_dim_high": part_offset(tensor, 3) + 7,
        "tensor_type": part_offset(tensor, 4),
        "tensor_offset_high": part_offset(tensor, 5) + 7,
        "data_offset": reader.data_offset,
        "mid_tokens": part_offset(reader.fields["tokenizer.ggml.tokens"], 40),
    }


@pytest.mark.parametrize(
    "cut", ["magic", "version", "kv_count_high", "mid_tokens", "tensor_type", "data_offset", "mid_data", "last_byte"]
)
def test_truncated_file_names_the_file(tiny_file, tmp_path, cut):
    size = tiny_file.stat().st_size
    keep = {name: offset + 2 for name, offset in field_offsets(tiny_file).items()}  # cut inside each field
    keep |= {"mid_data": size // 2 + 3, "last_byte": size - 1}
    path = corrupted_copy(tiny_file, tmp_path, lambda data: data[: keep[cut]])
    with pytest.raises(CheckpointError) as error:
        read_gguf(path)
    assert str(path) in str(error.value)
    if cut in ("mid_data", "last_byte"):
        assert "past the end of the file" in str(error.value)


@pytest.mark.parametrize("field", ["magic", "version", "tensor_count_high", "kv_count_high", "first_key_length_high",
                                   "first_value_type", "array_length_bit40", "tensor_dim_high", "tensor_type",
                                   "tensor_offset_high"])  # fmt: skip
def test_bit_flipped_header_names_the_file(tiny_file, tmp_path, field):
    offset = field_offsets(tiny_file)[field]
    flip = 0x01 if field == "array_length_bit40" else 0x80

    def edit(data):
        data[offset] ^= flip
        return data

    path = corrupted_copy(tiny_file, tmp_path, edit)
    with pytest.raises(CheckpointError) as error:
        list(iter_gguf_tensors(path))
    assert str(path) in str(error.value)


def test_random_header_bit_flips_raise_only_checkpoint_error(tiny_file, tmp_path):
    """Wherever a header bit flips, loading either works or raises CheckpointError: no other exception."""
    rng = random.Random(0)
    header_size = field_offsets(tiny_file)["data_offset"]
    num_rejected = 0
    for _ in range(100):
        offset, bit = rng.randrange(header_size), rng.randrange(8)

        def edit(data):
            data[offset] ^= 1 << bit
            return data

        path = corrupted_copy(tiny_file, tmp_path, edit)
        try:
            list(iter_gguf_tensors(path))
        except CheckpointError as error:
            assert str(path) in str(error)
            num_rejected += 1
    assert num_rejected > 0


@pytest.mark.parametrize(
    "tensor_name, value", [("blk.1.attn_norm.weight", np.float32("nan")), ("blk.0.ffn_up.weight", np.float16("inf"))]
)
def test_non_finite_values_name_the_tensor(tiny_file, tmp_path, tensor_name, value):
    # blk.0.ffn_up is Q8_0: its first two bytes are the first block's fp16 scale
    reader = gguf.GGUFReader(tiny_file)
    start = next(t.data_offset for t in reader.tensors if t.name == tensor_name)

    def edit(data):
        data[start : start + value.nbytes] = value.tobytes()
        return data

    path = corrupted_copy(tiny_file, tmp_path, edit)
    read_gguf(path)  # the header is intact
    with pytest.raises(CheckpointError, match="NaN or Inf") as error:
        list(iter_gguf_tensors(path))
    assert tensor_name in str(error.value) and str(path) in str(error.value)
