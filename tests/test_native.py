"""Building and loading the C++ CPU kernels (kernels/native.py), and the layers' fallback without them."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimserve.config import QuantConfig
from slimserve.kernels import native, w4a8, w8a8, w8a16
from slimserve.quant.qlinear import Kernel, QuantLinear


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache folder and no kernel loaded yet; loaded kernels are forgotten afterwards too."""
    monkeypatch.setenv("SLIMSERVE_CACHE", str(tmp_path))
    native.load.cache_clear(), native.load_operators.cache_clear()
    yield tmp_path
    native.load.cache_clear(), native.load_operators.cache_clear()


@pytest.mark.skipif(not (w8a16.available() and w8a8.available() and w4a8.available()),
                    reason="no AVX512-BF16/VNNI CPU, no compiler or torch before 2.13")
def test_kernels_build_into_an_empty_cache(fresh_cache):
    x = torch.randn(3, 64).to(torch.bfloat16)
    weight = torch.randint(-128, 128, (16, 64), dtype=torch.int8)
    scales = torch.rand(16).to(torch.bfloat16)
    torch.testing.assert_close(w8a16.w8a16_matmul(x, weight, scales).float(),
                               w8a16.w8a16_reference(x, weight, scales), rtol=2**-8, atol=1e-3)
    x_u8 = torch.randint(0, 256, (3, 64), dtype=torch.uint8)
    assert torch.equal(w8a8.w8a8_matmul(x_u8, *w8a8.pack(weight), scales.float()),
                       w8a8.w8a8_reference(x_u8, weight, scales.float()))
    # the operators build and load again (torch keeps the kernels it registered first)
    assert w8a16.available() and w8a8.available() and w4a8.available()
    built = sorted(path.name.split("-")[0] for path in (fresh_cache / "kernels").iterdir())
    assert built == ["w4a8", "w8a16", "w8a8"]  # and no partial file left behind


@pytest.mark.parametrize("bits,act_bits", [(8, None), (8, 8), (4, 8)])
def test_without_a_compiler_layers_keep_torchs_kernels(fresh_cache, monkeypatch, bits, act_bits):
    monkeypatch.setenv("CXX", str(fresh_cache / "no-such-compiler"))
    assert not w8a16.available() and not w8a8.available() and not w4a8.available()
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(64, 32).to(torch.bfloat16),
                                    QuantConfig(bits=bits, group_size=-1, act_bits=act_bits))
    if act_bits and bits == 8:
        assert layer.vnni is None and (layer.kernel is not Kernel.W8A8_CPU or layer.onednn is not None)
    if bits == 4:
        assert layer.kernel is Kernel.W4A8_REF
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    # W8A8 rounds the activations to 8 bits: the tolerance covers that, not a wrong kernel
    tolerance = dict(rtol=0.1, atol=0.1) if act_bits else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize(), layer.bias), **tolerance)
