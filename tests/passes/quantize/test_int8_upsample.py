"""Nearest upsampling between int8 layers stays int8: every output element is a copy of an input
one, so the value keeps its grid (x86: torch's quantized `upsample_nearest*d`; reference: the
float upsample of grid values), where it was a float op that made the conv before it write float
and the next layer quantize again (an FPN's top-down path, a U-Net's decoder: 0.66-0.92x the
time, tools/ab_int8_upsample.py). Upsampling that averages (bilinear) stays float and says why."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")


class TopDown(nn.Module):
    def __init__(self, mode: str = "nearest", module: bool = False) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 16, 3, 2, 1)
        self.up = nn.Upsample(scale_factor=2, mode=mode) if module else None
        self.mode = mode
        self.m = nn.Conv2d(32, 8, 3, padding=1)

    def forward(self, x):
        a = F.relu(self.c1(x))
        b = F.relu(self.c2(a))
        up = self.up(b) if self.up is not None else F.interpolate(b, scale_factor=2.0, mode=self.mode)
        return self.m(torch.cat([up, a], 1))


def _sqnr(ref, out):
    return (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())).item()


def _interpolates(gm):
    return [n for n in gm.graph.nodes if "upsample" in str(n.target) or "interpolate" in str(n.target)
            or (n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Upsample))]


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("backend", ["x86", "reference"])
@pytest.mark.parametrize("spelling", [("nearest", True), ("nearest", False), ("nearest-exact", False)],
                         ids=["Upsample", "interpolate", "nearest-exact"])
def test_a_nearest_upsample_between_int8_layers_stays_int8(mode, backend, spelling):
    torch.manual_seed(0)
    model = TopDown(*spelling).eval()
    batches = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    res = fxopt.optimize(model, batches[0], f"quantize{{backend={backend}}}", calibration=batches, mode=mode)
    stats = res.passes[0].stats
    assert res.verification.passed, res.summary()
    assert not any(k.startswith("interpolate") for k in stats["float_ops"].values()), stats["float_ops"]
    assert stats["int8_pass_through"] == 1, stats
    [up] = _interpolates(res.module)
    if backend == "x86":  # the upsample reads the int8 conv's output itself, and the int8 cat its
        # result: the model input is the only value quantized
        assert up.args[0].target == torch.ops.quantized.conv2d_relu.new, up.args[0].target
        assert stats["quantize_nodes"] == 1, stats
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert _sqnr(model(x), res.module(x)) > 30


def test_a_bilinear_upsample_stays_float_and_says_why():
    torch.manual_seed(0)
    model = TopDown("bilinear").eval()
    batches = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    res = fxopt.optimize(model, batches[0], "quantize", calibration=batches, mode="symbolic")
    assert any(reason.startswith("interpolate: no int8 kernel") for reason in res.passes[0].stats["float_ops"].values())


class SubPixel(nn.Module):
    """conv -> PixelUnshuffle -> conv -> PixelShuffle -> ReLU -> conv: each between int8 convs."""

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(32, 32, 3, padding=1)
        self.shuffle, self.unshuffle = nn.PixelShuffle(2), nn.PixelUnshuffle(2)
        self.functional = functional
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = self.mid(F.pixel_unshuffle(h, 2) if self.functional else self.unshuffle(h))
        h = F.relu(F.pixel_shuffle(h, 2) if self.functional else self.shuffle(h))
        return self.tail(h)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("backend", ["x86", "reference"])
@pytest.mark.parametrize("functional", [False, True], ids=["modules", "functions"])
def test_pixel_shuffle_between_int8_layers_stays_int8(mode, backend, functional):
    """PixelShuffle (and the ReLU after it) ran in float: the conv before it wrote float, the
    next quantized again (an EDSR net 1.34-1.42x torch.ao's time at batch 16, decoder tester).
    x86 moves the bytes (`int8_pixel_shuffle`), the reference backend shuffles grid values."""
    torch.manual_seed(0)
    model = SubPixel(functional).eval()
    batches = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    res = fxopt.optimize(model, batches[0], f"quantize{{backend={backend}}}", calibration=batches, mode=mode)
    stats = res.passes[0].stats
    assert res.verification.passed, res.summary()
    assert not [r for r in stats["float_ops"].values() if "pixel" in r or r.startswith("relu")], stats["float_ops"]
    if backend == "x86":
        from fxopt.passes.quantize.kernels import int8_pixel_shuffle
        shuffles = [n for n in res.module.graph.nodes if n.target is int8_pixel_shuffle]
        assert sorted(n.kwargs["inverse"] for n in shuffles) == [False, True], res.module.code
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert _sqnr(model(x), res.module(x)) > 30


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_1d_nearest_upsample_runs_in_float(mode):
    """torch's quantized tensors have no upsample_nearest1d kernel: the pass-through failed every
    audio net with one ("Could not run 'aten::upsample_nearest1d.out' ... QuantizedCPU")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(), nn.Upsample(scale_factor=2),
                          nn.Conv1d(8, 4, 3, padding=1)).eval()
    batches = [torch.randn(4, 4, 32) for _ in range(3)]
    res = fxopt.optimize(model, batches[0], "quantize", calibration=batches, mode=mode)
    assert res.verification.passed, res.summary()
    assert any(r.startswith("interpolate") for r in res.passes[0].stats["float_ops"].values())
