"""Channel slices whose bounds are computed from the channel count (ShiftNet's and S²-MLP's
spatial shift: ``q = h.shape[1] // 4; h[:, :q], h[:, q:2*q], ...``). Export fixes q as a
constant and pruned them; the symbolic graph computes q and pinned every slice (0.814 of the
MACs kept vs 0.458). The bounds are the original numbers now, written as constants in place
of the count; a bound read off another axis (which varies with the input) still pins."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxopt.measure import count_macs
from prune_masking import prune_and_mask


class SpatialShift(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.c1, self.c2, self.head = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, c, 1), nn.Linear(c, 5)

    def forward(self, x):
        h = F.relu(self.c1(x))
        q = h.shape[1] // 4
        h = torch.cat([torch.roll(h[:, :q], 1, 2), torch.roll(h[:, q:2 * q], -1, 2),
                       torch.roll(h[:, 2 * q:3 * q], 1, 3), torch.roll(h[:, 3 * q:], -1, 3)], 1)
        return self.head(F.relu(self.c2(h)).mean((2, 3)))


class BoundFromTheWidth(nn.Module):
    """A channel slice bounded by the image width: not a count, it changes with the input."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        h = F.relu(self.c1(x))
        return self.c2(torch.cat([h[:, :h.shape[3]], h[:, h.shape[3]:] * 2], 1)).mean((2, 3))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_slices_bounded_by_the_channel_count_prune_exactly_in_both_front_ends(mode):
    torch.manual_seed(0)
    model, x = SpatialShift().eval(), torch.randn(2, 3, 8, 8)
    r = prune_and_mask(model, x, mode)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    assert not r.plan.channel_graph.pinned_nodes
    assert count_macs(r.pruned, x) < 0.5 * count_macs(model, x)
    size = 12 if mode == "symbolic" else 8  # (export fixes the image size)
    with torch.no_grad():
        r.pruned(torch.randn(3, 3, size, size))  # the bounds are constants now, not the new count


def test_a_slice_bounded_by_another_axis_is_still_pinned():
    torch.manual_seed(0)
    r = prune_and_mask(BoundFromTheWidth().eval(), torch.randn(2, 3, 8, 8), "symbolic")
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    assert any("bounds computed in the graph" in why for why in r.plan.channel_graph.pinned_nodes.values())


class FlattenedHalves(nn.Module):
    """`f.shape[1]` after a flatten is C*H*W, not a channel count: it changes with the image."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x):
        f = F.relu(self.c1(x)).flatten(1)
        q = f.shape[1] // 2
        return f[:, :q].sum(1) + 2 * f[:, q:].sum(1)


def test_a_count_of_an_axis_that_merged_positions_is_no_constant():
    torch.manual_seed(0)
    r = prune_and_mask(FlattenedHalves().eval(), torch.randn(2, 3, 8, 8), "symbolic")
    assert any("bounds computed in the graph" in why for why in r.plan.channel_graph.pinned_nodes.values())


class UnpackedSizes(nn.Module):
    """SKNet's ``B, C = x.shape[:2]`` (a slice of the size, unpacked), the count then a reshape
    entry; `how` reads it another way for comparison, or unpacks a slice without the channels."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 4, 1)
        self.fc = nn.Linear(16, 32)

    def forward(self, x):
        h = F.relu(self.c1(x))
        b, c = {"slice": lambda: h.shape[:2], "negative": lambda: h.shape[-4:-2],
                "index": lambda: (h.shape[0], h.shape[1])}[self.how]()
        a = self.fc(h.mean((2, 3))).view(b, 2, c).softmax(1).sum(1)
        return self.c3(F.relu(self.c2(h)) * a[..., None, None]).mean((2, 3))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("how", ["slice", "negative", "index"])
def test_an_unpacked_slice_of_the_size_reads_the_count_where_it_is_used(mode, how):
    """Prune tester: ``B, C = x.shape[:2]`` pinned the channels as a read of their size, and the
    pruned graph re-expanded the value to full width only to read it (symbolic only; export
    writes the sizes as numbers). The count is now written where the reshape uses it."""
    torch.manual_seed(0)
    model, x = UnpackedSizes(how).eval(), torch.randn(2, 3, 8, 8)
    r = prune_and_mask(model, x, mode)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    assert not r.plan.channel_graph.pinned_nodes, r.plan.channel_graph.pinned_nodes
    assert r.pruned.get_submodule("c1").weight.shape[0] < 16 if mode == "symbolic" else True
    assert count_macs(r.pruned, x) < 0.6 * count_macs(model, x)


class PadModules(nn.Module):
    """Spatial pads as modules (a CycleGAN generator's reflection pads), and a zero pad module
    over the channels, which apply could not recount (a module keeps its padding)."""

    def __init__(self, channel_pad=False):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 4, 3)
        self.pads = nn.ModuleList([nn.ReflectionPad2d(1), nn.ReplicationPad2d((1, 0, 1, 0)), nn.ZeroPad2d(1)])
        self.channel_pad = nn.ConstantPad3d((0, 0, 0, 0, 2, 2), 0.0) if channel_pad else None

    def forward(self, x):
        h = F.relu(self.c1(self.pads[0](x)))
        h = F.relu(self.c2(self.pads[1](h)))
        if self.channel_pad is not None:
            h = self.channel_pad(h)[:, 2:-2]
        return self.c3(self.pads[2](h)).mean((2, 3))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_pad_modules_pass_channels_like_f_pad(mode):
    """Prune tester: a symbolic graph keeps nn.ReflectionPad2d and its kin as module calls,
    which had no rule: pinned, 0.52 of a small net's MACs kept against 0.26 with F.pad."""
    torch.manual_seed(0)
    model, x = PadModules().eval(), torch.randn(2, 3, 12, 12)
    r = prune_and_mask(model, x, mode)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    assert not r.plan.channel_graph.pinned_nodes, r.plan.channel_graph.pinned_nodes
    assert count_macs(r.pruned, x) < 0.4 * count_macs(model, x)


def test_a_pad_module_over_the_channels_is_pinned_by_name():
    torch.manual_seed(0)
    r = prune_and_mask(PadModules(channel_pad=True).eval(), torch.randn(2, 3, 12, 12), "symbolic")
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    assert "a pad module over the channel axis" in r.plan.channel_graph.pinned_nodes.values()
