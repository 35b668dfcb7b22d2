"""The Llama family: Llama 2/3 (with rope scaling), Mistral, Qwen2 (qkv bias), SmolLM2.

Parameter names follow the Hugging Face checkpoints, so a state dict loads without renaming.
"""

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from slimserve.models.attention import AttentionMetadata, PagedAttention
from slimserve.models.inference_linear import merge_linears


@dataclass
class LlamaArgs:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, config: dict) -> "LlamaArgs":
        """Known keys of a HF config.json; the rest is kept in `extra`."""
        names = {f.name for f in fields(cls)} - {"extra"}
        if "rope_parameters" in config:  # transformers >= 5 folds rope_theta and rope_scaling into one dict
            rope = config["rope_parameters"]
            config = {**config, "rope_theta": rope.get("rope_theta", cls.rope_theta),
                      "rope_scaling": rope if rope.get("rope_type", "default") != "default" else None}
        args = cls(**{k: v for k, v in config.items() if k in names},
                   extra={k: v for k, v in config.items() if k not in names})
        if args.model_type == "qwen2":
            args.attention_bias = True  # Qwen2 always has q/k/v biases; its config does not say so
            if not config.get("use_sliding_window", False):
                args.sliding_window = None
        if args.model_type == "llama":
            args.sliding_window = None
        return args

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")


def rope_inv_freq(args: LlamaArgs) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with Llama 3 / linear scaling applied."""
    dim = args.head_dim
    # An explicit CPU device: models are built on meta, and this buffer is computed, not loaded.
    exponents = torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim
    inv_freq = 1.0 / (args.rope_theta**exponents)
    scaling = args.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short kept, smooth ramp between.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        mixed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor,
                               torch.where(wavelen < old_len / high, inv_freq, mixed))
    elif rope_type != "default":
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: default, linear, llama3")
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (T, 1, head_dim) for the half-split (rotate_half) layout, computed in
        fp32 and rounded to dtype (as transformers does, so bf16 rotations match it)."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs, layer_idx: int):
        super().__init__()
        H, Hkv, D = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, D
        self.q_proj = nn.Linear(args.hidden_size, H * D, bias=args.attention_bias)
        self.k_proj = nn.Linear(args.hidden_size, Hkv * D, bias=args.attention_bias)
        self.v_proj = nn.Linear(args.hidden_size, Hkv * D, bias=args.attention_bias)
        self.qkv_proj: nn.Module | None = None  # q, k and v in one layer, once fuse_projections ran
        self.o_proj = nn.Linear(H * D, args.hidden_size, bias=args.attention_bias and args.model_type != "qwen2")
        self.attn = PagedAttention(layer_idx, H, Hkv, D, args.sliding_window)

    def fuse_projections(self) -> None:
        self.qkv_proj = merge_linears([self.q_proj, self.k_proj, self.v_proj])
        if self.qkv_proj is not None:
            del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        T, H, Hkv = x.shape[0], self.num_heads, self.num_kv_heads
        if self.qkv_proj is None:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        else:
            qkv = self.qkv_proj(x)
        qkv = qkv.view(T, H + 2 * Hkv, self.head_dim)
        q, k = apply_rotary(qkv[:, :H + Hkv], *rope).split([H, Hkv], dim=1)  # one rotation for q and k
        return self.o_proj(self.attn(q, k, qkv[:, H + Hkv:], meta).reshape(T, -1))


class MLP(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.gate_up_proj: nn.Module | None = None  # gate and up in one layer, once fuse_projections ran
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def fuse_projections(self) -> None:
        self.gate_up_proj = merge_linears([self.gate_proj, self.up_proj])
        if self.gate_up_proj is not None:
            del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(args)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: (T,) flat over the batch's sequences. Returns hidden states (T, hidden)."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary_emb(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, meta)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    base_model_prefix = "model"

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.tie_word_embeddings = args.tie_word_embeddings
        if self.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        a = self.args
        return (a.num_hidden_layers, 2, a.num_key_value_heads, num_blocks, block_size, a.head_dim)

    @property
    def max_model_len(self) -> int:
        return self.args.max_position_embeddings

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> float32 logits (N, vocab)."""
        return self.lm_head(hidden).float()
