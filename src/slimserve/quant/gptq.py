"""GPTQ: quantize a Linear column by column, correcting the columns not yet quantized.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (arXiv:2210.17323), Algorithm 1. For a layer's weight W
(out, in) and calibration inputs X, minimize ||W X - Q X||² with H = 2/n Σ x xᵀ:
quantize column j, spread its error (w_j - q_j) / [H⁻¹]_jj over the later columns along row j
of the upper Cholesky factor of H⁻¹, and apply updates lazily, one block of columns at a time.
Extras as in the reference implementations (AutoGPTQ, GPTQModel): dampening by damp_percent of
the mean diagonal, dead inputs (H_jj = 0) fixed to zero weight, act-order (columns by
decreasing H_jj, with g_idx mapping each column to its group) and static groups (group scales
fixed up front, so act-order keeps contiguous groups).

gptq_quantize drives a whole Llama-family model layer by layer, so only one decoder layer's
activations and Hessians are alive at a time. layer_stages runs each linear of a layer once per
calibration token; linears sharing an input share one Hessian and, when their configs agree,
are quantized as one stacked weight (GPTQ treats rows independently, so this changes nothing
but the number of column steps). The layer-wise machinery here is shared with AWQ.

Each calibration sequence's first token is its attention sink: every later token's attention
reads it, so an error in its keys, values or residual stream reaches every position, yet GPTQ's
objective counts it as one token in L. gptq_quantize counts it config.sink_weight times in the
decoder layers' Hessians (lm_head's outputs feed no attention, so its Hessian stays plain).
benchmarks/results/gptq_sink_weight_*.md sweeps the weight: SmolLM2-135M at W4 g64, 128 x 2048
calibration tokens, +18.1 % perplexity with weight 1 and +7.0 % with 16.

GPTQ fits each linear to its own output on inputs that already carry the error of the layers
quantized before it, so that error is never corrected, only kept from growing. With fp_target β > 0
(QuantConfig's, or a module's own override), the float model runs beside the quantized one and each
linear's target moves β of the way to the least-squares fit of the float model's output from the
quantized inputs, as GPTQv2's asymmetric calibration does (Li et al., "GPTQv2: Efficient
Finetuning-Free Quantization with Asymmetric Calibration", ICML 2025, whose reference code scales
that term by 0.25); see GPTQ.target_weight. It costs a second forward pass and one more product per
token: (in x in), or (rows x in) twice where the drift is summed times the weight (down_proj).
benchmarks/results/gptq_fp_target_*.md sweeps β: 0.5 takes SmolLM2-135M's W4 g64
from +7.0 % to +4.9 % perplexity at 128 x 2048 calibration tokens, Qwen2.5-Coder-0.5B's from +3.7 %
to +1.7 %.

The calibration forward passes run in config.calib_dtype, on a copy of each layer in that dtype:
by default bf16 where matrix products run natively in it (CUDA; CPUs with AVX512-BF16 or AMX),
the dtype the quantized model computes in (GPTQModel calibrates in the model's half precision),
else fp32, which CPUs without bf16 units multiply faster. The drift's product runs in it too; the
Hessians, the targets and the quantization stay in fp32, from the fp32 weights.
benchmarks/results/gptq_calib_dtype_*.md compares bf16 with fp32 calibration.
"""

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from slimserve.config import QuantConfig
from slimserve.kernels.gptq import gptq_columns
from slimserve.models.attention import AttentionMetadata
from slimserve.models.llama import LlamaForCausalLM
from slimserve.models.loader import torch_dtype
from slimserve.quant.qlinear import QuantLinear
from slimserve.quant.rtn import check_bits, check_finite, check_group_size, compute_scales


# x xᵀ is symmetric, so the Hessian sums only the blocks on and above the diagonal of a k x k
# grid: (k + 1) / 2k of the full product's multiply-adds. k = 8, 2048 tokens, 2 threads: the
# 4864-wide down_proj Hessian of Qwen2.5-0.5B in 248 ms instead of 419, a 896-wide one in 9 vs 14.
HESSIAN_BLOCKS = 8


