"""A quotient of channels by a value known positive is zero where the channels are: SimAM's
``d / (4 * (v + eps))`` with ``v = d.sum((2, 3)) / (h * w - 1)``. The sign analysis did not
follow a division or the shape arithmetic in it, so ``v + eps`` was dirty, pinned, and its
conv kept every channel (0.579 of the MACs; Torch-Pruning 0.289)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxopt.measure import count_macs
from prune_masking import prune_and_mask


class SimAM(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.head = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 5)

    def forward(self, x):
        h = F.relu(self.c1(x))
        n = h.shape[2] * h.shape[3] - 1
        d = (h - h.mean((2, 3), keepdim=True)).pow(2)
        v = d.sum((2, 3), keepdim=True) / n
        h = h * torch.sigmoid(d / (4 * (v + 1e-4)) + 0.5)
        return self.head(F.relu(self.c2(h)).mean((2, 3)))


class DivideByASignedValue(nn.Module):
    """The same quotient over a value that may be 0 or negative: not known positive, pinned."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        h = F.relu(self.c1(x))
        v = h.mean((2, 3), keepdim=True) - 0.5
        return self.c2(h / (v + 1e-4)).mean((2, 3))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_simam_prunes_its_conv_exactly(mode):
    torch.manual_seed(0)
    model, x = SimAM().eval(), torch.randn(2, 3, 16, 16)
    r = prune_and_mask(model, x, mode)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    assert not r.plan.channel_graph.pinned_nodes
    assert count_macs(r.pruned, x) < 0.35 * count_macs(model, x)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_divisor_not_known_positive_still_pins(mode):
    from fxopt.passes.prune.prune_pass import NothingToPrune

    torch.manual_seed(0)
    with pytest.raises(NothingToPrune, match=r"sub: sub is not zero-preserving .* reaches '(truediv|div)'"):
        prune_and_mask(DivideByASignedValue().eval(), torch.randn(2, 3, 8, 8), mode)


class AddsAShapeNumber(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        h = F.relu(self.c1(x))
        return self.c2(h + (h.shape[2] - 8)).mean((2, 3))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_an_add_of_a_shape_number_survives_apply(mode):
    """Symbolic: AttributeError: 'int' object has no attribute 'shape' while folding scatters."""
    torch.manual_seed(0)
    r = prune_and_mask(AddsAShapeNumber().eval(), torch.randn(2, 3, 8, 8), mode, adapter_cost=1.0)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)



class SquareAndEluDivisors(nn.Module):
    """Divisors known positive by bounds, not signs: ``(d * d).mean() + eps`` (a square, as
    ``pow(2)``) and ``elu(g) + 1.5`` (elu >= -1). Both were unknown, pinned, and c1 kept every
    channel. (``elu(g) + 1`` is not positive in float32: it rounds to 0 for g < -17.)"""

    def __init__(self):
        super().__init__()
        self.c1, self.g, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3, 16, 1), nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.c1(x))
        d = h - h.mean((2, 3), keepdim=True)
        h = h / ((d * d).mean((2, 3), keepdim=True) + 1e-4)
        h = h / (F.elu(self.g(x).mean((2, 3), keepdim=True)) + 1.5)
        return self.c2(h).mean((2, 3))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_square_and_elu_plus_a_margin_are_positive_divisors(mode):
    torch.manual_seed(0)
    model, x = SquareAndEluDivisors().eval(), torch.randn(2, 3, 12, 12)
    r = prune_and_mask(model, x, mode)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    assert not r.plan.channel_graph.pinned_nodes, r.plan.channel_graph.pinned_nodes
    assert count_macs(r.pruned, x) < 0.6 * count_macs(model, x)


def test_bounds_name_only_what_holds():
    """Bounds as float32 computes them: ``elu(x) + 1``, ``tanh(x) + 1`` and a sigmoid round to 0
    (tanh(-20) + 1 == 0), ``1e-46`` is 0, ``0.1 - 0.1`` of two roundings is 0: none of them is a
    positive divisor (a division by them gave 0 / 0 in the zeroed model and a number after
    pruning). A margin is: ``elu(x) + 1.5``, ``var + 1e-5``, ``rsqrt`` of a positive."""
    from fxopt.passes.prune.node_facts import _sign

    gm = torch.fx.symbolic_trace(lambda x: (
        F.elu(x, 2.0) + 1, F.elu(x) + 1, torch.tanh(x) + 1, torch.tanh(x).sum() + 1, torch.sigmoid(x) - 0.5,
        x.clamp(min=0.1) - 0.1, torch.sigmoid(x), F.relu(x) + 1e-46, F.elu(x) + 1.5,
        torch.rsqrt(x.var(1, keepdim=True) + 1e-5), torch.sigmoid(x) * torch.sigmoid(x)))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert [_sign(gm, n) for n in out] == [None, "nonneg", "nonneg", None, None, "nonneg", "nonneg", "nonneg",
                                           "pos", "pos", "nonneg"]


class DividesByAnUnderflow(nn.Module):
    """A divisor that is > 0 in exact arithmetic and exactly 0 in float32 where g is very
    negative: channels 0..7 (the ones pruned) divide 0 by 0 in the zeroed model. Taken as
    positive, the pruned model was finite there (an outside tester's finding)."""

    def __init__(self, divisor):
        super().__init__()
        self.c1, self.c0, self.c2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 4, 1)
        self.divisor = divisor
        with torch.no_grad():
            self.c1.weight[:8] *= 1e-3
            self.c0.bias[:8], self.c0.bias[8:] = -200.0, 200.0

    def forward(self, x):
        h = F.relu(self.c1(x))
        g = self.c0(x)
        g = g - g.mean(1, keepdim=True)
        return self.c2(h / self.divisor(g)).mean((2, 3))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("divisor", [lambda g: torch.tanh(g) + 1, lambda g: F.elu(g) + 1, torch.sigmoid,
                                     lambda g: F.relu(g) + 1e-46], ids=["tanh+1", "elu+1", "sigmoid", "relu+1e-46"])
def test_a_divisor_that_rounds_to_zero_is_not_positive(mode, divisor):
    torch.manual_seed(0)
    r = prune_and_mask(DividesByAnUnderflow(divisor).eval(), torch.randn(2, 16, 8, 8), mode)
    assert r.masked.isnan().any()
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5, equal_nan=True)
