"""A conv or linear whose weight the forward computes from parameters alone (NFNet's weight
standardization, a weight norm written out) is int8 like any other: `insert-observers` folds
that weight to a constant first. It used to stay float ("weight is not a parameter") unless
the pipeline began with `fold-constants`. A weight computed from the input stays float."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")


def _sqnr(ref, out):
    return (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())).item()


class StandardizedConv(nn.Conv2d):
    def forward(self, x):
        w = self.weight
        mean, var = w.mean((1, 2, 3), keepdim=True), w.var((1, 2, 3), keepdim=True, unbiased=False)
        return F.conv2d(x, (w - mean) / torch.sqrt(var + 1e-5), self.bias, self.stride, self.padding)


class NormedLinear(nn.Module):
    """weight = g * v / ||v|| per row, written out."""

    def __init__(self, cin, cout):
        super().__init__()
        self.v, self.g = nn.Parameter(torch.randn(cout, cin)), nn.Parameter(torch.rand(cout, 1) + 0.5)
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x):
        return F.linear(x, self.g * self.v / self.v.norm(dim=1, keepdim=True), self.bias)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = StandardizedConv(3, 16, 3, padding=1), StandardizedConv(16, 16, 3, padding=1)
        self.fc = NormedLinear(16, 10)

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc(h.mean((2, 3)))


class InputWeighted(nn.Module):
    """A dynamic conv: its weight comes from the input."""

    def __init__(self):
        super().__init__()
        self.base = nn.Parameter(torch.randn(8, 3, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.base * x.mean().sigmoid(), padding=1)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_weights_computed_from_parameters_are_folded_and_int8(mode):
    torch.manual_seed(0)
    model = Net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(4, 3, 16, 16),) for _ in range(4)]
    res = fxopt.optimize(model, batches[0], "quantize{backend=x86}", calibration=batches, mode=mode)
    stats = res.passes[-1].stats
    assert sum(stats["quantized"].values()) == 3, stats["quantized"]
    assert not any("weight" in reason for reason in stats["float_ops"].values()), stats["float_ops"]
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert _sqnr(model(x), res.module(x)) > 30
    for k, v in model.state_dict().items():   # the user's model keeps its parameters
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_a_weight_computed_from_the_input_stays_float():
    torch.manual_seed(0)
    batches = [(torch.randn(2, 3, 8, 8),) for _ in range(2)]
    res = fxopt.optimize(InputWeighted().eval(), batches[0], "quantize{backend=x86}", calibration=batches)
    assert "conv: weight is not a parameter; runs in float" in res.passes[-1].stats["float_ops"].values()
