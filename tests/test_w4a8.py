"""W4A8: kernels/w4a8.cpp against the torch reference, the reference against its definition, and
QuantLinear's W4A8 kernels eager and saved (test_qlinear: compiled graphs call the operator)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slimserve.config import QuantConfig
from slimserve.kernels import w4a8
from slimserve.quant.qlinear import Kernel, QuantLinear

needs_kernel = pytest.mark.skipif(not w4a8.available(),
                                  reason="no AVX512-VNNI CPU, no C++ compiler or torch before 2.13 here")


def operands(rows, out_features, in_features, group_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    groups = in_features // group_size
    q = torch.randint(0, 16, (out_features, in_features), generator=generator, dtype=torch.uint8)
    scales = (torch.rand(out_features, groups, generator=generator) / 32).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (out_features, groups), generator=generator, dtype=torch.uint8)
    x = torch.randn(rows, in_features, generator=generator)
    x[:, 5] *= 50  # an activation outlier: its group's scale is 50x the others'
    return x.to(torch.bfloat16), q, scales, zeros


@settings(max_examples=30, deadline=None)
@given(blocks=st.integers(1, 4), octets=st.integers(1, 8), groups=st.sampled_from([1, 2, 4]), seed=st.integers(0, 99))
def test_pack_round_trips(blocks, octets, groups, seed):
    out_features, in_features = 16 * blocks, 8 * octets * groups
    _, q, scales, zeros = operands(1, out_features, in_features, in_features // groups, seed)
    w, packed_scales, packed_zeros = w4a8.pack(q, scales, zeros)
    assert w.shape == (blocks, in_features // 8, 16, 4) and packed_scales.shape == (blocks, groups, 16)
    unpacked = w4a8.unpack(w, packed_scales, packed_zeros)
    assert all(torch.equal(a, b) for a, b in zip(unpacked, (q, scales, zeros)))
    # from the layout: block 0, octet 0, row 1: columns 0-3 in the low nibbles, 4-7 in the high ones
    assert (w[0, 0, 1] & 15).tolist() == q[1, :4].tolist() and (w[0, 0, 1] >> 4).tolist() == q[1, 4:8].tolist()


@pytest.mark.parametrize("rows", [1, 3])
def test_reference_follows_the_definition(rows):
    """Per row and group: int8 activations (scale max|x| / 127, half to even), exact integer dot
    products with q - zero, times both scales; written here in float64."""
    x, q, scales, zeros = operands(rows, 32, 128, 32)
    groups = x.double().reshape(rows, 4, 32)
    x_scales = groups.abs().amax(dim=2, keepdim=True) / 127
    x_q = torch.round(groups / x_scales).clamp(-127, 127)
    weight = (q.double() - zeros.double().repeat_interleave(32, dim=1)).reshape(32, 4, 32)
    dots = torch.einsum("rgk,ogk->rog", x_q, weight)
    expected = (dots * x_scales.transpose(1, 2) * scales.double()).sum(-1)
    torch.testing.assert_close(w4a8.w4a8_reference(x, q, scales, zeros).double(), expected, rtol=1e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 9, 33])  # passes of 4 rows, and their tails
@pytest.mark.parametrize("out_features,in_features,group_size", [
    (16, 32, 16), (48, 64, 32), (96, 576, 64), (32, 1536, 1536), (80, 256, 256)])
def test_matches_the_torch_reference(rows, out_features, in_features, group_size):
    """48 and 80 rows leave a block of 16 past the tasks of 2. The integer sums are exact either way;
    the fp32 sum over groups may round differently: at most one bf16 step apart."""
    x, q, scales, zeros = operands(rows, out_features, in_features, group_size)
    got = w4a8.w4a8_linear(x, *w4a8.pack(q, scales, zeros))
    expected = w4a8.w4a8_reference(x, q, scales, zeros)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    torch.testing.assert_close(got.float(), expected, rtol=2**-7, atol=1e-5)


@needs_kernel
def test_refuses_bad_operands():
    x, q, scales, zeros = operands(2, 16, 64, 32)
    packed = w4a8.pack(q, scales, zeros)
    with pytest.raises(RuntimeError, match="activations have 32 columns, the weight 64"):
        w4a8.w4a8_linear(x[:, :32].contiguous(), *packed)
    with pytest.raises(RuntimeError, match="contiguous 2-D bf16"):
        w4a8.w4a8_linear(x.float(), *packed)
    assert not w4a8.packable(8, 64, 2) and not w4a8.packable(16, 64, 8)  # 8 rows; groups of 8 columns


def layer_pair(group_size=32, sym=True, in_features=128, out_features=48):
    """A W4A8 layer on this CPU's kernel, and the same layer on the torch reference."""
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features).to(torch.bfloat16)
    config = QuantConfig(bits=4, group_size=group_size, sym=sym, act_bits=8)
    layer, reference = QuantLinear.from_linear(linear, config), QuantLinear.from_linear(linear.float(), config)
    return layer, reference


@needs_kernel
@pytest.mark.parametrize("group_size,sym", [(32, True), (64, False), (-1, False), (0, True)])
def test_layers_match_the_reference_kernel(group_size, sym):
    layer, reference = layer_pair(group_size, sym)
    assert layer.kernel is Kernel.W4A8_CPU and reference.kernel is Kernel.W4A8_REF  # fp32: the reference
    assert all(torch.equal(a.float(), b.float()) for a, b in zip(layer.quantized()[:3], reference.quantized()[:3]))
    x = torch.randn(2, 3, 128).to(torch.bfloat16)
    torch.testing.assert_close(layer(x).float(), reference(x.float()), rtol=2**-7, atol=1e-3)
    # 8-bit activations cost accuracy against the weight-only product of the same integers
    torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize(), layer.bias), rtol=0.1, atol=0.1)


@needs_kernel
def test_save_and_load_give_identical_outputs():
    layer, _ = layer_pair(64, sym=False)
    loaded = QuantLinear(128, 48, bits=4, group_size=64, sym=False, bias=True, act_bits=8, device="meta")
    loaded.load_state_dict(layer.state_dict())
    x = torch.randn(5, 128).to(torch.bfloat16)
    assert loaded.kernel is Kernel.W4A8_CPU and torch.equal(loaded(x), layer(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_layers_compute_what_cpu_layers_compute():
    """The same integers on CUDA (W4A8_REF) and on the CPU (the kernel where it builds): at most one
    bf16 step apart (the fp32 sums over groups may round differently); equal where both are REF."""
    layer, _ = layer_pair(32, sym=True, in_features=576, out_features=960)
    cuda = QuantLinear(576, 960, bits=4, group_size=32, sym=True, bias=True, act_bits=8, device="meta")
    cuda.load_state_dict({name: tensor.cuda() for name, tensor in layer.state_dict().items()})
    assert cuda.kernel is Kernel.W4A8_REF
    x = torch.randn(7, 576).to(torch.bfloat16)
    torch.testing.assert_close(cuda(x.cuda()).cpu(), layer(x), rtol=2**-7, atol=1e-3)
