import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor import config
from torch._inductor.utils import run_and_get_code

from slimserve.config import QuantConfig
from slimserve.kernels import w8a16
from slimserve.quant import qlinear
from slimserve.quant.qlinear import W8A16_MAX_ROWS, Kernel, QuantLinear
from slimserve.quant.rtn import dequantize_weight
from test_w4a16 import act_ordered  # a layer with a random act-order g_idx

needs_kernel = pytest.mark.skipif(not w8a16.available(), reason="no AVX512 CPU or no C++ compiler here")


def operands(rows, out_features, in_features, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
    weight = torch.randint(-128, 128, (out_features, in_features), generator=generator, dtype=torch.int8)
    weight[0, :] = -128  # the extremes widen exactly too
    weight[-1, :] = 127
    scales = (torch.rand(out_features, generator=generator) / 64 + 1e-3).to(torch.bfloat16)
    return x, weight, scales


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 16, 17, 40])  # passes of 8 rows, and their tails
@pytest.mark.parametrize("out_features,in_features", [(1, 32), (5, 64), (192, 576), (37, 1536)])
def test_matches_the_torch_reference(rows, out_features, in_features):
    """Odd out_features leave weight rows outside the blocks of 2 and 4; in_features 32 is one step."""
    x, weight, scales = operands(rows, out_features, in_features)
    got = w8a16.w8a16_matmul(x, weight, scales)
    reference = w8a16.w8a16_reference(x, weight, scales)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    # fp32 sums in another order, then one rounding to bf16 (relative 2^-8)
    scale = reference.abs().amax(dim=1, keepdim=True)
    torch.testing.assert_close(got.float(), reference, rtol=2**-8, atol=float(scale.max()) * 1e-5)


@needs_kernel
def test_refuses_what_its_layout_cannot_take():
    x, weight, scales = operands(2, 8, 48)
    assert not w8a16.takes(weight, scales)
    with pytest.raises(RuntimeError, match="groups of a multiple of 32 columns, got 48 columns in 1 groups"):
        w8a16.w8a16_matmul(x, weight, scales)
    x, weight, scales = operands(2, 8, 64)
    assert w8a16.takes(weight, scales)
    assert not w8a16.takes(weight.t().contiguous().t(), scales)
    assert not w8a16.takes(weight, scales.float())
    with pytest.raises(RuntimeError, match="bf16 activations"):
        w8a16.w8a16_matmul(x.float(), weight, scales)


@needs_kernel
def test_int8_layers_run_it_up_to_its_row_limit(monkeypatch):
    calls = []
    monkeypatch.setattr(w8a16, "w8a16_matmul", lambda x, *args: calls.append(x.shape[0]) or
                        w8a16.w8a16_reference(x, *args).to(torch.bfloat16))
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(64, 24).to(torch.bfloat16), QuantConfig(bits=8, group_size=-1))
    assert layer.kernel is Kernel.INT8_CPU
    for rows in (1, W8A16_MAX_ROWS, W8A16_MAX_ROWS + 1):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize(), layer.bias), rtol=2e-2, atol=2e-2)
    assert calls == [1, W8A16_MAX_ROWS]  # above the limit: the dequantized bf16 GEMM
    assert qlinear.PACKED_CPU_MAX_ROWS[Kernel.INT8_CPU] < W8A16_MAX_ROWS


def grouped_operands(rows, out_features, in_features, num_groups, seed=0):
    """operands() with uint8 zero points and bf16 scales per row and group."""
    x, weight, _ = operands(rows, out_features, in_features, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    scales = (torch.rand(out_features, num_groups, generator=generator) / 64 + 1e-3).to(torch.bfloat16)
    zeros = torch.randint(0, 256, (out_features, num_groups), generator=generator, dtype=torch.uint8)
    zeros[0, 0], zeros[-1, -1] = 0, 255  # q - zero spans -383..383
    return x, weight, scales, zeros


def test_grouped_reference_follows_the_definition():
    """x times scale * (q - zero) per group, the weight rounded to bf16, written here in float64."""
    x, weight, scales, zeros = grouped_operands(3, 8, 64, 2)
    q = weight.double() + 128
    dequantized = (q - zeros.double().repeat_interleave(32, dim=1)) * scales.double().repeat_interleave(32, dim=1)
    expected = x.double() @ dequantized.to(torch.bfloat16).double().t()
    torch.testing.assert_close(w8a16.w8a16_reference(x, weight, scales, zeros).double(), expected,
                               rtol=1e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 9, 17, 49])
