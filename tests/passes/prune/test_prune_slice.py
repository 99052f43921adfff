"""Slices of the channel axis: ``x[:, a:b]`` (symbolic getitem) and ``aten.slice`` (export) are
index maps like a split piece; a full-range one (GhostNet's ``cat([x1, x2], 1)[:, :oup]``) is the
identity. Apply rewrites the bounds to the kept channels; pruning stays exact (pruned == original
with the removed channels zeroed). Slices the rule cannot map stay pinned, with a reason."""
import copy
import operator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxopt.measure import count_parameters
from fxopt.passes.prune.apply import apply_pruning, zero_removed
from fxopt.passes.prune.boundary import Boundary
from fxopt.passes.prune.prune_pass import analyze
from prune_masking import prune_and_mask

MODES = ["symbolic", "export"]


class Ghost(nn.Module):
    """GhostNet's ghost module: half the channels from a 1x1 conv, half from a cheap depthwise
    conv of those, concatenated and cut to `oup` (a no-op slice when `oup` is even)."""

    def __init__(self, cin, oup):
        super().__init__()
        self.oup = oup
        init = -(-oup // 2)
        self.primary = nn.Conv2d(cin, init, 1)
        self.cheap = nn.Conv2d(init, init, 3, padding=1, groups=init)

    def forward(self, x):
        x1 = torch.relu(self.primary(x))
        return torch.cat([x1, torch.relu(self.cheap(x1))], dim=1)[:, :self.oup, :, :]


class GhostNet(nn.Module):
    def __init__(self, oup=16):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.g1, self.g2 = Ghost(8, oup), Ghost(oup, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.g2(self.g1(x))
        return self.head(x.mean((2, 3)))


class MiddleSlices(nn.Module):
    """A slice from the middle of a conv's channels, and one of a linear's last axis."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 1), nn.Conv2d(6, 4, 1)
        self.fc1, self.fc2 = nn.Linear(4, 12), nn.Linear(7, 3)

    def forward(self, x):
        y = self.b(self.a(x)[:, 4:10])
        return self.fc2(self.fc1(y.mean((2, 3)))[..., 2:9])


def _slices(gm):
    """(start, stop, width of the sliced axis) of every slice on a non-batch axis: export's
    ``aten.slice`` and the symbolic getitem's one non-trivial slice item."""
    found = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is torch.ops.aten.slice.Tensor and n.args[1] != 0:
            dim, start, stop = n.args[1:4]
        elif n.target is operator.getitem and isinstance(n.args[1], tuple):
            items = [(d, i) for d, i in enumerate(n.args[1]) if isinstance(i, slice) and i != slice(None)]
            if not items:
                continue
            (dim, item), = items
            start, stop = item.start, item.stop
        else:
            continue
        found.append((start or 0, stop, n.args[0].meta["tensor_meta"].shape[dim]))
    return found


def _check_exact(r, x):
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    r.pruned.graph.lint()
    assert count_parameters(r.pruned) < r.params_before
    for batch in (1, 3):  # the rewritten bounds do not depend on the example batch
        assert r.pruned(torch.randn(batch, *x.shape[1:])).shape[0] == batch


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("oup", [16, 15])
def test_ghost_module_slice_prunes_exactly(mode, oup):
    """[:, :16] of 16 channels is the identity, [:, :15] of 16 a prefix: neither pins anything,
    so the ghost convs shrink with the stream; the slice reads the new width."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    r = prune_and_mask(GhostNet(oup).eval(), x, mode)
    assert not r.plan.channel_graph.pinned_nodes, r.plan.channel_graph.pinned_nodes
    assert r.plan.selection.removed >= r.plan.selection.target // 2
    _check_exact(r, x)
    assert _slices(r.pruned) or oup == 16 and mode == "export"  # export drops a no-op slice itself
    for start, stop, width in _slices(r.pruned):
        assert start == 0 and stop <= width
        if oup == 16:
            assert stop == width, "a full-range slice stays full-range at the new width"


class GhostStream(nn.Module):
    """Ghost modules with an odd `oup` writing a residual stream that a depthwise conv and a
    dense conv read: the stream's width is the union of writers cut by a slice."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.g1, self.g2 = Ghost(24, 36), Ghost(36, 23)
        self.pad = nn.Conv2d(23, 1, 1)  # makes the block's output 24 wide again, as a skip
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.pw = nn.Conv2d(24, 16, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + torch.cat([self.g2(self.g1(x)), self.pad(self.g2(self.g1(x)))], dim=1)
        return self.pw(torch.relu(self.dw(x)))


@pytest.mark.parametrize("mode", MODES)
def test_round_to_holds_for_the_widths_layers_read(mode):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    r = prune_and_mask(GhostStream().eval(), x, mode, round_to=4)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)

    def conv_widths(gm):  # node name -> (channels read, channels produced)
        return {n.name: (n.all_input_nodes[0].meta["tensor_meta"].shape[1], n.meta["tensor_meta"].shape[1])
                for n in gm.graph.nodes if ("conv" in str(n.target) or n.op == "call_module")
                and n.meta.get("tensor_meta") is not None and n.all_input_nodes
                and n.all_input_nodes[0].meta.get("tensor_meta")}

    before, after = conv_widths(r.plan.gm), conv_widths(r.pruned)
    assert len(after) >= 7 and after != before
    for name, widths in after.items():
        for now, full in zip(widths, before[name]):
            assert now == full or now % 4 == 0, (name, widths, before[name])


@pytest.mark.parametrize("mode", MODES)
def test_middle_slice_bounds_follow_the_kept_channels(mode):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    r = prune_and_mask(MiddleSlices().eval(), x, mode, ratio=0.4)
    assert not r.plan.channel_graph.pinned_nodes, r.plan.channel_graph.pinned_nodes
    _check_exact(r, x)
    cg = r.plan.channel_graph
    a = next(s for s in cg.slots if s.role == "producer" and s.size == 16)
    alive = (~r.plan.dead[cg.positions(a.id)]).nonzero()[0]
    kept_in_range = [int(p) for p in alive if 4 <= p < 10]
    start = sum(int(p) < 4 for p in alive)  # kept channels before the slice shift it left
    assert (start, start + len(kept_in_range), len(alive)) in _slices(r.pruned), _slices(r.pruned)


class _ReluThenSlice(nn.Module):
    """A value read whole by a pinned op (cumsum) and sliced for a conv."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 12, 1), nn.Conv2d(6, 4, 1), nn.Conv2d(12, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.b(y[:, 3:9]) + self.c(torch.cumsum(y, 1))


@pytest.mark.parametrize("mode", MODES)
def test_slice_of_a_full_width_value_gathers_its_kept_channels(mode):
    """When the boundary keeps the sliced value at full width, the slice still gets exactly the
    channels its (narrower) output keeps: as bounds, or through a gather then [0:n]."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    for ratio in (0.2, 0.5):
        plan = analyze(_ReluThenSlice().eval(), (x,), mode=mode, ratio=ratio, adapter_cost=0.0)
        cg = plan.channel_graph
        relu = next(s for s in cg.slots if s.node.startswith("relu"))
        pruned = copy.deepcopy(plan.gm)
        apply_pruning(pruned, cg, plan.dead, Boundary(full={relu.id}), set(), {})
        pruned.graph.lint()
        zero_removed(plan.gm, cg, plan.dead)
        with torch.no_grad():
            torch.testing.assert_close(pruned(x), plan.gm(x), rtol=1e-4, atol=1e-5)


class _Unmappable(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.b = nn.Conv2d(3, 12, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.a(x)
        if self.how == "strided":
            y = y[:, ::2]
        elif self.how == "computed":  # bounded by the image width (a count-bounded slice prunes)
            y = y[:, :y.size(3) + 2]
        else:
            y = y[:, [0, 2, 4, 6, 8, 10]]
        return self.b(y)


@pytest.mark.parametrize("how, reason", [("strided", "strided slice on the channel axis (no rule yet)"),
                                         ("computed", "slice on the channel axis with bounds computed in the graph"),
                                         ("list",
                                          "advanced indexing of the channel axis (an index tensor or list on it)")])
def test_slices_the_rule_cannot_map_stay_pinned_with_a_reason(how, reason):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    r = prune_and_mask(_Unmappable(how).eval(), x, "symbolic")
    pinned = r.plan.channel_graph.pinned_nodes
    assert reason in pinned.values(), pinned
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


class _PositionIds(nn.Module):
    """Hugging Face BERT's position embedding: an integer buffer sliced to the sequence length
    (a constant here: a symbolic trace cannot slice a real tensor by a traced size)."""

    def __init__(self, length=8):
        super().__init__()
        self.length = length
        self.tok, self.pos = nn.Embedding(50, 16), nn.Embedding(32, 16)
        self.register_buffer("position_ids", torch.arange(32).expand(1, -1), persistent=False)
        self.fc = nn.Linear(16, 4)

    def forward(self, ids):
        return self.fc(self.tok(ids) + self.pos(self.position_ids[:, :self.length]))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_a_sliced_index_buffer_has_no_channels(mode, ratio):
    """Positions of an integer buffer are rows to look up, not channels: slicing it must not
    make them prunable (the sequence would shrink)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 8))
    r = prune_and_mask(_PositionIds().eval(), ids, mode, ratio)
    assert not [s for s in r.plan.channel_graph.slots if "position_ids" in s.node]
    assert r.plan.selection.removed > 0
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    assert r.pruned(torch.randint(0, 50, (3, 8))).shape == (3, 8, 4)


class _ReadsSome(nn.Module):
    """A conv whose channels only some readers take: `how` says which. The channels no reader
    takes get the largest weights, so an l1 selection blind to the readers would keep them."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.a2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.b, self.c = nn.Conv2d(4, 6, 1), nn.Conv2d(8, 6, 1)
        with torch.no_grad():
            for conv in (self.a, self.a2):
                conv.weight[[0, 1, 6, 7] if how == "slice" else [4, 5, 6, 7]] *= 10

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.how == "slice":
            return self.b(h[:, 2:6])
        if self.how == "split":  # the second piece is never read
            first, _ = h.chunk(2, dim=1)
            return self.b(first)
        if self.how == "junction":  # channels 4..7 of both addends are dropped after the sum
            return self.b((h + self.a2(x))[:, :4])
        return self.b(h[:, 2:6]) + self.c(h)  # "also whole": another reader takes every channel


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how, unread", [("slice", [0, 1, 6, 7]), ("split", [4, 5, 6, 7]),
                                         ("junction", [4, 5, 6, 7]), ("also whole", [])])
def test_channels_no_reader_takes_are_removed_first(mode, how, unread):
    """A class every reader drops has importance 0: at ratio 0.5 those are the channels removed,
    whatever their weights, and the pruned model equals the original (they never mattered)."""
    torch.manual_seed(0)
    model, x = _ReadsSome(how).eval(), torch.randn(2, 3, 8, 8)
    plan = analyze(model, x, ratio=0.5, mode=mode)
    cg = plan.channel_graph
    conv = next(s for s in cg.slots if s.node in ("a", "conv2d"))
    positions = cg.positions(conv.id)
    assert np.flatnonzero(cg.unread_classes[positions]).tolist() == unread
    assert plan.stats()["unread_classes"] >= len(unread)
    if unread:
        assert np.flatnonzero(plan.dead[positions]).tolist() == unread
        pruned = plan.apply()
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-5, atol=1e-6)
        # a cap on what a layer may lose does not count them (its surcharge made the
        # selection keep them and remove read channels instead)
        capped = analyze(model, x, ratio=0.5, mode=mode, max_layer_ratio=0.25)
        assert np.flatnonzero(capped.dead[positions]).tolist() == unread
    else:  # every channel is read: each keeps its weights' importance
        assert (plan.costs["imp"][positions] > 0).all()


class _NormThenSlice(nn.Module):
    """A statistic over all 8 channels, then a slice of 4: every channel is read by the statistic."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm
        self.a, self.b = nn.Linear(6, 8), nn.Linear(4, 3)
        self.rms, self.ln = nn.RMSNorm(8), nn.LayerNorm(8)

    def forward(self, x):
        h = self.a(x)
        h = {"normalize": lambda: F.normalize(h, dim=-1), "rms": lambda: self.rms(h),
             "layer_norm": lambda: self.ln(h)}[self.norm]()
        return self.b(h[..., :4])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm, exact_norms", [("normalize", True), ("rms", True), ("rms", False),
                                               ("layer_norm", False)])
def test_channels_a_norm_reads_for_its_statistics_are_read(mode, norm, exact_norms):
    """F.normalize, an RMS norm or a layer norm (exact_norms=false) maps channel c to channel c
    but divides it by a statistic of all of them: the channels a later slice drops are read.
    Taken for unread, they were removed first (0.53 off the original on normalize)."""
    torch.manual_seed(0)
    model, x = _NormThenSlice(norm).eval(), torch.randn(2, 5, 6)
    plan = analyze(model, x, ratio=0.5, mode=mode, exact_norms=exact_norms)
    cg = plan.channel_graph
    producer = next(s for s in cg.slots if cg.rules.get(s.node) is not None and cg.rules[s.node].category == "producer"
                    and s.size == 8)
    assert not cg.unread_classes[cg.positions(producer.id)].any()


def test_adaptive_max_pool_indices_read_as_features_are_pinned():
    """export's adaptive_max_pool2d returns (values, indices) per channel; a removed, all-zero
    channel's indices are each window's first position, not 0, so a layer reading the indices
    saw a non-zero removed channel (the pruned model differed from the masked one)."""
    class Indices(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(F.adaptive_max_pool2d(self.a(x), 2, return_indices=True)[1].float())

    torch.manual_seed(0)
    r = prune_and_mask(Indices().eval(), torch.randn(2, 3, 8, 8), "export", 0.5)
    assert any("indices" in why for why in r.plan.channel_graph.pinned_nodes.values())
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
