"""`quantize{average_grid=own}`: an averaging pool whose output spans much less than its input (a
3x3 blur, a global average over a feature map) writes its own output grid: the int8 kernel
rounds the average onto the input's grid, an error as large as the input's own after the average
shrank the rest (quantize tester: 5-8 dB behind PT2E). It runs on the dequantized input and
rounds once onto its grid. Off by default (`input`): the float pool costs up to 2x at batch 16."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
import fxopt.passes.quantize.lower as lower

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")


class Blur(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Conv2d(4, 32, 3, padding=1), nn.Conv2d(32, 8, 3, padding=1)

    def forward(self, x):
        return self.o(F.avg_pool2d(F.relu(self.a(x)), 3, 1, 1))


class GlobalAverage(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Conv2d(4, 64, 3, padding=1), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.a(x)), 1).flatten(1))


class Stride2(nn.Module):
    """A 2x2 average of a relu'd map keeps most of its input's range: int8 as before."""

    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Conv2d(4, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.o(F.avg_pool2d(F.relu(self.a(x)), 2))


def _sqnr(ref, out):
    return (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())).item()


def _run(model, backend, finer=lower._FINER):
    torch.manual_seed(0)
    batches = [torch.randn(8, 4, 16, 16) for _ in range(3)]
    x = torch.randn(8, 4, 16, 16)
    old, lower._FINER = lower._FINER, finer
    try:
        res = fxopt.optimize(model, batches[0], f"quantize{{backend={backend},average_grid=own}}", calibration=batches)
    finally:
        lower._FINER = old
    with torch.no_grad():
        return _sqnr(model(x), res.module(x)), res.passes[0].stats


@pytest.mark.parametrize("backend", ["x86", "reference"])
@pytest.mark.parametrize("model", [Blur, GlobalAverage])
def test_an_average_narrower_than_its_input_rounds_onto_its_own_grid(model, backend):
    torch.manual_seed(0)
    model = model().eval()
    sqnr, stats = _run(model, backend)
    on_input_grid, _ = _run(model, backend, finer=float("inf"))
    assert stats["averaged_in_float"] == 1
    assert sqnr > on_input_grid + 3.0, (sqnr, on_input_grid)  # measured: +3.7 and +6.9 dB


def test_both_backends_compute_the_same_average():
    torch.manual_seed(0)
    model = Blur().eval()
    assert abs(_run(model, "x86")[0] - _run(model, "reference")[0]) < 0.5


def test_a_pool_keeping_its_inputs_range_stays_on_its_grid():
    torch.manual_seed(0)
    assert "averaged_in_float" not in _run(Stride2().eval(), "x86")[1]


class IntoCat(nn.Module):
    """The pool's output goes into a cat with its own input: the cat rounds it onto its grid."""

    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Conv2d(4, 32, 3, padding=1), nn.Conv2d(64, 8, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.o(torch.cat([F.avg_pool2d(h, 3, 1, 1), h], 1))


class Blur3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Conv3d(4, 32, 3, padding=1), nn.Conv3d(32, 8, 3, padding=1)

    def forward(self, x):
        return self.o(F.avg_pool3d(F.relu(self.a(x)), 3, 1, 1))


@pytest.mark.parametrize("model", [IntoCat, Blur3d])
def test_an_average_into_a_cat_or_over_3d_stays_int8(model):
    """Adversary: a pool read by an int8 cat was rounded twice (its own grid, then the cat's:
    0.4 dB worse), and aten's float 3-D pool made a conv3d net 2-5x slower."""
    torch.manual_seed(0)
    model = model().eval()
    x = torch.randn(4, 4, 6, 8, 8) if isinstance(model, Blur3d) else torch.randn(8, 4, 16, 16)
    res = fxopt.optimize(model, x, "quantize{backend=x86,average_grid=own}", calibration=[x, torch.randn_like(x)])
    assert "averaged_in_float" not in res.passes[0].stats


class GlobalAverage3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Conv3d(3, 16, 3, padding=1), nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool3d(F.relu(self.a(x)), 1).flatten(1))


def test_a_global_3d_average_takes_its_own_grid():
    """Quantize tester: the 3-D exemption kept a video head's global average on the conv's grid
    (38.7 dB, PT2E 51.0); a global average is a mean, no slower in float than in int8."""
    torch.manual_seed(0)
    model = GlobalAverage3d().eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 3, 4, 8, 8, generator=g) for _ in range(4)]
    res = fxopt.optimize(model, batches[0], "quantize{backend=x86,average_grid=own}", calibration=batches)
    assert res.passes[0].stats["averaged_in_float"] == 1
    test = torch.randn(16, 3, 4, 8, 8, generator=g)
    with torch.no_grad():
        ref = model(test)
        assert 10 * torch.log10(ref.pow(2).mean() / (ref - res.module(test)).pow(2).mean()) > 45


def test_the_default_keeps_every_average_on_its_inputs_grid():
    torch.manual_seed(0)
    model = Blur().eval()
    batches = [torch.randn(8, 4, 16, 16) for _ in range(2)]
    res = fxopt.optimize(model, batches[0], "quantize{backend=x86}", calibration=batches)
    assert "averaged_in_float" not in res.passes[0].stats
    with pytest.raises(Exception, match="average_grid"):
        fxopt.optimize(model, batches[0], "quantize{average_grid=mine}", calibration=batches)
