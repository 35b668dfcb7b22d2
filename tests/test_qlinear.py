import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor.utils import run_and_get_code

from slimserve.config import QuantConfig
from slimserve.eval.evaluate import module_bytes
from slimserve.kernels import w4a8, w4a16, w8a8, w8a16
from slimserve.kernels.gemv import gemv
from slimserve.models import opaque
from slimserve.quant import qlinear
from slimserve.quant.packing import int4_cpu_layout_known, pack_bits
from slimserve.quant.qlinear import PACKED_CPU_MAX_ROWS, Kernel, QuantLinear, quantize_model
from slimserve.quant.rtn import dequantize_weight, quantize_weight

# Kernel vs dequantize-then-F.linear: both read the same stored integers and scales, so they
# differ only in summation order and, for int4, in the rounding of the float zero to dtype.
TOLERANCES = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
INT4_CPU = Kernel.INT4_CPU if int4_cpu_layout_known() else Kernel.REF
INT8_GROUPED_CPU = Kernel.INT8_GROUPED_CPU if w8a16.available() else Kernel.REF


@pytest.fixture
def torch_int4(monkeypatch):
    """4-bit layers take torch's int4 kernel (INT4_CPU), as where kernels/w4a16.cpp cannot be built;
    tests/test_w4a16.py tests the layers that take it."""
    monkeypatch.setattr(qlinear.w4a16, "packable", lambda *args: False)


# (bits, group_size, sym, act_bits) -> the kernel the CPU must pick for bf16 activations without
# w4a16.cpp (torch_int4); the packed int8/int4 kernels are scalar for fp32, so fp32 layers take REF
# (W8A8 is dtype-agnostic).
SCHEMES = {
    (8, -1, True, None): Kernel.INT8_CPU,
    (8, 0, True, None): Kernel.INT8_CPU,
    (4, 128, False, None): INT4_CPU,
    (4, 32, True, None): INT4_CPU,
    (4, -1, False, None): INT4_CPU,  # one group per row, as repeated 64-column groups
    (4, 16, False, None): Kernel.REF,  # the kernel's smallest group is 32
    (3, 64, False, None): INT4_CPU,  # one integer a nibble
    (2, 32, True, None): INT4_CPU,
    (3, 16, False, None): Kernel.REF,
    (8, 64, False, None): INT8_GROUPED_CPU,
    (8, 16, False, None): Kernel.REF,  # the kernel's groups are multiples of 32 columns
    (8, -1, True, 8): Kernel.W8A8_CPU,
}


def linear(in_features=768, out_features=192, bias=True, dtype=torch.float32, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def inputs(shape, dtype, seed=1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s[3] is None])
def test_kernel_matches_dequantize_then_linear(scheme, dtype, batch, torch_int4):
    bits, group_size, sym, _ = scheme
    layer = linear(dtype=dtype)
    module = QuantLinear.from_linear(layer, QuantConfig(bits=bits, group_size=group_size, sym=sym))
    assert module.kernel is (SCHEMES[scheme] if dtype == torch.bfloat16 else Kernel.REF)
    x = inputs((batch, 768), dtype)
    reference = F.linear(x, module.dequantize(), layer.bias)
    torch.testing.assert_close(module(x), reference, **TOLERANCES[dtype])


def test_int4_per_channel_on_576_columns_uses_64_column_kernel_groups(torch_int4):
    layer = linear(in_features=576, dtype=torch.bfloat16)  # SmolLM2's hidden size: 9 x 64
    module = QuantLinear.from_linear(layer, QuantConfig(bits=4, group_size=-1, sym=False))
    assert module.kernel is INT4_CPU and module.scales_and_zeros.shape == (9, 192, 2)
    x = inputs((3, 576), torch.bfloat16)
    reference = F.linear(x, module.dequantize(), layer.bias)
    torch.testing.assert_close(module(x), reference, **TOLERANCES[torch.bfloat16])


