"""A/B of `fuse` on instance norms: torch's instance_norm, or the group norm of one channel per group.

A: the pipeline with the instance norms left as written (what `fuse` did before the `norms`
option); B: the same pipeline now, where each instance norm that normalizes by its input's own
statistics is `F.group_norm(x, C, weight, bias, eps)` (`passes/fuse/rules.py`, `NORMS`).
Run for `fuse` and for `fuse,lower-cpu` (where the norms read the channels-last values of
lowered convs). Models: a CycleGAN ResNet generator (reflection pads, instance norms, a
transposed-conv up-sampler; 32 base channels at 64x64) and a Johnson-style style-transfer
net (affine instance norms, nearest up-sampling; 32 base channels at 64x64).

    python tools/ab_norms.py [--rounds 5 --repeats 20]
"""
from __future__ import annotations

from unittest import mock

from torch import nn

import fuse_ab
from fxopt.passes.fuse import rules
from fxopt.patterns import PatternSet


def _conv_in_relu(cin: int, cout: int, k: int, stride: int = 1, affine: bool = False) -> list[nn.Module]:
    return [nn.ReflectionPad2d(k // 2), nn.Conv2d(cin, cout, k, stride), nn.InstanceNorm2d(cout, affine=affine),
            nn.ReLU(inplace=True)]


class ResidualBlock(nn.Module):
    def __init__(self, c: int, affine: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_in_relu(c, c, 3, affine=affine), nn.ReflectionPad2d(1), nn.Conv2d(c, c, 3),
                                  nn.InstanceNorm2d(c, affine=affine))

    def forward(self, x):
        return x + self.body(x)


def cyclegan_generator(c: int = 32, blocks: int = 4) -> nn.Module:
    return nn.Sequential(
        *_conv_in_relu(3, c, 7), nn.Conv2d(c, 2 * c, 3, 2, 1), nn.InstanceNorm2d(2 * c), nn.ReLU(True),
        nn.Conv2d(2 * c, 4 * c, 3, 2, 1), nn.InstanceNorm2d(4 * c), nn.ReLU(True),
        *[ResidualBlock(4 * c, affine=False) for _ in range(blocks)],
        nn.ConvTranspose2d(4 * c, 2 * c, 3, 2, 1, output_padding=1), nn.InstanceNorm2d(2 * c), nn.ReLU(True),
        nn.ConvTranspose2d(2 * c, c, 3, 2, 1, output_padding=1), nn.InstanceNorm2d(c), nn.ReLU(True),
        nn.ReflectionPad2d(3), nn.Conv2d(c, 3, 7), nn.Tanh())


def style_transfer(c: int = 32, blocks: int = 3) -> nn.Module:
    return nn.Sequential(
        *_conv_in_relu(3, c, 9, affine=True), *_conv_in_relu(c, 2 * c, 3, 2, affine=True),
        *_conv_in_relu(2 * c, 4 * c, 3, 2, affine=True), *[ResidualBlock(4 * c, affine=True) for _ in range(blocks)],
        nn.Upsample(scale_factor=2), *_conv_in_relu(4 * c, 2 * c, 3, affine=True),
        nn.Upsample(scale_factor=2), *_conv_in_relu(2 * c, c, 3, affine=True),
        nn.ReflectionPad2d(4), nn.Conv2d(c, 3, 9))


def models() -> dict:
    return {"cyclegan_g": (fuse_ab.with_statistics(cyclegan_generator()), (3, 64, 64)),
            "style_transfer": (fuse_ab.with_statistics(style_transfer()), (3, 64, 64))}


def _instance_norms():
    return mock.patch.object(rules, "NORMS", PatternSet([]))


if __name__ == "__main__":
    fuse_ab.main(__doc__.splitlines()[0], models(), _instance_norms, ("instance_norm", "group_norm"),
                 pipelines=("fuse", "fuse,lower-cpu"))
