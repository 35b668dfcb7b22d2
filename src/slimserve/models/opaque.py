"""Modules that a torch.compile graph calls as opaque operators: they run eagerly inside it.

A compiled engine runs every step of two tokens or more (prefill chunks, batched decodes) as one
graph with a dynamic token count, which fuses the small operations between the matrix products:
norms, rotary embeddings, activations, residual adds. The big operations stay out of that graph:
- prepacked linears (PackedLinear) hold an oneDNN weight that no graph can take as an input, and
  quantized linears' packed kernels are fastest called as they are;
- attention loops over the step's sequences in Python, so their lengths would become constants
  of the graph. It reads the step's AttentionMetadata from `step_metadata` instead of an argument.
vLLM's piecewise graphs keep attention out the same way.

A module opts in with an `opaque_handle` attribute; `register` numbers a model's such modules, and
the number is the operator's constant argument (a graph cannot hold a module).
"""

import itertools
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

_modules: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()
_handles = itertools.count()
_metadata = None  # the running step's AttentionMetadata, inside step_metadata


def register(model: nn.Module) -> None:
    """Give every module of model that declares an opaque_handle a handle of its own."""
    for module in model.modules():
        if hasattr(module, "opaque_handle") and module.opaque_handle is None:
            module.opaque_handle = next(_handles)
            _modules[module.opaque_handle] = module


@contextmanager
def step_metadata(meta) -> Iterator[None]:
    """The AttentionMetadata that opaque attention calls read while a compiled step runs."""
    global _metadata
    _metadata = meta
    try:
        yield
    finally:
        _metadata = None


@torch.library.custom_op("slimserve::linear", mutates_args=())
def linear(x: torch.Tensor, handle: int) -> torch.Tensor:
    """The linear layer registered as handle, applied eagerly to x (..., in_features)."""
    return _modules[handle](x)


@linear.register_fake
def _(x: torch.Tensor, handle: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], _modules[handle].out_features)


@torch.library.custom_op("slimserve::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int) -> torch.Tensor:
    """The PagedAttention registered as handle, run eagerly with the step's metadata (it writes
    k and v into the KV cache the metadata names)."""
    assert _metadata is not None, "opaque attention runs inside step_metadata"
    return _modules[handle](q, k, v, _metadata)


@attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int) -> torch.Tensor:
    return torch.empty_like(q)
