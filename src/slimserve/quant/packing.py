"""Pack low-bit unsigned integers into int32 or uint8 words, and back.

Values are laid out as one little-endian bit stream: value j of a row occupies bits
[j * bits, (j + 1) * bits) of the stream, word w holds stream bits [32 w, 32 w + 32). For 2, 4
and 8 bits this is GPTQ's "value i << (bits * i)" packing; for 3 bits it is GPTQ's layout too
(32 values in 3 int32 words, values 10 and 21 straddling two words). With uint8 words and 4 bits
it is two values per byte, low nibble first.

GPTQ v1 checkpoints use, for a weight (out, in) with integers q (out, in):
    qweight = pack_bits(q.T, bits, dim=0)            # (in * bits / 32, out) int32
    qzeros = pack_bits(zeros, bits, dim=1)           # (num_groups, out * bits / 32) int32
(GPTQ v1 stores zeros - 1 in qzeros; AWQ GEMM packs along `out` after interleaving each 8
values as [0, 2, 4, 6, 1, 3, 5, 7]. Those conventions belong to the checkpoint format.)
"""

import math
from functools import cache

import torch
from torch import Tensor

WORD_BITS = {torch.int32: 32, torch.uint8: 8}


def _chunk(bits: int, word_bits: int) -> tuple[int, int]:
    """Smallest run of whole values that fills whole words: (num_values, num_words)."""
    common = math.gcd(bits, word_bits)
    return word_bits // common, bits // common


def _check(bits: int, dtype: torch.dtype) -> int:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be between 1 and 8, got {bits}")
    if dtype not in WORD_BITS:
        raise ValueError(f"word dtype must be torch.int32 or torch.uint8, got {dtype}")
    return WORD_BITS[dtype]


