"""Write tiny random GGUF files the way llama.cpp's convert_hf_to_gguf.py does, for tests.

Kept independent of slimserve.models.gguf: names, permutation and layout are written out here
from llama.cpp's converter, so a test comparing the two is not comparing code with itself.
"""

from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

TINY = {
    "hidden_size": 256,  # a multiple of 256 so K-quant blocks fit a row
    "intermediate_size": 1024,  # GPT-2 sizes, which transformers assumes for gpt2 GGUFs
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "o r"]
MERGES += ["Ġ w", "Ġw or", "l d", "Ġwor ld", "Ġ 1", "1 2"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_LLAMA_LEAVES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GPT2_LEAVES = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}


def tiny_vocab() -> tuple[list[str], list[int]]:
    """(tokens, token types): special tokens (CONTROL), the 256 byte-level symbols, merge results."""
    byte_symbols = gguf_byte_symbols()
    merged = [m.replace(" ", "") for m in MERGES]
    tokens = SPECIAL_TOKENS + byte_symbols + merged
    types = [3] * len(SPECIAL_TOKENS) + [1] * (len(byte_symbols) + len(merged))
    return tokens, types


def gguf_byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def random_state_dict(arch: str, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named float32 weights of a tiny model (HF layout: Linear (out, in), GPT-2 Conv1D (in, out))."""
    rng = np.random.default_rng(seed)
    H, F, L = TINY["hidden_size"], TINY["intermediate_size"], TINY["num_hidden_layers"]
    head_dim = H // TINY["num_attention_heads"]
    kv = TINY["num_key_value_heads"] * head_dim
    V = len(tiny_vocab()[0])
    w = lambda *shape: rng.standard_normal(shape).astype(np.float32) * 0.05  # noqa: E731
    if arch == "gpt2":
        sd = {"transformer.wte.weight": w(V, H), "transformer.wpe.weight": w(TINY["max_position_embeddings"], H)}
        sd |= {"transformer.ln_f.weight": 1 + w(H), "transformer.ln_f.bias": w(H)}
        for i in range(L):
            p = f"transformer.h.{i}"
            sd |= {f"{p}.ln_1.weight": 1 + w(H), f"{p}.ln_1.bias": w(H), f"{p}.ln_2.weight": 1 + w(H)}
            sd |= {f"{p}.ln_2.bias": w(H), f"{p}.attn.c_attn.weight": w(H, 3 * H), f"{p}.attn.c_attn.bias": w(3 * H)}
            sd |= {f"{p}.attn.c_proj.weight": w(H, H), f"{p}.attn.c_proj.bias": w(H)}
            sd |= {f"{p}.mlp.c_fc.weight": w(H, F), f"{p}.mlp.c_fc.bias": w(F)}
            sd |= {f"{p}.mlp.c_proj.weight": w(F, H), f"{p}.mlp.c_proj.bias": w(H)}
        return sd
    sd = {"model.embed_tokens.weight": w(V, H), "model.norm.weight": 1 + w(H), "lm_head.weight": w(V, H)}
    for i in range(L):
        p = f"model.layers.{i}"
        sd |= {f"{p}.input_layernorm.weight": 1 + w(H), f"{p}.post_attention_layernorm.weight": 1 + w(H)}
        sd |= {f"{p}.self_attn.q_proj.weight": w(H, H), f"{p}.self_attn.k_proj.weight": w(kv, H)}
        sd |= {f"{p}.self_attn.v_proj.weight": w(kv, H), f"{p}.self_attn.o_proj.weight": w(H, H)}
        sd |= {f"{p}.mlp.gate_proj.weight": w(F, H), f"{p}.mlp.up_proj.weight": w(F, H)}
        sd |= {f"{p}.mlp.down_proj.weight": w(H, F)}
        if arch == "qwen2":
            sd |= {f"{p}.self_attn.q_proj.bias": w(H), f"{p}.self_attn.k_proj.bias": w(kv)}
            sd |= {f"{p}.self_attn.v_proj.bias": w(kv)}
    return sd


def gguf_name(arch: str, hf_name: str) -> str:
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    top |= {"transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm"}
    stem, suffix = hf_name.rsplit(".", 1)
    if stem in top:
        return f"{top[stem]}.{suffix}"
    prefix = "transformer.h." if arch == "gpt2" else "model.layers."
    layer, leaf = stem.removeprefix(prefix).split(".", 1)
    leaves = _GPT2_LEAVES if arch == "gpt2" else _LLAMA_LEAVES
    return f"blk.{layer}.{leaves[leaf]}.{suffix}"


def llama_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute (n_head is already the kv head count for k)."""
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def to_gguf_layout(arch: str, hf_name: str, value: np.ndarray) -> np.ndarray:
    if arch == "llama" and ".q_proj." in hf_name:
        return llama_permute(value, TINY["num_attention_heads"])
    if arch == "llama" and ".k_proj." in hf_name:
        return llama_permute(value, TINY["num_key_value_heads"])
    if arch == "gpt2" and hf_name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
        return np.ascontiguousarray(value.T)
    return value


def random_k_quant_bytes(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random K-quant blocks whose fp16 super-block scales are set to a small finite value."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    scale_offsets = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (size - 2,)}[qtype]  # d (and dmin) fields
    for offset in scale_offsets:
        blocks[:, offset : offset + 2] = scale
    return blocks.reshape(rows, cols // block * size)


def write_gguf(
    path: Path,
    arch: str,
    state_dict: dict[str, np.ndarray],
    qtypes: dict[str, Q] | None = None,
    raw: dict[str, tuple[np.ndarray, Q]] | None = None,
    pre: str = "smollm",
    add_bos: bool | None = False,
    chat_template: str | None = CHAT_TEMPLATE,
    extra: list[tuple[str, Any, gguf.GGUFValueType]] = (),
) -> Path:
    """qtypes: HF name -> type to quantize to with gguf.quants; raw: HF name -> (bytes, type) written as
    is; extra: more metadata as (key, value, type)."""
    qtypes, raw = qtypes or {}, raw or {}
    H, heads = TINY["hidden_size"], TINY["num_attention_heads"]
    tokens, types = tiny_vocab()
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny test model")
    writer.add_block_count(TINY["num_hidden_layers"])
    writer.add_context_length(TINY["max_position_embeddings"])
    writer.add_embedding_length(H)
    writer.add_feed_forward_length(TINY["intermediate_size"])
    writer.add_head_count(heads)
    if arch == "gpt2":
        writer.add_layer_norm_eps(1e-5)
    else:
        writer.add_head_count_kv(TINY["num_key_value_heads"])
        writer.add_layer_norm_rms_eps(1e-6)
        writer.add_rope_freq_base(10000.0)
        writer.add_rope_dimension_count(H // heads)
        writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for key, value, vtype in extra:
        writer.add_key_value(key, value, vtype)
    for hf_name, value in state_dict.items():
        name = gguf_name(arch, hf_name)
        if hf_name in raw:
            data, qtype = raw[hf_name]
            writer.add_tensor(name, data, raw_dtype=qtype)
            continue
        value = to_gguf_layout(arch, hf_name, value)
        qtype = qtypes.get(hf_name, Q.F32)
        if qtype == Q.F32:
            writer.add_tensor(name, value)
        elif qtype == Q.F16:
            writer.add_tensor(name, value.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
