"""Attention over a flat batch of tokens from several sequences, with an optional paged KV cache.

Every model calls `PagedAttention`, so one definition serves perplexity windows (no cache), the
single-sequence generator and the batched engine. Tokens of all sequences are concatenated into
one flat batch of T tokens; `AttentionMetadata` says where each sequence's tokens start and how
long its context is. The KV cache is one tensor per model,
(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim); a sequence's block_table lists
the blocks holding its context in order, and slot_mapping gives each new token its cache slot
(block_id * block_size + offset).
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    """Layout of one flat batch. S sequences, T tokens in all.

    cu_seqlens_q: S+1 ints, prefix sums of the new (query) tokens per sequence.
    context_lens: S ints, tokens each sequence attends to after this step (cached + new).
    slot_mapping: (T,) int64 cache slot of each new token, or None to run without a cache.
    block_tables: (S, max_blocks) int64, or None without a cache; -1 pads unused entries.
    kv_cache: (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim), or None.
    num_decode_seqs: the first num_decode_seqs sequences have one new token each; with a cache
        they are attended in one batched call instead of one call per sequence.
    """

    cu_seqlens_q: list[int]
    context_lens: list[int]
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    kv_cache: torch.Tensor | None = None
    num_decode_seqs: int = 0

    @functools.cached_property
    def decode_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shared by every layer of a step: the decode sequences' block tables cut to the longest
        context, key positions (L,), and context lengths (n, 1) for masking."""
        n = self.num_decode_seqs
        assert n and self.cu_seqlens_q[n] == n, "decode sequences come first, one token each"
        block_size = self.kv_cache.shape[3]
        context_lens = self.context_lens[:n]
        num_blocks = -(-max(context_lens) // block_size)
        device = self.block_tables.device
        return (self.block_tables[:n, :num_blocks], torch.arange(num_blocks * block_size, device=device),
                torch.tensor(context_lens, device=device)[:, None])

    @classmethod
    def without_cache(cls, seq_lens: list[int]) -> "AttentionMetadata":
        """Full causal attention within each sequence, nothing stored (perplexity, parity tests)."""
        cu = [0]
        for n in seq_lens:
            cu.append(cu[-1] + n)
        return cls(cu_seqlens_q=cu, context_lens=list(seq_lens))

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)


class PagedAttention(nn.Module):
    """softmax(q kᵀ · scale + causal mask) v, per sequence, reading keys/values from the cache."""

    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: (T, H, D); k, v: (T, Hkv, D) for the new tokens. Returns (T, H, D)."""
        if meta.kv_cache is not None:
            k_cache, v_cache = meta.kv_cache[self.layer_idx]  # (num_blocks, block_size, Hkv, D)
            store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        n = meta.num_decode_seqs if meta.kv_cache is not None else 0
        if n:
            out[:n] = self._decode(q[:n], k_cache, v_cache, meta)
        for s in range(n, meta.num_seqs):
            start, end = meta.cu_seqlens_q[s], meta.cu_seqlens_q[s + 1]
            ctx = meta.context_lens[s]
            if meta.kv_cache is None:
                k_s, v_s = k[start:end], v[start:end]
            else:
                k_s = gather_blocks(k_cache, meta.block_tables[s], ctx)
                v_s = gather_blocks(v_cache, meta.block_tables[s], ctx)
            out[start:end] = self._attend(q[start:end], k_s, v_s)
        return out

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata
                ) -> torch.Tensor:
        """One query token per sequence, q: (n, H, D), all sequences in one padded, masked call."""
        block_tables, key_positions, context_lens = meta.decode_layout
        k = k_cache[block_tables].flatten(1, 2).transpose(1, 2)  # (n, Hkv, L, D)
        v = v_cache[block_tables].flatten(1, 2).transpose(1, 2)
        mask = key_positions < context_lens  # (n, L)
        if self.sliding_window is not None:
            mask &= key_positions >= context_lens - self.sliding_window
        dtype = q.dtype
        if q.device.type == "cpu" and dtype != torch.float32:
            # torch's CPU attention kernel is 3-4x slower for one bf16 query than in fp32, upcasts included
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask[:, None, None, :], scale=self.scale,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        return out[:, :, 0].to(dtype)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (Tq, H, D) are the last Tq of the Tk positions in k, v: (Tk, Hkv, D)."""
        num_q, num_k = q.shape[0], k.shape[0]
        mask = None
        if num_q > 1 or self.sliding_window is not None:
            q_pos = torch.arange(num_k - num_q, num_k, device=q.device)[:, None]
            k_pos = torch.arange(num_k, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if self.sliding_window is not None:
                mask &= k_pos > q_pos - self.sliding_window
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),  # (H, T, D)
            attn_mask=mask, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out.transpose(0, 1)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write new keys/values (T, Hkv, D) into their cache slots."""
    num_blocks, block_size = k_cache.shape[:2]
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:])[slot_mapping] = k
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:])[slot_mapping] = v


def gather_blocks(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """The first context_len cached positions of one sequence, (context_len, Hkv, D)."""
    block_size = cache.shape[1]
    num_blocks = -(-context_len // block_size)
    return cache[block_table[:num_blocks]].flatten(0, 1)[:context_len]
