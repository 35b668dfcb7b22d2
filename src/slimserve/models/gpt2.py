"""GPT-2: learned positions, LayerNorm, fused qkv, tanh-GELU MLP, tied embeddings.

Parameter names follow the Hugging Face checkpoint. Its `Conv1D` weights are stored (in, out);
we use nn.Linear (out, in), and the loader transposes the tensors named in `transposed_weights`.
"""

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from slimserve.models.attention import AttentionMetadata, PagedAttention


@dataclass
class GPT2Args:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False

    @classmethod
    def from_dict(cls, config: dict) -> "GPT2Args":
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})

    def __post_init__(self):
        self.n_inner = self.n_inner or 4 * self.n_embd
        if self.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT-2 activation_function={self.activation_function!r} is not supported; "
                             "supported: gelu_new, gelu_pytorch_tanh")
        if self.scale_attn_by_inverse_layer_idx or self.reorder_and_upcast_attn:
            raise ValueError("GPT-2 variants with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn "
                             "are not supported")


class GPT2Attention(nn.Module):
    def __init__(self, args: GPT2Args, layer_idx: int):
        super().__init__()
        self.num_heads, self.head_dim = args.n_head, args.n_embd // args.n_head
        self.c_attn = nn.Linear(args.n_embd, 3 * args.n_embd)
        self.c_proj = nn.Linear(args.n_embd, args.n_embd)
        self.attn = PagedAttention(layer_idx, self.num_heads, self.num_heads, self.head_dim)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.c_attn(x).view(T, 3, self.num_heads, self.head_dim).unbind(1)
        return self.c_proj(self.attn(q, k, v, meta).reshape(T, -1))


class GPT2MLP(nn.Module):
    def __init__(self, args: GPT2Args):
        super().__init__()
        self.c_fc = nn.Linear(args.n_embd, args.n_inner)
        self.c_proj = nn.Linear(args.n_inner, args.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self, args: GPT2Args, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        self.attn = GPT2Attention(args, layer_idx)
        self.ln_2 = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        self.mlp = GPT2MLP(args)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), meta)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, args: GPT2Args):
        super().__init__()
        self.wte = nn.Embedding(args.vocab_size, args.n_embd)
        self.wpe = nn.Embedding(args.n_positions, args.n_embd)
        self.h = nn.ModuleList(GPT2Block(args, i) for i in range(args.n_layer))
        self.ln_f = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(positions)  # (T, n_embd)
        for block in self.h:
            x = block(x, meta)
        return self.ln_f(x)


class GPT2LMHeadModel(nn.Module):
    transposed_weights = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
    tie_word_embeddings = True  # GPT-2 has no separate output matrix
    base_model_prefix = "transformer"

    def __init__(self, args: GPT2Args):
        super().__init__()
        self.args = args
        self.transformer = GPT2Model(args)
        self.lm_head = nn.Linear(args.n_embd, args.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.transformer(input_ids, positions, meta)

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        a = self.args
        return (a.n_layer, 2, a.n_head, num_blocks, block_size, a.n_embd // a.n_head)

    @property
    def max_model_len(self) -> int:
        return self.args.n_positions

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
