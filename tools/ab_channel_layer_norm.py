"""A/B of `fuse` on a layer norm over an image's channels, spelled out or one call.

A: ConvNeXt's / NAFNet's LayerNorm2d left as written (``u = x.mean(1, keepdim=True);
(x - u) / sqrt((x - u).pow(2).mean(1, keepdim=True) + eps) * w + b``: what `fuse` did before
`CHANNEL_LAYER_NORMS`); B: the same pipeline now, one `channel_layer_norm` call, which is
torch's `layer_norm` over the (N, H, W, C) view of a channels-last value
(`passes/fuse/rules.py`). Run for `fuse` and `fuse,lower-cpu` (where the values are
channels-last). Model: NAFNet-style blocks (LayerNorm2d, 1x1 conv, depthwise 3x3,
SimpleGate, channel attention; 32 and 64 channels at 64x64 and 32x32).

    python tools/ab_channel_layer_norm.py [--rounds 5 --repeats 20]
"""
from __future__ import annotations

from unittest import mock

import torch
from torch import nn

import fuse_ab
from fxopt.passes.fuse import rules
from fxopt.patterns import PatternSet


class LayerNorm2d(nn.Module):
    def __init__(self, c: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class NAFBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = LayerNorm2d(c), LayerNorm2d(c)
        self.conv1, self.conv2 = nn.Conv2d(c, 2 * c, 1), nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.conv3, self.sca = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.conv4, self.conv5 = nn.Conv2d(c, 2 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        a, b = self.conv2(self.conv1(self.norm1(x))).chunk(2, dim=1)
        y = a * b
        y = self.conv3(y * self.sca(y.mean((2, 3), keepdim=True)))
        x = x + y
        a, b = self.conv4(self.norm2(x)).chunk(2, dim=1)
        return x + self.conv5(a * b)


def nafnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), NAFBlock(32), NAFBlock(32), nn.Conv2d(32, 64, 2, 2),
                         NAFBlock(64), NAFBlock(64), nn.Conv2d(64, 3, 1))


def models() -> dict:
    torch.manual_seed(0)
    model = nafnet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LayerNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return {"nafnet": (model.eval(), (3, 64, 64))}


def _spelled_out():
    return mock.patch.object(rules, "CHANNEL_LAYER_NORMS", PatternSet([]))


if __name__ == "__main__":
    fuse_ab.main(__doc__.splitlines()[0], models(), _spelled_out, ("spelled out", "channel_layer_norm"),
                 pipelines=("fuse", "fuse,lower-cpu"))
