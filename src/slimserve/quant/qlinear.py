"""QuantLinear: a Linear layer whose weight lives as packed integers, and quantize_model.

The kernel is chosen once, when the integers are set (from_linear, load_state_dict), from the
buffers' device, the compute dtype (the scales' dtype) and the scheme, never at call time:

- INT8_CPU: int8 weight (out, in) times one scale per output channel; symmetric 8-bit, per channel
  or per tensor, bf16 activations. kernels/w8a16.cpp where it builds (AVX512, a C++ compiler,
  torch 2.13+), else aten._weight_int8pack_mm.
- INT8_GROUPED_CPU: 8-bit weights in groups or with zero points (asymmetric 8-bit, or groups of
  symmetric ones like llama.cpp's Q8_0), bf16 activations: kernels/w8a16.cpp, which dequantizes each
  32 weights to bf16 as it widens them (rounded as REF rounds the weight), at every row count and
  inside compiled graphs, where it builds and the groups are a multiple of 32 columns; past 48 rows
  it dequantizes the whole weight in C++ for torch's matmul.
- W4A16_CPU: 4-bit weights, any group size, bf16 activations: kernels/w4a16.cpp on the weight in
  w4a8.cpp's order, at every row count and inside compiled graphs, where it builds (AVX512-BF16, a
  C++ compiler, torch 2.13+; out % 16 == 0, groups of a multiple of 8 columns); past 256 rows it
  dequantizes the weight to bf16 in C++ for torch's matmul. Ahead of INT4_CPU at every row count
  measured (figures in kernels/w4a16.py).
  3- and 2-bit weights take it too, their integers held one a nibble: in memory a 4-bit layer's
  size, on disk (state_dict) their own width.
- INT4_CPU: where W4A16_CPU cannot be built, aten._weight_int4pack_mm_for_cpu on the layout of
  _convert_weight_to_int4pack_for_cpu; 4-bit, out % 16 == 0, groups of 32/64/128/256 (a larger group
  or a whole row is expressed with repeated scales), bf16 activations, AVX2/AVX512 builds. The kernel
  computes (q - 8) * scale + zero_f per element, so zero_f = (8 - zero) * scale. 3- and 2-bit
  weights take it too, one integer a nibble, q and zero raised by 8 - 2^(bits-1): a symmetric zero
  becomes 8 and zero_f 0, exact as at 4 bits (6 * scale, say, would round to bf16).
- W8A8_CPU: weights as INT8_CPU, activations quantized per token to int8 at run time and offset by
  128 to uint8, products summed exactly in int32: kernels/w8a8.cpp on the weight in VNNI order where
  it builds (AVX512-VNNI, a C++ compiler, out % 16 == 0), else oneDNN's u8 x s8 GEMM on its prepacked
  weight (onednn.qlinear_pointwise). Either beats the bf16 GEMM at every row count (SmolLM2-135M's
  121 linears, Zen 4: oneDNN 1.3x at 1 and 8 rows, 1.5x at 32, 1.9x at 512; on Zen 5 w8a8.cpp is
  1.2-1.6x faster than oneDNN up to 128 rows, 1.06-1.3x at 512),
  where torch._int_mm repacks the weight at every call (2x slower at 8 rows). Taken only where a
  probe finds oneDNN exact (without VNNI, its u8 x s8 sums can saturate). w8a8.cpp is a torch
  operator that compiled graphs call without Python; oneDNN's product runs as an opaque call, and one
  row in a compiled graph runs kernels.gemv on the integers instead (keep_plain_weight).
- W8A8_REF: the same arithmetic with a float matmul of the integers (any device).
- W4A8_CPU: 4-bit weights, any group size, with act_bits 8: activations quantized to int8 per row and
  weight group at run time, products summed exactly in int32 (llama.cpp's Q4_0 x Q8_0 arithmetic):
  kernels/w4a8.cpp on the weight in its order, at every row count and inside compiled graphs, where it
  builds (AVX512-VNNI, a C++ compiler, torch 2.13+; out % 16 == 0, groups of a multiple of 16
  columns): 1.3x INT4_CPU's speed at 1 row, 2-3x at 8 to 128 (figures in kernels/w4a8.py).
- W4A8_REF: the same arithmetic in plain torch (kernels.w4a8.w4a8_reference; any device).
- REF: dequantize, then F.linear: grouped or asymmetric 8-bit where the C++ kernels cannot be built,
  groups neither packed kernel takes, fp32/fp16 activations, every non-CPU device (CUDA for now).

INT8_CPU and INT4_CPU run their packed kernel up to PACKED_CPU_MAX_ROWS rows
(decode; W8A16_MAX_ROWS for INT8_CPU's w8a16.cpp); one row of INT8_CPU inside a compiled graph runs
kernels.gemv on the same int8 weight instead; for more rows (prefill) they dequantize the weight to
bf16 and run a bf16 GEMM. All are weight-only: activations stay in bf16.

Whatever the kernel, state_dict holds the portable form: qweight (out, in * bits / 8) uint8 packed
along `in` (packing.pack_bits), scales (rows, num_groups) in the compute dtype, zeros
(rows, num_groups) uint8, g_idx (in,) int32 when act-order regrouped the columns, and bias;
rows is 1 per tensor (group_size 0), else out.
"""

