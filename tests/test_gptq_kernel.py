import pytest
import torch

from slimserve.kernels import gptq as kernel
from slimserve.quant.gptq import gptq_quantize_weight
from slimserve.quant.rtn import compute_scales

needs_kernel = pytest.mark.skipif(not kernel.available(), reason="no AVX512 CPU or no C++ compiler here")


def block(out_features=200, width=48, seed=0):
    """A block's transposed weight, its spread factors (an upper triangle with a unit diagonal, as
    GPTQ's), and one scale and zero point per row, as 4-bit asymmetric RTN would pick them."""
    generator = torch.Generator().manual_seed(seed)
    wt = torch.randn(width, out_features, generator=generator)
    spread = torch.randn(width, width, generator=generator).triu(1) * 0.3 + torch.eye(width)
    scale, zero = compute_scales(wt.t().contiguous(), 4, sym=False)
    return wt, spread, scale[:, 0].contiguous(), zero[:, 0].contiguous()


@needs_kernel
@pytest.mark.parametrize("c0, c1", [(0, 48), (5, 30), (47, 48)])  # a whole block, a run inside, the last column
def test_columns_match_the_torch_loop(c0, c1):
    """Out of 200 rows, threads take 64 each and the last task 8: every row is stepped, none twice."""
    wt, spread, scale, zero = block()
    outputs = []
    for columns in (kernel.gptq_columns, kernel.gptq_columns_reference):
        w, q, delta = wt.clone(), torch.full_like(wt, -1.0), torch.full_like(wt, -1.0)
        columns(w, q, delta, spread, scale, zero, 4, 0, c0, c1, 48)
        outputs.append((w, q, delta))
    (w, q, delta), (w_ref, q_ref, delta_ref) = outputs
    assert torch.equal(q, q_ref)  # untouched columns stay -1 in both
    torch.testing.assert_close(delta, delta_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-5)
    assert bool((q[c0:c1] >= 0).all() and (q[c0:c1] <= 15).all())


@needs_kernel
@pytest.mark.parametrize("group_size, act_order, static_groups", [
    (64, True, False), (32, True, True), (-1, False, False), (0, False, False), (96, False, False),
])
def test_gptq_runs_the_same_with_the_torch_loop(monkeypatch, group_size, act_order, static_groups):
    """The kernel over every kind of run GPTQ hands it: columns sharing scales up to a group's or a
    block's edge (96: groups crossing blocks of 128; act-order with static groups: a new group at
    almost every column), whole blocks (per channel, per tensor)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 384, generator=generator)
    x = torch.randn(1024, 384, generator=generator) * torch.rand(384, generator=generator) * 3
    hessian = 2 * x.t() @ x / 1024
    args = (weight, hessian, 4, group_size, False, act_order, static_groups)
    with_kernel = gptq_quantize_weight(*args)
    monkeypatch.setattr("slimserve.quant.gptq.gptq_columns", kernel.gptq_columns_reference)
    reference = gptq_quantize_weight(*args)
    for got, expected in zip(with_kernel, reference):
        assert torch.equal(got, expected)
