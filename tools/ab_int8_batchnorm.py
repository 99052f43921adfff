"""A/B of `quantize` on batchnorms no conv or linear precedes: float, or an int8 batchnorm.

A: such a batchnorm (and its relu) runs in float between a dequantize and a quantize (what
`quantize` did before this change); B: it is an int8 group of its own,
`quantized.batch_norm2d(_relu)`, which the minimum cut keeps int8 where that spares
conversions (`passes/quantize/plan.py`, FOLLOWERS["batch_norm"]). Models: a pre-activation
ResNet stage (BN-ReLU-conv twice per block, residual adds) and a DenseNet-style block (BN-ReLU-
conv layers whose outputs are concatenated). Prints latency (`fxopt.measure.compare_latency`,
one thread, interleaved rounds) of fp32 eager, torch.ao FX int8 (x86; the peer), A and B at
batch 1 and 16, and each int8 model's SQNR against fp32 on a held-out batch.

    python tools/ab_int8_batchnorm.py --rounds 7
"""
from __future__ import annotations

import argparse
import copy
import warnings
from unittest import mock

import torch
from torch import nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import fxopt
from fxopt.measure import compare_latency
from fxopt.passes.quantize import plan


class PreActBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn1, self.c1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.c2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        return x + self.c2(torch.relu(self.bn2(self.c1(torch.relu(self.bn1(x))))))


class DenseBlock(nn.Module):
    def __init__(self, c: int, growth: int = 16, layers: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(c + i * growth), nn.ReLU(), nn.Conv2d(c + i * growth, growth, 3, padding=1))
            for i in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return x


def net(body: nn.Module, c: int, out: int) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), body, nn.BatchNorm2d(out), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(out, 10))
    for m in model.modules():  # statistics a trained net has, not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def models() -> dict:
    torch.manual_seed(0)
    return {"preact_resnet": net(nn.Sequential(*[PreActBlock(32) for _ in range(4)]), 32, 32),
            "densenet_block": net(DenseBlock(32), 32, 96)}


def sqnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(a.pow(2).mean() / (a - b).pow(2).mean()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    print("| model | batch | fp32 ms | torch.ao ms | A ms (float BN) | B ms (int8 BN) | B / A | B / torch.ao |")
    print("|---|---|---|---|---|---|---|---|")
    sqnrs = {}
    for name, model in models().items():
        calibration = [torch.randn(8, 3, 32, 32) for _ in range(4)]
        example = (calibration[0][:1],)
        without = {k: v for k, v in plan.FOLLOWERS.items() if k != "batch_norm"}
        with mock.patch.object(plan, "FOLLOWERS", without):
            a = fxopt.optimize(model, example, "quantize", calibration=calibration, verify=False).module
        b = fxopt.optimize(model, example, "quantize", calibration=calibration, verify=False).module
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), example)
        for batch in calibration:
            prepared(batch)
        ao = convert_fx(prepared)
        fns = {"fp32": model, "torch.ao": ao, "A": a, "B": b}
        held_out = torch.randn(16, 3, 32, 32)
        with torch.no_grad():
            sqnrs[name] = {k: sqnr(model(held_out), f(held_out)) for k, f in fns.items() if k != "fp32"}
            t = compare_latency(fns, {1: (held_out[:1],), 16: (held_out,)}, rounds=args.rounds,
                                repeats=args.repeats)
        for batch in (1, 16):
            row = {k: t[k][batch] for k in fns}
            print(f"| {name} | {batch} | {row['fp32']:.3f} | {row['torch.ao']:.3f} | {row['A']:.3f} | "
                  f"{row['B']:.3f} | {row['B'] / row['A']:.2f} | {row['B'] / row['torch.ao']:.2f} |")
    for name, values in sqnrs.items():
        print(f"SQNR dB, {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in values.items()))


if __name__ == "__main__":
    main()
