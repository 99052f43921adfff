"""A/B of `lower-cpu` on pools and upsamples: row-major where no lowered conv wrote, or channels-last.

A: `fuse,lower-cpu` as it was before this change: a small dense conv's batch switch
(`ConvByBatch`) ran aten's conv on its input's layout below its batch, so from a row-major
graph input on everything stayed row-major up to the first always-lowered conv, and the
pools and upsamples there ran torch's row-major kernels, 10-40x slower than its channels-last
ones on this build (max_pool2d k2 on 4x64x48x48: 13.3 vs 0.34 ms, one thread). B: the switch
runs aten's conv in the layout fastest for its layer (channels-last for a k x k conv reading
and writing 32 channels or more: `ConvByBatch._aten_layout`), and a 2-D pool or
nearest/bilinear resize of 8 channels or more reads a channels-last copy of a row-major
input (`passes/fuse/lower_cpu.py`, `_faster_channels_last`). Models: a SqueezeNet (fire
modules, max pools), a small stacked-hourglass-style net (max pools, nearest upsamples), a
U-Net (max pools, bilinear upsamples), and the zoo's digits CNN, ResNet-18 and MobileNetV2 as
controls. Prints latency of eager, torch.fx's `fuse`, ONNX Runtime, A and B at batch 1 and 16
(`fuse_ab.main`).

    python tools/ab_channels_last.py --rounds 5
"""
from __future__ import annotations

import contextlib
import pathlib
import sys
from unittest import mock

import torch
from torch import nn

from fxopt.examples import zoo
from fxopt.passes.fuse import lower_cpu

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import fuse_ab  # noqa: E402  (a sibling module, not a package)


class _RowMajorSwitch(lower_cpu.ConvByBatch):
    """The batch switch as it was: aten's conv on the input's own layout below the batch."""

    def forward(self, x, weight, bias, other=None):
        if x.shape[0] >= self.min_batch or x.dim() != 4:
            return super().forward(x, weight, bias, other)
        y = torch.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if other is not None:
            y = y.add_(other) if other.shape == y.shape and other.dtype == y.dtype else y + other
        return lower_cpu._eager_post_op(y, self.attr, self.scalars, self.algorithm)


@contextlib.contextmanager
def _row_major():
    with mock.patch.object(lower_cpu, "ConvByBatch", _RowMajorSwitch), \
            mock.patch.object(lower_cpu, "_faster_channels_last", lambda view: "off (A)"):
        yield


def _cbr(i: int, o: int, k: int = 3, s: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, k, s, k // 2, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class Fire(nn.Module):
    def __init__(self, i: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = _cbr(i, squeeze, 1)
        self.e1, self.e3 = _cbr(squeeze, expand, 1), _cbr(squeeze, expand, 3)

    def forward(self, x):
        s = self.squeeze(x)
        return torch.cat([self.e1(s), self.e3(s)], 1)


class SqueezeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _cbr(3, 64, 3, 2), nn.MaxPool2d(3, 2, ceil_mode=True), Fire(64, 16, 64), Fire(128, 16, 64),
            nn.MaxPool2d(3, 2, ceil_mode=True), Fire(128, 32, 128), Fire(256, 32, 128),
            nn.MaxPool2d(3, 2, ceil_mode=True), Fire(256, 48, 192), Fire(384, 64, 256))
        self.head = nn.Conv2d(512, 10, 1)

    def forward(self, x):
        return self.head(self.features(x)).mean((2, 3))


class Hourglass(nn.Module):
    """A recursive hourglass: max-pool down, residual blocks, nearest upsample, add."""

    def __init__(self, depth: int, c: int) -> None:
        super().__init__()
        self.skip, self.down = _cbr(c, c), _cbr(c, c)
        self.inner = Hourglass(depth - 1, c) if depth > 1 else _cbr(c, c)
        self.up = _cbr(c, c)

    def forward(self, x):
        low = self.up(self.inner(self.down(nn.functional.max_pool2d(x, 2))))
        return self.skip(x) + nn.functional.interpolate(low, scale_factor=2)


class UNet(nn.Module):
    def __init__(self, widths=(16, 32, 64)) -> None:
        super().__init__()
        self.stem = _cbr(3, widths[0])
        self.downs = nn.ModuleList(_cbr(a, b) for a, b in zip(widths, widths[1:]))
        self.ups = nn.ModuleList(_cbr(b + a, a) for a, b in zip(widths, widths[1:]))

    def forward(self, x):
        skips, h = [], self.stem(x)
        for down in self.downs:
            skips.append(h)
            h = down(nn.functional.max_pool2d(h, 2))
        for up, skip in zip(reversed(self.ups), reversed(skips)):
            h = up(torch.cat([nn.functional.interpolate(h, scale_factor=2, mode="bilinear"), skip], 1))
        return h


def models() -> dict:
    out = {"squeezenet": (fuse_ab.with_statistics(SqueezeNet()), (3, 96, 96)),
           "hourglass": (fuse_ab.with_statistics(nn.Sequential(_cbr(3, 32, 3, 2), Hourglass(3, 32))), (3, 64, 64)),
           "unet": (fuse_ab.with_statistics(UNet()), (3, 64, 64))}
    for name in ("digits", "resnet18", "mobilenet_v2"):
        model, inputs = zoo.get(name, batch=2)
        out[name] = (model.eval(), tuple(inputs[0].shape[1:]) if isinstance(inputs, tuple) else tuple(inputs.shape[1:]))
    return out


if __name__ == "__main__":
    fuse_ab.main(__doc__.splitlines()[0], models(), _row_major, ("row-major", "channels-last"))
