"""A/B of `prune{round_to=8}`: the selection blind to rounding, or solved again with what rounding
gives back held, on a RegNet-shaped CNN (grouped 3x3 convs of 8 channels per group), with
Torch-Pruning at the same ratio and round_to.

A: the selection, then rounding (what `prune` did before this change: a grouped conv's inner
channel is one class per group, so a conv of 19 or 46 groups keeps a multiple of 8 channels only
from 8 or 4 classes up; channels the selection took there came back, and its budget with them);
(it was solved again only where it emptied a layer); B: `prune` now (`passes/prune/prune_pass.py`, `_rounded_in_advance`). Prints, per scope, the
MACs and parameters kept (% of the original), each one's conv widths, and latency at batch 1
and 16 (`fxopt.measure.compare_latency`, one thread, interleaved rounds).

    python tools/ab_round_to.py --rounds 5
"""
from __future__ import annotations

import argparse
import copy
import warnings
from unittest import mock

import torch
from torch import nn

from fxopt.measure import compare_latency, count_macs, count_parameters
from fxopt.passes.prune import prune_pass


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, group_width: int = 8) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(cout, cout, 3, stride, 1, groups=cout // group_width, bias=False),
                               nn.BatchNorm2d(cout), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(cout, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.c(self.b(self.a(x))) + (x if self.shortcut is None else self.shortcut(x)))


class RegNet(nn.Module):
    """RegNetY-200MF's widths and depths without the SE blocks."""

    def __init__(self, widths=(24, 56, 152, 368), depths=(1, 1, 4, 7)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        blocks, cin = [], 32
        for width, depth in zip(widths, depths):
            for i in range(depth):
                blocks.append(Block(cin, width, 2 if i == 0 else 1))
                cin = width
        self.body = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        return self.fc(self.body(self.stem(x)).mean((2, 3)))


def regnet() -> nn.Module:
    torch.manual_seed(0)
    model = RegNet()
    for m in model.modules():  # statistics a trained net has, so l1 and bn_scale rank channels apart
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.2, 1.5), m.running_var.uniform_(0.5, 2.0)
    return model.eval()


_held_for = prune_pass._rounded_in_advance


def _blind_to_round_to(cg, sel, costs, blocked, round_to, solve):
    """A's selection: solved again only where it empties a layer (as round_to=1 is)."""
    return _held_for(cg, sel, costs, blocked, 1, solve)


def _widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    import torch_pruning as tp

    model, x = regnet(), torch.randn(1, 3, 224, 224)
    base_macs, base_params = count_macs(model, (x,)), count_parameters(model)
    models = {"original": model}
    for scope in ("local", "global"):
        options = dict(ratio=args.ratio, scope=scope, round_to=8)
        with mock.patch.object(prune_pass, "_rounded_in_advance", _blind_to_round_to):
            models[f"A {scope}"] = prune_pass.analyze(model, (x,), **options).apply()
        models[f"B {scope}"] = prune_pass.analyze(model, (x,), **options).apply()
        peer = copy.deepcopy(model)
        tp.pruner.MetaPruner(peer, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=args.ratio,
                             global_pruning=scope == "global", round_to=8, ignored_layers=[peer.fc]).step()
        models[f"torch-pruning {scope}"] = peer
    for label, m in models.items():
        print(f"{label}: widths {_widths(m)}")
    latency = compare_latency(models, {1: (x,), 16: (torch.randn(16, 3, 224, 224),)}, rounds=args.rounds,
                              repeats=args.repeats)
    print("\n| model | MACs | params | batch 1 ms | batch 16 ms |\n|---|---|---|---|---|")
    for label, m in models.items():
        print(f"| {label} | {100 * count_macs(m, (x,)) / base_macs:.1f}% | "
              f"{100 * count_parameters(m) / base_params:.1f}% | {latency[label][1]:.2f} | {latency[label][16]:.1f} |")


if __name__ == "__main__":
    main()
