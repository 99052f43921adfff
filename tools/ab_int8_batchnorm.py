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

import pathlib
import sys
from unittest import mock

import torch
from torch import nn

from fxopt.passes.quantize import plan

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import quantize_ab  # noqa: E402  (a sibling module, not a package)


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


def _before():
    """The lowering before: a batchnorm no conv or linear precedes ran in float."""
    return mock.patch.object(plan, "FOLLOWERS", {k: v for k, v in plan.FOLLOWERS.items() if k != "batch_norm"})


if __name__ == "__main__":
    quantize_ab.main(__doc__.splitlines()[0], models(), _before, ("float BN", "int8 BN"), (3, 32, 32))