class GPTQ:
    """Accumulates the Hessian of one nn.Linear from its inputs, then quantizes its weight."""

    def __init__(self, layer: nn.Linear, drift: bool = False, drift_weight: Tensor | None = None) -> None:
        """drift: also sum how far the inputs drifted from the float model's (for an fp target).
        drift_weight (rows, in_features): the weight target_weight will be given, where known now; the
        sums then hold its product with the drift, which costs 2 rows x in_features a token against the
        drift's own in_features², so it pays where 2 rows < in_features (down_proj)."""
        self.layer = layer
        self.num_samples = 0.0  # the samples' summed weight
        in_features = layer.in_features
        self._upper = torch.zeros(in_features, in_features, device=layer.weight.device)  # blocks below stay 0
        # With drift: the running mean of 2 (x_fp - x) xᵀ, x_fp the float model's input for x's token,
        # or with drift_weight W, of 2 W (x_fp - x) xᵀ.
        self._drift_weight = drift_weight.detach() if drift and drift_weight is not None else None
        rows = in_features if self._drift_weight is None else self._drift_weight.shape[0]
        self._drift = torch.zeros(rows, in_features, device=layer.weight.device) if drift else None

    def add_batch(self, inp: Tensor, weights: Tensor | None = None, fp_inp: Tensor | None = None) -> None:
        """inp (..., in_features): every row is one sample (token), counted weights[row] times (default once).
        fp_inp (inp's shape, needed with drift): the float model's inputs for the same tokens."""
        in_features = self.layer.in_features
        x = inp.reshape(-1, in_features).float()
        count = x.shape[0]
        scale = None if weights is None else weights.float().sqrt()[:, None]
        if scale is not None:
            x = x * scale
            count = float(weights.sum())
        total = self.num_samples + count
        if total == 0:
            return
        if self._drift is not None:
            if fp_inp is None:
                raise ValueError("GPTQ with drift needs fp_inp, the float model's inputs for the same tokens")
            drift = fp_inp.reshape(-1, in_features).float() * (1 if scale is None else scale) - x
            # The drift only nudges the target (target_weight), so its product may run in the inputs'
            # own dtype (bf16 at 4x fp32's speed on CPUs with bf16 units); H, which GPTQ inverts, stays fp32.
            drift, x_low = drift.to(inp.dtype), x.to(inp.dtype)
            if self._drift_weight is None:
                product = drift.t() @ x_low
            else:
                product = (drift @ self._drift_weight.t().to(inp.dtype)).t() @ x_low
            self._drift.mul_(self.num_samples / total).add_(product, alpha=2 / total)
        # H stays the weighted running mean of 2 x xᵀ (its scale does not grow with n).
        width = -(-in_features // HESSIAN_BLOCKS)
        for start in range(0, in_features, width):
            rows = slice(start, start + width)
            self._upper[rows, start:].addmm_(x[:, rows].t(), x[:, start:], beta=self.num_samples / total,
                                             alpha=2 / total)
        self.num_samples = total

    @property
    def hessian(self) -> Tensor:
        """H (in_features, in_features), the running mean of 2 x xᵀ."""
        return self._upper.triu() + self._upper.triu(1).t()

    def target_weight(self, weight: Tensor, fp_target: float, damp_percent: float) -> Tensor:
        """The weight (out, in) for GPTQ to quantize: weight itself, or with fp_target β > 0,
        weight + β (W* - weight), W* = weight + weight D (H + λI)⁻¹ (D: the drift sums, λ: GPTQ's
        damping). W* minimizes Σ |weight x_fp - W* x|² + λ|W* - weight|², and since
        Σ |weight x_fp - Q x|² = Σ |(W* - Q) x|² + const (λ aside), GPTQ toward W* with H matches
        the float model's outputs."""
        if fp_target == 0:
            return weight
        if self._drift is None:
            raise ValueError(f"fp_target {fp_target} needs the inputs' drift: build GPTQ with drift=True")
        if self._drift_weight is not None and weight.shape != self._drift.shape:
            raise ValueError(f"the drift was summed for a weight of shape {tuple(self._drift.shape)}, "
                             f"got {tuple(weight.shape)}")
        factor = torch.linalg.cholesky(_damped(self.hessian, damp_percent))
        rows = _row_block(weight.shape[1])
        blocks = weight.detach().split(rows)
        # weight · D, D the drift's sums, a block of rows at a time
        if self._drift_weight is None:
            products = (w.float() @ self._drift for w in blocks)
        else:
            products = self._drift.split(rows)
        corrections = (torch.cholesky_solve(wd.t(), factor).t() for wd in products)
        return torch.cat([w.float() + fp_target * c for w, c in zip(blocks, corrections)])

    def quantize(
        self,
        bits: int,
        group_size: int,
        sym: bool,
        act_order: bool = False,
        static_groups: bool = False,
        damp_percent: float = 0.01,
        block_size: int = 128,
        mse: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> q (out, in) uint8, scales (rows, num_groups) float32, zeros uint8, g_idx (in,) int32.

        Shapes as rtn.quantize_weight; dequantize with rtn.dequantize_weight(q, scales, zeros, g_idx).
        """
        if self.num_samples == 0:
            raise ValueError("GPTQ has no calibration samples: add_batch() was never given any tokens")
        return gptq_quantize_weight(
            self.layer.weight, self.hessian, bits, group_size, sym, act_order, static_groups, damp_percent, block_size,
            mse,
        )


def gptq_quantize_weight(
    weight: Tensor,
    hessian: Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    act_order: bool = False,
    static_groups: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
    mse: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """GPTQ for weight (out, in) given the Hessian (in, in) of its inputs; returns as GPTQ.quantize.
    mse: each scale's range searched as rtn.compute_scales does."""
    check_bits(bits)
    out_features, in_features = weight.shape
    check_group_size(group_size, in_features)
    if not 0 < damp_percent <= 1 or block_size < 1:
        raise ValueError(f"need 0 < damp_percent <= 1 and block_size >= 1, got {damp_percent}, {block_size}")
    check_finite(weight, "weight")
    H = hessian.float().clone()
    check_finite(H, "Hessian (from the calibration activations)")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    perm = torch.arange(in_features, device=weight.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        H = H[perm][:, perm]
    Hinv = _inverse_hessian_factor(H, damp_percent)
    columns = GPTQColumns(bits, group_size, sym, static_groups, block_size, mse, dead, perm, Hinv)
    # Rows are independent in GPTQ: a block of them at a time bounds the float32 copies (a per-tensor scale
    # spans every row, so per tensor runs as one block).
    rows = out_features if group_size == 0 else _row_block(in_features)
    q, scales, zeros = (torch.cat(parts) for parts in zip(*map(columns.quantize, weight.split(rows))))
    if group_size <= 0:
        g_idx = torch.zeros_like(perm)
    elif static_groups:
        g_idx = torch.arange(in_features, device=weight.device) // group_size
    else:
        g_idx = torch.argsort(perm) // group_size  # column perm[p] sits at position p, in group p // group_size
    return q, scales, zeros, g_idx.to(torch.int32)


# Rows of a weight GPTQ quantizes at once, by their float32 elements (128 MB): on Qwen2.5-0.5B's
# 151936 x 896 lm_head it peaked 2.3 GB above its target weight quantizing it whole, 0.5 GB in blocks.
ROW_BLOCK_ELEMENTS = 2**25


def _row_block(in_features: int) -> int:
    """Rows of a weight (out, in_features) that GPTQ and its fp target handle at once."""
    return max(1, ROW_BLOCK_ELEMENTS // in_features)


@dataclass
class GPTQColumns:
    """Algorithm 1's column loop for some rows of a weight, given what its Hessian decided: the dead
    inputs, the column order and the upper Cholesky factor of the damped inverse."""

    bits: int
    group_size: int
    sym: bool
    static_groups: bool
    block_size: int
    mse: bool
    dead: Tensor
    perm: Tensor
    Hinv: Tensor

    def quantize(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> q (rows, in) uint8, scales (rows or 1, num_groups) float32, zeros (same) uint8."""
        bits, group_size, sym, mse, Hinv = self.bits, self.group_size, self.sym, self.mse, self.Hinv
        out_features, in_features = weight.shape
        W = weight.detach().float().clone()
        W[:, self.dead] = 0
        fixed: list[tuple[Tensor, Tensor]] = []  # per group, computed before any update
        if group_size <= 0:
            fixed.append(compute_scales(W if group_size == -1 else W.reshape(1, -1), bits, sym, mse))
        elif self.static_groups:
            for start in range(0, in_features, group_size):
                fixed.append(compute_scales(W[:, start : start + group_size], bits, sym, mse))
        # Transposed, so column j of W is the contiguous row WT[j]; kernels.gptq runs the column steps.
        WT = W.t()[self.perm].contiguous()
        del W
        QT = torch.empty_like(WT)
        found: list[tuple[Tensor, Tensor]] = []  # per group in quantization order
        group_of = (self.perm // group_size).tolist() if group_size > 0 else []
        scales, zeros = fixed[0] if group_size <= 0 else (None, None)
        for i1 in range(0, in_features, self.block_size):
            i2 = min(i1 + self.block_size, in_features)
            Hinv1 = Hinv[i1:i2, i1:i2]
            d = Hinv1.diagonal()
            # err_i = delta_i / d_i spreads as err_i · Hinv1[i, i:], i.e. delta_i · (Hinv1[i] / d_i).
            spread = (Hinv1 / d[:, None]).contiguous()  # Hinv is column-major (a LAPACK factor)
            delta = torch.empty(i2 - i1, out_features, device=WT.device)
            col = i1
            while col < i2:  # runs of columns sharing their scales
                end = i2
                if group_size > 0 and self.static_groups:
                    scales, zeros = fixed[group_of[col]]
                    end = next((c for c in range(col + 1, i2) if group_of[c] != group_of[col]), i2)
                elif group_size > 0:
                    if col % group_size == 0:
                        # This block's columns are up to date in WT; later blocks lack its lazy update.
                        scales, zeros = compute_scales(WT[col : col + group_size].t(), bits, sym, mse)
                        found.append((scales, zeros))
                    end = min(i2, (col // group_size + 1) * group_size)
                s, z = (t[:, 0].expand(out_features).contiguous() for t in (scales, zeros))
                gptq_columns(WT, QT, delta, spread, s, z, bits, i1, col, end, i2)
                col = end
            WT[i2:].addmm_(Hinv[i1:i2, i2:].t(), delta.div_(d[:, None]), alpha=-1)
        groups = fixed if group_size <= 0 or self.static_groups else found
        scales = torch.cat([s for s, _ in groups], dim=1)
        zeros = torch.cat([z for _, z in groups], dim=1)
        q = QT.to(torch.uint8)[torch.argsort(self.perm)].t()
        return q, scales, zeros.to(torch.uint8)


def _damped(H: Tensor, damp_percent: float) -> Tensor:
    """H + λI, λ = damp_percent of H's mean diagonal: GPTQ's dampening."""
    damp = damp_percent * torch.mean(torch.diag(H))
    return H + damp * torch.eye(H.shape[0], device=H.device)


def _inverse_hessian_factor(H: Tensor, damp_percent: float) -> Tensor:
    """Upper Cholesky factor of (H + damp I)⁻¹, as Algorithm 1 uses it."""
    L, info = torch.linalg.cholesky_ex(_damped(H, damp_percent))
    if int(info) == 0:
        L, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) != 0:
        raise ValueError(
            f"the damped Hessian is not positive definite (damp_percent={damp_percent}); "
            "use more calibration tokens or a larger damp_percent"
        )
    return L


# Calibration tokens per forward call: large matmuls, bounded activations. At 8192, SmolLM2's
# activations outgrew the C allocator's reuse limit (32 MiB) and every one came as fresh pages:
# GPTQ at 32 x 512 tokens made 6.5 M page faults (14 s of system time), 2 M at 2048.
CHUNK_TOKENS = 2048


@dataclass
class CalibrationChunk:
    """Some calibration sequences as one flat batch: hidden (T, hidden_size) and attention's inputs."""

    hidden: Tensor
    rope: tuple[Tensor, Tensor]
    meta: AttentionMetadata

    def token_weights(self, sink_weight: float) -> Tensor:
        """(T,): 1 for every token, sink_weight for each sequence's first, its attention sink."""
        weights = torch.ones(self.hidden.shape[0], device=self.hidden.device)
        weights[self.meta.cu_seqlens_q[:-1]] = sink_weight
        return weights


def check_llama(model: nn.Module, method: str) -> None:
    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"{method} supports Llama-family models, got {type(model).__name__}")


def calibration_dtype(name: str, device: torch.device) -> torch.dtype:
    """QuantConfig.calib_dtype on `device`: "auto" is bf16 where matrix products run natively in it."""
    if name != "auto":
        return torch_dtype(name)
    native = device.type == "cuda" or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native else torch.float32


def embed_calibration(
    model: LlamaForCausalLM,
    calib_batches: list[Tensor],
    method: str,
    chunk_tokens: int = CHUNK_TOKENS,
    dtype: torch.dtype = torch.float32,
) -> list[CalibrationChunk]:
    """The calibration sequences (1-D token ids each) embedded in dtype, packed into chunks of <= chunk_tokens."""
    if not calib_batches or any(ids.dim() != 1 or ids.numel() == 0 for ids in calib_batches):
        shapes = [tuple(ids.shape) for ids in calib_batches[:4]]
        raise ValueError(
            f"{method} needs non-empty 1-D calibration sequences, got {len(calib_batches)} sequences {shapes}"
        )
    inner = model.model
    packs: list[list[Tensor]] = [[]]
    for ids in calib_batches:
        if packs[-1] and sum(len(p) for p in packs[-1]) + len(ids) > chunk_tokens:
            packs.append([])
        packs[-1].append(ids)
    chunks = []
    for pack in packs:
        positions = torch.cat([torch.arange(len(ids), device=ids.device) for ids in pack])
        hidden = inner.embed_tokens(torch.cat(pack)).to(dtype)
        meta = AttentionMetadata.without_cache([len(ids) for ids in pack])
        chunks.append(CalibrationChunk(hidden, inner.rotary_emb(positions, dtype), meta))
    return chunks


QKV = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
GATE_UP = ["mlp.gate_proj", "mlp.up_proj"]


def layer_stages(layer: nn.Module, chunks: list[CalibrationChunk]) -> Iterator[tuple[list[str], list[Tensor]]]:
    """Run one decoder layer over the chunks, pausing before each group of linears sharing an input.

    Yields (names, inputs): the group's linear names within the layer and their input for each
    chunk, (T, in_features). Before resuming, the caller may change or replace those linears and
    rescale the inputs in place (AWQ folds scales into the op before); the rest of the layer runs
    with both. When exhausted, every chunk.hidden holds the layer's output. Each linear runs once
    per token: x + attn(norm(x)), then x + mlp(norm(x)), split at o_proj and down_proj.
    """
    attn, mlp = layer.self_attn, layer.mlp
    yield QKV, [layer.input_layernorm(c.hidden) for c in chunks]
    with _bypassed(attn, "o_proj"):
        attn_out = [attn(layer.input_layernorm(c.hidden), c.rope, c.meta) for c in chunks]
    yield ["self_attn.o_proj"], attn_out
    for chunk, out in zip(chunks, attn_out):
        chunk.hidden += attn.o_proj(out)
    del attn_out
    yield GATE_UP, [layer.post_attention_layernorm(c.hidden) for c in chunks]
    with _bypassed(mlp, "down_proj"):
        act = [mlp(layer.post_attention_layernorm(c.hidden)) for c in chunks]
    yield ["mlp.down_proj"], act
    for chunk, out in zip(chunks, act):
        chunk.hidden += mlp.down_proj(out)


@contextmanager
def _bypassed(parent: nn.Module, name: str) -> Iterator[None]:
    """parent.<name> replaced by the identity, so parent returns that child's input."""
    child = getattr(parent, name)
    setattr(parent, name, nn.Identity())
    try:
        yield
    finally:
        setattr(parent, name, child)


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name), child, module)


def gptq_quantize(
    model: nn.Module, calib_batches: list[Tensor], config: QuantConfig, progress: bool = False
) -> nn.Module:
    """Quantize a Llama-family model in place with GPTQ, one decoder layer at a time.

    model: models/llama.py LlamaForCausalLM. calib_batches: 1-D int64 token-id tensors, one
    sequence each. Each layer sees the outputs of the already quantized layers before it, and
    inside a layer each group of linears sees the already quantized groups before it
    (true-sequential: o_proj's Hessian comes from the quantized q/k/v). Modules for which
    config.for_module(name) is None stay in full precision; an lm_head tied to the embedding is
    rounded to nearest.
    """
    check_llama(model, "GPTQ")
    inner = model.model
    with torch.no_grad():
        dtype = calibration_dtype(config.calib_dtype, inner.embed_tokens.weight.device)
        chunks = embed_calibration(model, calib_batches, "GPTQ", dtype=dtype)
        weights = [chunk.token_weights(config.sink_weight) for chunk in chunks]
        # With fp_target, the float model runs beside the quantized one, giving each linear its float inputs.
        # Any module's fp_target (an override included) needs it.
        fp_targets = [config.fp_target] + [o.get("fp_target", 0.0) for o in config.modules.values()]
        fp_chunks = [CalibrationChunk(c.hidden.clone(), c.rope, c.meta) for c in chunks] if any(fp_targets) else []
        for index, layer in enumerate(tqdm(inner.layers, desc="GPTQ", unit="layer", disable=not progress)):
            quantized: dict[str, QuantLinear] = {}
            runner = copy.deepcopy(layer).to(dtype)  # runs the calibration; GPTQ quantizes layer's weights
            fp_stages = layer_stages(copy.deepcopy(runner), fp_chunks) if fp_chunks else iter(())
            for names, inputs in layer_stages(runner, chunks):
                fp_inputs = next(fp_stages)[1] if fp_chunks else None
                group = _quantize_group(layer, f"model.layers.{index}.", names, inputs, fp_inputs, weights, config)
                for name, module in group.items():
                    # The stages after this one see the quantized weights; a plain Linear holding the
                    # dequantized weight runs them faster than the packed kernels at prefill sizes.
                    replace_module(runner, name, _dequantized_linear(module, dtype))
                quantized |= group
            for name, module in quantized.items():
                replace_module(layer, name, module)
            next(fp_stages, None)  # the float layer's output into fp_chunks
        head_config = config.for_module("lm_head")
        if head_config is not None and model.lm_head.weight is inner.embed_tokens.weight:
            # Tied: the embedding will read these integers too, and GPTQ's error feedback across
            # columns, tuned to lm_head's inputs, is pure error for an embedding lookup (SmolLM2
            # W8 per channel: +0.42 % perplexity; +0.16 % with the embedding left exact).
            model.lm_head = QuantLinear.from_linear(model.lm_head, head_config)
        elif head_config is not None:
            collector = GPTQ(model.lm_head, drift=bool(fp_chunks))
            for chunk, fp_chunk in zip(chunks, fp_chunks or [None] * len(chunks)):
                fp_inp = None if fp_chunk is None else inner.norm(fp_chunk.hidden)
                collector.add_batch(inner.norm(chunk.hidden), fp_inp=fp_inp)
            model.lm_head = _quantize_stacked([model.lm_head], collector, head_config)[0]
    return model


def _quantize_group(
    layer: nn.Module,
    prefix: str,
    names: list[str],
    inputs: list[Tensor],
    fp_inputs: list[Tensor] | None,
    weights: list[Tensor],
    config: QuantConfig,
) -> dict[str, QuantLinear]:
    """GPTQ the linears `names` of `layer`, which all read `inputs` (one tensor per chunk, its tokens
    counted `weights` times in the Hessian; the float model's are `fp_inputs`, whose drift is summed
    for each module's own fp_target, or None without the float stream)."""
    kept = [(name, config.for_module(prefix + name)) for name in names]
    kept = [(name, c) for name, c in kept if c is not None]
    if not kept:
        return {}
    # Stack linears with equal configs; a per-tensor scale must stay per linear.
    stacks: list[tuple[QuantConfig, list[str]]] = []
    for name, module_config in kept:
        same = [s for s in stacks if s[0] == module_config and module_config.group_size != 0]
        if same:
            same[0][1].append(name)
        else:
            stacks.append((module_config, [name]))
    first = layer.get_submodule(kept[0][0])
    drift_weight = None
    if len(stacks) == 1 and 2 * sum(layer.get_submodule(name).out_features for name, _ in kept) < first.in_features:
        drift_weight = torch.cat([layer.get_submodule(name).weight for name, _ in kept])
    collector = GPTQ(first, drift=fp_inputs is not None, drift_weight=drift_weight)
    for inp, fp_inp, inp_weights in zip(inputs, fp_inputs or [None] * len(inputs), weights):
        collector.add_batch(inp, inp_weights, fp_inp)
    result: dict[str, QuantLinear] = {}
    for module_config, stack in stacks:
        linears = [layer.get_submodule(name) for name in stack]
        result |= zip(stack, _quantize_stacked(linears, collector, module_config))
    return result


def _quantize_stacked(linears: list[nn.Linear], collector: GPTQ, config: QuantConfig) -> list[QuantLinear]:
    """GPTQ linears sharing one input (and the Hessian in `collector`) as one stacked weight."""
    if collector.num_samples == 0:
        raise ValueError("GPTQ has no calibration samples: the calibration set has no tokens")
    weight = torch.cat([linear.weight.detach() for linear in linears])
    weight = collector.target_weight(weight, config.fp_target, config.damp_percent)
    q, scales, zeros, g_idx = gptq_quantize_weight(
        weight,
        collector.hessian,
        config.bits,
        config.group_size,
        config.sym,
        config.act_order,
        config.static_groups,
        config.damp_percent,
        config.block_size,
        config.mse,
    )
    sizes = [linear.out_features for linear in linears]
    parts = zip(linears, q.split(sizes), scales.split(sizes), zeros.split(sizes))
    return [QuantLinear.from_linear(linear, config, *part, g_idx) for linear, *part in parts]


def _dequantized_linear(module: QuantLinear, dtype: torch.dtype) -> nn.Linear:
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(module.dequantize().to(dtype), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.to(dtype), requires_grad=False)
    return linear
