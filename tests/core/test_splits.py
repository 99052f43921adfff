"""A split's pieces as slices of its input (`splits_as_slices`): exact at every size the graph
runs at, and left alone where its tuple is read whole."""
import pytest
import torch
from torch import nn

import fxopt
from fxopt.ir import splits_as_slices


class _Pieces(nn.Module):
    """Chunks and splits along the last axis, whose size the caller chooses."""

    def forward(self, x):
        a, b, c = x.chunk(3, -1)
        d, e = torch.split(x, 2, dim=1)
        return a.sum(-1) + b.sum(-1) * 2 + c.sum(-1) * 3, d * e


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_pieces_become_narrows_computing_what_the_split_did(mode):
    x = torch.randn(2, 4, 8)
    gm = fxopt.capture(_Pieces(), (x,), mode=mode)
    assert splits_as_slices(gm) == 2
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(torch.narrow) == 5 and not any("chunk" in str(t) or "split" in str(t) for t in targets)
    gm.graph.lint()
    for y in (x, torch.randn(3, 4, 8)):
        torch.testing.assert_close(gm(y), _Pieces()(y), rtol=0, atol=0)
    if mode == "symbolic":  # any width: chunk(3) of 7 is 3, 3, 1 and of 9 is 3, 3, 3
        for width in (7, 9):
            y = torch.randn(2, 4, width)
            torch.testing.assert_close(gm(y), _Pieces()(y), rtol=0, atol=0)


class _ListedAndWhole(nn.Module):
    def forward(self, x):
        first, rest = torch.split(x, [1, 3], dim=1)
        whole = torch.cat(x.chunk(2, 1)[::-1], 1)  # a slice of the tuple: read piece by piece
        return first * 2, rest.mean(1), whole, x.chunk(2, 0)  # the last tuple is returned whole


def test_listed_sizes_and_tuples_read_whole():
    x = torch.randn(4, 4, 3)
    gm = fxopt.capture(_ListedAndWhole(), (x,))
    assert splits_as_slices(gm) == 2  # the returned tuple stays a chunk
    assert sum("chunk" in str(n.target) for n in gm.graph.nodes) == 1
    got, want = gm(x), _ListedAndWhole()(x)
    for g, w in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert all(torch.equal(g, w) for g, w in zip(got[3], want[3]))


class _AlongTheBatch(nn.Module):
    def forward(self, x):
        first, second = x.chunk(2, 0)  # along the batch export keeps symbolic: stays
        left, right = x.chunk(2, 1)
        return first.sum() + second.sum() + left * right


def test_an_export_split_along_a_symbolic_size_stays():
    x = torch.randn(4, 6)
    gm = fxopt.capture(_AlongTheBatch(), (x,), mode="export")
    assert splits_as_slices(gm) == 1
    assert sum("chunk" in str(n.target) or "split" in str(n.target) for n in gm.graph.nodes) == 1
    y = torch.randn(6, 6)
    torch.testing.assert_close(gm(y), _AlongTheBatch()(y), rtol=0, atol=0)