def pack_bits(values: Tensor, bits: int, dim: int = -1, dtype: torch.dtype = torch.int32) -> Tensor:
    """Pack integers in [0, 2^bits) along `dim` into words of `dtype`.

    The size of `dim` shrinks from n to n * bits / word_bits; n must fill whole words.
    """
    word_bits = _check(bits, dtype)
    v = values.movedim(dim, -1)
    n = v.shape[-1]
    num_values, num_words = _chunk(bits, word_bits)
    if n % num_values != 0:
        raise ValueError(
            f"{n} values of {bits} bits do not fill whole {word_bits}-bit words "
            f"(need a multiple of {num_values})"
        )
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise ValueError(f"values must lie in [0, {2**bits}), got [{int(v.min())}, {int(v.max())}]")
    v = v.reshape(*v.shape[:-1], n // num_values, num_values)
    # Shifts run in a dtype holding a whole word unsigned, so they never touch a sign bit: uint8
    # for uint8 words (a byte's shifts wrap as the mask would), int64 for int32 ones. All in int64,
    # packing SmolLM2's 49152 x 576 head 8 bits a byte took 0.8 GB of temporaries.
    work = torch.uint8 if dtype == torch.uint8 else torch.int64
    words = torch.zeros(*v.shape[:-1], num_words, dtype=work, device=values.device)
    mask = 2**word_bits - 1
    for j in range(num_values):
        value = v[..., j].to(work)
        word, shift = divmod(j * bits, word_bits)
        words[..., word] |= (value << shift) & mask
        if shift + bits > word_bits:
            words[..., word + 1] |= value >> (word_bits - shift)
    words = words.reshape(*words.shape[:-2], -1)
    if dtype == torch.int32:
        words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(dtype).movedim(-1, dim)


def unpack_bits(packed: Tensor, bits: int, dim: int = -1) -> Tensor:
    """Inverse of pack_bits: words (int32 or uint8) -> uint8 values, `dim` grows by word_bits / bits."""
    word_bits = _check(bits, packed.dtype)
    num_values, num_words = _chunk(bits, word_bits)
    if num_words == 1:  # no value straddles two words: shift in the word's own dtype
        w = packed.movedim(dim, -1)
        # int32 shifts are arithmetic; the mask drops the copied sign bits
        values = [(w >> (bits * j)) & (2**bits - 1) for j in range(num_values)]
        values = torch.stack(values, dim=-1).to(torch.uint8)
        return values.reshape(*w.shape[:-1], -1).movedim(-1, dim)
    w = packed.movedim(dim, -1).long() & (2**word_bits - 1)
    length = w.shape[-1]
    if length % num_words != 0:
        raise ValueError(f"{length} words of {word_bits} bits do not hold whole {bits}-bit chunks")
    w = w.reshape(*w.shape[:-1], length // num_words, num_words)
    values = torch.empty(*w.shape[:-1], num_values, dtype=torch.uint8, device=packed.device)
    for j in range(num_values):
        word, shift = divmod(j * bits, word_bits)
        value = w[..., word] >> shift
        if shift + bits > word_bits:
            value = value | (w[..., word + 1] << (word_bits - shift))
        values[..., j] = value & (2**bits - 1)
    return values.reshape(*values.shape[:-2], -1).movedim(-1, dim)


# torch's int4 CPU kernel reads its own layout, produced by _convert_weight_to_int4pack_for_cpu:
# per block of BLOCK_N output rows (64 on AVX512, 32 on AVX2), for each input column k, BLOCK_N / 2
# bytes whose low nibbles hold the block's first BLOCK_N / 2 rows and high nibbles the rest (AVX512
# bytes d < 16 hold rows d and d + 32, bytes 16 + d rows d + 16 and d + 48; AVX2 byte d rows d and
# d + 16); a last, shorter block holds rows 2j and 2j + 1 in byte j.
INT4_CPU_BLOCK_N = {"AVX512": 64, "AVX2": 32}


@cache
def int4_cpu_layout_known() -> bool:
    """Whether this CPU's int4 layout is one unpack_int4_cpu reads. The layout is private to torch and
    differs per ISA, so a probe with whole blocks and a shorter last one is packed and decoded back,
    once per process (decoding every layer as it was packed took 0.7 s of the 4.7 s that
    Qwen2.5-Coder-0.5B's 3-bit folder took to load)."""
    if torch.backends.cpu.get_cpu_capability() not in INT4_CPU_BLOCK_N:
        return False
    probe = torch.randint(0, 16, (144, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert torch.equal(unpack_int4_cpu(pack_int4_cpu(probe), *probe.shape), probe), "int4 CPU layout changed"
    return True


def pack_int4_cpu(q: Tensor) -> Tensor:
    """q (out, in) in [0, 16), out % 16 == 0 -> (out, in / 2) uint8 in the CPU kernel's layout, which
    int4_cpu_layout_known() checks."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


def unpack_int4_cpu(packed: Tensor, out_features: int, in_features: int) -> Tensor:
    """Inverse of pack_int4_cpu: (out, in / 2) uint8 -> q (out, in) uint8.

    q is the transpose of a contiguous (in, out) tensor: the layout stores each input column's
    values of a block side by side, so this order costs no transposing copy (and dequantizing
    it for a matmul broadcasts group scales along rows, which vectorizes).
    """
    block_n = INT4_CPU_BLOCK_N[torch.backends.cpu.get_cpu_capability()]
    flat = packed.reshape(-1)
    num_full = out_features // block_n
    full = flat[: num_full * block_n * in_features // 2].reshape(num_full, in_features, block_n // 2)
    q_t = torch.cat([full & 15, full >> 4], dim=-1).transpose(0, 1).reshape(in_features, -1)
    tail_rows = out_features - num_full * block_n
    if tail_rows:
        tail = flat[num_full * block_n * in_features // 2 :].reshape(in_features, tail_rows // 2)
        tail_q_t = torch.stack([tail & 15, tail >> 4], dim=-1).reshape(in_features, tail_rows)
        q_t = torch.cat([q_t, tail_q_t], dim=1)
    return q_t.t()
