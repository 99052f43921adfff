"""A/B of `fuse`'s spelled-out activation forms: eager vs `fuse,lower-cpu` with and without them.

    python tools/ab_activations.py --rounds 3

Two models that write their activation by hand: an EfficientNet-shaped CNN (MBConv blocks,
swish as ``x * sigmoid(x)``, 112x112 input) and a GPT-2-shaped MLP stack (4 residual blocks of
linear 256→1024, the tanh GELU spelled out as GPT-2's `NewGELUActivation`, linear back; 64
tokens). Both are captured symbolically and transformed at batch 2; every variant is timed in
the same interleaved rounds (`fxopt.measure.compare_latency`, one thread) at batch 1 and 16.
Prints the best median ms and the ratio to eager.
"""
from __future__ import annotations

import argparse
import math
import warnings

import torch
from torch import nn

import fxopt
from fxopt.measure import compare_latency


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class NewGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _mbconv(cin: int, cout: int, expand: int = 4) -> nn.Sequential:
    h = cin * expand
    return nn.Sequential(nn.Conv2d(cin, h, 1, bias=False), nn.BatchNorm2d(h), Swish(),
                         nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), Swish(),
                         nn.Conv2d(h, cout, 1, bias=False), nn.BatchNorm2d(cout))


class EfficientNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), Swish())
        self.blocks = nn.Sequential(_mbconv(32, 32), _mbconv(32, 48), _mbconv(48, 48), _mbconv(48, 64))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class GPT2MLPs(nn.Module):
    def __init__(self, d: int = 256, layers: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(d, 4 * d), NewGELU(), nn.Linear(4 * d, d))
                                    for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


MODELS = {"efficientnet-ish": (EfficientNetish, (3, 112, 112)), "gpt2-mlp": (GPT2MLPs, (64, 256))}
VARIANTS = {"fuse{activations=false},lower-cpu": "fuse{activations=false},lower-cpu", "fuse,lower-cpu": "fuse,lower-cpu"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    print("| model | variant | batch 1 ms (ratio) | batch 16 ms (ratio) |\n|---|---|---|---|")
    for name, (build, sample) in MODELS.items():
        model = build().eval()
        fns = {"eager": model}
        for label, pipeline in VARIANTS.items():
            fns[label] = fxopt.optimize(model, (torch.randn(2, *sample),), pipeline=pipeline, mode="symbolic").module
        lat = compare_latency(fns, {1: (torch.randn(1, *sample),), 16: (torch.randn(16, *sample),)},
                              rounds=args.rounds, repeats=args.repeats)
        for label, row in lat.items():
            cells = [f"{row[b]:.2f} ({row[b] / lat['eager'][b]:.2f}x)" for b in (1, 16)]
            print(f"| {name} | {label} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
