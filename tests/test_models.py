"""Our models against transformers on small random configs of every supported architecture."""

import json
import random

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from slimserve.errors import CheckpointError
from slimserve.models.attention import QUERY_BLOCK, AttentionMetadata, PagedAttention, compiled_decode_attention
from slimserve.models.inference_linear import PackedLinear, prepare_for_inference
from slimserve.models.loader import DTYPES, dtype_name, load_model, torch_dtype

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "llama3-rope-tied": lambda: transformers.LlamaConfig(
        **SMALL, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}),
    "llama-linear-rope-bias": lambda: transformers.LlamaConfig(
        **SMALL, attention_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral-window": lambda: transformers.MistralConfig(**SMALL, sliding_window=8),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=256),
}
LOGITS_ATOL = 1e-3  # fp32, random weights


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its saved safetensors folder, folder)."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(CONFIGS[request.param](), attn_implementation="eager").eval()
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, load_model(folder), folder


def flat_logits(model, seqs: list[torch.Tensor]) -> torch.Tensor:
    ids = torch.cat(seqs)
    positions = torch.cat([torch.arange(len(s)) for s in seqs])
    return model.compute_logits(model(ids, positions, AttentionMetadata.without_cache([len(s) for s in seqs])))


@torch.no_grad()
def test_logits_match_transformers(pair):
    hf, ours, _ = pair
    # Different lengths in one flat batch, one longer than two blocks of CPU attention's query rows.
    seqs = [torch.randint(0, 128, (n,)) for n in (23, 5, 17, 2 * QUERY_BLOCK + 9)]
    out = flat_logits(ours, seqs).split([len(s) for s in seqs])
    for seq, logits in zip(seqs, out):
        ref = hf(seq[None]).logits[0]
        assert (ref - logits).abs().max().item() < LOGITS_ATOL


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_prepacked_model_matches_the_loaded_one(pair, dtype):
    """What the engine runs (q/k/v and gate/up fused, oneDNN-prepacked weights) computes the same logits."""
    _, _, folder = pair
    plain, prepared = load_model(folder, dtype), prepare_for_inference(load_model(folder, dtype))
    assert not any(type(m) is torch.nn.Linear for m in prepared.modules())
    assert sum(isinstance(m, PackedLinear) for m in prepared.modules()) > 0
    seqs = [torch.randint(0, 128, (n,)) for n in (23, 1, 6)]
    atol = 1e-5 if dtype == torch.float32 else 5e-2  # bf16: another summation order, 8-bit mantissas
    torch.testing.assert_close(flat_logits(prepared, seqs), flat_logits(plain, seqs), atol=atol, rtol=0)


