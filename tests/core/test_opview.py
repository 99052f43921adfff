"""The op view reads one op whichever way a model spells it: here, a linear layer written as
``x @ W.T`` (Falcon, hand-written layers) on both front ends, and what is *not* a linear."""
import pytest
import torch
from torch import nn

import fxopt
from fxopt.ir import op_view


class TransposedWeight(nn.Module):
    """A weight [out, in] used through one of the transpose spellings."""

    def __init__(self, spelling: str, dims: int = 2):
        super().__init__()
        self.spelling = spelling
        self.weight = nn.Parameter(torch.randn(*([3] * (dims - 2)), 6, 4))

    def forward(self, x):
        w = self.weight
        wt = {"T": lambda: w.T, "t": lambda: w.t(), "mT": lambda: w.mT, "torch.t": lambda: torch.t(w),
              "transpose": lambda: w.transpose(0, 1), "transpose_neg": lambda: w.transpose(-1, -2),
              "permute": lambda: w.permute(1, 0), "none": lambda: w}[self.spelling]()
        return torch.matmul(x, wt) if self.spelling == "t" else x @ wt


def _matmul_views(gm):
    views = (op_view(gm, n) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
    return [v for v in views if v is not None and v.kind in ("linear", "matmul")]


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("spelling", ["T", "t", "mT", "torch.t", "transpose", "transpose_neg", "permute"])
def test_matmul_with_a_transposed_parameter_is_a_linear(spelling, mode):
    model = TransposedWeight(spelling)
    gm = fxopt.capture(model, (torch.randn(2, 5, 4),), mode=mode)
    (view,) = _matmul_views(gm)
    assert view.kind == "linear"
    assert view.param("weight") is model.weight or torch.equal(view.param("weight"), model.weight)
    assert view.param("bias") is None and view.input.op == "placeholder"


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_matmul_with_a_parameter_stored_in_out_stays_a_matmul(mode):
    model = TransposedWeight("none")
    model.weight = nn.Parameter(torch.randn(4, 6))
    gm = fxopt.capture(model, (torch.randn(2, 4),), mode=mode)
    assert [v.kind for v in _matmul_views(gm)] == ["matmul"]


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_batched_weight_or_a_transposed_activation_is_no_linear(mode):
    gm = fxopt.capture(TransposedWeight("mT", dims=3), (torch.randn(3, 5, 4),), mode=mode)
    assert [v.kind for v in _matmul_views(gm)] == ["matmul"]

    class Scores(nn.Module):
        def forward(self, q, k):
            return q @ k.transpose(-2, -1)

    q = torch.randn(2, 5, 4)
    gm = fxopt.capture(Scores(), (q, q), mode=mode)
    assert [v.kind for v in _matmul_views(gm)] == ["matmul"]


_ALIASES = {  # spelling -> (the op kind it is, a function of x computing it)
    "divide": ("div", lambda x: torch.divide(x, 4.0)),
    "true_divide": ("div", lambda x: torch.true_divide(x, 4.0)),
    "x.divide": ("div", lambda x: x.divide(4.0)),
    "multiply": ("mul", lambda x: torch.multiply(x, 0.25)),
    "subtract": ("sub", lambda x: torch.subtract(x, 1.0)),
    "expit": ("sigmoid", lambda x: torch.special.expit(x)),
    "special.softmax": ("softmax", lambda x: torch.special.softmax(x, -1)),
    "special.erf": ("erf", lambda x: torch.special.erf(x)),
    "absolute": ("abs", lambda x: torch.absolute(x)),
    "negative": ("neg", lambda x: torch.negative(x)),
    "greater": ("gt", lambda x: torch.greater(x, 0.5)),
    "less_equal": ("le", lambda x: x.less_equal(0.5)),
    "not_equal": ("ne", lambda x: torch.not_equal(x, 0.5)),
    "mT": ("transpose", lambda x: x.mT),
    "fix": ("trunc", lambda x: torch.fix(x)),
}


class _Spelled(nn.Module):
    def __init__(self, spelling):
        super().__init__()
        self.fn = _ALIASES[spelling][1]

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("spelling", sorted(_ALIASES))
def test_an_alias_is_the_op_it_names(spelling, mode):
    """``torch.divide``, ``torch.special.expit``, ``k.mT``...: the kind of the op they alias, so
    patterns written with ``/`` or ``sigmoid`` (attention scales, silu) match them too."""
    gm = fxopt.capture(_Spelled(spelling), (torch.randn(2, 3, 4),), mode=mode)
    kinds = [v.kind for n in gm.graph.nodes if (v := op_view(gm, n)) is not None]
    assert _ALIASES[spelling][0] in kinds, (spelling, kinds, gm.code)
    if spelling == "mT":
        (view,) = [op_view(gm, n) for n in gm.graph.nodes if op_view(gm, n) is not None]
        assert (view.attrs["dim0"], view.attrs["dim1"]) == (-2, -1)
