"""`fuse` vs `fuse,lower-cpu` on TCN-style conv1d stacks (``x + relu(bn(conv(x)))`` blocks).

Prints lowered / fused latency per batch size (one thread, `fxopt.measure.compare_latency`:
interleaved rounds, best median), for dense and dilated conv1d blocks of a few widths:

    python tools/ab_conv1d.py --rounds 5
"""
from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

import fxopt
from fxopt.measure import compare_latency


class TCN(nn.Module):
    """Four residual blocks of conv1d + batchnorm + relu at one dilation."""

    def __init__(self, channels: int, dilation: int, blocks: int = 4) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation)
                                   for _ in range(blocks))
        self.norms = nn.ModuleList(nn.BatchNorm1d(channels) for _ in range(blocks))

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = x + torch.relu(norm(conv(x)))
        return x


CASES = [(32, 256, 1), (64, 128, 1), (32, 256, 4), (64, 128, 2)]  # channels, length, dilation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print("| channels x length | dilation | " + " | ".join(f"batch {b} lowered / fused (fused ms)" for b in args.batches)
          + " |")
    print("|---|---|" + "---|" * len(args.batches))
    for channels, length, dilation in CASES:
        torch.manual_seed(0)
        model = TCN(channels, dilation).eval()
        example = (torch.randn(2, channels, length),)
        fused = fxopt.optimize(model, example, "fuse").module
        lowered = fxopt.optimize(model, example, "fuse,lower-cpu").module
        inputs = {b: (torch.randn(b, channels, length),) for b in args.batches}
        with torch.no_grad():
            lat = compare_latency({"fused": fused, "lowered": lowered}, inputs, rounds=args.rounds, repeats=20)
        cells = [f"{lat['lowered'][b] / lat['fused'][b]:.2f} ({lat['fused'][b]:.3f})" for b in args.batches]
        print(f"| {channels} x {length} | {dilation} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