@torch.no_grad()
def test_paged_cache_matches_full_forward(pair, decode_operator):
    """Prefill in chunks and decode one token at a time through a shuffled block table; the last
    chunk, after 29 cached tokens, spans several blocks of CPU attention's query rows."""
    _, ours, _ = pair
    chunks = [7, 9, 1, 1, 11, 2 * QUERY_BLOCK + 3]
    seq = torch.randint(0, 128, (sum(chunks),))
    block_size, num_blocks = 4, 48
    kv_cache = torch.zeros(ours.kv_cache_shape(num_blocks, block_size))
    block_table = torch.tensor(random.Random(0).sample(range(num_blocks), -(-len(seq) // block_size)))
    start, got = 0, []
    for n in chunks:
        end = start + n
        positions = torch.arange(start, end)
        slots = block_table[positions // block_size] * block_size + positions % block_size
        meta = AttentionMetadata([0, n], [end], slots, block_table[None], kv_cache, num_decode_seqs=int(n == 1))
        got.append(ours.compute_logits(ours(seq[start:end], positions, meta)))
        start = end
    ref = flat_logits(ours, [seq])
    torch.testing.assert_close(torch.cat(got), ref, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_batched_decode_matches_per_sequence_decode(pair, decode_operator):
    """Decodes of sequences with different context lengths in one padded call == one call each."""
    _, ours, _ = pair
    block_size, lens = 4, [9, 3, 14]
    kv_cache = torch.zeros(ours.kv_cache_shape(16, block_size))
    tables = torch.tensor([[5, 1, 9, -1], [2, -1, -1, -1], [0, 3, 7, 11]])
    for s, n in enumerate(lens):  # prefill each sequence
        positions = torch.arange(n)
        slots = tables[s][positions // block_size] * block_size + positions % block_size
        ours(torch.randint(0, 128, (n,)), positions, AttentionMetadata([0, n], [n], slots, tables[s:s + 1], kv_cache))
    positions = torch.tensor(lens)
    slots = tables[torch.arange(3), positions // block_size] * block_size + positions % block_size
    ids = torch.randint(0, 128, (3,))
    logits = {}
    for num_decode in (3, 0):
        meta = AttentionMetadata([0, 1, 2, 3], [n + 1 for n in lens], slots, tables, kv_cache.clone(), num_decode)
        logits[num_decode] = ours.compute_logits(ours(ids, positions, meta))
    torch.testing.assert_close(logits[3], logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sliding_window", [None, 8])
def test_compiled_decode_attention_matches_the_eager_one(sliding_window):
    """Compiled engines' batched decode attention where the operator is not available (one kernel
    reading the cache blocks in place) equals the eager gather + matmul path: padded block tables,
    contexts within one block and over several, a sliding window. Its one compilation serves every
    batch and context size."""
    torch.manual_seed(0)
    num_kv_heads, group, head_dim, block_size = 2, 3, 16, 4
    k_cache, v_cache = torch.randn(2, num_kv_heads, 12, block_size, head_dim, dtype=torch.bfloat16)
    attention = PagedAttention(0, num_kv_heads * group, num_kv_heads, head_dim, sliding_window)
    graphs = []
    for lens, tables in (([9, 3, 14], [[5, 1, 9, -1], [2, -1, -1, -1], [0, 3, 7, 11]]), ([2], [[6]])):
        q = torch.randn(len(lens), num_kv_heads * group, head_dim, dtype=torch.bfloat16)
        meta = AttentionMetadata(list(range(len(lens) + 1)), lens, block_tables=torch.tensor(tables),
                                 kv_cache=torch.stack([k_cache, v_cache])[None], num_decode_seqs=len(lens))
        block_tables, _, context_lens = meta.decode_layout()
        got = compiled_decode_attention(q, k_cache, v_cache, block_tables, context_lens, attention.scale,
                                        sliding_window)
        torch.testing.assert_close(got, attention._decode_gathered(q, None, None, k_cache, v_cache, meta))
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0]


def test_fp16_decode_takes_the_torch_path():
    """The operator reads fp32 and bf16 only: engines of dtype fp16 decode through _decode_gathered."""
    torch.manual_seed(0)
    attention = PagedAttention(0, 4, 2, 16)
    k_cache, v_cache = torch.randn(2, 2, 6, 4, 16, dtype=torch.float16)
    meta = AttentionMetadata([0, 1, 2], [5, 3], block_tables=torch.tensor([[1, 4], [2, -1]]),
                             kv_cache=torch.stack([k_cache, v_cache])[None], num_decode_seqs=2)
    q = torch.randn(2, 4, 16, dtype=torch.float16)
    out = attention._decode(q, None, None, k_cache, v_cache, meta)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, attention._decode_gathered(q, None, None, k_cache, v_cache, meta))


def test_sharded_checkpoint_loads(pair, tmp_path):
    hf, ours, _ = pair
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    sharded = load_model(tmp_path)
    for (name, a), b in zip(ours.state_dict().items(), sharded.state_dict().values()):
        assert torch.equal(a, b), name


def test_unknown_architecture_names_supported(pair, tmp_path):
    _, _, folder = pair
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="LlamaForCausalLM.*Qwen2ForCausalLM|supported"):
        load_model(tmp_path)


def _copy_with(folder, tmp_path, edit):
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path / "model.safetensors"


def test_missing_tensor_is_named(pair, tmp_path):
    _, _, folder = pair
    name = sorted(load_file(folder / "model.safetensors"))[3]
    _copy_with(folder, tmp_path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"missing \[.*'{name}'"):
        load_model(tmp_path)


def test_misshaped_tensor_names_tensor_and_file(pair, tmp_path):
    _, _, folder = pair
    name = sorted(load_file(folder / "model.safetensors"))[3]
    file = _copy_with(folder, tmp_path, lambda t: t.__setitem__(name, torch.zeros(3, 3)))
    with pytest.raises(CheckpointError, match=rf"{name} in {file}.*shape \(3, 3\)"):
        load_model(tmp_path)


@pytest.mark.parametrize("cut", [0.001, 0.5, 0.999])
def test_truncated_safetensors_names_file(pair, tmp_path, cut):
    _, _, folder = pair
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path)


@pytest.mark.parametrize("offset", [0, 3, 9, 20])
def test_bit_flipped_safetensors_header_names_file(pair, tmp_path, offset):
    """The 8-byte header length and the JSON header: a flipped bit there must not load."""
    _, _, folder = pair
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[offset] ^= 0x40
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path)


def test_nan_weights_are_refused(pair, tmp_path):
    _, _, folder = pair
    name = sorted(load_file(folder / "model.safetensors"))[3]
    _copy_with(folder, tmp_path, lambda t: t[name].view(-1).__setitem__(0, float("nan")))
    with pytest.raises(CheckpointError, match=f"{name}.*NaN"):
        load_model(tmp_path)


def test_dtype_names_round_trip_and_unknown_ones_are_refused():
    assert [dtype_name(torch_dtype(name)) for name in DTYPES] == list(DTYPES)
    with pytest.raises(ValueError, match="float64"):
        dtype_name(torch.float64)
    with pytest.raises(ValueError, match="fp64"):
        torch_dtype("fp64")
