"""torch.export copies a tensor the forward builds from a literal (`lift_fresh_copy`, then
`detach_`); capture reads the stored constant itself where nothing writes the copy."""
import pytest
import torch
from torch import nn

import fxopt


class LiteralIndex(nn.Module):
    def forward(self, x):
        return x.index_select(1, torch.tensor([2, 0, 1]))


class WrittenLiteral(nn.Module):
    """The copy is written in place: each call must start from the literal again."""

    def forward(self, x):
        t = torch.tensor([1.0, 2.0, 3.0])
        t.mul_(2)
        return x * t


def _ops(gm):
    return [fxopt.ir.op_name(n) for n in gm.graph.nodes if n.op == "call_function"]


def test_a_literal_tensor_is_read_as_the_stored_constant():
    gm = fxopt.capture(LiteralIndex(), (torch.randn(2, 3),), mode="export")
    assert not any("lift_fresh_copy" in op or "detach" in op for op in _ops(gm)), _ops(gm)
    select = next(n for n in gm.graph.nodes if "index_select" in str(n.target))
    assert select.args[2].op == "get_attr"
    x = torch.randn(4, 3)
    torch.testing.assert_close(gm(x), LiteralIndex()(x))


def test_a_literal_the_forward_writes_keeps_its_fresh_copy():
    gm = fxopt.capture(WrittenLiteral(), (torch.randn(2, 3),), mode="export")
    assert any("lift_fresh_copy" in op for op in _ops(gm)), _ops(gm)
    x = torch.randn(2, 3)
    for _ in range(2):  # the constant itself is never written: the second call agrees too
        torch.testing.assert_close(gm(x), WrittenLiteral()(x))


class ReturnedLiteral(nn.Module):
    def forward(self, x):
        c = torch.tensor([1.0, 2.0, 3.0, 4.0])
        return x + 1, c.view(2, 2)


def test_a_literal_the_forward_returns_keeps_its_fresh_copy():
    """Returned (here through a view), the stored constant itself would reach the caller, whose
    in-place write would change every later call."""
    gm = fxopt.capture(ReturnedLiteral(), (torch.randn(2, 3),), mode="export")
    x = torch.randn(2, 3)
    gm(x)[1].add_(100)
    torch.testing.assert_close(gm(x)[1], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


class LiteralHandedBack(nn.Module):
    """Ops that may return the literal's copy itself, which is then written or returned."""

    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, x):
        c = torch.tensor([1.0, 2.0, 3.0, 4.0])
        s = c.type_as(x) if self.how == "type_as" else torch.atleast_1d(c) if self.how == "atleast" \
            else torch.nn.functional.dropout(c, 0.5, False)
        s.add_(1)
        return x * s


@pytest.mark.parametrize("how", ["type_as", "atleast", "dropout"])
def test_a_literal_written_through_an_op_that_hands_it_back_keeps_its_copy(how):
    """`c.type_as(x)`, `atleast_1d(c)`, an eval dropout return `c` itself: reading the stored
    constant there let the write change it, and every call drifted ([3, 4, 5, 6], [4, ...])."""
    model = LiteralHandedBack(how)
    gm = fxopt.capture(model, (torch.ones(2, 4),), mode="export")
    x = torch.ones(2, 4)
    for _ in range(3):
        torch.testing.assert_close(gm(x), model(x))


class MovedLiteralWritten(nn.Module):
    """A literal moved to the input's device (the same tensor there) and written in place."""

    def forward(self, x):
        scale = torch.tensor([1.0, 2.0, 3.0, 4.0]).to(x.device)
        scale.mul_(2.0)
        return x * scale


def test_a_symbolic_literal_the_forward_writes_is_fresh_each_call():
    """torch.fx keeps the literal as one constant; the write accumulated from call to call
    ([2, 4, 6, 8], then [4, 8, 12, 16]) while verification, which runs once, said PASS."""
    model = MovedLiteralWritten()
    res = fxopt.optimize(model, torch.ones(1, 4), "dce", mode="symbolic")
    x = torch.ones(1, 4)
    for _ in range(3):
        torch.testing.assert_close(res.module(x), model(x))
