"""Modules that a torch.compile graph calls as opaque operators: they run eagerly inside it.

A compiled engine runs every step of two tokens or more (prefill chunks, batched decodes) as one
graph with a dynamic token count, which fuses the small operations between the matrix products:
norms, rotary embeddings, activations, residual adds. The big operations stay out of that graph:
- prepacked linears (PackedLinear, and W8A8 QuantLinear's integer product where kernels/w8a8.cpp
  does not build) hold an oneDNN weight that no graph can take as an input, and the quantized
  linears' packed kernels that are not torch operators are fastest called as they are;
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


# Defined with torch.library.Library rather than the custom_op decorator: its wrapper cost 17-20 µs
# per call against 3 µs here, and a step makes up to 150 such calls.
_library = torch.library.Library("slimserve", "DEF")


def _define(schema: str, impl, fake) -> None:
    name = schema.split("(")[0]
    _library.define(schema)
    _library.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"slimserve::{name}", fake, lib=_library)


def _linear(x: torch.Tensor, handle: int) -> torch.Tensor:
    """The linear layer registered as handle, applied eagerly to x (..., in_features)."""
    return _modules[handle](x)


def _int8_matmul(x_u8: torch.Tensor, handle: int) -> torch.Tensor:
    """The W8A8 QuantLinear registered as handle's prepacked integer product (its int8_matmul); the
    activation quantization around it stays in the graph and fuses."""
    return _modules[handle].int8_matmul(x_u8)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int) -> torch.Tensor:
    """The PagedAttention registered as handle, run eagerly with the step's metadata (it writes
    k and v into the KV cache the metadata names)."""
    assert _metadata is not None, "opaque attention runs inside step_metadata"
    return _modules[handle](q, k, v, _metadata)


_define("linear(Tensor x, int handle) -> Tensor", _linear,
        lambda x, handle: x.new_empty(*x.shape[:-1], _modules[handle].out_features))
_define("int8_matmul(Tensor x_u8, int handle) -> Tensor", _int8_matmul,
        lambda x_u8, handle: x_u8.new_empty(*x_u8.shape[:-1], _modules[handle].out_features,
                                            dtype=torch.float32))
_define("attention(Tensor q, Tensor k, Tensor v, int handle) -> Tensor", _attention,
        lambda q, k, v, handle: torch.empty_like(q))
linear = torch.ops.slimserve.linear
int8_matmul = torch.ops.slimserve.int8_matmul
attention = torch.ops.slimserve.attention
