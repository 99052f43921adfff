"""Prepacked int8 weights for torch's x86 kernels, with the packing engine chosen per layer.

A packed weight carries its engine: `quantized.conv2d` runs the kernel of the engine that
packed it, whatever `torch.backends.quantized.engine` says at run time. That is how a layer
avoids a kernel known to be wrong for its shape:

fbgemm's grouped-conv fast path (3x3 kernel, ``C/G == K/G`` in {2, 4, 8, 16}) processes
``16 // (C/G)`` groups at a time on the widest SIMD and reads and writes past its buffers
when the group count is not a multiple of that: ``Conv2d(12, 12, 3, groups=3)`` comes out
at -8 dB SQNR and corrupts the heap (torch 2.13, AVX2). Pruning a ResNeXt/RegNet group conv
makes exactly such shapes. Those layers are packed with oneDNN, which computes them right.

fbgemm's depthwise kernel is wrong for full-range (8-bit) activations: it adds pairs of
uint8 x int8 products in int16, which saturates (a ``Conv2d(256, 256, 3, groups=256)`` off by
up to 7.5 output steps, 12.7 dB SQNR against 36.2 dB on the reference backend; exact up to 96
channels on that AVX512-VNNI CPU), even where VNNI makes the dense kernels safe at 8 bits. Its
fast path also takes only "same" padding, so a depthwise conv behind an explicit pad runs on a
generic path 100x slower than oneDNN (16x144x6x6, 3x3: 3.3 ms against 30 µs, one thread). So
every depthwise conv is packed with oneDNN, which is also 2-4x faster on wide ones at batch 16.

Those are the wrong kernels known in advance. Others turn up on shapes nobody listed (oneDNN's
int8 conv with 16 channels and an 8-tap kernel gives -9 dB from 5 outputs on, under both the
`x86` and the `onednn` engine, while fbgemm computes it right), so every packed weight is
checked before it is used: one small run against the same layer in float
(`computes_right`). A pack that fails is packed again with the next engine; when no engine
computes the layer right, `prepack_conv`/`prepack_linear` return None and the caller keeps the
layer off the int8 kernels.

Example::

    >>> import torch
    >>> w = torch.quantize_per_tensor(torch.randn(12, 4, 3, 3), 0.02, 0, torch.qint8)
    >>> conv_engine(w, groups=3)
    'onednn'
    >>> conv_engine(w, groups=1)
    'x86'
    >>> conv_engine(torch.quantize_per_tensor(torch.randn(256, 1, 3, 3), 0.02, 0, torch.qint8), groups=256)
    'onednn'
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

#: Channels per group of fbgemm's grouped-conv fast path.
_GCONV_CHANNELS = (2, 4, 8, 16)


def conv_engine(weight: torch.Tensor, groups: int, engine: str = "x86") -> str:
    """The engine to pack a conv weight ``[K, C/G, *kernel]`` with: `engine`, or "onednn" for a
    conv3d (measured on a 32->32 3x3x3 conv at batch 8, one thread: fbgemm 6.1 ms, oneDNN 3.3,
    fp32 6.2), for a depthwise conv (see the module docstring), and where fbgemm's grouped-conv
    fast path could take the layer with a partial last block."""
    if "onednn" not in torch.backends.quantized.supported_engines:
        return engine
    if weight.dim() == 5:
        return "onednn"
    if groups > 1 and weight.shape[1] == 1 and weight.shape[0] == groups:
        return "onednn"
    # 2-d only: torch runs a quantized conv1d as a 1 x k conv2d, never a 3x3
    return "onednn" if _fbgemm_unsafe(weight, groups) else engine


def _fbgemm_unsafe(weight: torch.Tensor, groups: int) -> bool:
    """fbgemm's grouped-conv fast path with a partial last block: it writes past its buffers, so
    it is never packed, not even to be checked."""
    k_per_g, c_per_g = weight.shape[0] // groups, weight.shape[1]
    fast_path = (weight.dim() == 4 and groups > 1 and c_per_g == k_per_g and c_per_g in _GCONV_CHANNELS
                 and tuple(weight.shape[2:]) == (3, 3))
    return fast_path and groups % (16 // c_per_g) != 0


def _engines(first: str, weight: torch.Tensor, groups: int | None) -> list[str]:
    """`first`, then the other engines this build has that may pack the layer."""
    others = [e for e in ("fbgemm", "onednn", "x86") if e in torch.backends.quantized.supported_engines
              and e != first and not (e == "fbgemm" and groups is not None and _fbgemm_unsafe(weight, groups))]
    return [first, *others]


def prepack_conv(weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int], padding: list[int],
                 dilation: list[int], groups: int, engine: str = "x86", narrow: bool = False):
    """`quantized.conv{1,2,3}d_prepack` of an int8 weight, packed by `conv_engine`'s choice, or
    by the next engine whose kernel `computes_right` on inputs of 8 bits (7 when `narrow`, as
    `reduce_range` feeds them); None when none does."""
    prepack = {3: torch.ops.quantized.conv1d_prepack, 4: torch.ops.quantized.conv2d_prepack,
               5: torch.ops.quantized.conv3d_prepack}[weight.dim()]
    return _first_right(_engines(conv_engine(weight, groups, engine), weight, groups), weight, bias, narrow,
                        lambda: prepack(weight, bias, list(stride), list(padding), list(dilation), groups))


def prepack_linear(weight: torch.Tensor, bias: torch.Tensor | None, engine: str = "x86", narrow: bool = False):
    """`quantized.linear_prepack` of an int8 weight under `engine`, or under the next engine
    whose kernel `computes_right` (on 7-bit inputs when `narrow`); None when none does."""
    return _first_right(_engines(engine, weight, None), weight, bias, narrow,
                        lambda: torch.ops.quantized.linear_prepack(weight, bias))


def _first_right(engines: list[str], weight: torch.Tensor, bias: torch.Tensor | None, narrow: bool, pack):
    """A fresh `pack()` under the first of `engines` whose kernel `computes_right`. Fresh: a
    oneDNN pack keeps the primitive of its first call's shape, and calls at other shapes take
    a slower path, so the pack that was checked is not the one handed out."""
    for candidate in engines:
        with quantized_engine(candidate):
            if computes_right(pack(), weight, bias, narrow):
                return pack()
    return None


#: Outputs per spatial axis of the check run: wrong kernels seen so far go wrong from a few
#: outputs on (the oneDNN conv in the module docstring from 5), never only on large inputs.
_CHECK_OUTPUTS = {1: 32, 2: 8, 3: 4}


def computes_right(packed, weight: torch.Tensor, bias: torch.Tensor | None, narrow: bool = False) -> bool:
    """Whether the packed kernel gives what the same layer computes in float, on one input of
    random bytes over the range the kernel will read: all 8 bits, or 7 when `narrow` (without
    VNNI the kernels add pairs of products in int16 and `reduce_range` keeps them from
    saturating, so 8-bit inputs would fail every engine there). Batch 1; a conv with a few
    outputs per axis, a linear with 16 rows. Every output must be within 2 steps of the float
    result on the same output grid (rounding differs by at most one; the wrong kernels seen were
    off by tens of steps, or by 7 where int16 sums saturate).

        >>> w = torch.quantize_per_tensor(torch.randn(8, 4, 3, 3), 0.02, 0, torch.qint8)
        >>> computes_right(torch.ops.quantized.conv2d_prepack(w, None, [1, 1], [1, 1], [1, 1], 1), w, None)
        True
    """
    F = torch.nn.functional
    if hasattr(packed, "stride"):  # a conv
        dims = weight.dim() - 2
        # a conv1d is packed as a 1 x k conv2d: its geometry has a leading entry for the 1
        stride, padding, dilation = (list(v)[-dims:] for v in (packed.stride(), packed.padding(), packed.dilation()))
        shape = conv_check_shape(weight.shape, packed.groups(), stride, padding, dilation)
        convolution = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        run = {1: torch.ops.quantized.conv1d, 2: torch.ops.quantized.conv2d.new,
               3: torch.ops.quantized.conv3d.new}[dims]
        in_float = lambda x: convolution(x, weight.dequantize(), bias, stride, padding, dilation,  # noqa: E731
                                         packed.groups())
    else:
        shape, run = (16, weight.shape[1]), torch.ops.quantized.linear
        in_float = lambda x: F.linear(x, weight.dequantize(), bias)  # noqa: E731
    x = check_input(shape, narrow)
    reference = in_float(x.dequantize())
    scale = max(float(reference.abs().max()) / 127, 1e-8)
    out = run(x, packed, scale, 128)
    expected = torch.quantize_per_tensor(reference, scale, 128, torch.quint8)
    return bool((out.int_repr().int() - expected.int_repr().int()).abs().max() <= 2)


def conv_check_shape(weight_shape: torch.Size, groups: int, stride: list[int], padding: list[int],
                     dilation: list[int]) -> tuple[int, ...]:
    """The batch-1 input shape that gives a conv with weight `weight_shape` `_CHECK_OUTPUTS`
    outputs on each spatial axis."""
    dims = len(weight_shape) - 2
    size = [max((_CHECK_OUTPUTS[dims] - 1) * s + d * (k - 1) + 1 - 2 * p, 1)
            for s, p, d, k in zip(stride, padding, dilation, weight_shape[2:])]
    return (1, weight_shape[1] * groups, *size)


def check_input(shape: tuple[int, ...], narrow: bool = False) -> torch.Tensor:
    """A quint8 tensor of random bytes over the range a kernel reads: all 8 bits, or 7 when
    `narrow`; the same bytes on every call."""
    levels = 128 if narrow else 256
    generator = torch.Generator().manual_seed(0)
    return torch._make_per_tensor_quantized_tensor(
        torch.randint(0, levels, shape, dtype=torch.uint8, generator=generator), 0.05, levels // 2)


@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """Set `torch.backends.quantized.engine` for a block, restoring it after."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous
