"""``x @ W.t()`` prunes as a linear over x's channels, slicing W's columns. When anything else
reads W (a VQ-VAE codebook's ``||E||²``, ``E.sum(1)``, ``F.normalize(W)``, another
``x @ W.t()``), that reader must keep the full W: the layer gets a transpose of a private copy,
as ``F.linear(x, W)`` and ``nn.Linear`` get a private weight. Each case was a silent wrong
result (0.4-8 off) or a crash in apply."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from prune_masking import prune_and_mask

MODES = ("symbolic", "export")


class Codebook(nn.Module):
    def __init__(self, reader: str):
        super().__init__()
        self.reader = reader
        self.enc = nn.Linear(4, 8)
        self.E = nn.Parameter(torch.randn(6, 8))

    def forward(self, x):
        z = self.enc(x)
        if self.reader == "sum":
            return z @ self.E.t() + self.E.sum(1)
        if self.reader == "sq-norm":  # VQ-VAE's distance: ||z||² - 2 z·E + ||E||²
            return (z * z).sum(1, keepdim=True) - 2 * z @ self.E.t() + self.E.pow(2).sum(1)
        if self.reader == "normalize":
            return z @ self.E.t() + F.normalize(self.E, dim=1).sum(1)
        if self.reader == "second-matmul":
            return z @ self.E.t() + torch.relu(z) @ self.E.t()
        return z @ self.E.t() + self.E @ torch.ones(8)  # "untransposed": W read as the left operand


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reader", ["sum", "sq-norm", "normalize", "second-matmul", "untransposed"])
def test_a_transposed_weight_read_elsewhere_keeps_its_full_copy_there(reader, mode):
    torch.manual_seed(1)
    model, x = Codebook(reader).eval(), torch.randn(5, 4)
    with torch.no_grad():  # half of z's channels dead: removing them must not change the output
        model.enc.weight[::2] = 0
        model.enc.bias[::2] = 0
        expected = model(x)
    res = fxopt.optimize(model, (x,), "prune{ratio=0.5,adapter_cost=0}", mode=mode)
    assert res.passes[-1].stats["removed_channels"] > 0
    torch.testing.assert_close(res.module(x), expected, rtol=1e-4, atol=1e-5)
    assert model.E.shape == (6, 8)  # the user's model untouched


TRANSPOSES = {
    "swapaxes": lambda w: w.swapaxes(0, 1), "swapdims": lambda w: torch.swapdims(w, 1, 0),
    "movedim": lambda w: w.movedim(0, 1), "moveaxis": lambda w: torch.moveaxis(w, -1, 0),
    "H": lambda w: w.H, "mH": lambda w: w.mH, "adjoint": lambda w: w.adjoint(),
}


class SpelledTranspose(nn.Module):
    """A two-layer MLP on raw parameters, each transposed by another spelling."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.W1, self.W2 = nn.Parameter(torch.randn(32, 16)), nn.Parameter(torch.randn(8, 32))

    def forward(self, x):
        t = TRANSPOSES[self.how]
        return torch.relu(x @ t(self.W1)) @ t(self.W2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", sorted(TRANSPOSES))
def test_every_spelling_of_a_parameter_transpose_prunes_as_a_linear(how, mode):
    """`W.swapaxes(0, 1)`, `W.movedim(0, 1)`, `W.H`, `W.adjoint()` were not read as transposes:
    nothing to prune (the hidden width of W1 and W2 was pinned)."""
    torch.manual_seed(0)
    model, x = SpelledTranspose(how).eval(), torch.randn(2, 5, 16)
    r = prune_and_mask(model, x, mode)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    params = dict(r.pruned.named_parameters())
    assert params["W1"].shape[0] < 32 and params["W2"].shape[1] == params["W1"].shape[0]
    assert fxopt.measure.count_macs(r.pruned, x) < 0.6 * fxopt.measure.count_macs(model, x)


class SharedTranspose(nn.Module):
    """One transpose node read twice: W has a single reader (the transpose), which is shared."""

    def __init__(self, second: str):
        super().__init__()
        self.second = second
        self.a, self.b = nn.Linear(4, 8), nn.Linear(4, 8)
        self.E = nn.Parameter(torch.randn(6, 8))
        self.post = nn.Linear(6, 3)

    def forward(self, x):
        et = self.E.t()
        y = self.a(x) @ et
        y = y + (torch.relu(self.b(x)) @ et if self.second == "matmul" else et.sum(0))
        return self.post(torch.relu(y))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("second", ["matmul", "sum"])
def test_one_transpose_read_by_two_ops_gives_each_its_own(second, mode):
    """Both products sliced one tensor (an index out of bounds in apply), or the sum read a
    sliced one (a shape mismatch)."""
    torch.manual_seed(0)
    r = prune_and_mask(SharedTranspose(second).eval(), torch.randn(5, 4), mode)
    assert r.plan.dead.any()
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


def test_a_pruned_model_that_grows_says_so():
    """The VQ codebook keeps E whole for ||E||² and the product gets a sliced private copy:
    more parameters than before, which nothing reported."""
    torch.manual_seed(0)
    model = Codebook("sq-norm")
    model.E = nn.Parameter(torch.randn(64, 8))
    with pytest.warns(fxopt.PassWarning, match=r"holds more parameters .* than its input"):
        fxopt.optimize(model.eval(), (torch.randn(5, 4),), "prune{ratio=0.5,adapter_cost=0}", mode="symbolic")
