"""`split_packed_parameters`: a tensor the graph reads only as disjoint blocks of one axis gets
one tensor per block; the graph computes the same, and anything else is left as it was."""
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt import capture
from fxopt.ir import split_packed_parameters


class Packed(nn.Module):
    """One weight read in pieces, the way `read` says."""

    def __init__(self, read, rows=6, cols=4):
        super().__init__()
        self.w = nn.Parameter(torch.randn(rows, cols))
        self.register_buffer("scale", torch.rand(rows) + 0.5)
        self.fc = nn.Linear(cols, cols)
        self.read = read

    def forward(self, x):
        return self.read(self, x)


def _chunks(m, x):
    a, b, c = m.w.chunk(3)
    return F.linear(x, a) + F.linear(x, b) * F.linear(x, c)


def _slices_of_columns(m, x):
    return m.w[:, :1] * x[:, :1] + m.w.narrow(1, 1, 3) @ x[:, 1:].T


def _unequal_split(m, x):
    q, kv = torch.split(m.w, [2, 4])
    return F.linear(x, q).sum(1) + F.linear(x, kv).sum(1)


def _buffer_pieces(m, x):
    lo, hi = m.scale[:3], m.scale[3:]
    return F.linear(x, m.w[:3]) * lo + F.linear(x, m.w[3:]) * hi


def _a_few_rows(m, x):
    return F.linear(x, m.w[1:3])


def _grad_sum(m, x):
    return (F.linear(x, m.w[:2]) ** 2).sum() + F.linear(x, m.w[2:]).sum()


@pytest.mark.parametrize("read,pieces", [(_chunks, {"w_0": (2, 4), "w_1": (2, 4), "w_2": (2, 4)}),
                                         (_slices_of_columns, {"w_0": (6, 1), "w_1": (6, 3)}),
                                         (_unequal_split, {"w_0": (2, 4), "w_1": (4, 4)}),
                                         (_a_few_rows, {"w_0": (2, 4)})])
def test_pieces_become_parameters_of_their_own_and_compute_the_same(read, pieces):
    torch.manual_seed(0)
    model = Packed(read)
    x = torch.randn(6, 4) if read is _slices_of_columns else torch.randn(3, 4)
    gm = torch.fx.symbolic_trace(model)
    before = gm(x)
    assert split_packed_parameters(gm) == 1
    gm.graph.lint()
    shapes = {name: tuple(p.shape) for name, p in gm.named_parameters() if name.startswith("w")}
    assert shapes == pieces
    assert not any(n.op == "get_attr" and n.target == "w" for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), before, rtol=0, atol=0)
    assert split_packed_parameters(gm) == 0, "nothing left to split"


def test_a_buffer_stays_a_buffer_and_a_parameter_keeps_training():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    gm = capture(Packed(_buffer_pieces), (x,), mode="export")  # fx alone folds buffer slices
    before = gm(x)
    assert split_packed_parameters(gm) == 2
    assert sorted(n for n, _ in gm.named_buffers()) == ["scale_0", "scale_1"]
    assert all(p.requires_grad for n, p in gm.named_parameters() if n.startswith("w_"))
    torch.testing.assert_close(gm(x), before, rtol=0, atol=0)

    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(Packed(_grad_sum))
    reference = Packed(_grad_sum)
    with torch.no_grad():
        reference.w.copy_(gm.w)
    split_packed_parameters(gm)
    gm(x).backward()
    reference(x).backward()
    torch.testing.assert_close(torch.cat([gm.w_0.grad, gm.w_1.grad]), reference.w.grad)


def _whole_and_slice(m, x):
    return F.linear(x, m.w).sum(1) + F.linear(x, m.w[:2]).sum(1)


def _overlapping(m, x):
    return F.linear(x, m.w[:4]).sum(1) + F.linear(x, m.w[2:]).sum(1)


def _strided(m, x):
    return F.linear(x, m.w[::2])


def _two_axes(m, x):
    return F.linear(x, m.w[:2]).sum(1) + (m.w[:, 2:] @ x[:2, 2:].T).sum()


def _module_reads_it_too(m, x):
    return m.fc(x) + F.linear(x, m.fc.weight[:2]).sum(1, keepdim=True)


def _computed_bound(m, x):
    return F.linear(x, m.w[: x.shape[0]])


def _written(m, x):
    m.w.mul_(2)  # evaluated on a stand-in: splitting never runs the write on the weight
    return F.linear(x, m.w[:2])


def _scalar(m, x):
    m.count += 1  # a step counter, written in place (the same storage comes back)
    return x * m.count


@pytest.mark.parametrize("read", [_whole_and_slice, _overlapping, _strided, _two_axes, _module_reads_it_too,
                                  _computed_bound, _written, _scalar])
def test_reads_that_are_not_disjoint_blocks_of_one_axis_are_left_alone(read):
    torch.manual_seed(0)
    model = Packed(read)
    model.register_buffer("count", torch.tensor(0.0))
    gm = capture(model, (torch.randn(3, 4),), mode="export") if read is _scalar else torch.fx.symbolic_trace(model)
    code, params = gm.code, {name: p.clone() for name, p in gm.named_parameters()}
    assert split_packed_parameters(gm) == 0
    assert gm.code == code and dict(gm.named_parameters()).keys() == params.keys()
    assert all(torch.equal(p, params[name]) for name, p in gm.named_parameters())


def test_exported_cross_attention_gets_its_query_and_key_value_rows_apart():
    """torch.export slices `in_proj_weight` into the q rows and the packed k/v rows
    (`split_with_sizes`); each becomes a parameter on the attention module."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True).eval()

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x, memory):
            return self.attn(x, memory, memory, need_weights=False)[0]

    x, memory = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    gm = capture(Cross(), (x, memory), mode="export")
    before = gm(x, memory)
    assert split_packed_parameters(gm) == 2  # the weight and the bias
    shapes = {n: tuple(p.shape) for n, p in gm.attn.named_parameters() if n.startswith("in_proj")}
    assert shapes == {"in_proj_weight_0": (8, 8), "in_proj_weight_1": (16, 8),
                      "in_proj_bias_0": (8,), "in_proj_bias_1": (16,)}
    torch.testing.assert_close(gm(x, memory), before, rtol=0, atol=0)
    assert attn.in_proj_weight.shape == (24, 8), "the captured module's parameters, not the model's"


class _ExpandedRow(torch.nn.Module):
    """One parameter row read through a fixed-size expand: no block of rows of it."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(1, 16))
        self.fc = torch.nn.Linear(8, 16)

    def forward(self, x):
        return torch.nn.functional.linear(torch.relu(self.fc(x)), self.w.expand(4, 16))


@pytest.mark.parametrize("pipeline", ["prune{ratio=0.5}", "quantize{backend=x86}"])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_an_expanded_parameter_is_not_split_into_rows(mode, pipeline):
    """The packed-parameter split took the expand for rows 0:4 of a [1, 16] parameter:
    'start (0) + length (4) exceeds dimension size (1)' in prune and quantize."""
    torch.manual_seed(0)
    model, x = _ExpandedRow().eval(), torch.randn(3, 8)
    res = fxopt.optimize(model, (x,), pipeline, mode=mode, calibration=[(x,)])
    assert res.module(x).shape == (3, 4)
