"""Quantized checkpoints: our own format, GPTQ v1 and AWQ GEMM, written and read back.

Each is an HF-style folder: config.json with a `quantization_config`, model.safetensors, and the
tokenizer files. They differ in how a QuantLinear's integers q (out, in), zeros and scales
(out, G) are laid out (G groups along `in`):

- slimserve: QuantLinear's portable state dict (qweight (out, in*bits/8) uint8 packed along `in`,
  scales (rows, G) in the model dtype, zeros (rows, G) uint8, g_idx (in,) int32 after act-order);
  quantization_config = our QuantConfig fields + "quant_method": "slimserve".
- gptq (v1, as AutoGPTQ and GPTQModel write it, transformers and vLLM read it): qweight
  (in*bits/32, out) int32 packed along `in`, qzeros (G, out*bits/32) int32 holding zeros - 1 packed
  along `out`, scales (G, out) fp16, g_idx (in,) int32 (group of each input column); bits 2/3/4/8.
  v1 kernels read a zero as ((qzeros >> shift) & mask) + 1, so a zero point of 0 cannot be stored.
- awq (GEMM, as AutoAWQ writes it): qweight (in, out/8) and qzeros (G, out/8) int32 packed along
  `out`, each 8 values in the order [0, 2, 4, 6, 1, 3, 5, 7], zeros as they are; scales (G, out)
  fp16; 4 bits, groups only, no act-order.

A tied embedding matrix is stored once. When lm_head is quantized it is the stored copy, and the
embedding reads its dequantized rows (tie_quantized_embeddings), as llama.cpp reads one quantized
token_embd for both. GPTQ and AWQ readers keep lm_head dense, so those exports dequantize it.
Quantized checkpoints cover the Llama family (Llama, Mistral, Qwen2, SmolLM2).
"""

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from slimserve.config import QuantConfig
from slimserve.errors import CheckpointError
from slimserve.models.gguf import read_gguf
from slimserve.models.llama import LlamaForCausalLM
from slimserve.quant.packing import pack_bits, unpack_bits
from slimserve.quant.qlinear import QuantLinear
from slimserve.tokenizer import Tokenizer

FORMATS = ("slimserve", "gptq", "awq")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # packed slot i holds column AWQ_ORDER[i] of each 8
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # column j sits in slot AWQ_REVERSE_ORDER[j]
GPTQ_BITS = (2, 3, 4, 8)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def tie_quantized_embeddings(model: nn.Module) -> None:
    """In a tied model whose lm_head is a QuantLinear, make the embedding the dequantized lm_head."""
    if model.tie_word_embeddings and isinstance(model.lm_head, QuantLinear):
        model.model.embed_tokens.weight = nn.Parameter(model.lm_head.dequantize(), requires_grad=False)


