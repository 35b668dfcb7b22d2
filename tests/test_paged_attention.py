"""kernels/paged_attention.cpp (the operator slimserve::decode_attention) against a float64 attention
from the definition, and against models/attention.py's torch expression it replaces."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._inductor.utils import run_and_get_code

from slimserve.kernels import paged_attention
from slimserve.models import attention

needs_kernel = pytest.mark.skipif(not paged_attention.available(),
                                  reason="no AVX512 CPU, no C++ compiler or torch before 2.13 here")
DTYPES = (torch.float32, torch.bfloat16)
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2**-7, "atol": 1e-2}}


def operands(context_lens, num_heads, num_kv_heads, head_dim, block_size, q_dtype=torch.float32,
             cache_dtype=torch.float32, new_dtype=None, sliding_window=None, seed=0):
    """Random q, one layer's (k_cache, v_cache) views of a two-layer cache, permuted block tables with
    -1 past each context and one spare column, and k_new, v_new (n, Hkv, D) in new_dtype if given.
    Every cache slot that is not read holds NaN: padding blocks, positions past a context or before
    its window, and the new position's slot when k_new is given."""
    generator = torch.Generator().manual_seed(seed)
    n = len(context_lens)
    blocks_per_seq = [-(-ctx // block_size) for ctx in context_lens]
    num_blocks = sum(blocks_per_seq) + 2  # two blocks nobody owns
    ids = torch.randperm(num_blocks, generator=generator)
    block_tables = torch.full((n, max(blocks_per_seq) + 1), -1, dtype=torch.long)
    kv_cache = torch.full((2, 2, num_kv_heads, num_blocks, block_size, head_dim), float("nan"))
    start = 0
    for i, ctx in enumerate(context_lens):
        block_tables[i, :blocks_per_seq[i]] = ids[start:start + blocks_per_seq[i]]
        start += blocks_per_seq[i]
        first = 0 if sliding_window is None else max(0, ctx - sliding_window)
        for p in range(first, ctx - (new_dtype is not None)):
            slot = kv_cache[1, :, :, block_tables[i, p // block_size], p % block_size]
            slot.copy_(torch.randn(slot.shape, generator=generator))
    kv_cache = kv_cache.to(cache_dtype)
    q = torch.randn(n, num_heads, head_dim, generator=generator).to(q_dtype)
    k_new = v_new = None
    if new_dtype is not None:
        k_new, v_new = torch.randn(2, n, num_kv_heads, head_dim, generator=generator).to(new_dtype)
    return q, kv_cache[1, 0], kv_cache[1, 1], block_tables, torch.tensor(context_lens), k_new, v_new


def reference(q, k_cache, v_cache, block_tables, context_lens, k_new=None, v_new=None, scale=None,
              sliding_window=None):
    """(n, H, D) float64 from the definition: each sequence's positions gathered through its block
    table, the last one taken from k_new, v_new when given, the window's last positions kept."""
    n, H, D = q.shape
    Hkv, _, block_size, _ = k_cache.shape
    scale = D**-0.5 if scale is None else scale
    out = torch.empty(n, H, D, dtype=torch.float64)
    for i, ctx in enumerate(context_lens.view(-1).tolist()):
        positions = torch.arange(0 if sliding_window is None else max(0, ctx - sliding_window), ctx)
        blocks = block_tables[i, positions // block_size]
        k = k_cache[:, blocks, positions % block_size].double()  # (Hkv, L, D)
        v = v_cache[:, blocks, positions % block_size].double()
        if k_new is not None:
            k[:, -1], v[:, -1] = k_new[i].double(), v_new[i].double()
        scores = q[i].double().view(Hkv, H // Hkv, D) @ k.transpose(1, 2) * scale  # (Hkv, group, L)
        out[i] = (scores.softmax(-1) @ v).view(H, D)
    return out


def assert_matches(out, q, expected):
    """out has q's dtype and shape and equals the float64 expected to that dtype's rounding (fp32), or
    to one step of it (bf16)."""
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), expected.to(q.dtype).double(), **TOLERANCE[q.dtype])


@needs_kernel
@settings(max_examples=80, deadline=None)
@given(context_lens=st.lists(st.integers(1, 40), min_size=1, max_size=5), num_kv_heads=st.integers(1, 3),
       group=st.integers(1, 4), head_dim=st.sampled_from((8, 16, 48, 64, 80)),
       block_size=st.sampled_from((1, 4, 16)), q_dtype=st.sampled_from(DTYPES), cache_dtype=st.sampled_from(DTYPES),
       new=st.sampled_from(("none", "q", "cache")), sliding_window=st.none() | st.integers(1, 40),
       seed=st.integers(0, 2**16))
def test_matches_the_definition(context_lens, num_kv_heads, group, head_dim, block_size, q_dtype, cache_dtype, new,
                                sliding_window, seed):
    """Any head dim (tails within a 16-value step), block size, grouping and dtype pairing, new keys
    in q's or the cache's dtype; fp32 outputs agree to fp32 rounding, bf16 outputs to one bf16 step."""
    new_dtype = {"none": None, "q": q_dtype, "cache": cache_dtype}[new]
    args = operands(context_lens, num_kv_heads * group, num_kv_heads, head_dim, block_size, q_dtype, cache_dtype,
                    new_dtype, sliding_window, seed)
    assert_matches(paged_attention.decode_attention(*args, sliding_window=sliding_window), args[0],
                   reference(*args, sliding_window=sliding_window))


@needs_kernel
@pytest.mark.parametrize("sliding_window", [None, 200])
@pytest.mark.parametrize("new_dtype", [None, torch.bfloat16])
def test_long_contexts_and_wide_groups(sliding_window, new_dtype):
    """Contexts past the kernel's 128-position tiles (the new token alone in the last one at 129), and
    10 query heads per KV head: past its 8 heads at a time."""
    args = operands([128, 129, 300], 20, 2, 40, 16, torch.float32, torch.bfloat16, new_dtype, sliding_window)
    out = paged_attention.decode_attention(*args, sliding_window=sliding_window)
    torch.testing.assert_close(out.double(), reference(*args, sliding_window=sliding_window),
                               **TOLERANCE[torch.float32])


@needs_kernel
def test_unread_slots_do_not_leak():
    """NaN in padding blocks, past the contexts, before the window and in the new token's own slot."""
    args = operands([37, 1, 16], 6, 2, 64, 16, torch.bfloat16, torch.bfloat16, torch.bfloat16, sliding_window=20)
    q, k_cache, v_cache, block_tables, context_lens, k_new, v_new = args
    assert k_cache.isnan().any() and v_cache.isnan().any()
    for sliding_window in (20, None):  # without the window, the NaN before it is read and must show
        out = paged_attention.decode_attention(*args, scale=0.125, sliding_window=sliding_window)
        assert out.isnan().any().item() is (sliding_window is None)
    torch.testing.assert_close(paged_attention.decode_attention(*args, sliding_window=20),
                               reference(*args, sliding_window=20).to(torch.bfloat16), **TOLERANCE[torch.bfloat16])


@needs_kernel
@pytest.mark.parametrize("sliding_window", [None, 5])
def test_matches_the_torch_expression(sliding_window):
    """models/attention.py's decode_attention reads tables clamped to >= 0 and (n, 1) context_lens."""
    q, k_cache, v_cache, block_tables, context_lens, _, _ = operands([9, 30, 17], 9, 3, 64, 4, torch.bfloat16,
                                                                     torch.bfloat16, seed=1)
    k_cache, v_cache = k_cache.nan_to_num(), v_cache.nan_to_num()  # the expression reads every slot it lists
    expected = attention.decode_attention(q, k_cache, v_cache, block_tables.clamp(min=0), context_lens[:, None],
                                          64**-0.5, sliding_window)
    out = paged_attention.decode_attention(q, k_cache, v_cache, block_tables, context_lens[:, None],
                                           sliding_window=sliding_window)
    torch.testing.assert_close(out, expected, **TOLERANCE[torch.bfloat16])


@needs_kernel
def test_no_sequences():
    _, k_cache, v_cache, _, _, _, _ = operands([3], 4, 2, 16, 4)
    out = paged_attention.decode_attention(torch.empty(0, 4, 16), k_cache, v_cache,
                                           torch.empty(0, 1, dtype=torch.long), torch.empty(0, dtype=torch.long))
    assert out.shape == (0, 4, 16)


@needs_kernel
def test_reads_views_of_the_fused_projection():
    """q, k_new and v_new as the model hands them: views of one (n, H + 2 Hkv, D) tensor, sequences
    (H + 2 Hkv) D apart; the result equals that of contiguous copies."""
    q, k_cache, v_cache, block_tables, context_lens, k_new, v_new = operands([5, 9, 2], 4, 2, 16, 4,
                                                                             new_dtype=torch.float32)
    fused = torch.cat([q, k_new, v_new], dim=1)
    views = fused[:, :4], fused[:, 4:6], fused[:, 6:]
    assert not any(t.is_contiguous() for t in views)
    out = paged_attention.decode_attention(views[0], k_cache, v_cache, block_tables, context_lens, *views[1:])
    torch.testing.assert_close(out, paged_attention.decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                                                     k_new, v_new), rtol=0, atol=0)


@needs_kernel
def test_refuses_bad_operands():
    args = operands([5, 8], 4, 2, 16, 4, new_dtype=torch.float32)
    q, k_cache, v_cache, block_tables, context_lens, k_new, v_new = args

    def call(**changes):
        args = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, context_lens=context_lens,
                    k_new=k_new, v_new=v_new) | changes
        return paged_attention.decode_attention(**args)

    with pytest.raises(RuntimeError, match=r"\(n, H, D\) fp32 or bf16 q, each token's \(H, D\) contiguous"):
        call(q=q[0])
    with pytest.raises(RuntimeError, match=r"each token's \(H, D\) contiguous"):
        call(q=q.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(RuntimeError, match="k_cache and v_cache of one shape, both fp32 or both bf16"):
        call(v_cache=v_cache.bfloat16())
    with pytest.raises(RuntimeError, match="k_cache and v_cache of one shape"):
        call(v_cache=v_cache[:, :-1].contiguous())
    with pytest.raises(RuntimeError, match=r"\(n, Hkv, D\) k_new and v_new"):
        call(k_new=k_new[:1])
    with pytest.raises(RuntimeError, match="q has head dim 8, the cache 16"):
        call(q=q[..., :8].contiguous())
    with pytest.raises(RuntimeError, match="3 heads are not a multiple of the cache's 2 KV heads"):
        call(q=q[:, :3].contiguous())
    with pytest.raises(RuntimeError, match="k_new and v_new come together"):
        call(v_new=None)
    wide_tables = torch.cat([block_tables, block_tables], 1)
    with pytest.raises(RuntimeError, match=r"\(n, max_blocks\) int64 block_tables"):
        call(block_tables=wide_tables[:, ::2])
    bad_block = block_tables.clone()
    bad_block[1, 1] = k_cache.shape[1]
    with pytest.raises(RuntimeError, match=rf"block table entry \(1, 1\) is {k_cache.shape[1]}, outside the cache's"):
        call(block_tables=bad_block)
    bad_block[1, 1] = -1
    with pytest.raises(RuntimeError, match=r"block table entry \(1, 1\) is -1"):
        call(block_tables=bad_block)
    with pytest.raises(RuntimeError, match="sequence 1 has context length 13, outside 1 to the 12 positions"):
        call(context_lens=torch.tensor([5, 13]))
    with pytest.raises(RuntimeError, match="sequence 0 has context length 0"):
        call(context_lens=torch.tensor([0, 8]))


@needs_kernel
def test_compiled_graph_calls_the_operator_without_python():
    args = operands([7, 20], 6, 3, 64, 16, torch.bfloat16, torch.bfloat16, torch.bfloat16)
    compiled = torch.compile(lambda *args: torch.relu(paged_attention.decode_attention(*args, sliding_window=10)),
                             fullgraph=True, options={"cpp_wrapper": True})
    with torch.no_grad():
        out, code = run_and_get_code(compiled, *args)
    assert torch.equal(out, torch.relu(paged_attention.decode_attention(*args, sliding_window=10)))
    assert 'aoti_torch_call_dispatcher("slimserve::decode_attention"' in "".join(code)


def prefill_operands(query_counts, context_lens, num_heads, num_kv_heads, head_dim, block_size, q_dtype, cache_dtype,
                     seed=0):
    """operands' cache and tables for the contexts, every position written, and q (T, H, D) for the
    last query_counts[i] positions of each; query_starts their prefix sums."""
    _, k_cache, v_cache, block_tables, context_lens, _, _ = operands(context_lens, num_heads, num_kv_heads, head_dim,
                                                                     block_size, q_dtype, cache_dtype, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(sum(query_counts), num_heads, head_dim, generator=generator).to(q_dtype)
    query_starts = torch.tensor([0, *query_counts]).cumsum(0)
    return q, k_cache, v_cache, block_tables, query_starts, context_lens


def prefill_reference(q, k_cache, v_cache, block_tables, query_starts, context_lens, scale=None, sliding_window=None):
    """(T, H, D) float64 from the definition: each query at its position, attending the positions up
    to its own (the last sliding_window of them), gathered through its sequence's block table."""
    T, H, D = q.shape
    Hkv, _, block_size, _ = k_cache.shape
    scale = D**-0.5 if scale is None else scale
    out = torch.empty(T, H, D, dtype=torch.float64)
    for i, ctx in enumerate(context_lens.tolist()):
        start, end = query_starts[i].item(), query_starts[i + 1].item()
        positions = torch.arange(ctx)
        blocks = block_tables[i, positions // block_size]
        k = k_cache[:, blocks, positions % block_size].double()  # (Hkv, ctx, D)
        v = v_cache[:, blocks, positions % block_size].double()
        query_positions = torch.arange(ctx - (end - start), ctx)[:, None]
        allowed = positions <= query_positions
        if sliding_window is not None:
            allowed &= positions > query_positions - sliding_window
        for h in range(H):
            scores = (q[start:end, h].double() @ k[h * Hkv // H].T * scale).masked_fill(~allowed, float("-inf"))
            out[start:end, h] = scores.softmax(-1) @ v[h * Hkv // H]
    return out


@needs_kernel
@settings(max_examples=80, deadline=None)
@given(sequences=st.lists(st.tuples(st.integers(1, 60), st.integers(0, 60)), min_size=1, max_size=4),
       num_kv_heads=st.integers(1, 3), group=st.integers(1, 8), head_dim=st.sampled_from((8, 16, 48, 64, 80, 128)),
       block_size=st.sampled_from((1, 4, 16)), q_dtype=st.sampled_from(DTYPES), cache_dtype=st.sampled_from(DTYPES),
       sliding_window=st.none() | st.integers(1, 40), seed=st.integers(0, 2**16))
def test_prefill_matches_the_definition(sequences, num_kv_heads, group, head_dim, block_size, q_dtype, cache_dtype,
                                        sliding_window, seed):
    """Prompts whole, chunks after a cached prefix and sequences with no queries; any head dim, block
    size, grouping (up to 8 query heads per KV head: 128 rows a task) and dtype pairing."""
    query_counts = [min(queries, ctx) for ctx, queries in sequences]
    args = prefill_operands(query_counts, [ctx for ctx, _ in sequences], num_kv_heads * group, num_kv_heads,
                            head_dim, block_size, q_dtype, cache_dtype, seed)
    assert_matches(paged_attention.prefill_attention(*args, sliding_window=sliding_window), args[0],
                   prefill_reference(*args, sliding_window=sliding_window))


@needs_kernel
@pytest.mark.parametrize("sliding_window", [None, 100])
def test_prefill_of_a_long_prompt(sliding_window):
    """A 300-token prompt and a 70-token chunk after 230 cached positions: many tasks per sequence."""
    args = prefill_operands([300, 70], [300, 300], 14, 2, 64, 16, torch.bfloat16, torch.bfloat16, seed=3)
    out = paged_attention.prefill_attention(*args, scale=0.1, sliding_window=sliding_window)
    torch.testing.assert_close(out, prefill_reference(*args, 0.1, sliding_window).to(torch.bfloat16),
                               **TOLERANCE[torch.bfloat16])


@needs_kernel
def test_prefill_reads_no_unseen_slot():
    """NaN in every padding block and past each context (operands writes only the contexts)."""
    args = prefill_operands([5, 16, 1], [5, 37, 16], 6, 2, 64, 16, torch.float32, torch.bfloat16)
    assert args[1].isnan().any()
    out = paged_attention.prefill_attention(*args)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), prefill_reference(*args), **TOLERANCE[torch.float32])


@needs_kernel
def test_prefill_refuses_bad_operands():
    q, k_cache, v_cache, block_tables, query_starts, context_lens = prefill_operands([5, 8], [5, 8], 4, 2, 16, 4,
                                                                                     torch.float32, torch.float32)

    def call(**changes):
        args = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, query_starts=query_starts,
                    context_lens=context_lens) | changes
        return paged_attention.prefill_attention(**args)

    with pytest.raises(RuntimeError, match=r"prefill_attention needs an \(n, H, D\) fp32 or bf16 q"):
        call(q=q.half())
    with pytest.raises(RuntimeError, match=r"query_starts runs from 0 to 12, not from 0 to q's 13 tokens"):
        call(query_starts=torch.tensor([0, 5, 12]))
    with pytest.raises(RuntimeError, match=r"contiguous int64 query_starts \(n \+ 1,\) and context_lens \(n,\)"):
        call(context_lens=context_lens[:1])
    with pytest.raises(RuntimeError, match="sequence 0 has 6 queries and context length 5"):
        call(query_starts=torch.tensor([0, 6, 13]), context_lens=torch.tensor([5, 8]))
    with pytest.raises(RuntimeError, match="sequence 1 has 8 queries and context length 13, not 0 <= queries"):
        call(context_lens=torch.tensor([5, 13]))
    bad_block = block_tables.clone()
    bad_block[1, 1] = -1
    with pytest.raises(RuntimeError, match=r"prefill_attention: block table entry \(1, 1\) is -1"):
        call(block_tables=bad_block)


@needs_kernel
@pytest.mark.parametrize("cached", [True, False])
def test_prefill_layer_matches_the_torch_path(cached, monkeypatch):
    """PagedAttention with the operator equals its torch path: a step of two decodes, a prompt and a
    chunk after a cached prefix, with the cache; perplexity windows without it."""
    generator = torch.Generator().manual_seed(0)
    layer = attention.PagedAttention(0, 6, 2, 64, sliding_window=24)
    if cached:
        decode_ctx, prompts = [9, 20], [(30, 30), (40, 12)]  # (context, new tokens)
        context_lens = decode_ctx + [ctx for ctx, _ in prompts]
        new_tokens = [1, 1] + [new for _, new in prompts]
        _, k_cache, v_cache, block_tables, _, _, _ = operands(context_lens, 6, 2, 64, 16, seed=2)
        kv_cache = torch.stack([k_cache, v_cache])[None].nan_to_num()
        slots = [block_tables[i, p // 16] * 16 + p % 16 for i, (ctx, new) in enumerate(zip(context_lens, new_tokens))
                 for p in range(ctx - new, ctx)]
        meta = lambda: attention.AttentionMetadata([0, *torch.tensor(new_tokens).cumsum(0).tolist()], context_lens,
                                                   torch.tensor(slots), block_tables, kv_cache.clone(), 2)
    else:
        new_tokens = [7, 33]
        meta = lambda: attention.AttentionMetadata.without_cache(new_tokens)
    q, k, v = torch.randn(3, sum(new_tokens), 6, 64, generator=generator)
    k, v = k[:, :2], v[:, :2]
    out = layer(q, k, v, meta())
    monkeypatch.setattr(paged_attention, "serves", lambda *args: False)
    torch.testing.assert_close(out, layer(q, k, v, meta()), rtol=1e-5, atol=1e-5)