def test_compiled_one_row_int8_matches_packed_kernel(monkeypatch):
    """Under torch.compile one row of an INT8_CPU layer runs kernels.gemv on the same int8 weight."""
    traced = []
    monkeypatch.setattr(qlinear, "gemv", lambda *args: traced.append(args) or gemv(*args))
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(128, 48).to(torch.bfloat16), QuantConfig(bits=8, group_size=-1))
    assert layer.kernel is Kernel.INT8_CPU
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True, dynamic=False)(x)
    torch.testing.assert_close(compiled, eager, atol=2e-2, rtol=1e-2)
    assert len(traced) == 1


@pytest.mark.parametrize("scheme", [(8, -1, True, None), (4, 32, True, None), (8, -1, True, 8)])
def test_compiled_rows_match_eager(scheme):
    """In a compiled graph of several rows, the packed int8/int4 kernels run as opaque calls of the
    layer itself (models/opaque.py); W8A8 calls w8a8.cpp's operator, or where that does not build, is
    traced but for oneDNN's prepacked integer product."""
    bits, group_size, sym, act_bits = scheme
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(128, 48).to(torch.bfloat16),
                                    QuantConfig(bits=bits, group_size=group_size, sym=sym, act_bits=act_bits))
    opaque.register(layer)
    calls = []
    layer.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    products = []
    if layer.kernel is Kernel.W8A8_CPU:
        int8_matmul = layer.int8_matmul
        layer.int8_matmul = lambda x_u8: products.append(x_u8.shape[0]) or int8_matmul(x_u8)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for rows in (5, 33):  # the second reuses the graph compiled for the first
            x = torch.randn(rows, 128, dtype=torch.bfloat16)
            calls.clear(), products.clear()
            out = compiled(x)
            assert products == ([rows] if layer.kernel is Kernel.W8A8_CPU and layer.vnni is None else [])
            # opaque or an operator: the same kernel; traced W8A8 may round an activation to the other integer
            exact = layer.kernel in qlinear.OPAQUE_KERNELS or layer.vnni is not None
            torch.testing.assert_close(out, layer(x), **(dict(atol=0, rtol=0) if exact else TOLERANCES[torch.bfloat16]))
    # the hook runs once for the compiled call, once more inside it where the layer runs as itself
    assert len(calls) == (3 if layer.kernel in qlinear.OPAQUE_KERNELS else 2)



@pytest.mark.parametrize("cpp_wrapper", [False, True])
@pytest.mark.parametrize("bits,group_size,act_bits,kernel,operator", [
    (4, 32, 8, Kernel.W4A8_CPU, w4a8), (4, 32, None, Kernel.W4A16_CPU, w4a16), (8, -1, 8, Kernel.W8A8_CPU, w8a8)])
def test_operators_are_called_from_compiled_graphs(bits, group_size, act_bits, kernel, operator, cpp_wrapper):
    """kernels/w4a8.cpp's, w4a16.cpp's and w8a8.cpp's operators are traced into compiled graphs (a
    dynamic row count reuses one graph); with a C++ wrapper, the graph calls them through the
    dispatcher without Python."""
    if not operator.available():
        pytest.skip(f"{operator.__name__} does not build here")
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(128, 48).to(torch.bfloat16),
                                    QuantConfig(bits=bits, group_size=group_size, act_bits=act_bits))
    assert layer.kernel is kernel
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, options={"cpp_wrapper": cpp_wrapper})
    with torch.no_grad():
        x = torch.randn(6, 128).to(torch.bfloat16)
        out, code = run_and_get_code(compiled, x)
        assert torch.equal(out, layer(x))
        for rows in (9, 1):  # one row: as a compiled engine's decode graph for one sequence runs it
            x = torch.randn(rows, 128).to(torch.bfloat16)
            assert torch.equal(compiled(x), layer(x))
    name = operator.__name__.rsplit(".", 1)[1] + "_linear"
    assert name in "".join(code)
    if cpp_wrapper:
        assert f'aoti_torch_call_dispatcher("slimserve::{name}"' in "".join(code)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits, sym", [(4, False), (3, False), (3, True), (2, True)])
