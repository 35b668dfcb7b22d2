"""slimserve's AWQ against the reference implementation, AutoAWQ's AwqQuantizer, in one harness.

Both quantize the same fp32 weights to W4 g128 asymmetric with the same calibration tokens
(quant_report's: 64 windows x 512 tokens of `sotu-calib`, seed 0), lm_head and the embedding left
in fp32, with and without the weight-clipping search; every row is then evaluated as fake-quantized
fp32 weights in transformers' model of the built-in GGUF, on quant_report's perplexity windows
(4 x 2048 tokens of `sotu`). AutoAWQ runs as its users run it (duo_scaling, its default);
slimserve's scales are mean|x|^α alone (quant/awq.py). AutoAWQ is archived at 0.2.9, so it is
loaded from its unpacked source distribution without its package __init__, which imports every
model family of the transformers release it was written for:

    pip download --no-deps autoawq==0.2.9 && tar xzf autoawq-0.2.9.tar.gz
    python benchmarks/awq_reference.py --autoawq autoawq-0.2.9 [--model qwen2.5-coder-0.5b]

Needs transformers and gguf (`pip install -e ".[bench]"`); a GPU when there is one (AutoAWQ
searches on all 32768 calibration tokens). Writes results/awq_reference_<name>.md.
"""

import argparse
import copy
import importlib
import math
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slimserve.assets import resolve_model
from slimserve.config import QuantConfig
from slimserve.eval.datasets import load_text
from slimserve.eval.machine import machine_info
from slimserve.models.loader import load_model, load_tokenizer
from slimserve.quant.awq import awq_quantize
from slimserve.quant.calibrate import calibration_batches
from slimserve.quant.qlinear import QuantLinear
from slimserve.quant.rtn import dequantize_weight, quantize_weight

BITS, GROUP = 4, 128
CALIB_SAMPLES, CALIB_SEQ_LEN = 64, 512
WINDOWS, WINDOW = 4, 2048


