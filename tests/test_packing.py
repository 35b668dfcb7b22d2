import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimserve.quant.packing import (
    int4_cpu_layout_known,
    pack_bits,
    pack_int4_cpu,
    unpack_bits,
    unpack_int4_cpu,
)

CHUNK = {  # bits -> values per run of whole words, for int32 and uint8 words
    torch.int32: {1: 32, 2: 16, 3: 32, 4: 8, 5: 32, 6: 16, 7: 32, 8: 4},
    torch.uint8: {1: 8, 2: 4, 3: 8, 4: 2, 5: 8, 6: 4, 7: 8, 8: 1},
}


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 8),
    dtype=st.sampled_from([torch.int32, torch.uint8]),
    rows=st.integers(1, 5),
    num_chunks=st.integers(1, 4),
    dim=st.sampled_from([0, 1, -1]),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(bits, dtype, rows, num_chunks, dim, seed):
    n = CHUNK[dtype][bits] * num_chunks
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 2**bits, (rows, n), generator=generator, dtype=torch.uint8)
    if dim == 0:
        values = values.t().contiguous()  # pack along the first dimension instead
    packed = pack_bits(values, bits, dim=dim, dtype=dtype)
    word_bits = 32 if dtype == torch.int32 else 8
    assert packed.dtype == dtype and packed.shape[dim] == n * bits // word_bits
    assert torch.equal(unpack_bits(packed, bits, dim=dim), values)


def gptq_reference_pack(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's published packing loop for qweight, over rows of intweight (in, out)."""
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    w = intweight.astype(np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= w[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 32 values in 3 words, values 10 and 21 split across words
            for j in range(i, i + 10):
                qweight[row] |= w[j] << (3 * (j - i))
            i += 10
            qweight[row] |= w[i] << 30
            row += 1
            qweight[row] |= (w[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= w[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= w[i] << 31
            row += 1
            qweight[row] |= (w[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= w[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.view(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_gptq_qweight_layout(bits):
    q = torch.randint(0, 2**bits, (24, 128), generator=torch.Generator().manual_seed(bits))
    ours = pack_bits(q.t(), bits, dim=0)  # (in * bits / 32, out)
    reference = gptq_reference_pack(q.t().numpy(), bits)
    assert ours.shape == reference.shape
    assert np.array_equal(ours.numpy(), reference)


def test_qzeros_pack_along_output_dim():
    zeros = torch.randint(0, 16, (4, 64), generator=torch.Generator().manual_seed(0))  # (groups, out)
    qzeros = pack_bits(zeros, 4, dim=1)
    assert qzeros.shape == (4, 8)
    expected = sum(int(zeros[2, 8 + k]) << (4 * k) for k in range(8))
    assert int(qzeros[2, 1]) & 0xFFFFFFFF == expected


def test_two_int4_per_byte_low_nibble_first():
    values = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_bits(values, 4, dtype=torch.uint8).tolist() == [[0x21, 0x0F]]


def test_values_out_of_range_rejected():
    with pytest.raises(ValueError, match=r"values must lie in \[0, 16\), got \[0, 16\]"):
        pack_bits(torch.tensor([[0, 16, 1, 2, 3, 4, 5, 6]]), 4)


def test_partial_words_rejected():
    with pytest.raises(ValueError, match="12 values of 3 bits do not fill whole 32-bit words"):
        pack_bits(torch.zeros(2, 12, dtype=torch.uint8), 3)


def test_other_word_dtypes_rejected():
    with pytest.raises(ValueError, match="word dtype must be torch.int32 or torch.uint8"):
        pack_bits(torch.zeros(2, 8, dtype=torch.uint8), 4, dtype=torch.int16)


@pytest.mark.skipif(not int4_cpu_layout_known(), reason="int4 CPU layout known only on AVX2/AVX512")
@pytest.mark.parametrize("out_features", [16, 48, 64, 80, 112, 1536])
def test_int4_cpu_layout_round_trip(out_features):
    q = torch.randint(0, 16, (out_features, 96), generator=torch.Generator().manual_seed(out_features))
    packed = pack_int4_cpu(q)
    assert packed.shape == (out_features, 48) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4_cpu(packed, out_features, 96), q.to(torch.uint8))


def test_int4_cpu_layout_round_trip_on_avx2_build():
    # AVX2 machines pack 32-row blocks, not AVX512's 64; torch picks its kernels from this variable.
    code = (
        "import torch\n"
        "from slimserve.quant.packing import int4_cpu_layout_known, pack_int4_cpu, unpack_int4_cpu\n"
        "if torch.backends.cpu.get_cpu_capability() != 'AVX2': raise SystemExit('not avx2')\n"
        "assert int4_cpu_layout_known()\n"
        "for n in (16, 32, 48, 80, 96):\n"
        "    q = torch.randint(0, 16, (n, 64), dtype=torch.uint8)\n"
        "    assert torch.equal(unpack_int4_cpu(pack_int4_cpu(q), n, 64), q)\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if "not avx2" in result.stderr:
        pytest.skip("this CPU cannot run torch's AVX2 kernels")
    assert result.returncode == 0, result.stderr
