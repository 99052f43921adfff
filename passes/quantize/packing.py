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
    k_per_g, c_per_g = weight.shape[0] // groups, weight.shape[1]
    if groups > 1 and c_per_g == 1 and k_per_g == 1:
        return "onednn"
    # 2-d only: torch runs a quantized conv1d as a 1 x k conv2d, never a 3x3
    fast_path = (groups > 1 and c_per_g == k_per_g and c_per_g in _GCONV_CHANNELS
                 and tuple(weight.shape[2:]) == (3, 3))
    if fast_path and groups % (16 // c_per_g):
        return "onednn"
    return engine


def prepack_conv(weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int], padding: list[int],
                 dilation: list[int], groups: int, engine: str = "x86"):
    """`quantized.conv{1,2,3}d_prepack` of an int8 weight, packed by `conv_engine`'s choice."""
    prepack = {3: torch.ops.quantized.conv1d_prepack, 4: torch.ops.quantized.conv2d_prepack,
               5: torch.ops.quantized.conv3d_prepack}[weight.dim()]
    with quantized_engine(conv_engine(weight, groups, engine)):
        return prepack(weight, bias, list(stride), list(padding), list(dilation), groups)


def prepack_linear(weight: torch.Tensor, bias: torch.Tensor | None, engine: str = "x86"):
    """`quantized.linear_prepack` of an int8 weight under `engine`."""
    with quantized_engine(engine):
        return torch.ops.quantized.linear_prepack(weight, bias)


@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """Set `torch.backends.quantized.engine` for a block, restoring it after."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous
