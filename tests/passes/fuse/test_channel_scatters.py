"""lower-cpu routes the channel scatters prune leaves (``index_add(stream, 1, pos, block)`` where
a narrowed block joins a residual stream) through `index_add_channels`, which scatters over the
(N*H*W, C) view of the channels-last tensors lowered convs return; same values as index_add."""
import pytest
import torch

import fxopt
from fxopt.examples import zoo
from fxopt.passes.fuse.lower_cpu import index_add_channels

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_index_add_channels_is_index_add_in_either_layout(layout):
    torch.manual_seed(0)
    y = torch.randn(2, 12, 5, 7).contiguous(memory_format=layout)
    source = torch.randn(2, 8, 5, 7).contiguous(memory_format=layout)
    index = torch.tensor([0, 2, 3, 5, 6, 9, 10, 11])
    got = index_add_channels(y, index, source)
    torch.testing.assert_close(got, torch.index_add(y, 1, index, source), rtol=0, atol=0)
    assert got.is_contiguous(memory_format=layout)


def test_a_pruned_resnet_lowered_for_cpu_scatters_over_rows_and_stays_exact():
    model, x = zoo.get("resnet18", batch=2, image_size=32)
    pruned = fxopt.optimize(model, x, "prune{ratio=0.5}", verify=False).module
    scatters = sum(n.target is torch.index_add for n in pruned.graph.nodes)
    assert scatters, "the pruned ResNet writes narrowed block outputs into its streams"
    res = fxopt.optimize(pruned, x, "fuse,lower-cpu")
    assert res.passes[-1].stats["channel_scatters"] == scatters
    lowered = [n for n in res.module.graph.nodes if n.target is index_add_channels]
    assert len(lowered) == scatters
    assert any(n.kwargs.get("in_place") for n in lowered), "a block's conv result takes its skip in place"
    assert res.verification.verdict == "PASS"
    y = zoo.get("resnet18", batch=3, image_size=32, seed=4)[1]
    with torch.no_grad():
        torch.testing.assert_close(res.module(*y), pruned(*y), rtol=1e-4, atol=1e-5)


class _ScatterIntoConv(torch.nn.Module):
    """A conv's result gains a narrower value on some channels, then ReLU (as prune leaves a
    pruned block's residual add); `reads_conv_twice` also returns the conv's result."""

    def __init__(self, reads_conv_twice: bool = False):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 6, 3, padding=1)
        self.register_buffer("pos", torch.tensor([1, 4]))
        self.reads_conv_twice = reads_conv_twice

    def forward(self, x, side):
        y = self.conv(x)
        out = torch.relu(torch.index_add(y, 1, self.pos, side))
        return (out, y) if self.reads_conv_twice else out


def _lowered_scatter(model, x, side):
    res = fxopt.optimize(model, (x, side), "fuse,lower-cpu{min_macs=0}")
    (scatter,) = [n for n in res.module.graph.nodes if n.target is index_add_channels]
    return res, scatter


def test_a_scatter_into_a_conv_result_read_by_nothing_else_writes_in_place_and_folds_the_relu():
    torch.manual_seed(0)
    model, x, side = _ScatterIntoConv(), torch.randn(2, 4, 5, 5), torch.randn(2, 2, 5, 5)
    res, scatter = _lowered_scatter(model, x, side)
    assert scatter.kwargs == {"in_place": True, "relu": True}
    assert not any(n.target is torch.relu for n in res.module.graph.nodes), "the ReLU is folded into the scatter"
    side_before = side.clone()
    with torch.no_grad():
        torch.testing.assert_close(res.module(x, side), model(x, side), rtol=1e-5, atol=1e-6)
    assert torch.equal(side, side_before), "the narrow value is read, never written"


def test_a_conv_result_read_elsewhere_is_copied_not_overwritten():
    torch.manual_seed(0)
    model, x, side = _ScatterIntoConv(reads_conv_twice=True), torch.randn(2, 4, 5, 5), torch.randn(2, 2, 5, 5)
    res, scatter = _lowered_scatter(model, x, side)
    assert scatter.kwargs == {}
    with torch.no_grad():
        for got, want in zip(res.module(x, side), model(x, side)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_index_add_channels_in_place_writes_into_y_in_either_layout():
    torch.manual_seed(0)
    for layout in (torch.contiguous_format, torch.channels_last):
        y = torch.randn(2, 6, 3, 4).contiguous(memory_format=layout)
        source, index = torch.randn(2, 2, 3, 4).contiguous(memory_format=layout), torch.tensor([5, 0])
        want = torch.relu(torch.index_add(y, 1, index, source))
        got = index_add_channels(y, index, source, in_place=True, relu=True)
        assert got.data_ptr() == y.data_ptr()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
