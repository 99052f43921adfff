"""A/B of `fuse` on transposed conv + batchnorm decoders: the folded shift as the conv's bias or
as an add after it.

A: the batchnorm's shift folded into a bias-less transposed conv as its bias (what `fuse` did
at groups=1 before this change); B: the shift added after the conv (`_shift_after` in
passes/fuse/rules.py), which torch's CPU conv_transpose runs without its slower bias path.
Models: decoders of two ConvTranspose(k=3, stride 2, padding 1, bias=False) + BatchNorm + ReLU
in 1-D, 2-D and 3-D, and a U-Net up-sampler (k=2, stride 2), which keeps its bias in both.
Prints latency (`fxopt.measure.compare_latency`, one thread, interleaved rounds) of eager,
torch.fx's `fuse` (the peer), A and B at batch 1 and 16.

    python tools/ab_conv_transpose.py --rounds 7
"""
from __future__ import annotations

import argparse
import copy
import warnings
from unittest import mock

import torch
import torch.fx.experimental.optimization as fx_optimization
from torch import nn

import fxopt
from fxopt.measure import compare_latency
from fxopt.passes.fuse import rules


def decoder(dim: int, kernel: int = 3, stride: int = 2, padding: int = 1) -> nn.Module:
    conv = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dim]
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
    layers = []
    for _ in range(2):
        bn = norm(16)
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
        layers += [conv(16, 16, kernel, stride, padding, bias=False), bn, nn.ReLU()]
    return nn.Sequential(*layers).eval()


def models() -> dict:
    torch.manual_seed(0)
    return {"decoder_1d": (decoder(1), (16, 128)), "decoder_2d": (decoder(2), (16, 16, 16)),
            "decoder_3d": (decoder(3), (16, 6, 6, 6)), "upsampler_2d": (decoder(2, 2, 2, 0), (16, 16, 16))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    print("| model | batch | eager ms | torch.fx fuse ms | A ms (bias) | B ms (add after) | B / A | B / eager |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (model, shape) in models().items():
        example = (torch.randn(2, *shape),)
        with mock.patch.object(rules, "_shift_after", lambda conv: False):
            a = fxopt.optimize(model, example, "fuse", verify=False).module
        b = fxopt.optimize(model, example, "fuse", verify=False).module
        fns = {"eager": model, "torch.fx": fx_optimization.fuse(copy.deepcopy(model)), "A": a, "B": b}
        inputs = {batch: (torch.randn(batch, *shape),) for batch in (1, 16)}
        with torch.no_grad():
            for x in inputs.values():
                torch.testing.assert_close(b(*x), model(*x), rtol=1e-4, atol=1e-4)
            t = compare_latency(fns, inputs, rounds=args.rounds, repeats=args.repeats)
        for batch in inputs:
            row = {k: t[k][batch] for k in fns}
            print(f"| {name} | {batch} | {row['eager']:.3f} | {row['torch.fx']:.3f} | {row['A']:.3f} | "
                  f"{row['B']:.3f} | {row['B'] / row['A']:.2f} | {row['B'] / row['eager']:.2f} |")


if __name__ == "__main__":
    main()