@pytest.mark.parametrize("out_features,in_features,num_groups", [(1, 32, 1), (5, 64, 2), (37, 1536, 12), (48, 576, 9)])
def test_grouped_matches_the_torch_reference(rows, out_features, in_features, num_groups):
    """Each weight is dequantized exactly in fp32 and rounded to bf16 once, as the reference's, in the dot
    products and (past 48 rows) for torch's GEMM; only the order of the fp32 sums differs."""
    x, weight, scales, zeros = grouped_operands(rows, out_features, in_features, num_groups)
    got = w8a16.w8a16_matmul(x, weight, scales, zeros)
    reference = w8a16.w8a16_reference(x, weight, scales, zeros)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    scale = reference.abs().amax(dim=1, keepdim=True)
    torch.testing.assert_close(got.float(), reference, rtol=2**-8, atol=float(scale.max()) * 1e-5)


@needs_kernel
def test_grouped_refuses_what_its_layout_cannot_take():
    """RuntimeErrors naming the operand (QuantLinear runs groups of 16 columns on REF instead)."""
    x, weight, scales, zeros = grouped_operands(2, 8, 64, 4)  # groups of 16 columns
    with pytest.raises(RuntimeError, match="groups of a multiple of 32 columns, got 64 columns in 4 groups"):
        w8a16.w8a16_matmul(x, weight, scales, zeros)
    x, weight, scales, zeros = grouped_operands(2, 8, 64, 2)
    for bad in (zeros[:, :1].contiguous(), zeros.to(torch.int8)):
        with pytest.raises(RuntimeError, match="uint8 zeros shaped as the scales"):
            w8a16.w8a16_matmul(x, weight, scales, bad)


GEMM_ROWS = 48  # w8a16.cpp's switch to the dequantized weight's GEMM
# (group_size, sym): asymmetric per channel, per tensor and in groups; symmetric groups (llama.cpp's Q8_0 layout)
GROUPED_SCHEMES = [(-1, False), (0, False), (64, False), (32, True)]


def grouped_pair(group_size, sym, in_features=128, out_features=48):
    """An 8-bit layer on INT8_GROUPED_CPU and the same integers on REF (fp32 scales: REF takes them)."""
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features).to(torch.bfloat16)
    layer = QuantLinear.from_linear(linear, QuantConfig(bits=8, group_size=group_size, sym=sym))
    q, scales, zeros, _ = layer.quantized()
    reference = QuantLinear(in_features, out_features, 8, group_size, sym, bias=True, device="meta")
    reference.set_quantized(q, scales.float(), zeros, None, linear.bias.detach().float())
    return layer, reference


@needs_kernel
@pytest.mark.parametrize("group_size,sym", GROUPED_SCHEMES)
@pytest.mark.parametrize("rows", [1, 7, GEMM_ROWS, GEMM_ROWS + 1])
def test_grouped_layers_match_the_reference_kernel(group_size, sym, rows):
    """Up to GEMM_ROWS the dot products; past it the weight dequantized in C++ as REF dequantizes it,
    for torch's bf16 matmul."""
    layer, reference = grouped_pair(group_size, sym)
    assert layer.kernel is Kernel.INT8_GROUPED_CPU and reference.kernel is Kernel.REF
    x = torch.randn(rows, 128).to(torch.bfloat16)
    expected = x @ dequantize_weight(*layer.quantized()[:3]).to(torch.bfloat16).t() + layer.bias
    if rows > GEMM_ROWS:
        assert torch.equal(layer(x), expected)
    torch.testing.assert_close(layer(x), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(layer(x).float(), reference(x.float()), rtol=2e-2, atol=2e-2)


@needs_kernel
def test_grouped_layers_keep_act_order_and_round_trip_their_state():
    layer = act_ordered(8, 64)
    assert layer.kernel is Kernel.INT8_GROUPED_CPU and layer.perm is not None
    x = torch.randn(5, 256).to(torch.bfloat16)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize()), rtol=2e-2, atol=2e-2)
    loaded = QuantLinear(256, 64, bits=8, group_size=64, sym=False, device="meta")
    loaded.load_state_dict(layer.state_dict())
    assert loaded.kernel is Kernel.INT8_GROUPED_CPU and torch.equal(loaded(x), layer(x))


@needs_kernel
def test_grouped_layers_in_compiled_graphs():
    """The graph's C++ wrapper calls the operator at any row count, with the eager result."""
    layer, _ = grouped_pair(64, sym=False)
    with torch.no_grad(), config.patch(cpp_wrapper=True):
        for rows in (1, 5, GEMM_ROWS + 1):
            x = torch.randn(rows, 128).to(torch.bfloat16)
            out, (code, *_) = run_and_get_code(torch.compile(layer, fullgraph=True, dynamic=False), x)
            assert torch.equal(out, layer(x))
            assert "slimserve::w8a16_matmul" in code and "slimserve::linear" not in code
