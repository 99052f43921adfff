"""An int8 cat's inputs share its grid: the kernels (or quantize nodes) that produce them write
on the cat's output scale and zero point, so `quantized::cat` copies instead of requantizing.
A value something else also reads keeps its own grid (the cat requantizes it)."""
from __future__ import annotations

import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.passes.quantize.kernels import int8_cat

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")


class Inception(nn.Module):
    """Three conv branches (two with a relu, one without) joined by cat, the third behind a
    max pool (a pass-through op); the graph input is concatenated as it is in `both`."""

    def __init__(self, reuse: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 5, padding=2)
        self.mix = nn.Conv2d(24, 8, 1)
        self.side = nn.Conv2d(8, 8, 1)
        self.reuse = reuse

    def forward(self, x):
        x = F.relu(self.stem(x))
        a = F.relu(self.a(x))
        c = F.max_pool2d(self.c(x), 3, stride=1, padding=1)
        y = self.mix(torch.cat([a, F.relu(self.b(x)), c], dim=1))
        if self.reuse:                              # `a` is read by another conv too
            y = y + self.side(a)
        return y


def _batches(n=6, shape=(4, 3, 12, 12)):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(*shape, generator=g),) for _ in range(n)]


def _producer_qparams(node):
    """(scale, zero point) of the int8 value `node` computes on x86, through pass-through ops."""
    while node.target in (F.max_pool2d, torch.ops.aten.max_pool2d.default, operator.getitem):
        node = node.args[0]
    target = str(node.target)
    if target.startswith("quantized.conv") or node.target is int8_cat:
        return node.args[2], node.args[3]
    assert target == "aten.quantize_per_tensor.default", node.format_node()
    return node.args[1], node.args[2]


def _cats(gm):
    return [n for n in gm.graph.nodes if n.target is int8_cat]


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_cat_inputs_are_computed_on_the_cats_grid(mode):
    torch.manual_seed(0)
    model, batches = Inception().eval(), _batches()
    res = fxopt.optimize(model, batches[0], "quantize{backend=x86}", calibration=batches, mode=mode)
    (cat,) = _cats(res.module)
    out_qparams = cat.args[2], cat.args[3]
    # relu(a), relu(b) and max_pool(c)'s conv c: all written on the cat's own scale/zero point
    assert [_producer_qparams(i) for i in cat.args[0]] == [out_qparams] * 3
    assert res.passes[0].stats["shared_qparams"] == 3
    assert res.verification.passed and res.verification.sqnr_db > 35, res.verification.summary()


def test_a_cat_input_read_elsewhere_keeps_its_own_grid():
    torch.manual_seed(0)
    model, batches = Inception(reuse=True).eval(), _batches()
    res = fxopt.optimize(model, batches[0], "quantize{backend=x86}", calibration=batches)
    (cat,) = _cats(res.module)
    out_qparams = cat.args[2], cat.args[3]
    a, b, c = (_producer_qparams(i) for i in cat.args[0])
    assert b == c == out_qparams
    assert a != out_qparams and a[1] == 0              # relu(a)'s own grid, starting at zero
    assert res.passes[0].stats["shared_qparams"] == 2
    assert res.verification.passed and res.verification.sqnr_db > 35, res.verification.summary()


class Nested(nn.Module):
    """A cat of a cat, and a graph input concatenated as it is (quantized for the cat alone)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2d(3, 4, 3, padding=1) for _ in range(3))
        self.out = nn.Conv2d(15, 4, 1)

    def forward(self, x):
        inner = torch.cat([F.relu(self.a(x)), self.b(x)], 1)
        return self.out(torch.cat([inner, self.c(x), x], 1))


def test_nested_cats_and_a_quantized_input_share_the_outer_grid():
    torch.manual_seed(0)
    batches = _batches()
    res = fxopt.optimize(Nested().eval(), batches[0], "quantize{backend=x86}", calibration=batches)
    inner, outer = _cats(res.module)
    grid = outer.args[2], outer.args[3]
    assert (inner.args[2], inner.args[3]) == grid
    assert [_producer_qparams(i) for i in inner.args[0]] == [grid] * 2
    # the inner cat, conv c; x is read by the three convs too: it keeps the grid they read it
    # on, and that grid (randn input: the widest range) is the outer cat's output grid, so
    # nothing is requantized
    assert [_producer_qparams(i) for i in outer.args[0][:2]] == [grid] * 2
    x_quantized = outer.args[0][2]
    assert _producer_qparams(x_quantized) == grid
    assert {u.target for u in x_quantized.users} >= {int8_cat, torch.ops.quantized.conv2d.new}
    assert res.passes[0].stats["shared_qparams"] == 4
    assert res.passes[0].stats["cat_requantized"] == 0
    assert res.verification.passed and res.verification.sqnr_db > 35, res.verification.summary()


def test_reference_backend_rounds_cat_inputs_onto_the_cats_grid():
    torch.manual_seed(0)
    model, batches = Inception().eval(), _batches()
    common = dict(calibration=batches)
    ref = fxopt.optimize(model, batches[0], "quantize{backend=reference,reduce_range=true}", **common)
    x86 = fxopt.optimize(model, batches[0], "quantize{backend=x86,reduce_range=true}", **common)
    cat = next(n for n in ref.module.graph.nodes if n.target is torch.ops.aten.cat.default)
    dequant = torch.ops.quantized_decomposed.dequantize_per_tensor.default
    grids = set()
    for value in cat.args[0]:
        while value.target is not dequant:          # through the max pool
            value = value.args[0]
        grids.add(tuple(value.args[1:3]))
    (cat_q,) = [u for u in cat.users]                # the cat's own output quantize
    assert grids == {tuple(cat_q.args[1:3])}
    with torch.no_grad():
        a, b = ref.module(*batches[1]), x86.module(*batches[1])
    assert (a - b).abs().max().item() < 0.05 * b.abs().max().item()
    assert ref.verification.passed and ref.verification.sqnr_db > 30, ref.verification.summary()  # 7-bit
