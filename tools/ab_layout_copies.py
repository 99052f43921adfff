"""A/B of `lower-cpu`'s channels-last copies in front of norm -> activation -> conv chains.

A: every lowered conv copies its input to channels-last where it reads it (the lowering before
this change); B: a chain of layout followers (norms, elementwise ops) from a value the graph
already copies to channels-last reads that copy, so the conv reads a channels-last value and its
own copy goes (`_read_copies_early` in passes/fuse/lower_cpu.py). Models: a UNet / diffusion
residual block (GroupNorm -> SiLU -> conv3x3, three times, plus the block's input), at 32x32
(power-of-two rows, where a row-major -> channels-last copy is slowest) and 28x28; a small
diffusion-style UNet (stem, residual blocks, down, upsample, skip cat, head); a pre-activation
ResNet stage (BatchNorm -> ReLU -> conv, no fold); ResNet-18 (no such chain: the
control). Prints latency (`fxopt.measure.compare_latency`, one thread, interleaved rounds) of
eager, `fuse` and both `fuse,lower-cpu` variants at batch 1 and 8, and how many copies B shared.

    python tools/ab_layout_copies.py --rounds 7
"""
from __future__ import annotations

import argparse
import warnings
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.examples import zoo
from fxopt.measure import compare_latency
from fxopt.passes.fuse import lower_cpu


class NormActConv(nn.Module):
    """A UNet / diffusion residual block: three GroupNorm -> SiLU -> conv3x3, plus the input."""

    def __init__(self, c: int = 32):
        super().__init__()
        self.norms = nn.ModuleList(nn.GroupNorm(8, c) for _ in range(3))
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(3))

    def forward(self, x):
        h = x
        for norm, conv in zip(self.norms, self.convs):
            h = conv(F.silu(norm(h)))
        return x + h


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.n2, self.c2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.c2(F.silu(self.n2(self.c1(F.silu(self.n1(x))))))


class SmallUNet(nn.Module):
    """A diffusion-style UNet: a stem conv, GroupNorm -> SiLU -> conv residual blocks, a strided
    conv down, a nearest upsample, a skip concatenation, a GroupNorm -> SiLU -> conv head."""

    def __init__(self, c: int = 32):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.enc = ResBlock(c, c)
        self.down = nn.Conv2d(c, 2 * c, 3, 2, 1)
        self.mid = ResBlock(2 * c, 2 * c)
        self.dec = ResBlock(3 * c, c)
        self.norm, self.head = nn.GroupNorm(8, c), nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x):
        skip = self.enc(self.stem(x))
        h = F.interpolate(self.mid(self.down(skip)), scale_factor=2.0, mode="nearest")
        return self.head(F.silu(self.norm(self.dec(torch.cat([h, skip], 1)))))


class PreActStage(nn.Module):
    """Two pre-activation residual blocks: BatchNorm -> ReLU -> conv (nothing to fold into)."""

    def __init__(self, c: int = 64):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(4))
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(4))

    def forward(self, x):
        for i in (0, 2):
            h = self.convs[i](F.relu(self.bns[i](x)))
            x = x + self.convs[i + 1](F.relu(self.bns[i + 1](h)))
        return x


def models() -> dict:
    torch.manual_seed(0)
    pre_act = PreActStage().eval()
    for bn in pre_act.bns:  # running statistics of a trained net
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
    return {"unet_block_32x32": (NormActConv().eval(), (32, 32, 32)),
            "unet_block_28x28": (NormActConv().eval(), (32, 28, 28)),
            "small_unet_32x32": (SmallUNet().eval(), (3, 32, 32)),
            "preact_stage_28x28": (pre_act, (64, 28, 28)),
            "resnet18": (zoo.get("resnet18", batch=1)[0].eval(), (3, 32, 32))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    print("| model | batch | eager ms | fuse ms | A ms | B ms | B / A | B / eager | copies shared |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (model, shape) in models().items():
        example = (torch.randn(2, *shape),)
        with mock.patch.object(lower_cpu, "_read_copies_early", lambda gm: 0):
            a = fxopt.optimize(model, example, "fuse,lower-cpu", verify=False).module
        b_result = fxopt.optimize(model, example, "fuse,lower-cpu", verify=False)
        shared = b_result.passes[-1].stats["layout_copies_shared"]
        fns = {"eager": model, "fuse": fxopt.optimize(model, example, "fuse", verify=False).module,
               "A": a, "B": b_result.module}
        inputs = {batch: (torch.randn(batch, *shape),) for batch in (1, 8)}
        with torch.no_grad():
            for batch, x in inputs.items():
                torch.testing.assert_close(b_result.module(*x), model(*x), rtol=1e-4, atol=1e-4)
            t = compare_latency(fns, inputs, rounds=args.rounds, repeats=args.repeats)
        for batch in inputs:
            row = {k: t[k][batch] for k in fns}
            print(f"| {name} | {batch} | {row['eager']:.2f} | {row['fuse']:.2f} | {row['A']:.2f} | {row['B']:.2f} | "
                  f"{row['B'] / row['A']:.2f} | {row['B'] / row['eager']:.2f} | {shared} |")


if __name__ == "__main__":
    main()
