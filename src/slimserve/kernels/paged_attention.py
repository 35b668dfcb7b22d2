"""Attention over the paged KV cache on the CPU: kernels/paged_attention.cpp.

Decode: one query token per sequence attends its context in place, block by block, through its
block table: the time is the time to read the keys and values. paged_attention.cpp (AVX512) reads
each sequence's keys, then its values, once and in order, with scores, softmax and sums in fp32. 32
sequences of 64-128 positions, 3 bf16 KV heads of 64, each layer's cache in DRAM, 2 Zen 5 cores:
125 µs a layer (19 GB/s) against 340 (7 GB/s) for models/attention.py's compiled decode_attention;
78 against 176 with one layer's cache in L3.

Prefill: the last query tokens of every prompt or chunk of a step in one call, each attending the
positions up to its own: fp32 arithmetic, 16 tokens of one KV head's query heads a task, keys only
widened (never transposed) and the scores of 8 positions for 48 rows 24 multiply-adds per dimension.
On SmolLM2's shape, 2 cores: 6.7x models/attention.py's torch path for 32 prompts of 64 tokens (the
per-prompt calls it saves), 3.2-4.7x for one prompt of 128-2048 (benchmarks/results/attention_cpu.md).

Registered from C++ as the torch operators slimserve::decode_attention and
slimserve::prefill_attention; a compiled graph's C++ wrapper calls them without Python. Where they
cannot be built (no AVX512, no compiler, torch before 2.13) `available()` is False, and the callers
keep models/attention.py's torch expressions.
"""

import torch
from torch import Tensor

from slimserve.kernels import native

native.define_operator("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
                       "Tensor context_lens, Tensor? k_new, Tensor? v_new, float scale, int sliding_window) -> Tensor",
                       lambda q, *args: q.new_empty(q.shape))
native.define_operator("prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
                       "Tensor query_starts, Tensor context_lens, float scale, int sliding_window) -> Tensor",
                       lambda q, *args: q.new_empty(q.shape))


DTYPES = (torch.float32, torch.bfloat16)  # of q and the cache: what the operator reads


@torch.compiler.assume_constant_result  # traced calls take it as a constant, read once
def available() -> bool:
    return native.load_operators("paged_attention.cpp", (), frozenset())


def serves(q: Tensor, cache: Tensor) -> bool:
    """True where the operators can run: CPU tensors of their dtypes, and the operators built here."""
    return q.device.type == "cpu" and q.dtype in DTYPES and cache.dtype in DTYPES and available()


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
                     k_new: Tensor | None = None, v_new: Tensor | None = None, scale: float | None = None,
                     sliding_window: int | None = None) -> Tensor:
    """softmax(q kᵀ · scale) v of one query token per sequence, in fp32, returned in q's dtype.

    q (n, H, D) fp32 or bf16, each sequence's (H, D) contiguous (sequences may lie any stride apart,
    as views of the fused q/k/v projection do; so may k_new's and v_new's); k_cache, v_cache
    (Hkv, num_blocks, block_size, D) fp32 or bf16;
    block_tables (n, max_blocks) int64, -1 past a context; context_lens (n,) or (n, 1) int64.
    Sequence i attends positions [0, context_lens[i]), the last sliding_window of them if given;
    k_new, v_new (n, Hkv, D): the new token's key and value, read for position context_lens[i] - 1
    in place of its cache slot (not written yet). scale: head_dim ** -0.5 when None.
    """
    assert available(), "no slimserve::decode_attention here: callers check available() first"
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.slimserve.decode_attention(q, k_cache, v_cache, block_tables, context_lens, k_new, v_new, scale,
                                                sliding_window or 0)


def prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, query_starts: Tensor,
                      context_lens: Tensor, scale: float | None = None, sliding_window: int | None = None) -> Tensor:
    """Causal softmax(q kᵀ · scale) v of the last query tokens of each sequence, in fp32, returned
    in q's dtype; their keys and values already in the cache.

    q (T, H, D) fp32 or bf16, each token's (H, D) contiguous (tokens any stride apart); k_cache,
    v_cache and block_tables (n, max_blocks) as decode_attention's; query_starts (n + 1,) int64:
    sequence i's queries are q's tokens [query_starts[i], query_starts[i + 1]), the last positions
    of its context_lens[i] (n,) int64, each attending the positions up to its own, the last
    sliding_window of them if given. scale: head_dim ** -0.5 when None.
    """
    assert available(), "no slimserve::prefill_attention here: callers check available() first"
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.slimserve.prefill_attention(q, k_cache, v_cache, block_tables, query_starts, context_lens,
                                                 scale, sliding_window or 0)
