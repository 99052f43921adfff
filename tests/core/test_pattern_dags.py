"""Patterns that read one value at several places (a spelled-out layer norm reads `x - mean` three
times): one `Op` object at each place, matched to one node (api item 3)."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.patterns import Const, Op, Pattern, Var, apply_patterns, pattern_from_function


def _layer_norm(x, eps=1e-5):
    d = x - x.mean(-1, keepdim=True)
    return d / torch.sqrt((d * d).mean(-1, keepdim=True) + eps)


def _fused(x, eps):
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


class _SpelledOut(nn.Module):
    def __init__(self, recompute: bool = False, return_centered: bool = False):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.recompute, self.return_centered = recompute, return_centered

    def forward(self, x):
        h = self.fc(x)
        m = h.mean(-1, keepdim=True)
        if self.recompute:  # each read computes it again: three nodes
            out = (h - m) / torch.sqrt(((h - m) * (h - m)).mean(-1, keepdim=True) + 1e-5)
        else:
            d = h - m
            out = d / torch.sqrt((d * d).mean(-1, keepdim=True) + 1e-5)
        return (out, d) if self.return_centered else out


def _count(gm, target) -> int:
    return sum(n.op == "call_function" and n.target is target for n in gm.graph.nodes)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("recompute", [False, True], ids=["one-node", "recomputed"])
def test_a_pattern_function_reading_a_value_twice_matches(mode, recompute):
    """The function's `d` became two copies of its tree: a graph's `d`, one node with three users,
    never matched, and the reason said "has 2 users ...; use single_use=False", which a pattern function
    cannot take. A graph computing `h - m` at each read matches too."""
    model, x = _SpelledOut(recompute).eval(), torch.randn(2, 5, 16)
    gm = fxopt.capture(model, x, mode=mode)
    report = apply_patterns(gm, Pattern("ln", pattern_from_function(_layer_norm), replacement=_fused))
    gm.recompile()
    assert report.counts == {"ln": 1}
    assert _count(gm, F.layer_norm) == 1 and not any("sub" in n.name or "sqrt" in n.name for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


def test_a_value_the_pattern_reads_twice_and_the_graph_returns_too_stays():
    model, x = _SpelledOut(return_centered=True).eval(), torch.randn(2, 5, 16)
    gm = fxopt.capture(model, x, mode="symbolic")
    root = next(n for n in gm.graph.nodes if n.op == "output").args[0][0].name
    report = apply_patterns(gm, Pattern("ln", pattern_from_function(_layer_norm), replacement=_fused), debug=root)
    assert report.counts == {}
    assert re.search(r"node 'sub' .* is read by output outside the pattern, which would remove it", report.why_not["ln"])


def _centered():
    return Op("sub", Var("x"), Op("mean", Var("x"), attrs={"dim": [-1], "keepdim": True}))


def _layer_norm_tree(d_first, d_second, d_third):
    return Op("div", d_first, Op("sqrt", Op("add", Op("mean", Op("mul", d_second, d_third),
                                                     attrs={"dim": [-1], "keepdim": True}), scalar=Const("eps"))))


def test_an_op_tree_reads_one_value_as_one_op_object():
    model, x = _SpelledOut().eval(), torch.randn(2, 5, 16)
    d = _centered()
    gm = fxopt.capture(model, x, mode="symbolic")
    assert apply_patterns(gm, Pattern("ln", _layer_norm_tree(d, d, d), replacement=_fused)).counts == {"ln": 1}
    gm.recompile()
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)
    # three Op objects are three values: the graph's one node cannot be all of them, and the reason says how
    gm = fxopt.capture(model, x, mode="symbolic")
    root = next(n for n in gm.graph.nodes if n.op == "output").args[0].name
    report = apply_patterns(gm, Pattern("ln", _layer_norm_tree(_centered(), _centered(), _centered()),
                                        replacement=_fused), debug=root)
    assert report.counts == {}
    assert re.search(r"node 'sub' .*where the pattern reads this value at several places, give one Op object at "
                     r"each", report.why_not["ln"])
