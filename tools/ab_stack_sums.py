"""A/B of `fuse` on sums over a stacked axis: the stack summed, or the pieces added.

A: the pipeline with ``stack(xs, 1).sum(1)`` and ``(stack(xs, 1) * a).sum(1)`` left as written
(what `fuse` did before `STACK_SUMS`); B: the same pipeline now, where they are the pieces
added (times their slices of `a`) (`passes/fuse/rules.py`, `STACK_SUMS`). Run for `fuse` and
`fuse,lower-cpu` (where the stack reads lowered convs' channels-last values). Model: an
SKNet-style net (selective-kernel units of two and three dilated grouped branches, 64 and
128 channels at 32x32 and 16x16).

    python tools/ab_stack_sums.py [--rounds 5 --repeats 20]
"""
from __future__ import annotations

from unittest import mock

import torch
from torch import nn

import fuse_ab
from fxopt.passes.fuse import rules
from fxopt.patterns import PatternSet


def _cbr(cin: int, cout: int, k: int, stride: int = 1, dilation: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, dilation * (k // 2), dilation, groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SelectiveKernel(nn.Module):
    """SKNet's unit: branches of growing dilation, fused by a softmax over the branches."""

    def __init__(self, c: int, branches: int, reduction: int = 4) -> None:
        super().__init__()
        self.branches = nn.ModuleList([_cbr(c, c, 3, dilation=1 + i, groups=8) for i in range(branches)])
        self.squeeze = _cbr(c, c // reduction, 1)
        self.excite = nn.Conv2d(c // reduction, c * branches, 1)

    def forward(self, x):
        fs = torch.stack([b(x) for b in self.branches], 1)
        a = self.excite(self.squeeze(fs.sum(1).mean((2, 3), keepdim=True)))
        a = a.view(x.shape[0], len(self.branches), -1, 1, 1).softmax(1)
        return x + (fs * a).sum(1)


def sknet() -> nn.Module:
    return nn.Sequential(_cbr(3, 64, 3), SelectiveKernel(64, 2), SelectiveKernel(64, 3), _cbr(64, 128, 3, 2),
                         SelectiveKernel(128, 2), SelectiveKernel(128, 3))


def models() -> dict:
    return {"sknet": (fuse_ab.with_statistics(sknet()), (3, 32, 32))}


def _stacked():
    return mock.patch.object(rules, "STACK_SUMS", PatternSet([]))


if __name__ == "__main__":
    fuse_ab.main(__doc__.splitlines()[0], models(), _stacked, ("stack summed", "pieces added"),
                 pipelines=("fuse", "fuse,lower-cpu"))
