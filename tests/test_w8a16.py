import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimserve.config import QuantConfig
from slimserve.kernels import w8a16
from slimserve.quant import qlinear
from slimserve.quant.qlinear import W8A16_MAX_ROWS, Kernel, QuantLinear

needs_kernel = pytest.mark.skipif(not w8a16.available(), reason="no AVX512-BF16 CPU or no C++ compiler here")


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
    with pytest.raises(ValueError, match="divisible by 32"):
        w8a16.w8a16_matmul(x, weight, scales)
    x, weight, scales = operands(2, 8, 64)
    assert w8a16.takes(weight, scales)
    assert not w8a16.takes(weight.t().contiguous().t(), scales)
    assert not w8a16.takes(weight, scales.float())
    with pytest.raises(ValueError, match="bf16 activations"):
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
