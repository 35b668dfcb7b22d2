"""Open checkpoints (HF safetensors folders, sharded or not, and GGUF files) into our nn.Modules.

The model is built on the meta device, then every tensor is streamed from the checkpoint,
checked (known name, right shape, finite), cast to the target dtype and assigned, so peak memory
stays near one copy of the model. Loading is strict: missing or unexpected names are an error
that lists them and names the files. A folder whose config.json has a `quantization_config`
(ours, GPTQ v1, AWQ GEMM: quant/formats.py) gets QuantLinear modules before its tensors load.
"""

import ctypes
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from slimserve.assets import resolve_model
from slimserve.config import ENGINE_DTYPES
from slimserve.errors import CheckpointError
from slimserve.models.gguf import iter_gguf_tensors, read_gguf
from slimserve.models.gpt2 import GPT2Args, GPT2LMHeadModel
from slimserve.models.llama import LlamaArgs, LlamaForCausalLM
from slimserve.quant.formats import quantized_state_dict, tie_quantized_embeddings
from slimserve.quant.qlinear import QuantLinear
from slimserve.tokenizer import Tokenizer

ARCHITECTURES: dict[str, tuple[type, type[nn.Module]]] = {
    "LlamaForCausalLM": (LlamaArgs, LlamaForCausalLM),
    "MistralForCausalLM": (LlamaArgs, LlamaForCausalLM),
    "Qwen2ForCausalLM": (LlamaArgs, LlamaForCausalLM),
    "GPT2LMHeadModel": (GPT2Args, GPT2LMHeadModel),
}
DTYPES = dict(zip(ENGINE_DTYPES, (torch.float32, torch.bfloat16, torch.float16)))
# Buffers some checkpoints carry that we recompute (rope frequencies, GPT-2's causal masks).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """torch_dtype's inverse: torch.bfloat16 -> "bf16"."""
    names = {value: name for name, value in DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"dtype {dtype} is not one of {', '.join(DTYPES)}")
    return names[dtype]


def load_config(path: Path) -> dict:
    """The HF-style config dict of a model folder or GGUF file."""
    if path.suffix == ".gguf":
        return read_gguf(path).config
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{config_file} not found: a model folder needs a config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from e


def build_model(config: dict, device: str | torch.device = "meta") -> nn.Module:
    """An uninitialised model of the config's architecture."""
    archs = config.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise CheckpointError(f"unsupported architecture {archs}; supported: {', '.join(sorted(ARCHITECTURES))}")
    args_cls, model_cls = ARCHITECTURES[arch]
    with torch.device(device):
        return model_cls(args_cls.from_dict(config))


def iter_checkpoint_tensors(path: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(name, tensor, file) for every tensor of a GGUF file (dequantized to dtype) or safetensors
    folder (as stored), one at a time."""
    if path.suffix == ".gguf":
        for name, tensor in iter_gguf_tensors(path, dtype):
            yield name, tensor, path
        return
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                names = list(f.keys())
            for name in names:
                # One open per tensor: closing unmaps the file, so its pages do not stay resident
                # beside the copies (peak memory ~ the model, not model + file).
                with safe_open(file, framework="pt", device="cpu") as f:
                    tensor = f.get_tensor(name)
                # numpy: torch.isfinite is far slower on these CPUs (GGUF tensors are checked in gguf.py)
                if tensor.is_floating_point() and not np.isfinite(tensor.float().numpy()).all():
                    raise CheckpointError(f"tensor {name} in {file} holds NaN or Inf values: the file is corrupt")
                yield name, tensor, file
        except SafetensorError as e:
            raise CheckpointError(f"{file} is truncated or corrupt: {e}") from e


def load_weights(model: nn.Module, path: Path, dtype: torch.dtype, device: str | torch.device = "cpu") -> None:
    """Stream the checkpoint at `path` into `model` (built on meta), strictly."""
    expected = dict(model.state_dict())  # meta tensors: names and shapes only
    tied = model.tie_word_embeddings
    transposed = getattr(model, "transposed_weights", ())
    if tied:
        expected.pop("lm_head.weight")
    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for name, tensor, file in iter_checkpoint_tensors(path, dtype):
        if name.endswith(IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        if name not in expected and f"{model.base_model_prefix}.{name}" in expected:
            name = f"{model.base_model_prefix}.{name}"  # checkpoints saved from the bare base model
        if name not in expected:
            unexpected.append(name)
            continue
        if name.endswith(transposed):
            tensor = tensor.t()
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"tensor {name} in {file} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(expected[name].shape)}")
        loaded[name] = tensor.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(loaded))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {missing[:20]} "
                              f"({len(missing)} in all), unexpected {unexpected[:20]} ({len(unexpected)} in all)")
    model.load_state_dict(loaded, strict=not tied, assign=True)
    if tied:
        model.tie_weights()
    model.to(device)  # the rope buffers were built on the CPU, outside the meta device
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def load_quantized_weights(model: nn.Module, path: Path, quantization_config: dict, dtype: torch.dtype,
                           device: str | torch.device = "cpu") -> None:
    """Load a quantized folder into `model` (built on meta), strictly: its packed layers become QuantLinear
    modules (integers, zeros and g_idx keep their dtype; scales and float tensors become `dtype`)."""
    tensors = {name: tensor for name, tensor, _ in iter_checkpoint_tensors(path, dtype)
               if not name.endswith(IGNORED_SUFFIXES)}
    tied_name = None
    if model.tie_word_embeddings:  # the tied matrix is stored once: as the embedding, or as a quantized lm_head
        tensors.pop("lm_head.weight", None)
        tied_name = "lm_head.weight"
    state_dict = quantized_state_dict(model, tensors, quantization_config)
    if model.tie_word_embeddings and isinstance(model.lm_head, QuantLinear):
        tied_name = "model.embed_tokens.weight"
    state_dict = {name: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                  for name, t in state_dict.items()}
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    except (RuntimeError, ValueError) as e:  # size mismatches, and QuantLinear's checks of its tensors
        raise CheckpointError(f"checkpoint {path} does not match the model: {e}") from e
    missing = sorted(set(missing) - {tied_name})
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {missing[:20]} "
                              f"({len(missing)} in all), unexpected {unexpected[:20]} ({len(unexpected)} in all)")
    if tied_name == "lm_head.weight":
        model.tie_weights()
    elif tied_name is not None and tied_name not in state_dict:
        tie_quantized_embeddings(model)
    model.to(device)  # the rope buffers were built on the CPU, outside the meta device
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def load_model(spec: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """A ready model in eval mode from a MODEL argument (short name, folder, .gguf, hub id)."""
    path = resolve_model(str(spec))
    config = load_config(path)
    model = build_model(config, device="meta")
    if "quantization_config" in config:
        load_quantized_weights(model, path, config["quantization_config"], dtype, device)
    else:
        load_weights(model, path, dtype, device)
    release_freed_memory()
    return model.eval()


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS: glibc keeps what a load frees (the checkpoint's
    tensors, each layer's packing temporaries) as process memory; elsewhere this does nothing. Loaded
    on the 2-core Xeon, Qwen2.5-Coder-0.5B's 3-bit folder held 1.1-2.1 GB across runs, 1.0 GB after it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def load_tokenizer(spec: str | Path) -> Tokenizer:
    path = resolve_model(str(spec))
    if path.suffix == ".gguf":
        return Tokenizer.from_gguf(read_gguf(path))
    return Tokenizer.from_pretrained(path)
