"""One-row matrix-vector products, written for torch.compile's CPU code generator.

At one row (batch-1 decode) a linear layer's time is the time to read its weight. Written as a
multiply and a sum over in_features, inductor emits one vectorized loop per output row that
widens the stored weight (fp32, bf16 or int8) to fp32 in registers and streams it once. The
projections of SmolLM2-135M's 30 layers, compiled into one graph, read their weights at 23-24 GB/s
on 2 Zen 4 cores, where oneDNN's GEMV and torch's int8 kernel, called one by one, read 12-18 GB/s;
whole-step effect in benchmarks/results/engine_cpu.md.

Run eagerly, the same expression would build the whole (out, in) product in memory, so layers use
it only while torch.compile traces them (`use_gemv`). At two rows or more, inductor's loops re-read
the weight per row (3x slower at 4 rows than at 1); the layers' own kernels serve those.
"""

import torch


def use_gemv(x: torch.Tensor) -> bool:
    """True for one CPU row while torch.compile is tracing: the case gemv is written for."""
    return x.shape[0] == 1 and x.device.type == "cpu" and torch.compiler.is_compiling()


def gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None,
         bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (1, in) @ (weight (out, in) * scales (out,)).T + bias, summed in fp32, returned in x's dtype."""
    y = (x.float()[:, None, :] * weight.float()).sum(-1)
    if scales is not None:
        y = y * scales.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
