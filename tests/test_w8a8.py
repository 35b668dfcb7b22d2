import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimserve.config import QuantConfig
from slimserve.kernels import w8a8
from slimserve.quant.qlinear import Kernel, QuantLinear

needs_kernel = pytest.mark.skipif(not w8a8.available(), reason="no AVX512-VNNI CPU or no C++ compiler here")


def operands(rows, out_features, in_features, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x_u8 = torch.randint(0, 256, (rows, in_features), generator=generator, dtype=torch.uint8)
    weight = torch.randint(-128, 128, (out_features, in_features), generator=generator, dtype=torch.int8)
    x_u8[0], weight[0] = 255, -128  # the largest products, summed over every column
    scales = torch.rand(out_features, generator=generator) / 64
    return x_u8, weight, scales


def test_pack_round_trips():
    weight = torch.randint(-128, 128, (48, 36), dtype=torch.int8)
    vnni, sums = w8a8.pack(weight)
    assert vnni.shape == (3, 9, 16, 4) and torch.equal(w8a8.unpack(vnni), weight)
    assert vnni[1, 2, 5].tolist() == weight[16 + 5, 8:12].tolist()  # block 1, columns 8-11 of its row 5
    assert torch.equal(sums, 128 * weight.long().sum(dim=1).int())


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 17, 64])  # passes of 8 rows, and their tails
@pytest.mark.parametrize("out_features,in_features", [(16, 4), (32, 64), (80, 576), (48, 1536), (112, 100)])
def test_matches_the_torch_reference_exactly(rows, out_features, in_features):
    """16, 32, 80 and 112 rows leave 1, 2, 2 and 1 blocks of 16 past the tasks of 3; sums are integers."""
    x_u8, weight, scales = operands(rows, out_features, in_features)
    got = w8a8.w8a8_matmul(x_u8, *w8a8.pack(weight), scales)
    assert torch.equal(got, w8a8.w8a8_reference(x_u8, weight, scales))


@needs_kernel
def test_refuses_bad_operands():
    x_u8, weight, scales = operands(2, 16, 64)
    vnni, sums = w8a8.pack(weight)
    with pytest.raises(RuntimeError, match="the activations have 32 columns, the weight 64"):
        w8a8.w8a8_matmul(x_u8[:, :32].contiguous(), vnni, sums, scales)
    with pytest.raises(RuntimeError, match="w8a8_matmul needs contiguous 2-D uint8 activations"):
        w8a8.w8a8_matmul(x_u8.t().contiguous().t(), vnni, sums, scales)
    with pytest.raises(RuntimeError, match="w8a8_linear needs contiguous 2-D bf16 activations"):
        w8a8.w8a8_linear(x_u8.float(), vnni, sums, scales)
    with pytest.raises(RuntimeError, match="needs w8a8.pack's weight"):
        w8a8.w8a8_matmul(x_u8, weight, sums, scales)
    with pytest.raises(RuntimeError, match=r"needs pack's int32 row sums \(N,\)"):
        w8a8.w8a8_matmul(x_u8, vnni, sums[:8], scales)
    with pytest.raises(RuntimeError, match=r"needs fp32 weight scales \(N,\)"):
        w8a8.w8a8_matmul(x_u8, vnni, sums, scales.bfloat16())
    assert not w8a8.packable(weight[:8])  # 8 output rows: not a block of 16


@needs_kernel
@pytest.mark.parametrize("out_features", [48, 40])
def test_w8a8_layers_hold_their_weight_packed_once(out_features):
    """40 rows cannot be packed in blocks of 16: that layer keeps oneDNN's prepacked weight, and for
    a compiled engine's one-row graph, its plain integers too; a packed layer never holds them."""
    torch.manual_seed(0)
    linear = nn.Linear(64, out_features).to(torch.bfloat16)
    layer = QuantLinear.from_linear(linear, QuantConfig(bits=8, group_size=-1, act_bits=8))
    assert layer.kernel is Kernel.W8A8_CPU and layer.qweight is None
    assert (layer.vnni is not None) == (out_features % 16 == 0) and (layer.onednn is None) == (out_features % 16 == 0)
    reference = QuantLinear.from_linear(linear, QuantConfig(bits=8, group_size=-1, act_bits=8))
    reference.kernel, reference.qweight = Kernel.W8A8_REF, layer._signed_weight()
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    # the same integers; the kernel scales the sums by the weight scale first, the reference by the
    # activation's: an fp32 rounding apart at most, before bf16
    torch.testing.assert_close(layer(x), reference(x), rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize(), layer.bias), rtol=0.1, atol=0.1)
    layer.keep_plain_weight()
    assert (layer.qweight is None) == (out_features % 16 == 0)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 9])
@pytest.mark.parametrize("in_features", [64, 36])  # 36: the last 16 columns are a partial vector
def test_linear_quantizes_and_scales_as_the_torch_path(rows, in_features):
    """w8a8_linear equals the torch W8A8 path (quantize in torch, then w8a8_matmul) bit for bit."""
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(in_features, 48, bias=False).to(torch.bfloat16),
                                    QuantConfig(bits=8, group_size=-1, act_bits=8))
    x = torch.randn(rows, in_features).to(torch.bfloat16)
    x[0, 3] = 0.5 * x[0].float().abs().max()  # ties: x / scale on .5 for round half to even
    x_scales = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    x_u8 = (torch.round(x.float() / x_scales).clamp(-127, 127) + 128).to(torch.uint8)
    expected = (w8a8.w8a8_matmul(x_u8, *layer.vnni) * x_scales).to(torch.bfloat16)
    assert torch.equal(w8a8.w8a8_linear(x, *layer.vnni), expected)
    assert torch.equal(layer(x), expected)  # eager layers take it
    assert torch.equal(w8a8.w8a8_linear(torch.zeros_like(x), *layer.vnni), torch.zeros(rows, 48, dtype=torch.bfloat16))