def save_model(
    model: nn.Module,
    hf_config: dict,
    out_dir: Path,
    format: str = "slimserve",
    quant_config: QuantConfig | None = None,
    tokenizer_source: Path | None = None,
) -> None:
    """Write `model` (quantized or not) as a folder that models/loader.load_model reads back.

    hf_config: the source's config.json dict; quant_config: how the model was quantized (needed for
    the slimserve format of a quantized model); tokenizer_source: the HF folder or GGUF file whose
    tokenizer is carried along.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if quantized and not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"quantized checkpoints support the Llama family, got {type(model).__name__}")
    if format != "slimserve" and not quantized:
        raise ValueError(f"format {format!r} needs a quantized model; this one has no QuantLinear layers")
    tensors = model.state_dict()  # QuantLinear layers give their portable form
    if model.tie_word_embeddings and isinstance(model.lm_head, QuantLinear):
        embedding = tensors.pop("model.embed_tokens.weight")
        if not torch.equal(embedding, model.lm_head.dequantize()):
            raise ValueError("the tied embedding differs from the quantized lm_head; "
                             "call tie_quantized_embeddings(model) after quantizing")
    elif model.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    config = {k: v for k, v in hf_config.items() if k not in ("quantization_config", "dtype")}
    config["torch_dtype"] = DTYPE_NAMES[next(model.parameters()).dtype]
    for name in [n for n in tensors if n.endswith(getattr(model, "transposed_weights", ()))]:
        tensors[name] = tensors[name].t()  # GPT-2 checkpoints hold Conv1D (in, out) weights
    if format == "slimserve" and quantized:
        if quant_config is None:
            raise ValueError("quant_config is required to save a quantized model in the slimserve format")
        _check_matches_config(quantized, quant_config)
        config["quantization_config"] = {"quant_method": "slimserve", **asdict(quant_config)}
    elif format != "slimserve":
        config["quantization_config"] = _export(model, quantized, tensors, format)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer_source is not None:
        save_tokenizer(tokenizer_source, out_dir)


def _check_matches_config(quantized: dict[str, QuantLinear], quant_config: QuantConfig) -> None:
    for name, module in quantized.items():
        expected = quant_config.for_module(name)
        actual = (module.bits, module.group_size, module.sym, module.act_bits)
        if expected is None or actual != (expected.bits, expected.group_size, expected.sym, expected.act_bits):
            raise ValueError(f"layer {name} is quantized as (bits, group_size, sym, act_bits) = {actual}, "
                             f"which quant_config.for_module({name!r}) does not describe")


def _export(model: nn.Module, quantized: dict[str, QuantLinear], tensors: dict, format: str) -> dict:
    """Rewrite `tensors` in place into the GPTQ or AWQ layout; returns their quantization_config."""
    if "lm_head" in quantized:
        for key in [k for k in tensors if k.startswith("lm_head.")]:
            del tensors[key]
        head = quantized["lm_head"].dequantize()
        tensors["model.embed_tokens.weight" if model.tie_word_embeddings else "lm_head.weight"] = head
        quantized = {name: m for name, m in quantized.items() if name != "lm_head"}
    dense = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")]
    if dense:
        raise ValueError(f"format {format!r} needs every linear layer of the decoder quantized; dense: {dense[:4]}")
    schemes = {(m.bits, m.group_size if m.group_size > 0 else -1, m.sym, m.act_bits) for m in quantized.values()}
    if len(schemes) != 1:
        raise ValueError(f"format {format!r} stores one (bits, group_size, sym, act_bits) for all layers, "
                         f"got {sorted(schemes, key=str)}")
    bits, group_size, sym, act_bits = schemes.pop()
    if act_bits is not None:
        raise ValueError(f"format {format!r} is weight-only; W8A8 (act_bits={act_bits}) needs the slimserve format")
    encode = _encode_gptq if format == "gptq" else _encode_awq
    desc_act = False
    for name, module in quantized.items():
        for key in [k for k in tensors if k.startswith(name + ".")]:
            del tensors[key]
        for key, tensor in encode(name, module).items():
            tensors[f"{name}.{key}"] = tensor
        desc_act |= module.perm is not None
    if format == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
                "checkpoint_format": "gptq", "true_sequential": True, "lm_head": False}
    return {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": None}


def _per_row(module: QuantLinear) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """q (out, in), scales and zeros (out, G) with a per-tensor scale repeated on every row, g_idx."""
    q, scales, zeros, g_idx = module.quantized()
    rows = (module.out_features, scales.shape[1])
    return q, scales.expand(rows), zeros.expand(rows), g_idx


def _encode_gptq(name: str, module: QuantLinear) -> dict[str, Tensor]:
    if module.bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ stores {GPTQ_BITS}-bit weights; layer {name} has {module.bits} bits")
    q, scales, zeros, g_idx = _per_row(module)
    if bool((zeros == 0).any()):
        raise ValueError(f"layer {name} has a zero point of 0, which GPTQ v1 cannot store (it keeps zeros - 1); "
                         "quantize with sym=True or save in the slimserve format")
    if g_idx is None:
        span = module.group_size if module.group_size > 0 else module.in_features
        g_idx = torch.arange(module.in_features, device=q.device) // span
    tensors = {
        "qweight": pack_bits(q.t(), module.bits, dim=0),  # (in * bits / 32, out)
        "qzeros": pack_bits(zeros.t() - 1, module.bits, dim=1),  # (G, out * bits / 32)
        "scales": scales.t().half(),  # (G, out)
        "g_idx": g_idx.to(torch.int32),
    }
    if module.bias is not None:
        tensors["bias"] = module.bias.half()
    return tensors


def _encode_awq(name: str, module: QuantLinear) -> dict[str, Tensor]:
    if module.bits != 4 or module.group_size <= 0 or module.perm is not None:
        raise ValueError(f"AWQ GEMM stores 4-bit weights in groups without act-order; layer {name} has "
                         f"bits={module.bits}, group_size={module.group_size}, act-order={module.perm is not None}")
    q, scales, zeros, _ = _per_row(module)
    tensors = {
        "qweight": pack_bits(_interleave(q.t()), 4, dim=1),  # (in, out / 8)
        "qzeros": pack_bits(_interleave(zeros.t()), 4, dim=1),  # (G, out / 8)
        "scales": scales.t().half(),  # (G, out)
    }
    if module.bias is not None:
        tensors["bias"] = module.bias.half()
    return tensors


def _interleave(values: Tensor, order: list[int] = AWQ_ORDER) -> Tensor:
    """Reorder each run of 8 columns of values (R, C) by `order`."""
    rows, columns = values.shape
    return values.reshape(rows, columns // 8, 8)[..., order].reshape(rows, columns)


def quantized_state_dict(model: nn.Module, tensors: dict[str, Tensor], quantization_config: dict) -> dict[str, Tensor]:
    """For loading a quantized folder into `model` (built on meta): swap every nn.Linear whose packed
    weight `tensors` holds for a QuantLinear on meta, and return the tensors in QuantLinear's portable form."""
    method = quantization_config.get("quant_method")
    if method not in FORMATS:
        raise CheckpointError(f"quantization_config quant_method {method!r} is not supported; supported: {FORMATS}")
    if not isinstance(model, LlamaForCausalLM):
        raise CheckpointError(f"quantized checkpoints support the Llama family, got {type(model).__name__}")
    scheme = _reader_scheme(quantization_config)
    tensors = dict(tensors)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and f"{n}.qweight" in tensors]
    for name, linear in linears:
        try:
            bits, group_size, sym, act_bits = scheme(name)
            module = QuantLinear(linear.in_features, linear.out_features, bits, group_size, sym,
                                 bias=linear.bias is not None, act_bits=act_bits, device="meta")
        except ValueError as e:
            raise CheckpointError(f"layer {name}: {e}") from e
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
        if method != "slimserve":
            parts = {k: tensors.pop(f"{name}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx", "bias")
                     if f"{name}.{k}" in tensors}
            missing = [f"{name}.{k}" for k in ("qzeros", "scales") if k not in parts]
            if missing:
                raise CheckpointError(f"checkpoint lacks {missing}")
            decode = _decode_gptq if method == "gptq" else _decode_awq
            tensors |= {f"{name}.{k}": v for k, v in decode(name, module, parts).items()}
    return tensors


