import pytest

from slimserve.kernels import paged_attention


@pytest.fixture(params=[True, False], ids=["attention-operator", "attention-torch"])
def decode_operator(request, monkeypatch):
    """Run the test with kernels/paged_attention.cpp's decode attention, then with the torch paths that
    machines without it run (the operator made unavailable)."""
    if request.param and not paged_attention.available():
        pytest.skip("no AVX512 CPU, no C++ compiler or torch before 2.13 here")
    if not request.param:
        monkeypatch.setattr(paged_attention, "available", lambda: False)
    return request.param
