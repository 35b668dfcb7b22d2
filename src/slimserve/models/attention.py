"""Attention over a flat batch of tokens from several sequences, with an optional paged KV cache.

Every model calls `PagedAttention`, so one definition serves perplexity windows (no cache), the
single-sequence generator and the batched engine. Tokens of all sequences are concatenated into
one flat batch of T tokens; `AttentionMetadata` says where each sequence's tokens start and how
long its context is. The KV cache is one tensor per model,
(num_layers, 2, num_kv_heads, num_blocks, block_size, head_dim); a sequence's block_table lists
the blocks holding its context in order, and slot_mapping gives each new token its cache slot
(block_id * block_size + offset). Heads come first so that gathering a sequence's blocks gives
keys already laid out per head, (Hkv, L, D), for the attention matmuls: no copy to transpose.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from slimserve.kernels import paged_attention
from slimserve.models import opaque

# Query rows per block of CPU prefill attention: 64 or 128 are fastest on 2 cores at 128-2048 tokens.
QUERY_BLOCK = 64


@dataclass
class AttentionMetadata:
    """Layout of one flat batch. S sequences, T tokens in all.

    cu_seqlens_q: S+1 ints, prefix sums of the new (query) tokens per sequence. Empty for a
        decode-only batch run as one compiled graph, whose sequence count may be symbolic: there
        num_decode_seqs says how many (one token each).
    context_lens: S ints, tokens each sequence attends to after this step (cached + new).
        Empty for a decode-only batch run as one compiled graph, which gives decode_context_lens.
    slot_mapping: (T,) int64 cache slot of each new token, or None to run without a cache.
    block_tables: (S, max_blocks) int64, or None without a cache; -1 pads unused entries.
    kv_cache: (num_layers, 2, num_kv_heads, num_blocks, block_size, head_dim), or None.
    num_decode_seqs: the first num_decode_seqs sequences have one new token each; with a cache
        they are attended in one batched call instead of one call per sequence.
    decode_context_lens: (num_decode_seqs,) int64 tensor, or None: given by a compiled decode
        step, whose block_tables are then exactly as wide as its longest context. A compiled
        graph takes python ints as constants, so lengths that change every step come as a tensor.
    new_kv: None to write each layer's new keys and values into kv_cache as it runs. A compiled
        decode step passes a list, which collects each layer's (k, v), and writes them all after
        its graph with one store_kv: the graph then holds no in-place write to an input, and one
        write per step costs ~10 µs where SmolLM2-135M's 30 per-layer writes cost ~450.
    """

    cu_seqlens_q: list[int]
    context_lens: list[int]
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    kv_cache: torch.Tensor | None = None
    num_decode_seqs: int = 0
    decode_context_lens: torch.Tensor | None = None
    new_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    _decode_layout: tuple | None = field(default=None, repr=False)
    _prefill_layout: tuple | None = field(default=None, repr=False)
    _biases: dict = field(default_factory=dict, repr=False)  # made once per step, shared by every layer

    def decode_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shared by every layer of a step: the decode sequences' block tables cut to the longest
        context (padding -1 read as block 0: those positions are masked), key positions (L,), and
        context lengths (n, 1) for masking. Made once per step (not a cached_property: its lock
        would stop torch.compile's tracing)."""
        if self._decode_layout is None:
            self._decode_layout = self._make_decode_layout()
        return self._decode_layout

    def prefill_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shared by every layer of a step: for the sequences after the decode ones, their block
        tables, where their queries start (from 0) and their context lengths, as
        kernels/paged_attention.cpp's prefill operator reads them. Without a cache, each table lists
        its sequence's tokens in the flat batch: blocks of one position in (Hkv, T, 1, D) keys."""
        if self._prefill_layout is None:
            n = self.num_decode_seqs if self.kv_cache is not None else 0
            starts = torch.tensor(self.cu_seqlens_q[n:]) - self.cu_seqlens_q[n]
            context_lens = torch.tensor(self.context_lens[n:])
            if self.kv_cache is None:
                positions = torch.arange(int(context_lens.max()))
                tables = torch.where(positions < context_lens[:, None], starts[:-1, None] + positions, -1)
            else:
                tables = self.block_tables[n:]
            self._prefill_layout = tables.contiguous(), starts, context_lens
        return self._prefill_layout

    def _make_decode_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.num_decode_seqs
        assert n and (not self.cu_seqlens_q or self.cu_seqlens_q[n] == n), "decode sequences come first, one each"
        block_size = self.kv_cache.shape[4]
        device = self.block_tables.device
        context_lens = self.decode_context_lens
        if context_lens is None:
            context_lens = torch.tensor(self.context_lens[:n], device=device)
            num_blocks = -(-max(self.context_lens[:n]) // block_size)
        else:
            num_blocks = self.block_tables.shape[1]
        return (self.block_tables[:n, :num_blocks].clamp(min=0), torch.arange(num_blocks * block_size, device=device),
                context_lens[:, None])

    def decode_bias(self, sliding_window: int | None) -> torch.Tensor:
        """(n, 1, L) float32: 0 where a decode query may attend, -inf elsewhere; made once per step."""
        key = ("decode", sliding_window)
        if key not in self._biases:
            _, key_positions, context_lens = self.decode_layout()
            self._biases[key] = additive_mask(decode_allowed(key_positions, context_lens, sliding_window))[:, None, :]
        return self._biases[key]

    def block_bias(self, first_q: int, end_q: int, first_k: int, sliding_window: int | None, repeats: int,
                   device: torch.device) -> torch.Tensor:
        """(repeats * queries, keys) float32: the additive mask of query positions [first_q, end_q)
        over key positions [first_k, end_q), stacked `repeats` times (once per query head of a KV
        head); made once per step, as every layer's prefill blocks at the same positions share it."""
        key = (first_q, end_q, first_k, sliding_window, repeats)
        if key not in self._biases:
            allowed = causal_allowed(first_q, end_q, first_k, end_q, sliding_window, device)
            self._biases[key] = additive_mask(allowed).repeat(repeats, 1)
        return self._biases[key]

    @classmethod
    def without_cache(cls, seq_lens: list[int]) -> "AttentionMetadata":
        """Full causal attention within each sequence, nothing stored (perplexity, parity tests)."""
        cu = [0]
        for n in seq_lens:
            cu.append(cu[-1] + n)
        return cls(cu_seqlens_q=cu, context_lens=list(seq_lens))

    @property
    def num_seqs(self) -> int:
        return len(self.cu_seqlens_q) - 1 if self.cu_seqlens_q else self.num_decode_seqs


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
        self.opaque_handle: int | None = None  # see models/opaque.py

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata | None
                ) -> torch.Tensor:
        """q: (T, H, D); k, v: (T, Hkv, D) for the new tokens. Returns (T, H, D).

        meta None: inside a compiled step's graph, which calls this layer as an opaque operator
        with the step's metadata (models/opaque.py)."""
        if meta is None:
            return opaque.attention(q, k, v, self.opaque_handle)
        if meta.kv_cache is not None:
            if meta.new_kv is None:
                store_kv(torch.stack([k, v]), meta.kv_cache[self.layer_idx], meta.slot_mapping)
            else:
                meta.new_kv.append((k, v))
            k_cache, v_cache = meta.kv_cache[self.layer_idx]  # (Hkv, num_blocks, block_size, D)
            if not meta.cu_seqlens_q:  # a compiled decode-only step, whose sequence count may be symbolic
                return self._decode(q, k, v, k_cache, v_cache, meta)
        out = torch.empty_like(q)
        n = meta.num_decode_seqs if meta.kv_cache is not None else 0
        if n:
            out[:n] = self._decode(q[:n], k[:n], v[:n], k_cache, v_cache, meta)
        if n < meta.num_seqs and paged_attention.serves(q, k if meta.kv_cache is None else k_cache):
            first = meta.cu_seqlens_q[n]
            out[first:] = self._prefill(q[first:], k, v, meta)
            return out
        for s in range(n, meta.num_seqs):
            start, end = meta.cu_seqlens_q[s], meta.cu_seqlens_q[s + 1]
            ctx = meta.context_lens[s]
            if meta.kv_cache is None or ctx == end - start:  # no cached prefix: the new keys are all
                k_s, v_s = k[start:end].transpose(0, 1), v[start:end].transpose(0, 1)
            else:
                num_blocks = -(-ctx // k_cache.shape[2])
                k_s = gather_blocks(k_cache, meta.block_tables[s, :num_blocks])[:, :ctx]
                v_s = gather_blocks(v_cache, meta.block_tables[s, :num_blocks])[:, :ctx]
            out[start:end] = self._attend(q[start:end], k_s, v_s, meta)
        return out

    def _decode(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One query token per sequence, q: (n, H, D), all sequences in one call.
        k_new, v_new (n, Hkv, D): the new tokens' keys and values, read from here where meta.new_kv
        defers their write to the cache.

        On the CPU, in fp32 or bf16, kernels/paged_attention.cpp's operator where it builds: it reads
        each sequence's blocks in place, once, and compiled graphs call it without Python. Else a
        compiled engine's steps run compiled_decode_attention, and the rest _decode_gathered.
        """
        block_tables, _, context_lens = meta.decode_layout()
        if paged_attention.serves(q, k_cache):
            new = (k_new, v_new) if meta.new_kv is not None else (None, None)
            return paged_attention.decode_attention(q, k_cache, v_cache, block_tables, context_lens, *new, self.scale,
                                                    self.sliding_window)
        if self.opaque_handle is not None and meta.new_kv is None:  # a compiled engine's step, run eagerly
            return compiled_decode_attention(q, k_cache, v_cache, block_tables, context_lens, self.scale,
                                             self.sliding_window)
        return self._decode_gathered(q, k_new, v_new, k_cache, v_cache, meta)

    def _decode_gathered(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """_decode as a plain matmul-softmax-matmul in fp32 over the gathered blocks, padded and
        masked, batched over (KV head, sequence): torch's fused attention kernels are built for blocks
        of queries, and on the CPU this is faster for one query per sequence (and 3-4x faster than
        their bf16 path). The path of GPUs, and the reference of the others."""
        block_tables, key_positions, context_lens = meta.decode_layout()
        n, Hkv, D = q.shape[0], self.num_kv_heads, self.head_dim
        k = gather_blocks(k_cache, block_tables).float()  # (Hkv, n, L, D)
        v = gather_blocks(v_cache, block_tables).float()
        if meta.new_kv is not None:  # the last position of each context is not in the cache yet
            is_new = (key_positions == context_lens - 1)[None, :, :, None]  # (1, n, L, 1)
            k = torch.where(is_new, k_new.transpose(0, 1)[:, :, None].float(), k)
            v = torch.where(is_new, v_new.transpose(0, 1)[:, :, None].float(), v)
        q = q.float().view(n, Hkv, self.num_heads // Hkv, D).transpose(0, 1)  # (Hkv, n, group, D)
        out = self._softmax_matmul(q, k, v, meta.decode_bias(self.sliding_window))  # (Hkv, n, group, D)
        return out.transpose(0, 1).reshape(n, self.num_heads, D).to(v_cache.dtype)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The queries of every sequence after the decode ones, q (T', H, D), in one call of
        kernels/paged_attention.cpp's prefill operator, with their keys and values read from the
        cache (stored above); without a cache, from k and v (T, Hkv, D) read as a cache of
        one-position blocks. On 2 cores, SmolLM2's shape: 6.7x the torch path below for 32
        prompts of 64 tokens, 3.2-4.7x for one of 128-2048 (benchmarks/results/attention_cpu.md)."""
        if meta.kv_cache is None:
            k_cache, v_cache = (x.transpose(0, 1).unsqueeze(2).contiguous() for x in (k, v))  # (Hkv, T, 1, D)
        else:
            k_cache, v_cache = meta.kv_cache[self.layer_idx]
        return paged_attention.prefill_attention(q, k_cache, v_cache, *meta.prefill_layout(), self.scale,
                                                 self.sliding_window)

    def _softmax_matmul(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """softmax(q kᵀ · scale + bias) v for fp32 q (..., Tq, D), k and v (..., Tk, D)."""
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(self.scale).add_(bias)
        return torch.matmul(scores.softmax(dim=-1), v)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: (Tq, H, D) are the last Tq of the Tk positions in k, v: (Hkv, Tk, D)."""
        if q.device.type == "cpu":
            return self._attend_in_blocks(q, k, v, meta)
        num_q, num_k = q.shape[0], k.shape[1]
        mask = None
        if num_q > 1 or self.sliding_window is not None:
            mask = causal_allowed(num_k - num_q, num_k, 0, num_k, self.sliding_window, q.device)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v,  # (heads, T, D)
                                             attn_mask=mask, scale=self.scale,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        return out.transpose(0, 1)

    def _attend_in_blocks(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
                          ) -> torch.Tensor:
        """The CPU path of _attend where the prefill operator does not build: matmul-softmax-matmul
        in fp32, QUERY_BLOCK query rows at a time, each block against only the keys some row of it
        may see. On 2 cores this is 1.2-4.6x faster than torch's CPU scaled_dot_product_attention at
        128-2048 tokens (benchmarks/results/attention_cpu.md), and the scores stay small."""
        num_q, num_k = q.shape[0], k.shape[1]
        Hkv, group, D = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        k, v = k.float(), v.float()
        out = torch.empty_like(q)
        for start in range(0, num_q, QUERY_BLOCK):
            end = min(num_q, start + QUERY_BLOCK)
            first_q, end_q = num_k - num_q + start, num_k - num_q + end  # the block's positions
            first_k = 0 if self.sliding_window is None else max(0, first_q - self.sliding_window + 1)
            bias = meta.block_bias(first_q, end_q, first_k, self.sliding_window, group, q.device)
            rows = q[start:end].float().view(end - start, Hkv, group, D).permute(1, 2, 0, 3)
            block = self._softmax_matmul(rows.reshape(Hkv, group * (end - start), D), k[:, first_k:end_q],
                                         v[:, first_k:end_q], bias)  # (Hkv, group * rows, D)
            out[start:end] = block.view(Hkv, group, end - start, D).permute(2, 0, 1, 3).reshape(end - start, -1, D)
        return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, sliding_window: int | None) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v of one query token per sequence, q (n, H, D), its keys and values
    read in place from the cache blocks (Hkv, num_blocks, block_size, D) that block_tables (n, blocks)
    lists, context_lens (n, 1) long. Returns (n, H, D).

    Written for torch.compile: as elementwise products and sums, inductor turns it into loops over
    each sequence's cached positions that read every key and value once, where the eager gather path
    copies them out (gather, then fp32) before its matmuls. Compiled, it is 1.6-2.4x faster than
    that for 4-32 sequences on 2 cores; kernels/paged_attention.cpp's operator, where it builds,
    is faster still (benchmarks/results/attention_cpu.md).
    """
    n, H, D = q.shape
    Hkv = k_cache.shape[0]
    k = k_cache[:, block_tables].flatten(2, 3).transpose(0, 1)  # (n, Hkv, L, D)
    v = v_cache[:, block_tables].flatten(2, 3).transpose(0, 1)
    scores = (q.view(n, Hkv, H // Hkv, 1, D).float() * k[:, :, None].float()).sum(-1) * scale  # (n, Hkv, group, L)
    key_positions = torch.arange(k.shape[2], device=q.device)
    allowed = decode_allowed(key_positions, context_lens, sliding_window)  # (n, L)
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    out = (scores.softmax(dim=-1)[..., None] * v[:, :, None].float()).sum(-2)  # (n, Hkv, group, D)
    return out.view(n, H, D).to(q.dtype)


_compiled_decode_attention = torch.compile(decode_attention, dynamic=False)


def compiled_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                              sliding_window: int | None) -> torch.Tensor:
    """decode_attention as one compiled kernel for any number of sequences and blocks. Their sizes
    are marked unbacked: the kernel then holds no assumption about them (not even that they differ
    from 1), so one compilation serves every step, and a compiled engine's warm-up makes it."""
    for tensor, dims in ((q, (0,)), (block_tables, (0, 1)), (context_lens, (0,))):
        for dim in dims:
            torch._dynamo.decorators.mark_unbacked(tensor, dim)
    return _compiled_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window)


def decode_allowed(key_positions: torch.Tensor, context_lens: torch.Tensor, sliding_window: int | None
                   ) -> torch.Tensor:
    """(n, L) bool: which key positions (L,) the decode query of each context length (n, 1) may attend."""
    allowed = key_positions < context_lens
    if sliding_window is not None:
        allowed &= key_positions >= context_lens - sliding_window
    return allowed


def causal_allowed(first_q: int, end_q: int, first_k: int, end_k: int, sliding_window: int | None,
                   device: torch.device) -> torch.Tensor:
    """(queries, keys) bool: which key positions [first_k, end_k) each query position
    [first_q, end_q) may attend (causal, within the sliding window if any)."""
    q_pos = torch.arange(first_q, end_q, device=device)[:, None]
    k_pos = torch.arange(first_k, end_k, device=device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    return allowed


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """float32 of allowed's shape: 0 where allowed, -inf elsewhere, to add to attention scores."""
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def store_kv(kv: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write new keys and values kv (..., 2, T, Hkv, D) into their slots of kv_cache
    (..., 2, Hkv, num_blocks, block_size, D): one layer's (no leading dims), or every layer's."""
    *lead, num_kv_heads, num_blocks, block_size, head_dim = kv_cache.shape
    slots = kv_cache.view(*lead, num_kv_heads, num_blocks * block_size, head_dim)
    slots[..., slot_mapping, :] = kv.transpose(-2, -3)


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """The cached positions of the blocks listed in block_tables (..., num_blocks), as
    (Hkv, ..., num_blocks * block_size, D). index_select: 4-7x faster than indexing on the CPU."""
    num_kv_heads, _, block_size, head_dim = cache.shape
    blocks = cache.index_select(1, block_tables.flatten())
    return blocks.view(num_kv_heads, *block_tables.shape[:-1], block_tables.shape[-1] * block_size, head_dim)