def test_dequantized_weight_is_rtn_result(bits, sym, dtype, torch_int4):
    """Whatever the kernel's storage (INT4_CPU raises 3- and 2-bit integers), quantized() gives RTN's."""
    layer = linear(dtype=dtype)
    module = QuantLinear.from_linear(layer, QuantConfig(bits=bits, group_size=64, sym=sym))
    assert module.kernel is (INT4_CPU if dtype == torch.bfloat16 else Kernel.REF)
    q, scales, zeros = quantize_weight(layer.weight.detach(), bits, 64, sym=sym)
    assert [torch.equal(a, b) for a, b in zip(module.quantized()[:3], (q, scales.to(dtype), zeros))] == [True] * 3
    reference = dequantize_weight(q, scales.to(dtype), zeros).to(dtype)
    torch.testing.assert_close(module.dequantize(), reference, rtol=0, atol=0)


def test_keeps_leading_dimensions():
    module = QuantLinear.from_linear(linear(), QuantConfig(bits=4, group_size=64))
    x = inputs((2, 5, 768), torch.float32)
    assert module(x).shape == (2, 5, 192)
    torch.testing.assert_close(module(x)[1], module(x[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 5, 33])
def test_w8a8_matches_per_token_int8_reference(dtype, batch):
    layer = linear(dtype=dtype)
    module = QuantLinear.from_linear(layer, QuantConfig(bits=8, group_size=-1, sym=True, act_bits=8))
    assert module.kernel is Kernel.W8A8_CPU
    x = inputs((batch, 768), dtype)
    # written from the definition: symmetric per-token int8, exact integer sums, both scales
    x64 = x.double()
    x_scales = x64.abs().amax(dim=1, keepdim=True) / 127
    x_q = torch.round(x64 / x_scales).clamp(-127, 127)
    q, scales, zeros, _ = module.quantized()
    w_q = q.double() - zeros.double()
    expected = (x_q @ w_q.t()) * x_scales * scales.double().t() + layer.bias.double()
    torch.testing.assert_close(module(x).double(), expected, **TOLERANCES[dtype])
    # and it is still the layer: within int8 noise of the float output
    torch.testing.assert_close(module(x).float(), layer(x).float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    "bits, group_size, sym, out_features",
    # 80 rows: a 64-row block and a tail
    [(8, -1, True, 192), (4, 64, False, 192), (4, -1, True, 80), (3, 64, False, 192), (2, 32, True, 80)],
)
def test_packed_kernel_and_dequantized_gemm_both_match_reference(bits, group_size, sym, out_features, torch_int4):
    layer = linear(out_features=out_features, dtype=torch.bfloat16)
    module = QuantLinear.from_linear(layer, QuantConfig(bits=bits, group_size=group_size, sym=sym))
    if module.kernel not in PACKED_CPU_MAX_ROWS:
        pytest.skip("no packed CPU kernel for this scheme on this build")
    max_rows = module.packed_max_rows()
    reference_weight = module.dequantize()
    for batch in (max_rows, max_rows + 1):  # the last packed-kernel call and the first dequantized one
        x = inputs((batch, 768), torch.bfloat16)
        reference = F.linear(x, reference_weight, layer.bias)
        torch.testing.assert_close(module(x), reference, **TOLERANCES[torch.bfloat16])
    assert torch.equal(module(x), module._dequantized_mm(x) + layer.bias)  # past max_rows, that path


@pytest.mark.skipif(not int4_cpu_layout_known(), reason="int4 CPU layout known only on AVX2/AVX512")
def test_dequantized_gemm_keeps_act_order(torch_int4):
    layer = linear(in_features=256, out_features=64, bias=False, dtype=torch.bfloat16)
    q, scales, zeros = quantize_weight(layer.weight.detach(), 4, 32, sym=False)
    g_idx = torch.randperm(256, generator=torch.Generator().manual_seed(0)) // 32
    config = QuantConfig(bits=4, group_size=32, sym=False)
    module = QuantLinear.from_linear(layer, config, q, scales.to(torch.bfloat16), zeros, g_idx)
    x = inputs((PACKED_CPU_MAX_ROWS[module.kernel] + 1, 256), torch.bfloat16)
    reference = F.linear(x, module.dequantize())
    torch.testing.assert_close(module(x), reference, **TOLERANCES[torch.bfloat16])


# (bits, group_size, sym, act_bits): int8, grouped int8 and int4 packed kernels, a REF scheme, W8A8, per-tensor
CONCAT_SCHEMES = [(8, -1, True, None), (4, 64, False, None), (8, 64, False, None), (8, 16, False, None),
                  (8, -1, True, 8), (8, 0, True, None)]


@pytest.mark.parametrize("bias", [(True, True, True), (False, False, False), (True, False, True)])
@pytest.mark.parametrize("scheme", CONCAT_SCHEMES)
def test_concat_equals_stacked_outputs(scheme, bias):
    bits, group_size, sym, act_bits = scheme
    config = QuantConfig(bits=bits, group_size=group_size, sym=sym, act_bits=act_bits)
    layers = [
        QuantLinear.from_linear(linear(out_features=n, bias=b, dtype=torch.bfloat16, seed=n), config)
        for n, b in zip((192, 64, 64), bias)  # q, k, v projections of a GQA layer
    ]
    fused = QuantLinear.concat(layers)
    assert fused.out_features == 320 and fused.kernel is layers[0].kernel
    q, scales, zeros, _ = fused.quantized()
    parts = [layer.quantized() for layer in layers]
    assert torch.equal(q, torch.cat([part[0] for part in parts]))
    rows = [(layer.out_features, -1) for layer in layers]
    assert torch.equal(scales, torch.cat([part[1].expand(shape) for part, shape in zip(parts, rows)]))
    assert torch.equal(zeros, torch.cat([part[2].expand(shape) for part, shape in zip(parts, rows)]))
    for batch in (1, 65):  # packed kernel and dequantized GEMM
        x = inputs((batch, 768), torch.bfloat16)
        expected = torch.cat([layer(x) for layer in layers], dim=-1)
        torch.testing.assert_close(fused(x), expected, **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("scheme", CONCAT_SCHEMES)
def test_state_dict_loads_into_a_materialized_layer(scheme):
    """Every kernel, W8A8's prepacked one included, takes another layer's state dict in place."""
    bits, group_size, sym, act_bits = scheme
    config = QuantConfig(bits=bits, group_size=group_size, sym=sym, act_bits=act_bits)
    source, target = (QuantLinear.from_linear(linear(dtype=torch.bfloat16, seed=s), config) for s in (0, 1))
    target.load_state_dict(source.state_dict())
    assert target.kernel is source.kernel
    x = inputs((5, 768), torch.bfloat16)
    assert torch.equal(target(x), source(x))


@pytest.mark.parametrize("scheme", CONCAT_SCHEMES)
def test_module_bytes_counts_the_weight_whatever_its_storage(scheme):
    """W8A8's prepacked oneDNN weight lies outside the parameters and buffers; it still counts."""
    bits, group_size, sym, act_bits = scheme
    layer = QuantLinear.from_linear(linear(dtype=torch.bfloat16), QuantConfig(bits=bits, group_size=group_size,
                                                                              sym=sym, act_bits=act_bits))
    weight_bytes = 192 * 768 * bits // 8
    assert weight_bytes < module_bytes(layer) < weight_bytes * 1.2  # groups of 16: 3 bytes a group


def test_concat_keeps_act_order():
    weights = [linear(in_features=256, out_features=64, dtype=torch.bfloat16, seed=s) for s in (0, 1)]
    g_idx = torch.randperm(256, generator=torch.Generator().manual_seed(0)) // 32
    config = QuantConfig(bits=4, group_size=32, sym=False)
    layers = []
    for layer in weights:
        q, scales, zeros = quantize_weight(layer.weight.detach(), 4, 32, sym=False)
        layers.append(QuantLinear.from_linear(layer, config, q, scales.to(torch.bfloat16), zeros, g_idx))
    fused = QuantLinear.concat(layers)
    assert torch.equal(fused.state_dict()["g_idx"], g_idx.to(torch.int32))
    x = inputs((3, 256), torch.bfloat16)
    torch.testing.assert_close(fused(x), torch.cat([layer(x) for layer in layers], dim=-1), rtol=0, atol=0)


def test_concat_rejects_mismatched_layers():
    int4 = QuantLinear.from_linear(linear(out_features=64), QuantConfig(bits=4, group_size=64))
    with pytest.raises(ValueError, match="cannot concat layers with bits 4 and 8"):
        QuantLinear.concat([int4, QuantLinear.from_linear(linear(out_features=64), QuantConfig(bits=8))])
    with pytest.raises(ValueError, match="cannot concat layers with in_features 768 and 512"):
        other = QuantLinear.from_linear(linear(512, 64), QuantConfig(bits=4, group_size=64))
        QuantLinear.concat([int4, other])
    with pytest.raises(ValueError, match="cannot concat layers with group_size 64 and 128"):
        QuantLinear.concat([int4, QuantLinear.from_linear(linear(out_features=64), QuantConfig(bits=4))])
    layer = linear(out_features=64)
    q, scales, zeros = quantize_weight(layer.weight.detach(), 4, 64, sym=True)
    g_idx = torch.randperm(768, generator=torch.Generator().manual_seed(0)) // 64
    act_order = QuantLinear.from_linear(layer, QuantConfig(bits=4, group_size=64), q, scales, zeros, g_idx)
    with pytest.raises(ValueError, match="cannot concat layers with different g_idx"):
        QuantLinear.concat([int4, act_order])
    with pytest.raises(ValueError, match="concat needs at least one layer"):
        QuantLinear.concat([])


@pytest.mark.parametrize(
    "bits, group_size, expected_bytes",
    [
        (4, 128, 576 * 1536 // 2 + 12 * 576 * 2 * 2),  # kernel layout + bf16 (scale, float zero) pairs
        (8, -1, 576 * 1536 + 576 * 2),  # int8 weight + one bf16 scale per row
        (3, 64, 576 * 1536 // 2 + 24 * 576 * 2 * 2),  # one integer a nibble, as 4-bit
    ],
)
def test_buffer_bytes_shrink(bits, group_size, expected_bytes, torch_int4):
    """In memory a 3-bit layer is a 4-bit one (INT4_CPU); its state_dict packs bits per weight."""
    layer = nn.Linear(1536, 576, bias=False, dtype=torch.bfloat16)  # SmolLM2's down_proj
    module = QuantLinear.from_linear(layer, QuantConfig(bits=bits, group_size=group_size, sym=True))
    num_bytes = sum(b.numel() * b.element_size() for b in module.buffers())
    if module.kernel is not Kernel.REF:
        assert num_bytes == expected_bytes
    assert num_bytes / (576 * 1536 * 2) < max(bits, 4) / 16 + 0.04  # a nibble or a byte per weight, plus scales
    assert module.state_dict()["qweight"].numel() == 576 * 1536 * bits // 8


def test_state_dict_is_portable_and_round_trips():
    layer = linear(dtype=torch.bfloat16)
    config = QuantConfig(bits=4, group_size=64, sym=False)
    module = QuantLinear.from_linear(layer, config)
    state = module.state_dict()
    assert set(state) == {"qweight", "scales", "zeros", "bias"}
    q, scales, zeros = quantize_weight(layer.weight.detach(), 4, 64, sym=False)
    assert torch.equal(state["qweight"], pack_bits(q, 4, dim=1, dtype=torch.uint8))
    assert torch.equal(state["zeros"], zeros)
    assert torch.equal(state["scales"], scales.to(torch.bfloat16))

    loaded = QuantLinear(768, 192, 4, 64, False, bias=True, dtype=torch.bfloat16, device="meta")
    loaded.load_state_dict(state, assign=True)
    assert loaded.kernel is module.kernel
    x = inputs((3, 768), torch.bfloat16)
    assert torch.equal(loaded(x), module(x))


def test_load_state_dict_reports_missing_and_unexpected():
    module = QuantLinear(64, 32, 4, 32, True, dtype=torch.float32, device="meta")
    with pytest.raises(RuntimeError, match=r"(?s)Missing key\(s\).*zeros.*Unexpected key\(s\).*weight"):
        module.load_state_dict({"qweight": torch.zeros(32, 32, dtype=torch.uint8),
                                "scales": torch.ones(32, 2), "weight": torch.zeros(1)})


def test_act_order_g_idx_regroups_columns_consistently(torch_int4):
    layer = linear(in_features=256, out_features=64, dtype=torch.bfloat16)
    q, scales, zeros = quantize_weight(layer.weight.detach(), 4, 32, sym=False)
    scales = scales.to(torch.bfloat16)
    g_idx = torch.randperm(256, generator=torch.Generator().manual_seed(0)) // 32  # as act-order gives
    config = QuantConfig(bits=4, group_size=32, sym=False)
    module = QuantLinear.from_linear(layer, config, q, scales, zeros, g_idx)
    assert module.perm is not None and module.kernel is INT4_CPU
    expected_weight = dequantize_weight(q, scales, zeros, g_idx).to(torch.bfloat16)
    torch.testing.assert_close(module.dequantize(), expected_weight, rtol=0, atol=0)
    x = inputs((4, 256), torch.bfloat16)
    reference = F.linear(x, expected_weight, layer.bias)
    torch.testing.assert_close(module(x), reference, **TOLERANCES[torch.bfloat16])
    assert torch.equal(module.state_dict()["g_idx"], g_idx.to(torch.int32))


def test_g_idx_with_unequal_groups_rejected():
    layer = linear(in_features=64, out_features=16)
    q, scales, zeros = quantize_weight(layer.weight.detach(), 4, 32, sym=True)
    g_idx = torch.zeros(64, dtype=torch.int32)
    g_idx[0] = 1
    with pytest.raises(ValueError, match=r"g_idx must give each group 32 columns, got \[63, 1\]"):
        QuantLinear.from_linear(layer, QuantConfig(bits=4, group_size=32), q, scales, zeros, g_idx)


def test_bad_inputs_rejected():
    with pytest.raises(ValueError, match="group_size 100 does not divide in_features 768"):
        QuantLinear.from_linear(linear(), QuantConfig(bits=4, group_size=100))
    with pytest.raises(ValueError, match="bits must be between 2 and 8, got 9"):
        QuantLinear(64, 16, 9, 32, True)
    module = QuantLinear.from_linear(linear(), QuantConfig(bits=4, group_size=64))
    with pytest.raises(ValueError, match="input dtype torch.bfloat16 does not match .* torch.float32"):
        module(torch.zeros(1, 768, dtype=torch.bfloat16))
    q = torch.full((192, 768), 16)
    with pytest.raises(ValueError, match=r"q must lie in \[0, 16\), got \[16, 16\]"):
        config = QuantConfig(bits=4, group_size=64)
        QuantLinear.from_linear(linear(), config, q, torch.ones(192, 12), torch.zeros(192, 12))


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(100, 64)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(64, 128), "down": nn.Linear(128, 64)}) for _ in range(2)
        )
        self.lm_head = nn.Linear(64, 100, bias=False)


def test_quantize_model_swaps_linears_per_module_config():
    model = TinyModel().to(torch.bfloat16)
    overrides = {"lm_head": {"bits": 8, "group_size": -1}, "blocks.1.down": {"skip": True}}
    config = QuantConfig(bits=4, group_size=32, modules=overrides)
    quantize_model(model, config)
    assert isinstance(model.embed_tokens, nn.Embedding)
    assert type(model.blocks[1]["down"]) is nn.Linear
    for module in (model.blocks[0]["up"], model.blocks[0]["down"], model.blocks[1]["up"]):
        assert isinstance(module, QuantLinear) and (module.bits, module.group_size) == (4, 32)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.kernel is Kernel.INT8_CPU
    assert (model.lm_head.bits, model.lm_head.group_size) == (8, -1)
