"""Pruning GroupNorm CNNs at ratio 0.5: fxopt `prune` (whole groups under exact norms) against
Torch-Pruning (MagnitudePruner, L1, classifier ignored) in the same process. Prints MACs kept
and latency ratios to the original at batch 1 and 16 (one thread, `fxopt.measure.compare_latency`:
interleaved rounds, best median):

    python tools/ab_prune_groupnorm.py --rounds 5
"""
from __future__ import annotations

import argparse
import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.measure import compare_latency, count_macs


class GroupNormNet(nn.Module):
    """Four conv3x3 -> GroupNorm -> SiLU blocks (32/64/64/128 channels) and a classifier."""

    def __init__(self, groups: int = 8) -> None:
        super().__init__()
        widths = [3, 32, 64, 64, 128]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(widths, widths[1:]))
        self.norms = nn.ModuleList(nn.GroupNorm(groups, b) for b in widths[1:])
        self.fc = nn.Linear(widths[-1], 10)

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = F.silu(norm(conv(x)))
        return self.fc(x.mean((2, 3)))


def torch_pruning(model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=[model.fc])
    pruner.step()
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--groups", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    print("| groups | MACs kept fxopt | MACs kept TP | b1 fxopt / orig | b1 TP / orig | b16 fxopt / orig | b16 TP / orig |")
    print("|---|---|---|---|---|---|---|")
    for groups in args.groups:
        torch.manual_seed(0)
        model = GroupNormNet(groups).eval()
        example = torch.randn(2, 3, 32, 32)
        ours = fxopt.optimize(model, (example,), f"prune{{ratio={args.ratio}}}").module
        theirs = torch_pruning(model, example, args.ratio).eval()
        macs = count_macs(model, (example,))
        inputs = {b: (torch.randn(b, 3, 32, 32),) for b in (1, 16)}
        with torch.no_grad():
            lat = compare_latency({"orig": model, "fxopt": ours, "tp": theirs}, inputs, rounds=args.rounds)
        cells = [f"{count_macs(ours, (example,)) / macs:.1%}", f"{count_macs(theirs, (example,)) / macs:.1%}"]
        cells += [f"{lat[m][b] / lat['orig'][b]:.2f}" for b in (1, 16) for m in ("fxopt", "tp")]
        print(f"| {groups} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
