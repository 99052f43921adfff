"""A/B of `fuse` on a batchnorm after a channel cat of convs: kept, or folded into each conv.

A: the pipeline with `bn(cat(conv_a(x), conv_b(y)))` left as written (what `fuse` did before
the `bn-into-cat/n` patterns); B: the same pipeline now, where each conv takes its slice of the
batchnorm (`passes/fuse/rules.py`, `_BN_INTO_CAT`). Run for `fuse` and `fuse,lower-cpu`.
Model: a CSPDarknet-style backbone (YOLOv4/v5's BottleneckCSP: `act(bn(cat(cv3(m(cv1(x))),
cv2(x))))`, LeakyReLU(0.1), widths 32-128 at 64x64).

    python tools/ab_bn_into_cat.py [--rounds 5 --repeats 20]
"""
from __future__ import annotations

from unittest import mock

import torch
from torch import nn

import fuse_ab
from fxopt.passes.fuse import rules
from fxopt.patterns import PatternSet


def _cbl(cin: int, cout: int, k: int = 1, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.LeakyReLU(0.1, inplace=True))


class Bottleneck(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_cbl(c, c), _cbl(c, c, 3))

    def forward(self, x):
        return x + self.body(x)


class BottleneckCSP(nn.Module):
    def __init__(self, cin: int, cout: int, blocks: int) -> None:
        super().__init__()
        hidden = cout // 2
        self.cv1, self.cv2 = _cbl(cin, hidden), nn.Conv2d(cin, hidden, 1, bias=False)
        self.cv3, self.cv4 = nn.Conv2d(hidden, hidden, 1, bias=False), _cbl(2 * hidden, cout)
        self.blocks = nn.Sequential(*[Bottleneck(hidden) for _ in range(blocks)])
        self.bn, self.act = nn.BatchNorm2d(2 * hidden), nn.LeakyReLU(0.1, inplace=True)

    def forward(self, x):
        y1 = self.cv3(self.blocks(self.cv1(x)))
        return self.cv4(self.act(self.bn(torch.cat((y1, self.cv2(x)), 1))))


def csp_darknet() -> nn.Module:
    return nn.Sequential(_cbl(3, 32, 3), _cbl(32, 64, 3, 2), BottleneckCSP(64, 64, 1), _cbl(64, 128, 3, 2),
                         BottleneckCSP(128, 128, 2))


def models() -> dict:
    return {"csp_darknet": (fuse_ab.with_statistics(csp_darknet()), (3, 64, 64))}


def _kept():
    return mock.patch.object(rules, "FOLDS", PatternSet(p for p in rules.FOLDS if p.name not in rules.BN_INTO_CAT))


if __name__ == "__main__":
    fuse_ab.main(__doc__.splitlines()[0], models(), _kept, ("batchnorm kept", "folded"),
                 pipelines=("fuse", "fuse,lower-cpu"))
