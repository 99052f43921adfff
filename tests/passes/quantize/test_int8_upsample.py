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