from enum import Enum
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimserve.config import QuantConfig, check_act_bits
from slimserve.kernels import w4a8, w4a16, w8a8, w8a16
from slimserve.kernels.gemv import gemv, use_gemv
from slimserve.models import opaque
from slimserve.quant.packing import (
    int4_cpu_layout_known,
    pack_bits,
    pack_int4_cpu,
    unpack_bits,
    unpack_int4_cpu,
)
from slimserve.quant.rtn import check_bits, check_group_size, dequantize_weight, quantize_weight

# torch's packed int8/int4 CPU kernels are vectorized for bf16 activations only; with fp32/fp16
# they run scalar loops, 10-40x slower than dequantize + F.linear (576 x 1536, batch 8, measured).
PACKED_CPU_DTYPES = (torch.bfloat16,)
INT4_CPU_GROUP_SIZES = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts


def int4_cpu_group_size(group_size: int, in_features: int) -> int | None:
    """The kernel group expressing `group_size` (a whole row if <= 0), or None if none fits."""
    span = in_features if group_size <= 0 else group_size
    return next((g for g in INT4_CPU_GROUP_SIZES if span % g == 0), None)


@cache
def onednn_int8_exact() -> bool:
    """True if oneDNN's prepacked u8 x s8 GEMM exists here and sums the worst case exactly."""
    try:
        weight = torch.full((16, 64), -127, dtype=torch.int8)
        x = torch.full((1, 64), 255, dtype=torch.uint8)
        y = torch.ops.onednn.qlinear_pointwise(
            x, 1.0, 0, torch.ops.onednn.qlinear_prepack(weight, None), torch.ones(16),
            torch.zeros(1, dtype=torch.long), None, 1.0, 0, torch.float32, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return bool((y == -255 * 127 * 64).all())


class Kernel(Enum):
    REF = "ref"
    INT8_CPU = "int8_cpu"
    INT8_GROUPED_CPU = "int8_grouped_cpu"
    INT4_CPU = "int4_cpu"
    W8A8_CPU = "w8a8_cpu"
    W8A8_REF = "w8a8_ref"
    W4A16_CPU = "w4a16_cpu"
    W4A8_CPU = "w4a8_cpu"
    W4A8_REF = "w4a8_ref"


# The packed kernels are compute-bound past a few rows: their time grows about linearly with the
# row count, while dequantizing the weight once (to_dtype for int8; unpack and scale for int4, the
# dearer) and running the compute dtype's GEMM costs a little more than the bf16 GEMM. Crossovers
# on SmolLM2-135M's shapes (AVX512-BF16 Zen 4): int8 between 8 and 16 rows, int4 near 50.
# INT8_CPU runs kernels/w8a16.cpp instead where it is available: it reads the weight once and
# multiplies 8 rows per pass with bf16 dot products, ahead of the dequantized bf16 GEMM up to about
# 96 rows on the same shapes (121 layers: 83 vs 94 ms at 64 rows, 125-127 vs 122-127 at 96, 161-165
# vs 148-158 at 128; benchmarks/quant_kernels_cpu.py).
W8A16_MAX_ROWS = 96
PACKED_CPU_MAX_ROWS = {Kernel.INT8_CPU: 8, Kernel.INT4_CPU: 48}
# In a compiled graph, several rows of these kernels run as opaque calls (models/opaque.py): the
# switch to a dequantized GEMM above depends on the row count, and inductor lowers int4's kernel
# to a slower one. W8A8 and REF are traced: their extra operations fuse (W8A8_CPU calls only its
# prepacked integer product opaquely).
OPAQUE_KERNELS = (Kernel.INT8_CPU, Kernel.INT4_CPU)


class QuantLinear(nn.Module):
    """y = x @ dequantize(qweight).T + bias, for x (..., in_features) of the layer's dtype."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        sym: bool,
        bias: bool = False,
        act_bits: int | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_bits(bits)
        check_group_size(group_size, in_features)
        if in_features * bits % 8 != 0:
            raise ValueError(f"in_features {in_features} x bits {bits} is not a whole number of bytes")
        check_act_bits(act_bits, bits, sym, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym, self.act_bits = bits, group_size, sym, act_bits
        self.num_groups = in_features // group_size if group_size > 0 else 1
        self.scale_rows = 1 if group_size == 0 else out_features
        self.kernel = Kernel.REF
        self.opaque_handle: int | None = None  # see models/opaque.py
        groups = (self.scale_rows, self.num_groups)
        packed = (out_features, in_features * bits // 8)
        self.register_buffer("qweight", torch.empty(packed, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.empty(groups, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", None)  # INT4_CPU only
        self.onednn: tuple[Tensor, Tensor, Tensor] | None = None  # W8A8_CPU: weight, scales, zeros
        self.vnni: tuple[Tensor, Tensor, Tensor] | None = None  # or: w8a8.pack's weight, sums; scales
        self.nibbles: tuple[Tensor, Tensor, Tensor] | None = None  # W4A8/W4A16_CPU: w4a8.pack's three
        self.uses_w8a16 = False  # INT8_CPU, INT8_GROUPED_CPU: kernels/w8a16.cpp takes the weight
        self.register_buffer("perm", None)  # column order making act-order groups contiguous
        self.register_buffer(
            "bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None
        )

    @property
    def dtype(self) -> torch.dtype:
        if self.nibbles is not None:
            return torch.bfloat16  # the only dtype W4A8_CPU and W4A16_CPU take
        return (self.scales if self.scales is not None else self.scales_and_zeros).dtype

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        config: QuantConfig,
        q: Tensor | None = None,
        scales: Tensor | None = None,
        zeros: Tensor | None = None,
        g_idx: Tensor | None = None,
    ) -> "QuantLinear":
        """RTN-quantize `linear`, or wrap precomputed results (GPTQ's q, scales, zeros, g_idx)."""
        weight = linear.weight.detach()
        module = cls(
            linear.in_features,
            linear.out_features,
            config.bits,
            config.group_size,
            config.sym,
            bias=linear.bias is not None,
            act_bits=config.act_bits,
            dtype=weight.dtype,
            device="meta",
        )
        if q is None:
            q, scales, zeros = quantize_weight(weight, config.bits, config.group_size, config.sym, config.mse)
        bias = None if linear.bias is None else linear.bias.detach()
        module.set_quantized(q, scales.to(weight.dtype), zeros, g_idx, bias)
        return module

    @classmethod
    def concat(cls, layers: list["QuantLinear"]) -> "QuantLinear":
        """One layer whose output is the given layers' outputs stacked along out_features.

        Fuses projections of one input (q/k/v, gate/up) into one matmul. The layers must agree on
        in_features, bits, group_size, sym, act_bits, dtype and g_idx; per-tensor layers (group_size
        0) become per-channel (-1), each row keeping its layer's scale. A missing bias is zeros.
        """
        if not layers:
            raise ValueError("concat needs at least one layer")
        first, forms = layers[0], [layer.quantized() for layer in layers]
        g_idx = forms[0][3]
        for layer, (_, _, _, layer_g_idx) in zip(layers[1:], forms[1:]):
            for name in ("in_features", "bits", "group_size", "sym", "act_bits", "dtype"):
                if getattr(layer, name) != getattr(first, name):
                    values = f"{getattr(first, name)} and {getattr(layer, name)}"
                    raise ValueError(f"cannot concat layers with {name} {values}")
            same_g_idx = layer_g_idx is g_idx or (
                layer_g_idx is not None and g_idx is not None and torch.equal(layer_g_idx, g_idx)
            )
            if not same_g_idx:
                raise ValueError("cannot concat layers with different g_idx")

        def stacked(index: int) -> Tensor:  # q, scales or zeros; a per-tensor scale repeats per row
            parts = [form[index].expand(layer.out_features, -1) for form, layer in zip(forms, layers)]
            return torch.cat(parts)

        q = stacked(0)
        bias = None
        if any(layer.bias is not None for layer in layers):
            bias = torch.cat([
                q.new_zeros(layer.out_features, dtype=first.dtype) if layer.bias is None else layer.bias
                for layer in layers
            ])
        module = cls(
            first.in_features,
            q.shape[0],
            first.bits,
            -1 if first.group_size == 0 else first.group_size,
            first.sym,
            bias=bias is not None,
            act_bits=first.act_bits,
            dtype=first.dtype,
            device="meta",
        )
        module.set_quantized(q, stacked(1), stacked(2), g_idx, bias)
        return module

    def set_quantized(
        self, q: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor | None, bias: Tensor | None
    ) -> None:
        """Store integers q (out, in), scales and zeros (rows, num_groups); pick the kernel.

        The compute dtype is scales.dtype; the kernel follows q's device.
        """
        groups = (self.scale_rows, self.num_groups)
        if q.shape != (self.out_features, self.in_features):
            expected = (self.out_features, self.in_features)
            raise ValueError(f"q has shape {tuple(q.shape)}, expected {expected}")
        if scales.shape != groups or zeros.shape != groups:
            raise ValueError(f"scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)}, expected {groups}")
        if int(q.min()) < 0 or int(q.max()) >= 2**self.bits:
            raise ValueError(f"q must lie in [0, {2**self.bits}), got [{int(q.min())}, {int(q.max())}]")
        if (bias is None) != (self.bias is None):
            raise ValueError(f"bias given: {bias is not None}, layer has bias: {self.bias is not None}")
        self.perm = None if g_idx is None else self._group_order(g_idx.to(q.device))
        if self.perm is not None:
            q = q[:, self.perm]
        self.bias = bias
        self.kernel = self._choose_kernel(q.device, scales.dtype)
        self.qweight, self.scales, self.zeros, self.scales_and_zeros = None, None, None, None
        self.onednn, self.vnni, self.nibbles, self.uses_w8a16 = None, None, None, False
        if self.kernel is Kernel.INT4_CPU:
            self.qweight = pack_int4_cpu(q + self.nibble_offset)
            self.scales_and_zeros = self._int4_scales_and_zeros(scales, zeros + self.nibble_offset)
        elif self.kernel in (Kernel.W4A8_CPU, Kernel.W4A16_CPU):
            every_row = (self.out_features, self.num_groups)
            self.nibbles = w4a8.pack(q, scales.expand(every_row), zeros.expand(every_row))
        elif self.kernel in (Kernel.REF, Kernel.W4A8_REF):
            self.qweight = pack_bits(q.to(torch.uint8), self.bits, dim=1, dtype=torch.uint8)
            self.scales, self.zeros = scales, zeros.to(torch.uint8)
        elif self.kernel is Kernel.INT8_GROUPED_CPU:  # as the symmetric kernels, q - 128, and zero points
            every_row = (self.out_features, self.num_groups)
            self.qweight = (q.to(torch.int16) - 128).to(torch.int8)
            self.scales = scales.expand(every_row).contiguous()
            self.zeros = zeros.to(torch.uint8).expand(every_row).contiguous()
            self.uses_w8a16 = True
        else:  # symmetric 8-bit: the zero point is 128, so q - 128 is the signed weight
            if not bool((zeros == 128).all()):
                raise ValueError(f"symmetric 8-bit zeros must all be 128, got {zeros.unique()[:8].tolist()}")
            self.qweight = (q.to(torch.int16) - 128).to(torch.int8)
            self.scales = scales.expand(self.out_features, 1).reshape(-1).contiguous()
            self.uses_w8a16 = self.kernel is Kernel.INT8_CPU and w8a16.takes(self.qweight, self.scales)
            if self.kernel is Kernel.W8A8_CPU and w8a8.packable(self.qweight):  # held packed; quantized()
                self.vnni = (*w8a8.pack(self.qweight), self.scales.float())  # unpacks it
                self.qweight = None
            elif self.kernel is Kernel.W8A8_CPU:
                packed = torch.ops.onednn.qlinear_prepack(self.qweight, None)
                self.onednn = (packed, self.scales.float(), torch.zeros(1, dtype=torch.long))
                self.qweight = None

    def _group_order(self, g_idx: Tensor) -> Tensor | None:
        """Column order making every group contiguous, or None if g_idx is already trivial."""
        if g_idx.shape != (self.in_features,):
            raise ValueError(f"g_idx has shape {tuple(g_idx.shape)}, expected {(self.in_features,)}")
        g_idx = g_idx.long()
        columns = torch.arange(self.in_features, device=g_idx.device)
        span = self.group_size if self.group_size > 0 else self.in_features
        if torch.equal(g_idx, columns // span):
            return None  # per-group in order, or one group per row (all zeros)
        if self.group_size <= 0:
            raise ValueError(f"group_size {self.group_size} has one group per row; g_idx must be all 0")
        counts = torch.bincount(g_idx, minlength=self.num_groups)
        if counts.numel() != self.num_groups or not bool((counts == self.group_size).all()):
            raise ValueError(f"g_idx must give each group {self.group_size} columns, got {counts.tolist()}")
        return torch.argsort(g_idx, stable=True)

    def _choose_kernel(self, device: torch.device, dtype: torch.dtype) -> Kernel:
        on_cpu = device.type == "cpu"
        if self.act_bits == 8 and self.bits == 4:
            packable = on_cpu and dtype == torch.bfloat16 and w4a8.packable(self.out_features, self.in_features,
                                                                             self.num_groups)
            return Kernel.W4A8_CPU if packable else Kernel.W4A8_REF
        if self.act_bits == 8:
            return Kernel.W8A8_CPU if on_cpu and onednn_int8_exact() else Kernel.W8A8_REF
        packed_cpu = on_cpu and dtype in PACKED_CPU_DTYPES
        if packed_cpu and self.bits == 8 and self.sym and self.group_size <= 0:
            return Kernel.INT8_CPU
        if packed_cpu and self.bits == 8 and self.in_features % (self.num_groups * w8a16.K_MULTIPLE) == 0 \
                and w8a16.available():
            return Kernel.INT8_GROUPED_CPU
        if packed_cpu and self.bits <= 4 and w4a16.packable(self.out_features, self.in_features, self.num_groups):
            return Kernel.W4A16_CPU
        if (
            packed_cpu
            and self.bits <= 4
            and self.out_features % 16 == 0
            and int4_cpu_group_size(self.group_size, self.in_features) is not None
            and int4_cpu_layout_known()
        ):
            return Kernel.INT4_CPU
        return Kernel.REF

    @property
    def nibble_offset(self) -> int:
        """What INT4_CPU adds to a 3- or 2-bit layer's integers and zeros (see the module's docstring)."""
        return 8 - 2 ** (self.bits - 1)

    def _int4_scales_and_zeros(self, scales: Tensor, zeros: Tensor) -> Tensor:
        """(in / kernel_group, out, 2): each kernel group's scale and float zero (8 - zero) * scale."""
        kernel_group = int4_cpu_group_size(self.group_size, self.in_features)
        repeat = self.in_features // self.num_groups // kernel_group
        s = scales.float().expand(self.out_features, -1).repeat_interleave(repeat, dim=1)
        z = zeros.float().expand(self.out_features, -1).repeat_interleave(repeat, dim=1)
        return torch.stack([s, (8 - z) * s], dim=-1).transpose(0, 1).contiguous().to(scales.dtype)

    def quantized(self) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The portable form: (q (out, in) uint8, scales, zeros uint8, g_idx int32 or None)."""
        if self.kernel is Kernel.INT4_CPU:
            q = unpack_int4_cpu(self.qweight, self.out_features, self.in_features) - self.nibble_offset
            step = self.scales_and_zeros.shape[0] // self.num_groups
            pairs = self.scales_and_zeros[::step, : self.scale_rows].float().transpose(0, 1)
            s, zero_f = pairs[..., 0], pairs[..., 1]
            # exact: (8 - zero) * s has at most 12 significant bits before rounding to dtype; a zero
            # scale loses the zero point, read back as the symmetric one
            zeros = (torch.where(s == 0, 8.0, torch.round(8 - zero_f / s)) - self.nibble_offset).to(torch.uint8)
            scales = s.to(self.dtype)
        elif self.kernel in (Kernel.W4A8_CPU, Kernel.W4A16_CPU):
            q, scales, zeros = w4a8.unpack(*self.nibbles)
            scales, zeros = scales[: self.scale_rows], zeros[: self.scale_rows]
        elif self.kernel in (Kernel.REF, Kernel.W4A8_REF):
            q = unpack_bits(self.qweight, self.bits, dim=1)
            scales, zeros = self.scales, self.zeros
        elif self.kernel is Kernel.INT8_GROUPED_CPU:
            q = (self.qweight.to(torch.int16) + 128).to(torch.uint8)
            scales, zeros = self.scales[: self.scale_rows], self.zeros[: self.scale_rows]
        else:
            q = (self._signed_weight().to(torch.int16) + 128).to(torch.uint8)
            scales = self.scales[: self.scale_rows, None]
            zeros = torch.full(scales.shape, 128, dtype=torch.uint8, device=q.device)
        if self.perm is None:
            return q, scales, zeros, None
        inverse = torch.argsort(self.perm)
        sorted_groups = torch.arange(self.in_features, device=q.device) // self.group_size
        return q[:, inverse], scales, zeros, sorted_groups[inverse].to(torch.int32)

    def dequantize(self) -> Tensor:
        """The weight (out, in) in the layer's dtype, columns in their original order."""
        q, scales, zeros, g_idx = self.quantized()
        return dequantize_weight(q, scales, zeros, g_idx).to(self.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != self.dtype:
            raise ValueError(f"input dtype {x.dtype} does not match the layer's dtype {self.dtype}")
        if torch.compiler.is_compiling() and self.kernel in OPAQUE_KERNELS and x.numel() > self.in_features:
            return opaque.linear(x, self.opaque_handle)
        x2 = x.reshape(-1, self.in_features)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        x2 = x2.contiguous()
        if self.kernel is Kernel.INT8_CPU and use_gemv(x2):
            y = gemv(x2, self.qweight, self.scales)
        elif self.kernel in PACKED_CPU_MAX_ROWS and x2.shape[0] > self.packed_max_rows():
            y = self._dequantized_mm(x2)
        elif self.uses_w8a16:
            y = w8a16.w8a16_matmul(x2, self.qweight, self.scales, self.zeros)
        elif self.kernel is Kernel.INT4_CPU:
            kernel_group = self.in_features // self.scales_and_zeros.shape[0]
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, self.qweight, kernel_group, self.scales_and_zeros
            )
        elif self.kernel is Kernel.INT8_CPU:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        elif self.kernel is Kernel.W4A16_CPU:
            y = w4a16.w4a16_linear(x2, *self.nibbles)
        elif self.kernel is Kernel.W4A8_CPU:
            y = w4a8.w4a8_linear(x2, *self.nibbles)
        elif self.kernel is Kernel.W4A8_REF:
            q = unpack_bits(self.qweight, self.bits, dim=1)
            every_row = (self.out_features, self.num_groups)
            y = w4a8.w4a8_reference(x2, q, self.scales.expand(every_row), self.zeros.expand(every_row)).to(self.dtype)
        elif self.kernel is Kernel.REF:
            q = unpack_bits(self.qweight, self.bits, dim=1)
            y = F.linear(x2, dequantize_weight(q, self.scales, self.zeros).to(self.dtype))
        else:
            y = self._w8a8(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def packed_max_rows(self) -> int:
        """The most rows the layer's packed CPU kernel (INT8_CPU, INT4_CPU) takes at once."""
        if self.kernel is Kernel.INT8_CPU and self.uses_w8a16:
            return W8A16_MAX_ROWS
        return PACKED_CPU_MAX_ROWS[self.kernel]

    def _dequantized_mm(self, x2: Tensor) -> Tensor:
        """x2 @ W.T through the weight dequantized to the compute dtype, for the packed CPU kernels."""
        if self.kernel is Kernel.INT8_CPU:  # q - 128 is exact in bf16; the scale is per output
            return F.linear(x2, self.qweight.to(self.dtype)) * self.scales
        q_t = unpack_int4_cpu(self.qweight, self.out_features, self.in_features).t()  # (in, out)
        num_kernel_groups = self.scales_and_zeros.shape[0]
        # contiguous (groups, 1, out) factors, so the broadcast along each group's rows vectorizes
        scales = self.scales_and_zeros[:, None, :, 0].contiguous()
        offsets = self.scales_and_zeros[:, None, :, 1] - 8 * scales  # (q - 8) s + zero_f = q s + offset
        q_t = q_t.to(self.dtype).view(num_kernel_groups, -1, self.out_features)
        return x2 @ torch.addcmul(offsets, q_t, scales).view(self.in_features, self.out_features)

    def _w8a8(self, x2: Tensor) -> Tensor:
        """Per-token symmetric int8 activations (W8A8 dynamic), products summed in int32."""
        one_row_graph = self.qweight is not None and use_gemv(x2)
        if self.vnni is not None and x2.dtype == torch.bfloat16 and not one_row_graph:
            return w8a8.w8a8_linear(x2, *self.vnni)  # the arithmetic below in one call
        x_scales = x2.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        x_q = torch.round(x2.float() / x_scales).clamp(-127, 127)
        if self.kernel is Kernel.W8A8_CPU and not one_row_graph:
            x_u8 = (x_q + 128).to(torch.uint8)
            prepacked = self.vnni is None and torch.compiler.is_compiling()  # oneDNN's weight: out of graphs
            acc = opaque.int8_matmul(x_u8, self.opaque_handle) if prepacked else self.int8_matmul(x_u8)
            return (acc * x_scales).to(self.dtype)
        # float32 sums of integer products: exact below 2^24, else off by a few ulp
        acc = gemv(x_q, self.qweight) if one_row_graph else x_q @ self.qweight.float().t()
        return (acc * x_scales * self.scales.float()).to(self.dtype)

    def keep_plain_weight(self) -> None:
        """For a compiled engine's one-row graph: W8A8_CPU on oneDNN (where w8a8.cpp does not build)
        keeps its int8 weight unpacked beside the prepacked one, which kernels.gemv reads faster at one
        row: SmolLM2-135M's 121 layers in 3.6 ms where oneDNN's product takes 6.6
        (benchmarks/results/quant_kernels_cpu.md). The layer then holds its weight twice. w8a8.cpp's
        operator decodes as fast as gemv (SmolLM2 W8A8 compiled bs1: 216-249 tok/s either way, 2 Zen 5
        cores), so its layers hold the weight once."""
        if self.kernel is Kernel.W8A8_CPU and self.vnni is None and self.qweight is None:
            self.qweight = self._signed_weight().contiguous()

    def _signed_weight(self) -> Tensor:
        """The symmetric 8-bit kernels' int8 weight (out, in), unpacked from W8A8_CPU's packed
        layout if that is the only copy held."""
        if self.qweight is not None:
            return self.qweight
        return w8a8.unpack(self.vnni[0]) if self.vnni is not None else self.onednn[0].to_dense().t()

    def int8_matmul(self, x_u8: Tensor) -> Tensor:
        """W8A8_CPU's integer product: x_u8 (rows, in), int8 activations + 128, times the int8
        weight, summed exactly in int32 and returned in fp32 times the weight scales."""
        if self.vnni is not None:
            return w8a8.w8a8_matmul(x_u8, *self.vnni)
        weight, scales, zeros = self.onednn
        return torch.ops.onednn.qlinear_pointwise(
            x_u8, 1.0, 128, weight, scales, zeros, None, 1.0, 0, torch.float32, "none", [], "")

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        q, scales, zeros, g_idx = self.quantized()
        destination[prefix + "qweight"] = pack_bits(q, self.bits, dim=1, dtype=torch.uint8)
        destination[prefix + "scales"] = scales.contiguous()
        destination[prefix + "zeros"] = zeros.contiguous()
        if g_idx is not None:
            destination[prefix + "g_idx"] = g_idx
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        names = ["qweight", "scales", "zeros"] + (["bias"] if self.bias is not None else [])
        missing = [prefix + name for name in names if prefix + name not in state_dict]
        missing_keys.extend(missing)
        own = {key[len(prefix) :] for key in state_dict if key.startswith(prefix)}
        unexpected = {name for name in own if "." not in name} - set(names) - {"g_idx"}
        unexpected_keys.extend(prefix + name for name in sorted(unexpected))
        if missing:
            return
        # A layer built on "meta" takes the tensors' device; a materialized one keeps its own
        # (W8A8_CPU holds no qweight, only its prepacked weight and scales; W4A8/W4A16_CPU their packed three).
        held = next(t for t in (self.qweight, self.scales, self.nibbles and self.nibbles[0]) if t is not None)
        device = held.device if held.device.type != "meta" else None
        tensors = {name: state_dict[prefix + name].to(device) for name in names}
        g_idx = state_dict.get(prefix + "g_idx")
        self.set_quantized(
            unpack_bits(tensors["qweight"], self.bits, dim=1),
            tensors["scales"],
            tensors["zeros"],
            None if g_idx is None else g_idx.to(device),
            tensors.get("bias"),
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, sym={self.sym}, act_bits={self.act_bits}, "
            f"kernel={self.kernel.value}"
        )


def quantize_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Replace, in place, every nn.Linear that config.for_module(name) keeps by an RTN QuantLinear."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        module_config = config.for_module(name)
        if module_config is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, QuantLinear.from_linear(linear, module_config))
    return model
