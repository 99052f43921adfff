"""A/B of `lower-cpu` on channel shuffles: spelled out, or one `torch.channel_shuffle`.

A: `fuse,lower-cpu` with the shuffle left as written (``view -> transpose -> contiguous ->
view``: on the channels-last outputs of lowered convs a copy to row-major, the shuffle's copy
and a copy back before the next conv; what `lower-cpu` did before this change); B: the same
pipeline now, where it is `torch.channel_shuffle(x, g)` on the channels-last value
(`passes/fuse/rules.py`, `CHANNEL_SHUFFLE`). Models: a ShuffleNetV2 (stride-2 and stride-1
units, widths 48/96/192 at 64x64) and a ShuffleNetV2 unit stack at 28x28, 116 channels.
Prints latency of eager, torch.fx's `fuse`, ONNX Runtime, A and B at batch 1 and 16
(`fuse_ab.main`).

    python tools/ab_channel_shuffle.py --rounds 5
"""
from __future__ import annotations

import pathlib
import sys
from unittest import mock

import torch
from torch import nn

from fxopt.passes.fuse import rules
from fxopt.patterns import PatternSet

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import fuse_ab  # noqa: E402  (a sibling module, not a package)


def _channel_shuffle(x, groups: int):  # torchvision's spelling
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


def _cbr(i: int, o: int, k: int = 1, s: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(i, o, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(o)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class Unit(nn.Module):
    def __init__(self, i: int, o: int, stride: int) -> None:
        super().__init__()
        half = o // 2
        self.stride = stride
        self.left = nn.Sequential(_cbr(i, i, 3, stride, i, relu=False), _cbr(i, half)) if stride > 1 else None
        cin = i if stride > 1 else half
        self.right = nn.Sequential(_cbr(cin, half), _cbr(half, half, 3, stride, half, relu=False), _cbr(half, half))

    def forward(self, x):
        if self.stride > 1:
            out = torch.cat((self.left(x), self.right(x)), 1)
        else:
            a, b = x.chunk(2, 1)
            out = torch.cat((a, self.right(b)), 1)
        return _channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        units, c = [], 24
        for o, n in ((48, 3), (96, 4), (192, 2)):
            units += [Unit(c, o, 2)] + [Unit(o, o, 1) for _ in range(n - 1)]
            c = o
        self.stem, self.units = _cbr(3, 24, 3, 2), nn.Sequential(*units)
        self.head = nn.Linear(192, 10)

    def forward(self, x):
        return self.head(self.units(self.stem(x)).mean((2, 3)))


def models() -> dict:
    return {"shufflenet_v2": (fuse_ab.with_statistics(ShuffleNetV2()), (3, 64, 64)),
            "units_116": (fuse_ab.with_statistics(nn.Sequential(*[Unit(116, 116, 1) for _ in range(4)])), (116, 28, 28))}


def _spelled_out():
    return mock.patch.object(rules, "CHANNEL_SHUFFLE", PatternSet([]))


if __name__ == "__main__":
    fuse_ab.main(__doc__.splitlines()[0], models(), _spelled_out, ("spelled out", "channel_shuffle"))
