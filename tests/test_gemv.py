"""kernels/gemv.cpp (the operator slimserve::gemv) against the torch expression it replaces, and the
expression against a float64 product from the definition."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._inductor.utils import run_and_get_code

from slimserve.kernels import gemv

needs_kernel = pytest.mark.skipif(not gemv.available(),
                                  reason="no AVX512 CPU, no C++ compiler or torch before 2.13 here")
X_DTYPES = (torch.float32, torch.bfloat16)
W_DTYPES = (torch.float32, torch.bfloat16, torch.int8)


def operands(rows, out_features, in_features, x_dtype, w_dtype, scaled, biased, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=generator).to(x_dtype)
    if w_dtype is torch.int8:
        w = torch.randint(-127, 128, (out_features, in_features), generator=generator, dtype=torch.int8)
    else:
        w = torch.randn(out_features, in_features, generator=generator).to(w_dtype)
    scales = (torch.rand(out_features, generator=generator) / 64).to(x_dtype) if scaled else None
    bias = torch.randn(out_features, generator=generator).to(x_dtype) if biased else None
    return x, w, scales, bias


def test_reference_follows_the_definition():
    x, w, scales, bias = operands(2, 5, 7, torch.bfloat16, torch.int8, True, True)
    expected = (x.double() @ (w.double() * scales.double()[:, None]).t() + bias.double()).to(torch.bfloat16)
    torch.testing.assert_close(gemv.gemv_reference(x, w, scales, bias), expected, rtol=2**-8, atol=1e-3)


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 3), out_features=st.integers(1, 40), in_features=st.integers(1, 80),
       x_dtype=st.sampled_from(X_DTYPES), w_dtype=st.sampled_from(W_DTYPES), scaled=st.booleans(),
       biased=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_the_torch_expression(rows, out_features, in_features, x_dtype, w_dtype, scaled, biased, seed):
    """Any shape (column tails past the 64-column steps and within a 16-column one), every dtype
    pairing; the two sum in a different order, so fp32 agrees to rounding and bf16 results to one
    bf16 step."""
    x, w, scales, bias = operands(rows, out_features, in_features, x_dtype, w_dtype, scaled, biased, seed)
    out = torch.ops.slimserve.gemv(x, w, scales, bias)
    assert out.dtype == x_dtype and out.shape == (rows, out_features)
    expected = gemv.gemv_reference(x, w, scales, bias)
    tolerance = {"rtol": 1e-5, "atol": 1e-4} if x_dtype is torch.float32 else {"rtol": 2**-7, "atol": 1e-2}
    torch.testing.assert_close(out, expected, **tolerance)


@needs_kernel
def test_integer_operands_sum_exactly():
    """W8A8's one-row graph hands it int8 values as fp32 activations: the sums are exact integers."""
    x = torch.randint(-127, 128, (1, 1536)).float()
    w = torch.randint(-127, 128, (64, 1536), dtype=torch.int8)
    assert torch.equal(torch.ops.slimserve.gemv(x, w), (x.long() @ w.long().t()).float())


@needs_kernel
def test_refuses_bad_operands():
    x, w, scales, bias = operands(1, 16, 32, torch.bfloat16, torch.bfloat16, True, True)
    with pytest.raises(RuntimeError, match="activations have 16 columns, the weight 32"):
        torch.ops.slimserve.gemv(x[:, :16].contiguous(), w)
    with pytest.raises(RuntimeError, match="fp32 or bf16 activations"):
        torch.ops.slimserve.gemv(x.half(), w)
    with pytest.raises(RuntimeError, match="fp32, bf16 or int8 weight"):
        torch.ops.slimserve.gemv(x, w.t())
    with pytest.raises(RuntimeError, match="scales must be a contiguous fp32 or bf16 vector"):
        torch.ops.slimserve.gemv(x, w, scales[:8])


@needs_kernel
def test_compiled_graph_calls_the_operator_without_python():
    x, w, _, bias = operands(1, 48, 64, torch.bfloat16, torch.bfloat16, False, True)
    compiled = torch.compile(lambda x: torch.relu(gemv.gemv(x, w, bias=bias)), fullgraph=True,
                             options={"cpp_wrapper": True})
    with torch.no_grad():
        out, code = run_and_get_code(compiled, x)
    assert torch.equal(out, torch.relu(torch.ops.slimserve.gemv(x, w, None, bias)))
    assert 'aoti_torch_call_dispatcher("slimserve::gemv"' in "".join(code)


def test_without_the_operator_graphs_run_the_torch_expression(monkeypatch):
    """No AVX512, compiler or torch 2.13 (available() False): inductor compiles the expression instead."""
    monkeypatch.setattr(gemv, "available", lambda: False)
    x, w, scales, _ = operands(1, 24, 40, torch.bfloat16, torch.int8, True, False)
    compiled = torch.compile(lambda x: gemv.gemv(x, w, scales), fullgraph=True)
    with torch.no_grad():
        out, code = run_and_get_code(compiled, x)
    assert "slimserve" not in "".join(code)
    torch.testing.assert_close(out, gemv.gemv_reference(x, w, scales), rtol=2**-7, atol=1e-2)
