"""An int8 conv that writes float: for a conv whose value only float ops read.

Rounding a conv's output onto an 8-bit grid that only a dequantize reads costs accuracy and buys
nothing: a segmentation head's or a detector's output conv, a conv before a sigmoid or a layer
norm. The grid spans what calibration saw, so a held-out value beyond it is clipped, and every
value moves by up to half a step (PT2E's x86 quantizer leaves such outputs float: 1.1 dB ahead
of fxopt on a three-conv net whose output is a conv, 2-6.6 dB on testers' models). torch's
x86 int8 conv kernels only write int8; oneDNN's `qconv_pointwise` reads the int8 input and
weight and writes float32 (what torch.compile's int8 path calls).

`FloatOutputConv` holds the layer: its int8 weight, per-channel scales, bias and geometry, and
oneDNN's packed weight where oneDNN computes the layer right on this CPU (checked once per pack,
like `packing.computes_right`). `int8_conv_float_output` runs it. oneDNN builds its primitive on
every call (~45 µs, against ~20 µs for the int8 conv), so a small call (below
`ONEDNN_FROM_MACS` on fewer than `FLOAT_PATH_MAX_INPUT` input elements), and every call without
a pack (no oneDNN, or a wrong kernel), computes the same value as a float conv of the
dequantized input and weight. Measured per layer at one thread: the float conv is 2.5x faster
on a 32->10 1x1 conv at 16x16 at batch 1 (33 vs 82 µs; the int8 conv and its dequantize took
48), still faster at 1.4 M MACs (81 vs 98 µs), and 1.6-10x slower from 2.4 M MACs on (the
same conv at batch 16: 164 vs 106 µs). A conv3d always runs on oneDNN: aten's float conv3d is
slower at any size (a 16->4 1x1 head at 6^3, batch 16: 541 vs 273 µs). Neither path always
matches the int8 conv and its dequantize (a 64->2 1x1 head at 64x64, batch 1: ~240 against
~180 µs): the float output buys accuracy, not speed.

    >>> import torch
    >>> w = torch.randint(-128, 128, (4, 3, 3, 3), dtype=torch.int8)
    >>> conv = FloatOutputConv.pack(w, torch.full((4,), 0.01), None, [1, 1], [1, 1], [1, 1], 1)
    >>> x = torch.quantize_per_tensor(torch.randn(2, 3, 8, 8), 0.05, 128, torch.quint8)
    >>> y = int8_conv_float_output(x, conv, relu=False)
    >>> y.dtype, tuple(y.shape)
    (torch.float32, (2, 4, 8, 8))
    >>> bool(torch.allclose(y, torch.nn.functional.conv2d(x.dequantize(), w * 0.01, padding=1), atol=1e-4))
    True
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from fxopt.ir import leaf_function

from .kernels import raw_bytes
from .packing import check_input, conv_check_shape

_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
#: MACs per call from which oneDNN's int8 kernel beats the float conv (see the module docstring).
ONEDNN_FROM_MACS = 2_000_000
#: Input elements from which the float path's dequantize of the input costs more than oneDNN's
#: fixed cost (a 64->2 1x1 head at 64x64, batch 1: float 327 µs, oneDNN 241).
FLOAT_PATH_MAX_INPUT = 100_000
#: Packs kept per layer (one per thread count, input shape and zero point; the oldest goes
#: first), as lower-cpu's `WeightPacks.max_packs`: a weight copy each.
MAX_PACKS = 8


@dataclass(eq=False)
class FloatOutputConv:
    """An int8 conv layer for `int8_conv_float_output`. `weight` holds the int8 values
    ``[K, C/G, *kernel]``, `scales` one float32 scale per output channel; `packed` is oneDNN's
    packed weight, None where the float path computes the layer."""

    weight: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    #: the oneDNN pack `_onednn_pack` checked against the float conv: None where the float conv
    #: computes every call; calls run the packs of `_shaped` made for their own shapes
    packed: Any = field(default=None, repr=False)
    narrow: bool = False
    #: (threads, input shape, input zero point) -> oneDNN's weight packed for such calls
    #: (`pack_for`; the input's scale changes no pack: measured equal at 0.001-0.5)
    _shaped: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def pack(cls, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
             padding: list[int], dilation: list[int], groups: int, narrow: bool = False) -> "FloatOutputConv":
        """The layer of int8 `weight` values and their per-channel `scales`, with oneDNN's pack
        when oneDNN computes it right on inputs of 8 bits (7 when `narrow`, as `reduce_range`
        feeds them)."""
        conv = cls(weight, scales.float(), bias, list(stride), list(padding), list(dilation), int(groups),
                   narrow=narrow)
        conv.packed = _onednn_pack(conv, narrow)
        return conv

    @functools.cached_property
    def _zero_points(self) -> torch.Tensor:
        return torch.zeros(self.scales.numel(), dtype=torch.long)

    @property
    def dims(self) -> int:
        return self.weight.dim() - 2

    def macs(self, q: torch.Tensor) -> float:
        """About the MACs of one call on `q` (each input element meets K/G kernel taps per stride step)."""
        taps = math.prod(self.weight.shape[2:]) * self.weight.shape[0] / self.groups
        return q.numel() * taps / math.prod(self.stride)

    @functools.cached_property
    def float_weight(self) -> torch.Tensor:
        """The int8 weight's values in float (made once: small calls run the float conv)."""
        return self.weight.float() * self.scales.view(-1, *([1] * (self.dims + 1)))

    def in_float(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on the float value `x` (the dequantized input)."""
        return _CONVS[self.dims](x, self.float_weight, self.bias, self.stride, self.padding, self.dilation,
                                 self.groups)

    def pack_for(self, q: torch.Tensor) -> Any:
        """oneDNN's weight packed for a call on `q` at this thread count. The pack made without
        an input shape is in a blocked layout oneDNN may not run: every call then reordered the
        weight (ONEDNN_VERBOSE: a 512x128 1x1 weight reordered at 3.8-9 ms per call, for a
        0.4 ms conv; an outside tester's PointNet 4-9x torch.ao's time). oneDNN picks the
        layout from the input shape and the thread count, as for `lower-cpu`'s `WeightPacks`."""
        key = (torch.get_num_threads(), tuple(q.shape), q.q_zero_point())
        packed = self._shaped.get(key)
        if packed is None:
            packed = torch.ops.onednn.qconv_prepack(
                self.weight, self.scales, q.q_scale(), q.q_zero_point(), self.stride, self.padding, self.dilation,
                self.groups, list(q.shape))
            if len(self._shaped) >= MAX_PACKS:  # a graph called at ever new sizes keeps the latest
                self._shaped.pop(next(iter(self._shaped)))
            self._shaped[key] = packed
        return packed

    def run_packed(self, q: torch.Tensor, relu: bool) -> torch.Tensor:
        """oneDNN's int8 conv with a float32 output on the quint8 tensor `q`. Its conv3d takes
        no relu post-op: the relu runs after it."""
        fused = relu and self.dims < 3
        y = torch.ops.onednn.qconv_pointwise(
            raw_bytes(q), q.q_scale(), q.q_zero_point(), self.pack_for(q), self.scales,
            self._zero_points, self.bias, self.stride, self.padding,
            self.dilation, self.groups, 1.0, 0, torch.float32, "relu" if fused else "none",
            [None] if fused else [], "")
        return F.relu(y) if relu and not fused else y


@leaf_function
def int8_conv_float_output(q: torch.Tensor, conv: FloatOutputConv | torch.nn.Module, relu: bool) -> torch.Tensor:
    """`conv` (and a relu) on the int8 input `q`, in float32: oneDNN's int8 kernel on a quint8
    per-tensor `q`, the float conv of the dequantized values otherwise (no pack, or another
    input; the same value up to float rounding). `conv` may be the `fxopt.serialize.CodedValue`
    holding it: lowered graphs pass the holder (a module stays one get_attr when torch
    re-traces the code, as pickling does; a dataclass would be spelled out field by field)."""
    conv = getattr(conv, "value", conv)
    # (an empty batch takes the float path too: oneDNN's conv1d hands back its internal 4-D form)
    if conv.packed is not None and q.is_quantized and q.dtype == torch.quint8 \
            and q.qscheme() == torch.per_tensor_affine and (conv.dims == 3 or conv.macs(q) >= ONEDNN_FROM_MACS
                                                            or q.numel() >= FLOAT_PATH_MAX_INPUT):
        return conv.run_packed(q, relu)
    y = conv.in_float(q.dequantize() if q.is_quantized else q)
    return F.relu(y) if relu else y


def _onednn_pack(conv: FloatOutputConv, narrow: bool):
    """oneDNN's packed weight for `conv` (made for one input of random bytes and checked on it),
    or None: no oneDNN int8 conv in this build, or it is not within float rounding of the float
    conv on that input (a wrong kernel, or one that drops a weight bit on CPUs without VNNI)."""
    if not hasattr(torch.ops.onednn, "qconv_pointwise") or not torch.backends.mkldnn.is_available():
        return None
    x = check_input(conv_check_shape(conv.weight.shape, conv.groups, conv.stride, conv.padding, conv.dilation),
                    narrow)
    try:
        computed = conv.run_packed(x, relu=False)  # (packs for the check's shape: `pack_for`)
        reference = conv.in_float(x.dequantize())
    except RuntimeError:  # a geometry or CPU oneDNN's int8 conv does not take
        conv._shaped.clear()
        return None
    if float((computed - reference).abs().max()) > 1e-4 * float(reference.abs().max()) + 1e-6:
        conv._shaped.clear()
        return None
    return conv.pack_for(x)


__all__ = ["FloatOutputConv", "int8_conv_float_output"]
