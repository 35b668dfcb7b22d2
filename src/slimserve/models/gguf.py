"""Read llama.cpp's GGUF files: metadata as an HF config.json-style dict, tensors as HF-named float32.

GGUF carries no checksum, so every read is bounds-checked and every dequantized tensor is checked
for NaN/Inf: together these catch truncation and most data corruption, always naming the file.
"""

import functools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from slimserve.errors import CheckpointError

SUPPORTED_TYPES = frozenset(
    GGMLQuantizationType[name]
    for name in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K")
)

# general.architecture -> (HF model_type, HF class); llama.cpp writes Llama 2/3, Mistral and SmolLM2 as "llama".
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "gpt2": ("gpt2", "GPT2LMHeadModel"),
}

_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LLAMA_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GPT2_TOP = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
}
_GPT2_LAYER = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
# (top-level names, per-layer names, prefix of layer i)
_NAMES = {
    "llama": (_LLAMA_TOP, _LLAMA_LAYER, "model.layers"),
    "qwen2": (_LLAMA_TOP, _LLAMA_LAYER, "model.layers"),
    "gpt2": (_GPT2_TOP, _GPT2_LAYER, "transformer.h"),
}
# HF GPT-2 uses Conv1D, which stores weights as (in, out); GGUF holds them as (out, in).
_GPT2_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
DEQUANT_CHUNK_BYTES = 1 << 20  # quantized bytes per dequantize call: bounds its float32 temporaries
_PARSE_ERRORS = (OSError, EOFError, ValueError, KeyError, IndexError, OverflowError)


class TensorInfo(NamedTuple):
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # HF order: (out, in) for a weight
    n_bytes: int
    data_offset: int  # from the start of the file


@dataclass
class GGUFFile:
    path: Path
    config: dict  # HF config.json keys and meanings
    tokenizer_metadata: dict  # every tokenizer.* key (tokenizer.ggml.*, tokenizer.chat_template) as python values


class _BoundedReader(GGUFReader):
    """GGUFReader whose reads must lie inside the file.

    The stock reader slices its memmap, so a read past the end silently returns fewer items and
    parsing goes on until some later step trips over them; a bit-flipped array length then spins
    through up to 2**64 empty reads. These overrides lean on GGUFReader internals;
    tests/test_gguf.py truncates and bit-flips files to keep them honest."""

    def _get(self, offset, dtype, count=1, override_order=None):
        if offset + np.dtype(dtype).itemsize * int(count) > len(self.data):
            what = f"{int(count)} x {np.dtype(dtype).name}"
            raise EOFError(f"read of {what} at byte {offset} runs past the end of the file")
        return super()._get(offset, dtype, count, override_order)

    def _get_field_parts(self, orig_offs, raw_type):
        if GGUFValueType(raw_type) == GGUFValueType.ARRAY:
            # the stock reader parses arrays item by item: refuse a length the rest of the file cannot hold
            item_type = GGUFValueType(int(self._get(orig_offs, np.uint32)[0]))
            scalar = self.gguf_scalar_to_np.get(item_type)
            min_item_bytes = 8 if scalar is None else np.dtype(scalar).itemsize  # 8: a string's length
            length = int(self._get(orig_offs + 4, np.uint64)[0])
            if length * min_item_bytes > len(self.data) - orig_offs - 12:
                raise EOFError(f"array of {length} {item_type.name} items at byte {orig_offs} cannot fit in the file")
        return super()._get_field_parts(orig_offs, raw_type)


