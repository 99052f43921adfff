"""Where an int8 boundary costs the same on either side of a pass-through op, the value is
quantized after the op, on the op's own grid (quantize tester: a relu after a group norm read
int8 on the norm's signed grid, 1.4-2.1 dB behind PT2E), and a hardtanh on its own runs in
float unless it starts at 0 (relu6): on its input's grid it kept a few levels, and a bound past
the grid's ends gave the end (hardtanh(-1, -0.5) after a relu: 0 everywhere on x86, -0.5 dB)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())).item()


class NormRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Conv2d(8, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.b(F.relu(self.norm(self.a(x))))


class ReluThenBounds(nn.Module):
    def __init__(self, lo: float, hi: float):
        super().__init__()
        self.lo, self.hi = lo, hi
        self.a, self.b = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.b(F.hardtanh(F.relu(self.a(x)), self.lo, self.hi))


def _quantized(model, backend, mode="symbolic"):
    torch.manual_seed(1)
    calibration = [(torch.randn(8, 8, 10, 10),) for _ in range(3)]
    return fxopt.optimize(model, calibration[0], pipeline=f"quantize{{backend={backend}}}",
                          calibration=calibration, mode=mode)


@pytest.mark.parametrize("backend", ["x86", "reference"])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_relu_after_a_float_norm_is_quantized_after(mode, backend):
    torch.manual_seed(0)
    model = NormRelu().eval()
    result = _quantized(model, backend, mode)
    relu = next(n for n in result.module.graph.nodes if "relu" in str(n.target))
    assert "quantize" not in str(relu.args[0].target), result.module.code  # it reads the norm's float value
    assert any("quantize" in str(u.target) for u in relu.users), result.module.code
    test = torch.randn(8, 8, 10, 10)
    with torch.no_grad():
        assert _sqnr(model(test), result.module(test)) > 36  # 36.2 with the relu on the norm's grid


@pytest.mark.parametrize("backend", ["x86", "reference"])
@pytest.mark.parametrize("bounds", [(-1.0, -0.5), (0.2, 0.5)])
def test_a_hardtanh_on_its_own_runs_in_float_on_both_backends(bounds, backend):
    torch.manual_seed(0)
    model = ReluThenBounds(*bounds).eval()
    result = _quantized(model, backend)
    assert result.verification.passed, result.summary()
    reason = next(r for name, r in result.passes[-1].stats["float_ops"].items() if "hardtanh" in name)
    assert "fused only right after a conv/linear" in reason
    test = torch.randn(8, 8, 10, 10)
    with torch.no_grad():
        assert _sqnr(model(test), result.module(test)) > 35  # x86: -0.5 and 39.2 dB on the relu's grid


class PoolThen(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.act = act
        self.a, self.b = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.b(self.act(F.max_pool2d(self.a(x), 2)))


@pytest.mark.parametrize("backend", ["x86", "reference"])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("spelling", ["hardtanh", "clamp", "clamp_min", "method", "clamp_min_op", "clamp_min_method"])
def test_a_clamp_from_zero_on_its_own_passes_through_like_relu6(spelling, backend, mode):
    """A standalone `clamp(0, 6)` ran in float (a dequantize, a float clamp and a quantize)
    where `hardtanh(0, 6)`, the same function, passed through on int8 (quantize tester); then
    `clamp_min(0)` crashed on x86, which has no quantized clamp_min (adversary)."""
    act = {"hardtanh": lambda h: F.hardtanh(h, 0.0, 6.0), "clamp": lambda h: torch.clamp(h, 0, 6),
           "clamp_min": lambda h: torch.clamp(h, min=0.0), "method": lambda h: h.clamp(0.0, 6.0),
           "clamp_min_op": lambda h: torch.clamp_min(h, 0.0), "clamp_min_method": lambda h: h.clamp_min(0)}[spelling]
    torch.manual_seed(0)
    model = PoolThen(act).eval()
    result = _quantized(model, backend, mode)
    stats = result.passes[-1].stats
    assert stats["float_ops"] == {} and stats["int8_pass_through"] == 2, stats  # the pool and the clamp
    assert result.verification.passed, result.summary()
    test = torch.randn(8, 8, 10, 10)
    with torch.no_grad():
        assert _sqnr(model(test), result.module(test)) > 35  # 37.6


class AddPoolClamp(nn.Module):
    def __init__(self, hi: float):
        super().__init__()
        self.hi = hi
        self.a, self.b, self.c = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.c(F.max_pool2d(self.a(x) + self.b(x), 2).clamp(0, self.hi))


@pytest.mark.parametrize("backend", ["x86", "reference"])
def test_a_clamp_keeping_few_levels_of_its_input_grid_is_rounded_onto_its_own(backend):
    """Adversary: clamp(0, 0.3) after an add's pool, passed through on the add's signed grid,
    kept a handful of levels (33.7 dB; PT2E 39.2): its own grid, 20x finer, is worth a
    dequantize and a quantize; a clamp(0, 6) keeping most of the levels still passes through."""
    torch.manual_seed(0)
    model = AddPoolClamp(0.3).eval()
    calibration = [(torch.randn(4, 8, 16, 16),) for _ in range(3)]
    result = fxopt.optimize(model, calibration[0], f"quantize{{backend={backend}}}", calibration=calibration)
    assert result.passes[-1].stats.get("clamped_in_float") == 1, result.passes[-1].stats
    test = torch.randn(8, 8, 16, 16)
    with torch.no_grad():
        assert _sqnr(model(test), result.module(test)) > 37  # 33.7 on the add's grid
    wide = fxopt.optimize(AddPoolClamp(6.0).eval(), calibration[0], f"quantize{{backend={backend}}}",
                          calibration=calibration)
    assert "clamped_in_float" not in wide.passes[-1].stats


def test_an_in_place_clamp_export_keeps_runs_in_float():
    """Export keeps `y.clamp_(0, 6)` in place: an int8 copy of y clamped would leave y, which
    the graph reads on, unclamped (adversary: x86 crashed on 'aten::clamp.out')."""
    class InPlace(nn.Module):
        def forward(self, h):
            return h.clamp_(0, 6)

    torch.manual_seed(0)
    model = PoolThen(InPlace()).eval()
    result = _quantized(model, "x86", "export")
    assert result.verification.passed, result.summary()
    reason = next(r for name, r in result.passes[-1].stats["float_ops"].items() if "clamp" in name)
    assert "writes its input in place" in reason


class AddThen(nn.Module):
    def __init__(self, after):
        super().__init__()
        self.after = after
        self.a, self.b, self.o = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.o(self.after(self.a(x) + self.b(x)))


@pytest.mark.parametrize("backend", ["x86", "reference"])
@pytest.mark.parametrize("after", [nn.ReLU6(), nn.Hardtanh(0.0, 4.0)], ids=["relu6", "hardtanh0-4"])
def test_a_relu6_after_an_add_is_the_int8_add_relu_on_its_own_grid(after, backend):
    """A hardtanh from 0 after an add is fused as the int8 add_relu, its output on the
    activation's grid (adversary: in float, the add and every conv around it wrote float, 12-35%
    slower; quantize tester: as a pass-through on the add's signed grid, 1.2 dB lower)."""
    torch.manual_seed(0)
    model = AddThen(after).eval()
    result = _quantized(model, backend)
    stats = result.passes[-1].stats
    assert stats["quantized"] == {"conv": 3, "add+act": 1}, stats
    test = torch.randn(8, 8, 10, 10)
    with torch.no_grad():
        assert _sqnr(model(test), result.module(test)) > 36  # 35.35 on the add's grid


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_training_mode_dropout_stays_float(mode):
    """A dropout that draws random numbers (Monte Carlo dropout, spelled in the forward) is no
    int8 pass-through: `bernoulli_` has no quantized kernel (adversary: torch.dropout(h, 0.5,
    True) failed the whole pass)."""
    class McDropout(nn.Module):
        def forward(self, h):
            return torch.dropout(h, 0.5, True)

    model = AddThen(McDropout()).eval()
    result = _quantized(model, "x86", mode)
    reason = next(r for name, r in result.passes[-1].stats["float_ops"].items() if "drop" in name)
    assert "training mode" in reason, reason
    assert result.module(torch.randn(2, 8, 10, 10)).shape == (2, 16, 10, 10)