def _reader_scheme(config: dict) -> Callable[[str], tuple]:
    """name -> (bits, group_size, sym, act_bits) for a checkpoint's quantization_config."""
    method = config["quant_method"]
    if method == "slimserve":
        try:
            quant_config = QuantConfig(**{f.name: config[f.name] for f in fields(QuantConfig) if f.name in config})
        except ValueError as e:
            raise CheckpointError(f"quantization_config is invalid: {e}") from e

        def scheme(name: str) -> tuple:
            module_config = quant_config.for_module(name)
            if module_config is None:
                raise ValueError("the checkpoint holds packed weights, but quantization_config keeps it dense")
            return module_config.bits, module_config.group_size, module_config.sym, module_config.act_bits
        return scheme
    if method == "gptq":
        checkpoint_format = config.get("checkpoint_format", config.get("format", "gptq"))
        if checkpoint_format != "gptq":
            raise CheckpointError(
                f"GPTQ checkpoint_format {checkpoint_format!r} is not supported; supported: 'gptq' (v1)")
        bits, group_size, sym = config.get("bits"), config.get("group_size"), config.get("sym", True)
    else:
        version = config.get("version", config.get("format", "gemm")).lower()
        if version != "gemm" or not config.get("zero_point", True):
            raise CheckpointError(f"AWQ version {version!r} with zero_point={config.get('zero_point')} is not "
                                  "supported; supported: 'gemm' with zero points")
        bits, sym = config.get("bits", config.get("w_bit")), False  # AutoAWQ's own quant_config.json names
        group_size = config.get("group_size", config.get("q_group_size"))
    if type(bits) is not int or type(group_size) is not int:
        raise CheckpointError(f"quantization_config needs integer bits and group_size, got {bits!r} and {group_size!r}")
    return lambda name: (bits, group_size, sym, None)


