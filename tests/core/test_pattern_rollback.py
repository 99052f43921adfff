"""A pattern whose rewrite raises, or declines, leaves the caller's graph and module as they were:
a refused replacement left its nodes and a tensor attribute behind (found by a notebook-style
user of `apply_patterns`, whose graph is the one they passed in)."""
import pytest
import torch
from torch import nn

import fxopt
from fxopt.patterns import Pattern, apply_patterns, pattern_from_function


class _Swish(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x)
        return h * torch.sigmoid(h)


def _swish(x):
    return x * torch.sigmoid(x)


def _state(gm: torch.fx.GraphModule) -> tuple:
    """What a failed rewrite must not change: the graph's code and the module's tensors."""
    return gm.code, [n.name for n in gm.graph.nodes], sorted(k for k, _ in gm.named_parameters()), \
        sorted(k for k, _ in gm.named_buffers())


def _declines_after_a_tensor(rw):
    rw.tensor("scratch", torch.ones(8))
    return None


def _returns_a_string_after_a_tensor(rw):
    rw.call(torch.mul, rw.tensor("scratch", torch.ones(8)), 2.0)
    return "not a node"


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("replacement, error", [
    (lambda x: (x + x).half(), r"computes float16\[2, 8\] where the matched value is float32\[2, 8\]"),
    (lambda x: x @ torch.ones(3, 3), r"cannot run at the matched shapes"),
], ids=["wrong-dtype", "cannot-run-with-a-constant"])
def test_a_refused_replacement_leaves_the_graph_as_it_was(mode, replacement, error):
    gm = fxopt.capture(_Swish().eval(), torch.randn(2, 8), mode=mode)
    before = _state(gm)
    with pytest.raises(ValueError, match=error):
        apply_patterns(gm, Pattern("bad", pattern_from_function(_swish), replacement=replacement))
    assert _state(gm) == before


@pytest.mark.parametrize("rewrite, raises", [(_declines_after_a_tensor, None),
                                             (_returns_a_string_after_a_tensor, TypeError)])
def test_a_declined_or_wrong_rewrite_leaves_no_tensor_behind(rewrite, raises):
    gm = fxopt.capture(_Swish().eval(), torch.randn(2, 8), mode="symbolic")
    before = _state(gm)
    pattern = Pattern("p", pattern_from_function(_swish), rewrite=rewrite)
    if raises is None:
        assert apply_patterns(gm, pattern).total == 0
    else:
        with pytest.raises(raises, match="rewrite= returned str"):
            apply_patterns(gm, pattern)
    assert _state(gm) == before
    assert not hasattr(gm, "scratch")