def load_awq_quantizer(source: Path) -> type:
    """AutoAWQ's AwqQuantizer from an unpacked autoawq sdist; datasets and accelerate, which it imports
    but does not use here, stubbed where they are not installed."""
    package = types.ModuleType("awq")
    package.__path__ = [str(source / "awq")]
    sys.modules["awq"] = package
    for name in ("datasets", "accelerate", "accelerate.hooks"):
        try:
            importlib.import_module(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.load_dataset = stub.add_hook_to_module = stub.AlignDevicesHook = None
            sys.modules[name] = stub
    return importlib.import_module("awq.quantize.quantizer").AwqQuantizer


class LlamaLikeHooks:
    """What AwqQuantizer asks of its model wrapper, as AutoAWQ's llama.py and qwen2.py define it."""

    def __init__(self, model_type: str) -> None:
        self.model_type = model_type

    @staticmethod
    def get_model_layers(model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    @staticmethod
    def move_embed(model: nn.Module, device: str) -> None:
        model.model.embed_tokens = model.model.embed_tokens.to(device)
        model.model.rotary_emb = model.model.rotary_emb.to(device)

    @staticmethod
    def get_layers_for_scaling(layer: nn.Module, input_feat: dict, module_kwargs: dict) -> list[dict]:
        attn, mlp = layer.self_attn, layer.mlp
        groups = [dict(prev_op=layer.input_layernorm, layers=[attn.q_proj, attn.k_proj, attn.v_proj],
                       inp=input_feat["self_attn.q_proj"], module2inspect=attn, kwargs=module_kwargs)]
        if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
            groups.append(dict(prev_op=attn.v_proj, layers=[attn.o_proj], inp=input_feat["self_attn.o_proj"]))
        groups.append(dict(prev_op=layer.post_attention_layernorm, layers=[mlp.gate_proj, mlp.up_proj],
                           inp=input_feat["mlp.gate_proj"], module2inspect=mlp))
        groups.append(dict(prev_op=mlp.up_proj, layers=[mlp.down_proj], inp=input_feat["mlp.down_proj"]))
        return groups


def fake_quantize_layers(model: nn.Module) -> None:
    """Every decoder-layer linear rounded to BITS-bit asymmetric groups of GROUP, in place."""
    with torch.no_grad():
        for layer in model.model.layers:
            for linear in (m for m in layer.modules() if isinstance(m, nn.Linear)):
                linear.weight.copy_(dequantize_weight(*quantize_weight(linear.weight, BITS, GROUP, sym=False)))


def autoawq(quantizer: type, model: nn.Module, calib: list[list[int]], clip: bool) -> None:
    """AutoAWQ's scales and clips applied to model's fp32 weights, then every layer fake-quantized."""
    run = quantizer(LlamaLikeHooks(model.config.model_type), model, None, w_bit=BITS, group_size=GROUP,
                    zero_point=True, version="gemm", calib_data=calib, split=None, text_column=None,
                    duo_scaling=True, export_compatible=True, apply_clip=clip, max_calib_samples=len(calib),
                    max_calib_seq_len=len(calib[0]))
    run.quantize()
    model.to(model.lm_head.weight.device)  # its apply_scale leaves what it touched on the CPU
    fake_quantize_layers(model)


def slimserve_awq(model_name: str, model: nn.Module, calib: list[torch.Tensor], clip: bool) -> None:
    """slimserve's AWQ on its own model of the same file, its dequantized weights copied into model."""
    ours = load_model(model_name, torch.float32)
    config = QuantConfig(method="awq", bits=BITS, group_size=GROUP, sym=False, skip=["embed_tokens", "lm_head"],
                         awq_clip=clip, num_calib_samples=len(calib), calib_seq_len=len(calib[0]))
    awq_quantize(ours, calib, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            owner_name, _, leaf = name.rpartition(".")
            owner = ours.get_submodule(owner_name)
            param.copy_(owner.dequantize() if isinstance(owner, QuantLinear) and leaf == "weight"
                        else getattr(owner, leaf))


def perplexity(model: nn.Module, windows: list[torch.Tensor]) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            window = window.to(model.device)
            logits = model(window[None]).logits[0, :-1].float()
            nll += F.cross_entropy(logits, window[1:], reduction="sum").item()
            count += len(window) - 1
    return math.exp(nll / count)


def main() -> None:
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser()
    parser.add_argument("--autoawq", type=Path, required=True, help="an unpacked autoawq-0.2.9 source distribution")
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    machine = machine_info()
    quantizer = load_awq_quantizer(args.autoawq)
    tokenizer = load_tokenizer(args.model)
    ids = tokenizer.encode(load_text("sotu"))
    windows = [torch.tensor(ids[i * WINDOW:(i + 1) * WINDOW]) for i in range(WINDOWS)]
    calib = calibration_batches(tokenizer, "sotu-calib", num_samples=CALIB_SAMPLES, seq_len=CALIB_SEQ_LEN)
    path = resolve_model(args.model)
    base = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    base = base.to(args.device).eval()
    rows = [("fp32", perplexity(base, windows), 0.0)]
    runs = [("RTN", fake_quantize_layers),
            ("AutoAWQ", lambda m: autoawq(quantizer, m, [c.tolist() for c in calib], clip=True)),
            ("AutoAWQ no clip", lambda m: autoawq(quantizer, m, [c.tolist() for c in calib], clip=False)),
            ("slimserve AWQ", lambda m: slimserve_awq(args.model, m, calib, clip=True)),
            ("slimserve AWQ no clip", lambda m: slimserve_awq(args.model, m, calib, clip=False))]
    for name, quantize in runs:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        quantize(model)
        rows.append((name, perplexity(model, windows), time.perf_counter() - start))
        print(name, f"{rows[-1][1]:.4f}", flush=True)
        del model
    fp32, rtn = rows[0][1], rows[1][1]
    lines = [f"# AWQ against AutoAWQ on {args.model}", "", machine.markdown(), "",
             f"W{BITS} g{GROUP} asymmetric, {CALIB_SAMPLES} x {CALIB_SEQ_LEN} calibration tokens of `sotu-calib` "
             f"(seed 0), lm_head and embedding in fp32; perplexity of fake-quantized fp32 weights in transformers "
             f"on {WINDOWS} windows x {WINDOW} tokens of `sotu`. AutoAWQ 0.2.9 with duo_scaling (its default); "
             "slimserve's scales are mean|x|^α. Seconds: the method on this machine, without loading.", "",
             "| method | ppl | Δppl % | recovers of RTN's loss | s |", "|---|---|---|---|---|"]
    for name, ppl, seconds in rows:
        recovers = f"{100 * (rtn - ppl) / (rtn - fp32):.0f} %" if name not in ("fp32", "RTN") else "—"
        lines.append(f"| {name} | {ppl:.4f} | {100 * (ppl / fp32 - 1):+.2f} | {recovers} | {seconds:.0f} |")
    out = args.out or Path(__file__).parent / "results" / f"awq_reference_{args.model}.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