def _unpacked(name: str, parts: dict, key: str, bits: int, dim: int, shape: tuple[int, int]) -> Tensor:
    if parts[key].dtype != torch.int32:
        raise CheckpointError(f"{name}.{key} is {parts[key].dtype}, expected torch.int32")
    try:
        values = unpack_bits(parts[key], bits, dim=dim)
    except ValueError as e:
        raise CheckpointError(
            f"{name}.{key} of shape {tuple(parts[key].shape)} holds no {shape} {bits}-bit values: {e}") from e
    if tuple(values.shape) != shape:
        raise CheckpointError(f"{name}.{key} holds {tuple(values.shape)} {bits}-bit values, expected {shape}")
    return values


def _decode_gptq(name: str, module: QuantLinear, parts: dict) -> dict[str, Tensor]:
    bits, out_features, in_features = module.bits, module.out_features, module.in_features
    q = _unpacked(name, parts, "qweight", bits, 0, (in_features, out_features)).t()
    zeros = _unpacked(name, parts, "qzeros", bits, 1, (module.num_groups, out_features)).t().short() + 1
    if int(zeros.max()) > 255:  # a v1 zero of 0 reads back as 2^bits: representable below 8 bits only
        raise CheckpointError(f"{name}.qzeros holds an 8-bit zero point of 256 (a v1 zero of 0)")
    tensors = {"qweight": pack_bits(q, bits, dim=1, dtype=torch.uint8), "zeros": zeros.to(torch.uint8),
               "scales": parts["scales"].t()}
    if "g_idx" in parts:
        tensors["g_idx"] = parts["g_idx"]
    if "bias" in parts:
        tensors["bias"] = parts["bias"]
    return tensors


def _decode_awq(name: str, module: QuantLinear, parts: dict) -> dict[str, Tensor]:
    if module.bits != 4:
        raise CheckpointError(f"AWQ GEMM checkpoints hold 4-bit weights; quantization_config says {module.bits}")
    shape = (module.in_features, module.out_features)
    q = _interleave(_unpacked(name, parts, "qweight", 4, 1, shape), AWQ_REVERSE_ORDER).t()
    zeros = _interleave(_unpacked(name, parts, "qzeros", 4, 1, (module.num_groups, module.out_features)),
                        AWQ_REVERSE_ORDER).t()
    tensors = {"qweight": pack_bits(q, 4, dim=1, dtype=torch.uint8), "zeros": zeros, "scales": parts["scales"].t()}
    if "bias" in parts:
        tensors["bias"] = parts["bias"]
    return tensors


def save_tokenizer(source: Path, out_dir: Path) -> None:
    """Carry a tokenizer along: an HF folder's files are copied; a GGUF file's vocabulary is written
    as tokenizer.json, tokenizer_config.json (special tokens, chat template) and generation_config.json."""
    if source.suffix != ".gguf":
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, out_dir / name)
        return
    tokenizer = Tokenizer.from_gguf(read_gguf(source))
    # Tokenizer has no public save yet: its tokenizers backend serializes merges, pre-tokenizer and post-processor.
    tokenizer._backend.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer.bos_token,
              "eos_token": tokenizer.eos_token, "clean_up_tokenization_spaces": False}
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    eos_id = None if tokenizer.eos_token is None else tokenizer._backend.token_to_id(tokenizer.eos_token)
    eos_ids = ([eos_id] if eos_id is not None else []) + sorted(tokenizer.eos_token_ids - {eos_id})
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos_ids}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