def _open(path: Path) -> tuple[list[TensorInfo], dict]:
    """The parsed file; parsing SmolLM2's metadata takes seconds, and loading a model asks for it
    three times (config, tensors, tokenizer), so the last two files parsed are kept."""
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    stat = path.stat()
    return _parse(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _parse(path: Path, mtime_ns: int, size: int) -> tuple[list[TensorInfo], dict]:
    """Keyed by modification time and size too, so a rewritten file is parsed again."""
    try:
        reader = _BoundedReader(path)
        metadata = {key: field.contents() for key, field in reader.fields.items()}
        # Keep plain values only: the reader's per-field numpy parts weigh ~150 MB for a 49k vocabulary.
        tensors = [TensorInfo(t.name, t.tensor_type, tuple(int(d) for d in reversed(t.shape)), int(t.n_bytes),
                              int(t.data_offset)) for t in reader.tensors]
    except _PARSE_ERRORS as e:
        raise CheckpointError(f"cannot parse GGUF file {path}: {type(e).__name__}: {e}") from e
    return tensors, metadata


def read_gguf(path: str | Path) -> GGUFFile:
    """Metadata only: the memmapped tensor data is never touched."""
    path = Path(path)
    tensors, metadata = _open(path)
    return _gguf_file(path, tensors, metadata)


def _gguf_file(path: Path, tensors: list[TensorInfo], metadata: dict) -> GGUFFile:
    tensor_names = {t.name for t in tensors}
    try:
        config = _config(metadata, tensor_names)
    except KeyError as e:
        raise CheckpointError(f"GGUF file {path} lacks metadata key {e.args[0]!r}") from e
    except ValueError as e:
        raise CheckpointError(f"GGUF file {path}: {e}") from e
    tokenizer_metadata = {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}
    return GGUFFile(path=path, config=config, tokenizer_metadata=tokenizer_metadata)


def _config(metadata: dict, tensor_names: set[str]) -> dict:
    arch = metadata["general.architecture"]
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    model_type, hf_class = ARCHITECTURES[arch]
    count = lambda name, default=None: _positive(metadata, f"{arch}.{name}", int, default)  # noqa: E731
    real = lambda name, default=None: _positive(metadata, f"{arch}.{name}", float, default)  # noqa: E731

    num_heads = count("attention.head_count")
    config = {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": count("vocab_size", len(metadata.get("tokenizer.ggml.tokens", [])) or None),
        # llama.cpp writes output.weight only when it differs from the embedding
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
    }
    if arch == "gpt2":
        return config | {
            "n_embd": count("embedding_length"),
            "n_layer": count("block_count"),
            "n_head": num_heads,
            "n_inner": count("feed_forward_length"),
            "n_positions": count("context_length"),
            "n_ctx": count("context_length"),
            "layer_norm_epsilon": real("attention.layer_norm_epsilon"),
        }
    hidden_size = count("embedding_length")
    config |= {
        "hidden_size": hidden_size,
        "intermediate_size": count("feed_forward_length"),
        "num_hidden_layers": count("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": count("attention.head_count_kv", num_heads),
        "head_dim": count("attention.key_length", hidden_size // num_heads),
        "rms_norm_eps": real("attention.layer_norm_rms_epsilon"),
        "rope_theta": real("rope.freq_base", 10000.0),  # llama.cpp's value when the file states none
        "max_position_embeddings": count("context_length"),
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "hidden_act": "silu",
    }
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        config["rope_scaling"] = {"rope_type": scaling, "factor": real("rope.scaling.factor")}
        if f"{arch}.rope.scaling.original_context_length" in metadata:
            original = count("rope.scaling.original_context_length")
            config["rope_scaling"]["original_max_position_embeddings"] = original
    return config


def _positive(metadata: dict, key: str, kind: type, default: int | float | None) -> int | float:
    """metadata[key] (or default when absent), checked to be a positive int or finite float."""
    value = metadata[key] if default is None or key in metadata else default
    if kind is int and (type(value) is not int or value <= 0):
        raise ValueError(f"{key} = {value!r} is not a positive integer")
    if kind is float:
        if type(value) not in (int, float) or not 0 < value < float("inf"):
            raise ValueError(f"{key} = {value!r} is not a positive number")
        # float32 in the file: its shortest round-tripping decimal is the config.json value (1e-05, not 9.99e-06)
        value = float(str(np.float32(value)))
    return value


def _hf_name(arch: str, name: str, path: Path) -> str:
    top, layer, layer_prefix = _NAMES[arch]
    if name == "rope_freqs.weight":
        raise CheckpointError(f"{path}: Llama-3.1-style RoPE frequency factors (rope_freqs.weight) are not supported")
    stem, _, suffix = name.rpartition(".")
    if stem in top and suffix in ("weight", "bias"):
        return f"{top[stem]}.{suffix}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if match and match[2] in layer and suffix in ("weight", "bias"):
        return f"{layer_prefix}.{match[1]}.{layer[match[2]]}.{suffix}"
    raise CheckpointError(f"unexpected tensor {name!r} for architecture {arch!r} in {path}")


def _unpermute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's row permutation of llama q/k projections (weights or biases).

    HF's rotary embedding pairs dimension i with i + head_dim/2; GGML's pairs 2i with 2i+1, so the
    converter moved row (half j, i) of each head to row 2i + j. Shape (num_heads * head_dim, ...)."""
    shape = weight.shape
    return weight.reshape(num_heads, shape[0] // num_heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def iter_gguf_tensors(path: str | Path, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF parameter name, tensor of `dtype` in HF layout), one tensor at a time.

    Tensor data is read with plain file reads in chunks of rows and dequantized chunk by chunk
    into the output tensor, so memory holds the yielded tensor plus one small chunk: neither the
    float32 temporaries of a whole large tensor nor memory-mapped pages of the file stay resident."""
    path = Path(path)
    tensors, metadata = _open(path)
    config = _gguf_file(path, tensors, metadata).config
    arch = metadata["general.architecture"]
    with open(path, "rb") as f:
        for tensor in tensors:
            hf_name = _hf_name(arch, tensor.name, path)
            if tensor.tensor_type not in SUPPORTED_TYPES:
                raise CheckpointError(
                    f"tensor {tensor.name!r} in {path} has type {tensor.tensor_type.name}; "
                    f"supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))}"
                )
            values = _read_dequantized(f, tensor, dtype, path)  # (rows, cols) = HF's (out, in)
            leaf = tensor.name.split(".")[-2]
            if arch == "llama" and leaf in ("attn_q", "attn_k"):
                num_heads = config["num_attention_heads" if leaf == "attn_q" else "num_key_value_heads"]
                if values.shape[0] != num_heads * config["head_dim"]:
                    raise CheckpointError(
                        f"tensor {tensor.name!r} in {path} has {values.shape[0]} rows, "
                        f"expected {num_heads} heads x head_dim {config['head_dim']}"
                    )
                values = _unpermute_rotary(values, num_heads)
            elif arch == "gpt2" and hf_name.endswith(_GPT2_TRANSPOSED):
                values = values.T.contiguous()
            yield hf_name, values


def _read_dequantized(f: BinaryIO, tensor: TensorInfo, dtype: torch.dtype, path: Path) -> torch.Tensor:
    shape = tensor.shape
    num_rows = math.prod(shape[:-1])
    row_bytes = tensor.n_bytes // num_rows
    out = torch.empty(num_rows, shape[-1], dtype=dtype)
    rows_per_chunk = max(1, DEQUANT_CHUNK_BYTES // row_bytes)
    for start in range(0, num_rows, rows_per_chunk):
        n = min(rows_per_chunk, num_rows - start)
        raw = bytearray(n * row_bytes)
        f.seek(tensor.data_offset + start * row_bytes)
        if f.readinto(raw) != len(raw):
            raise CheckpointError(f"tensor {tensor.name!r} in {path} runs past the end of the file (truncated?)")
        with np.errstate(invalid="ignore", over="ignore"):  # corrupt scales give NaN/Inf, caught just below
            values = dequantize(np.frombuffer(raw, np.uint8).reshape(n, row_bytes), tensor.tensor_type)
        # checked in numpy: torch.isfinite measured ~1000x slower on these shared 2-core CPUs
        if not np.isfinite(values).all():
            raise CheckpointError(f"tensor {tensor.name!r} in {path} holds NaN or Inf after dequantization (corrupt?)")
        out[start : start + n] = torch.from_numpy(values.reshape(n, shape[-1]))
    return out.view(shape)
