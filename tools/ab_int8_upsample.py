"""A/B of `quantize` on upsampling between int8 layers: float, or an int8 pass-through.

A: a nearest (or nearest-exact) `F.interpolate` / `nn.Upsample`, or a `PixelShuffle`, runs in
float, so the conv before it writes float and the upsampled map is quantized again before the
next int8 layer (what `quantize` did before these changes); B: it is an int8 pass-through
(every output element is a copy of an input one: one grid in and out), as torch.ao keeps it
(`passes/quantize/plan.py`: `_copies_nearest`, "pixel_shuffle" in `PASS_THROUGH`, run by
`kernels.int8_pixel_shuffle`). Models: an FPN-style top-down path (strided convs, two
upsamples, concatenations), a U-Net-style decoder (conv, nearest-exact upsample, add the skip)
and an EDSR-style super-resolution net (residual body, conv -> PixelShuffle(2) -> ReLU). Prints latency (`fxopt.measure.compare_latency`, one thread, interleaved rounds) of fp32
eager, torch.ao FX int8 (x86; the peer), A and B at batch 1 and 16, and each int8 model's SQNR
against fp32 on a held-out batch.

    python tools/ab_int8_upsample.py --rounds 7
"""
from __future__ import annotations

import contextlib
import pathlib
import sys
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from fxopt.passes.quantize import plan

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import quantize_ab  # noqa: E402  (a sibling module, not a package)


class TopDown(nn.Module):
    """Three strided convs, then two nearest upsamples each concatenated with a skip."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 32, 3, 2, 1), nn.Conv2d(32, 64, 3, 2, 1), nn.Conv2d(64, 64, 3, 2, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.m2, self.m1 = nn.Conv2d(128, 64, 3, padding=1), nn.Conv2d(96, 32, 3, padding=1)
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        a = F.relu(self.c1(x))
        b = F.relu(self.c2(a))
        c = F.relu(self.c3(b))
        d = F.relu(self.m2(torch.cat([self.up(c), b], 1)))
        e = F.relu(self.m1(torch.cat([F.interpolate(d, scale_factor=2.0, mode="nearest"), a], 1)))
        return self.head(e)


class Decoder(nn.Module):
    """A U-Net's decoder: each stage convs, upsamples (nearest-exact) and adds the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.d1, self.d2, self.d3 = nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 32, 3, 2, 1), nn.Conv2d(32, 64, 3, 2, 1)
        self.u3, self.u2, self.u1 = nn.Conv2d(64, 32, 3, padding=1), nn.Conv2d(32, 16, 3, padding=1), \
            nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        s1 = F.relu(self.d1(x))
        s2 = F.relu(self.d2(s1))
        x = F.relu(self.d3(s2))
        x = F.interpolate(F.relu(self.u3(x)), scale_factor=2, mode="nearest-exact") + s2
        x = F.interpolate(F.relu(self.u2(x)), scale_factor=2, mode="nearest-exact") + s1
        x = F.interpolate(F.relu(self.u1(x)), scale_factor=2, mode="nearest-exact")
        return self.head(x)


class SuperResolution(nn.Module):
    """EDSR-like: a residual body, conv -> PixelShuffle(2) -> ReLU, a tail conv, plus the
    nearest-upsampled input."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
                                  for _ in range(2))
        self.up = nn.Sequential(nn.Conv2d(c, 4 * c, 3, padding=1), nn.PixelShuffle(2), nn.ReLU())
        self.tail = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x):
        h = self.head(x)
        b = h
        for block in self.body:
            b = b + block(b)
        return self.tail(self.up(b + h)) + F.interpolate(x, scale_factor=2, mode="nearest")


def models() -> dict:
    torch.manual_seed(0)
    return {"fpn_top_down": TopDown().eval(), "unet_decoder": Decoder().eval(), "edsr": SuperResolution().eval()}


def _before():
    """The lowering before: nearest upsampling and PixelShuffle ran in float."""
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(plan, "_copies_nearest", lambda view: False))
    stack.enter_context(mock.patch.object(plan, "PASS_THROUGH", plan.PASS_THROUGH - {"pixel_shuffle", "pixel_unshuffle"}))
    return stack


if __name__ == "__main__":
    quantize_ab.main(__doc__.splitlines()[0], models(), _before, ("float upsample", "int8 upsample"), (3, 64, 64))
