"""A/B of `lower-cpu` on transposed-conv decoders: left on aten, or lowered to oneDNN.

A: `fuse,lower-cpu` with transposed convs left on aten (before this change: a row-major
conv_transpose2d and the folded batchnorm shift as an add after it); B: the same pipeline now,
where a dense transposed conv2d [+ shift] [+ activation] is one
`mkldnn._convolution_transpose_pointwise` call on channels-last values, with the weight packed
for it (`passes/fuse/lower_cpu.py`, `_conv_transpose_check`). Models: the fuse tester's decoder
(three ConvTranspose2d + BatchNorm + ReLU, 32->32->16->16 channels, stride 2), a U-Net
up-sampler stage (k=2, stride 2, then a 3x3 conv) and a GAN-style generator from a 4x4 map.
Prints latency (`fxopt.measure.compare_latency`, one thread, interleaved rounds) of eager,
torch.fx's `fuse`, ONNX Runtime (ORT_ENABLE_ALL, one thread; where installed), A and B at batch
1 and 16, and B's largest difference from eager.

    python tools/ab_lower_conv_transpose.py --rounds 5
"""
from __future__ import annotations

import pathlib
import sys
from unittest import mock

import torch
from torch import nn

from fxopt.passes.fuse import lower_cpu

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import fuse_ab  # noqa: E402  (a sibling module, not a package)


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0), bn.weight.data.uniform_(0.5, 1.5)
    return bn


def _up(i: int, o: int, k: int, s: int, p: int, op: int = 0) -> list:
    return [nn.ConvTranspose2d(i, o, k, s, p, op, bias=False), _bn(o), nn.ReLU()]


def models() -> dict:
    torch.manual_seed(0)
    decoder = nn.Sequential(*_up(32, 32, 4, 2, 1), *_up(32, 16, 3, 2, 1, 1), *_up(16, 16, 4, 2, 1))
    unet_up = nn.Sequential(nn.ConvTranspose2d(64, 32, 2, 2), nn.Conv2d(32, 32, 3, padding=1), _bn(32), nn.ReLU())
    generator = nn.Sequential(*_up(128, 64, 4, 2, 1), *_up(64, 32, 4, 2, 1), *_up(32, 16, 4, 2, 1),
                              nn.ConvTranspose2d(16, 3, 4, 2, 1), nn.Tanh())
    return {"decoder": (decoder.eval(), (32, 8, 8)), "unet_up": (unet_up.eval(), (64, 16, 16)),
            "generator": (generator.eval(), (128, 4, 4))}


def _aten_transposed():
    return mock.patch.object(lower_cpu, "_conv_transpose_check", lambda view, *floor: "off")


if __name__ == "__main__":
    fuse_ab.main(__doc__.splitlines()[0], models(), _aten_transposed, ("aten", "oneDNN"))
