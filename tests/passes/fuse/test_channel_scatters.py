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
    assert sum(n.target is index_add_channels for n in res.module.graph.nodes) == scatters
    assert res.verification.verdict == "PASS"
    y = zoo.get("resnet18", batch=3, image_size=32, seed=4)[1]
    with torch.no_grad():
        torch.testing.assert_close(res.module(*y), pruned(*y), rtol=1e-4, atol=1e-5)
