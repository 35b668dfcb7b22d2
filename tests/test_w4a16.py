"""W4A16: kernels/w4a16.cpp against the torch reference, the reference against its definition, and
QuantLinear's W4A16_CPU kernel eager, act-ordered and saved (test_qlinear: compiled graphs call it)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimserve.config import QuantConfig
from slimserve.eval.evaluate import module_bytes
from slimserve.kernels import w4a8, w4a16
from slimserve.quant.qlinear import Kernel, QuantLinear
from slimserve.quant.rtn import quantize_weight
from test_w4a8 import operands  # random nibbles, scales, zeros and bf16 activations with an outlier

needs_kernel = pytest.mark.skipif(not w4a16.available(),
                                  reason="no AVX512-BF16 CPU, no C++ compiler or torch before 2.13 here")


def test_reference_follows_the_definition():
    """x times scale * (q - zero) per group, written here in float64."""
    x, q, scales, zeros = operands(3, 32, 128, 32)
    weight = (q.double() - zeros.double().repeat_interleave(32, dim=1)) * scales.double().repeat_interleave(32, dim=1)
    torch.testing.assert_close(w4a16.w4a16_reference(x, q, scales, zeros).double(), x.double() @ weight.t(),
                               rtol=1e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 9, 33])  # passes of 4 rows, and their tails
@pytest.mark.parametrize("out_features,in_features,group_size", [
    (16, 8, 8), (48, 64, 32), (96, 576, 64), (32, 1536, 1536), (80, 256, 16)])
def test_matches_the_torch_reference(rows, out_features, in_features, group_size):
    """48 and 80 rows leave a block of 16 past the tasks of 2 blocks. The products are exact in fp32
    (128 + q and a bf16 activation); only the order of the fp32 sums differs, and the offset by 128
    costs a few more bits of them: within one bf16 step of the float result."""
    x, q, scales, zeros = operands(rows, out_features, in_features, group_size)
    got = w4a16.w4a16_linear(x, *w4a8.pack(q, scales, zeros))
    expected = w4a16.w4a16_reference(x, q, scales, zeros)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    torch.testing.assert_close(got.float(), expected, rtol=2**-7, atol=1e-4)


@needs_kernel
def test_refuses_bad_operands():
    x, q, scales, zeros = operands(2, 16, 64, 32)
    packed = w4a8.pack(q, scales, zeros)
    with pytest.raises(RuntimeError, match="activations have 32 columns, the weight 64"):
        w4a16.w4a16_linear(x[:, :32].contiguous(), *packed)
    with pytest.raises(RuntimeError, match="contiguous 2-D bf16"):
        w4a16.w4a16_linear(x.float(), *packed)
    with pytest.raises(RuntimeError, match="uint8 zeros shaped as the scales"):
        w4a16.w4a16_linear(x, packed[0], packed[1], packed[2][:, :1].contiguous())
    assert not w4a16.packable(8, 64, 2) and not w4a16.packable(16, 64, 16)  # 8 rows; groups of 4 columns


def layer_pair(group_size=32, sym=True, in_features=128, out_features=48, bits=4):
    """A layer of up to 4 bits on this CPU's kernel, and the same layer on the torch reference (fp32: REF)."""
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features).to(torch.bfloat16)
    config = QuantConfig(bits=bits, group_size=group_size, sym=sym)
    return QuantLinear.from_linear(linear, config), QuantLinear.from_linear(linear.float(), config)


@needs_kernel
@pytest.mark.parametrize("group_size,sym,bits", [
    (32, True, 4), (64, False, 4), (16, False, 4), (-1, False, 4), (0, True, 4), (32, False, 3), (64, True, 2)])
@pytest.mark.parametrize("rows", [1, 7, 256])  # the dot products; past 256 rows see the last test
def test_layers_match_the_reference_kernel(group_size, sym, bits, rows):
    """3- and 2-bit integers run in the 4-bit kernel, one a nibble."""
    layer, reference = layer_pair(group_size, sym, bits=bits)
    assert layer.kernel is Kernel.W4A16_CPU and reference.kernel is Kernel.REF
    assert all(torch.equal(a.float(), b.float()) for a, b in zip(layer.quantized()[:3], reference.quantized()[:3]))
    x = torch.randn(rows, 128).to(torch.bfloat16)
    torch.testing.assert_close(layer(x).float(), reference(x.float()), rtol=2**-7, atol=2e-3)


def act_ordered(bits: int, group_size: int) -> QuantLinear:
    """A bf16 256 -> 64 layer, asymmetric, its columns in groups by a random g_idx (GPTQ's act-order)."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 64, bias=False).to(torch.bfloat16)
    q, scales, zeros = quantize_weight(linear.weight.detach(), bits, group_size, sym=False)
    g_idx = torch.randperm(256, generator=torch.Generator().manual_seed(0)) // group_size
    return QuantLinear.from_linear(linear, QuantConfig(bits=bits, group_size=group_size, sym=False), q,
                                   scales.to(torch.bfloat16), zeros, g_idx)


@needs_kernel
def test_act_order_columns_are_regrouped():
    layer = act_ordered(4, 32)
    assert layer.kernel is Kernel.W4A16_CPU and layer.perm is not None
    x = torch.randn(5, 256).to(torch.bfloat16)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize()), rtol=2e-2, atol=2e-2)


@needs_kernel
@pytest.mark.parametrize("bits", [4, 3])
def test_save_and_load_give_identical_outputs(bits):
    """The state_dict packs the integers at the layer's width (3 bits: 48 bytes a row of 128)."""
    layer, _ = layer_pair(64, sym=False, bits=bits)
    state = layer.state_dict()
    assert state["qweight"].shape == (48, 128 * bits // 8)
    loaded = QuantLinear(128, 48, bits=bits, group_size=64, sym=False, bias=True, device="meta")
    loaded.load_state_dict(state)
    x = torch.randn(5, 128).to(torch.bfloat16)
    assert loaded.kernel is Kernel.W4A16_CPU and torch.equal(loaded(x), layer(x))


@needs_kernel
@pytest.mark.parametrize("bits", [4, 3])
def test_memory_is_the_packed_weight_and_its_groups(bits):
    """SmolLM2's down_proj in groups of 128: half a byte a weight (3-bit integers too, one a nibble),
    a bf16 scale and a uint8 zero a group."""
    layer = QuantLinear.from_linear(nn.Linear(1536, 576, bias=False).to(torch.bfloat16),
                                    QuantConfig(bits=bits, group_size=128, sym=False))
    assert layer.kernel is Kernel.W4A16_CPU
    assert module_bytes(layer) == 576 * 1536 // 2 + 576 * 12 * (2 + 1)


@needs_kernel
def test_past_256_rows_the_dequantized_weight_meets_torch_matmul():
    """More rows than GEMM_ROWS: the weight dequantized in C++ (scale * (q - zero), rounded to bf16
    as QuantLinear.dequantize rounds it) goes through torch's bf16 matmul; up to it, the dot products."""
    layer, _ = layer_pair(32, sym=False, in_features=576, out_features=96)
    weight = layer.dequantize()
    x = torch.randn(257, 576).to(torch.bfloat16)
    assert torch.equal(layer(x), x @ weight.t() + layer.bias)
    torch.testing.assert_close(layer(x[:256]), F.linear(x[:256], weight, layer.bias), rtol=2e-2, atol=2e-2)
