"""Attention on the CPU, one model's shape (SmolLM2-135M: 9 query heads, 3 KV heads, head_dim 64), bf16.

Prefill: prompts attending to themselves causally, as the engine's prefill does: the C++ operator
(kernels/paged_attention.cpp), reading the keys and values from scattered cache blocks, which the
engine runs where it builds; slimserve's torch path (query blocks, one call per prompt), which runs
where it does not; torch's scaled_dot_product_attention per prompt, with the same causal mask (its
is_causal flag measured no faster).

Batched decode: one new token for each of n sequences against its context in the paged KV cache:
the torch path (`PagedAttention._decode_gathered`: gather the blocks, fp32 matmuls), the compiled
torch expression (`compiled_decode_attention`) and the C++ operator (kernels/paged_attention.cpp),
which the engine runs where it builds. Timed over the 30 layers of a step, each with its own cache,
so keys and values come from memory as in a real step.

Each repetition times both sides in turn; the tables give medians. Writes benchmarks/results/attention_cpu.md.

    python benchmarks/attention_cpu.py [--threads 2] [--repeats 5]
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slimserve.eval.machine import machine_info
from slimserve.kernels import paged_attention
from slimserve.models.attention import (QUERY_BLOCK, AttentionMetadata, PagedAttention, compiled_decode_attention,
                                        store_kv)

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
PREFILLS = ((1, 128), (1, 512), (1, 1024), (1, 2048), (32, 64), (8, 512))  # (prompts, tokens each)
LAYERS, BLOCK_SIZE = 30, 16
DECODES = ((1, 1024), (1, 2048), (4, 512), (8, 2048), (32, 128), (32, 512))  # (sequences, context tokens)


def per_call_ms(fn, min_seconds: float = 0.3) -> float:
    fn()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds:
        fn()
        calls += 1
    return elapsed / calls * 1e3


def medians(fns: dict, repeats: int) -> dict[str, float]:
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(per_call_ms(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def prefill_rows(attention: PagedAttention, repeats: int) -> list[str]:
    rows = []
    for num_seqs, length in PREFILLS:
        tokens = num_seqs * length
        q = torch.randn(tokens, HEADS, HEAD_DIM, dtype=torch.bfloat16)
        k, v = (torch.randn(tokens, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16) for _ in range(2))
        num_blocks = tokens // BLOCK_SIZE
        block_tables = torch.randperm(num_blocks).view(num_seqs, -1)  # scattered, as in use
        kv_cache = torch.empty(1, 2, KV_HEADS, num_blocks, BLOCK_SIZE, HEAD_DIM, dtype=torch.bfloat16)
        cu = [length * i for i in range(num_seqs + 1)]
        meta = AttentionMetadata(cu, [length] * num_seqs, block_tables=block_tables, kv_cache=kv_cache)
        slots = (block_tables[:, :, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).view(-1)
        store_kv(torch.stack([k, v]), kv_cache[0], slots)
        mask = torch.ones(length, length, dtype=torch.bool).tril()
        sequences = [slice(cu[i], cu[i + 1]) for i in range(num_seqs)]

        def torch_path():  # the engine's prefill where the operator does not build; its masks made once
            return [attention._attend(q[s], k[s].transpose(0, 1), v[s].transpose(0, 1), meta) for s in sequences]

        def operator():
            return paged_attention.prefill_attention(q, *kv_cache[0], *meta.prefill_layout())

        def torch_sdpa():
            return [F.scaled_dot_product_attention(q[s].transpose(0, 1), k[s].transpose(0, 1), v[s].transpose(0, 1),
                                                   attn_mask=mask, enable_gqa=True) for s in sequences]

        expected = torch.cat(torch_path()).float()
        error = max((operator().float() - expected).abs().max().item(),
                    (torch.cat([o.transpose(0, 1) for o in torch_sdpa()]).float() - expected).abs().max().item())
        ms = medians({"torch": torch_path, "operator": operator, "sdpa": torch_sdpa}, repeats)
        rows.append(f"| {num_seqs} x {length} | {ms['torch']:.2f} | {ms['operator']:.2f} | {ms['sdpa']:.2f} | "
                    f"{ms['torch'] / ms['operator']:.2f}x | {ms['sdpa'] / ms['operator']:.2f}x | {error:.1e} |")
        print(rows[-1], flush=True)
    return rows


def decode_rows(attention: PagedAttention, repeats: int) -> list[str]:
    rows = []
    for num_seqs, context in DECODES:
        blocks_per_seq = context // BLOCK_SIZE
        num_blocks = num_seqs * blocks_per_seq
        kv_cache = torch.randn(LAYERS, 2, KV_HEADS, num_blocks, BLOCK_SIZE, HEAD_DIM, dtype=torch.bfloat16)
        block_tables = torch.randperm(num_blocks).view(num_seqs, blocks_per_seq)  # scattered, as in use
        q = torch.randn(num_seqs, HEADS, HEAD_DIM, dtype=torch.bfloat16)
        meta = AttentionMetadata(list(range(num_seqs + 1)), [context] * num_seqs, block_tables=block_tables,
                                 kv_cache=kv_cache, num_decode_seqs=num_seqs)
        tables, _, context_lens = meta.decode_layout()

        fns = {
            "gathered": lambda: [attention._decode_gathered(q, None, None, *kv_cache[layer], meta)
                                 for layer in range(LAYERS)],
            "compiled": lambda: [compiled_decode_attention(q, *kv_cache[layer], tables, context_lens,
                                                           attention.scale, None) for layer in range(LAYERS)],
            "operator": lambda: [paged_attention.decode_attention(q, *kv_cache[layer], tables, context_lens)
                                 for layer in range(LAYERS)],
        }
        outputs = {name: fn() for name, fn in fns.items()}
        error = max((a.float() - b.float()).abs().max().item() for name in ("compiled", "operator")
                    for a, b in zip(outputs["gathered"], outputs[name]))
        ms = medians(fns, repeats)
        rows.append(f"| {num_seqs} | {context} | {ms['gathered']:.1f} | {ms['compiled']:.1f} | {ms['operator']:.2f} | "
                    f"{ms['compiled'] / ms['operator']:.2f}x | {error:.1e} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = machine_info()
    attention = PagedAttention(0, HEADS, KV_HEADS, HEAD_DIM)
    text = "\n".join([
        "# Attention on the CPU: SmolLM2-135M's shape, bf16", "",
        machine.markdown(), "",
        f"{HEADS} query heads, {KV_HEADS} KV heads, head_dim {HEAD_DIM}. Medians of {args.repeats} repetitions, "
        "each timed over at least 0.3 s; max |difference| of the outputs in the last column.", "",
        "## Prefill, one layer", "",
        "Causal prompts attending to themselves. operator: `slimserve::prefill_attention` "
        "(kernels/paged_attention.cpp), all prompts in one call, keys and values read from scattered cache "
        f"blocks of {BLOCK_SIZE}; torch path: `PagedAttention._attend` per prompt (fp32 matmul-softmax-matmul in "
        f"blocks of {QUERY_BLOCK} query rows, each against the keys it may see; the block masks made once and "
        "reused, as a step's layers share them), what runs where the operator does not build; SDPA: torch's "
        "`scaled_dot_product_attention` per prompt with the causal mask and `enable_gqa`. Speed-ups of the "
        "operator; max abs diff of the operator and SDPA against the torch path.", "",
        "| prompts x tokens | torch path ms | operator ms | SDPA ms | vs torch path | vs SDPA | max abs diff |",
        "|---|---|---|---|---|---|---|",
        *prefill_rows(attention, args.repeats), "",
        f"## Batched decode, the {LAYERS} layers of a step", "",
        f"One new token for each sequence, its context in scattered cache blocks of {BLOCK_SIZE} tokens, each "
        "layer's cache its own (keys and values come from memory, as in a real step). gathered: "
        "`PagedAttention._decode_gathered` (gathers the blocks, converts them to fp32, matmul-softmax-matmul), "
        "the torch path; compiled: `compiled_decode_attention`, what compiled engines ran before the operator "
        "and still run where it does not build (one compilation for all sizes); operator: "
        "`slimserve::decode_attention` (kernels/paged_attention.cpp), what the engine runs where it builds. "
        "Speed-up: compiled / operator; max abs diff of both against gathered.", "",
        "| sequences | context tokens | gathered ms | compiled ms | operator ms | operator speed-up | max abs diff |",
        "|---|---|---|---|---|---|---|",
        *decode_rows(attention, args.repeats), ""])
    out = Path(__file__).parent / "results" / "attention_cpu.md"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
