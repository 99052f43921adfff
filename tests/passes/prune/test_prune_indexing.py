"""Advanced indexing (``h[idx]``, ``h[:, idx]``, ``h[mask]``; export's ``aten.index.Tensor``)
on axes that are not the channel axis: the channels pass through to the output's channel axis,
placed by torch's indexing rules, so a sparse MoE's token gather ``xf[tok]`` prunes like
``index_select(xf, 0, tok)``. Indexing the channel axis itself stays pinned, with a reason.

Size reads of the channel axis read as numbers (``q.size(-1) ** -0.5``, ``math.sqrt(x.shape[-1])``):
the pruned graph computes with the original count, a constant, as export bakes it in, so the
channels are free in symbolic capture too.

A prune that removes materially less than its target (below `SHORTFALL_WARNING`, 90%) warns,
naming what held the channels back and the options that would remove more.

Every case is checked for exactness (pruned == original with the removed channels zeroed) in
both front ends."""
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.errors import PassWarning
from fxopt.measure import count_parameters
from fxopt.passes.prune.channel_graph import Slot, _Builder, _Pin
from fxopt.passes.prune.prune_pass import OVERSHOOT_WARNING, SHORTFALL_WARNING, _shortfall
from prune_masking import prune_and_mask

MODES = ["symbolic", "export"]


class RowGather(nn.Module):
    """The tester's repro: rows gathered by a constant index, a layer on them, added back."""

    def __init__(self):
        super().__init__()
        self.a, self.e, self.b = nn.Linear(8, 64), nn.Linear(64, 64), nn.Linear(64, 4)
        self.register_buffer("idx", torch.tensor([0, 2, 3, 5]))

    def forward(self, x):
        h = self.a(x)
        return self.b(h.index_add(0, self.idx, self.e(h[self.idx])))


class TokenAxis(nn.Module):
    """[B, T, C]: ``h[:, idx]`` (one adjacent index), ``h[ib, it]`` (two, broadcast), a 2-D
    index over the batch axis, a list, and an Ellipsis before an index."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 32), nn.Linear(32, 32), nn.Linear(32, 3)
        self.register_buffer("it", torch.tensor([4, 0, 2]))
        self.register_buffer("ib", torch.tensor([1, 0, 1]))
        self.register_buffer("i2", torch.tensor([[0, 1], [1, 1]]))

    def forward(self, x):
        h = torch.relu(self.a(x))                       # [2, 5, 32]
        g = self.b(h[:, self.it])                       # [2, 3, 32]
        pairs = h[self.ib, self.it]                     # [3, 32]
        grid = h[self.i2][:, :, 0]                      # [2, 2, 32] -> token 0
        listed = h[:, [1, 3]]                           # [2, 2, 32]
        return self.c(g.mean(1) + pairs.sum(0) + grid.mean(1) + listed[..., 0, :] + h[..., self.it[:2], :][:, 0])


class ChannelsFirst(nn.Module):
    """[B, C, T] from a conv: indices on the batch and time axes around the channels. Not
    adjacent, ``h[ib, :, it]`` puts the broadcast index first ([3, C]); ``h[0, :, it]``
    selects first (torch, unlike numpy), so the channels stay in front ([C, 3])."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv1d(4, 24, 3, padding=1), nn.Linear(24, 5)
        self.register_buffer("it", torch.tensor([6, 1, 3]))
        self.register_buffer("ib", torch.tensor([1, 0, 1]))

    def forward(self, x):
        h = torch.relu(self.conv(x))                    # [2, 24, 8]
        return (self.fc(h[self.ib, :, self.it]).sum(0) + self.fc(h[0, :, self.it].transpose(0, 1)).sum(0)
                + self.fc(h[:, None][:, 0, :, 2]).sum(0))


class Masked(nn.Module):
    """A boolean mask over the batch and token axes (BERT's masked positions) keeps the channels."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 32), nn.Linear(32, 7)
        self.register_buffer("keep", torch.tensor([[True, False, True, True, False], [False, True, True, False, True]]))

    def forward(self, x):
        return self.b(torch.relu(self.a(x))[self.keep])


class Expert(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.up, self.gate, self.down = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


class SparseMoE(nn.Module):
    """Switch/Mixtral dispatch as the tester's m_llm.MoESparse: tokens gathered per expert by a
    computed index, weighted, and added back with index_add."""

    def __init__(self, d=32, h=64, experts=3, k=2):
        super().__init__()
        self.inp, self.out = nn.Linear(6, d), nn.Linear(d, 5)
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(Expert(d, h) for _ in range(experts))
        self.k = k

    def forward(self, x):
        x = self.inp(x)
        B, T, D = x.shape
        xf = x.reshape(-1, D)
        topw, topi = torch.softmax(self.router(xf), dim=-1).topk(self.k, dim=-1)
        out = torch.zeros_like(xf)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(topi == e)
            out = out.index_add(0, tok, expert(xf[tok]) * topw[tok, slot, None])
        return self.out((xf + out).reshape(B, T, D))


CASES = {
    "row_gather": (RowGather, lambda: torch.randn(6, 8)),
    "token_axis": (TokenAxis, lambda: torch.randn(2, 5, 6)),
    "channels_first": (ChannelsFirst, lambda: torch.randn(2, 4, 8)),
    "bool_mask": (Masked, lambda: torch.randn(2, 5, 6)),
    "sparse_moe": (SparseMoE, lambda: torch.randn(2, 6, 6)),
}


def _indexing_pins(plan):
    """Pinned nodes other than the MoE router's softmax over its experts (its channel axis)."""
    return {n: why for n, why in plan.channel_graph.pinned_nodes.items() if "softmax" not in why}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_indexing_other_axes_follows_the_channels_exactly(name, mode):
    torch.manual_seed(0)
    build, make = CASES[name]
    x = make()
    r = prune_and_mask(build().eval(), x, mode)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    r.pruned.graph.lint()
    assert not _indexing_pins(r.plan), r.plan.channel_graph.pinned_nodes
    assert r.plan.selection.removed >= r.plan.selection.target // 2, r.plan.stats()
    assert count_parameters(r.pruned) < r.params_before


@pytest.mark.parametrize("mode", MODES)
def test_row_gather_prunes_like_index_select(mode):
    """The tester's numbers: h[idx] kept every MAC (pinned), index_select kept 30.5%."""
    from fxopt.measure import count_macs
    import fxopt

    torch.manual_seed(0)
    m, x = RowGather().eval(), torch.randn(6, 8)
    res = fxopt.optimize(m, (x,), "prune{ratio=0.5}", mode=mode)
    stats = next(p.stats for p in res.passes if p.name == "prune")
    assert not stats["pinned"], stats["pinned"]
    assert count_macs(res.module, (x,)) / count_macs(m, (x,)) < 0.4


class OnChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(4, 3)
        self.register_buffer("ic", torch.tensor([0, 5, 6, 9]))

    def forward(self, x):
        return self.b(self.a(x)[:, self.ic])


@pytest.mark.parametrize("mode", MODES)
def test_an_index_on_the_channel_axis_stays_pinned_with_its_reason(mode):
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    r = prune_and_mask(OnChannels().eval(), x, mode)
    pins = r.plan.channel_graph.pinned_nodes
    assert any("advanced indexing of the channel axis" in why for why in pins.values()), pins
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


# ----- the axis rule against torch itself -------------------------------------------------------

SHAPE = (2, 3, 4, 5)  # distinct sizes: the channel axis is the one of size 3 + axis


def _items(draw):
    """Index tuples over a 4-D value: ints, slices, None, one Ellipsis, index tensors."""
    kinds = [0, slice(None), None, Ellipsis, "t", "t2", "m"]
    for combo in itertools.product(kinds, repeat=draw):
        if sum(k is Ellipsis for k in combo) > 1:
            continue
        yield combo


def _materialize(combo, shape, axis):
    """The combo with index tensors that fit the axes they land on (None if they cannot)."""
    out, dim = [], 0
    rest = len(shape) - sum(1 if k not in (None, Ellipsis) else 0 for k in combo) - sum(k == "m" for k in combo)
    for k in combo:
        if k is Ellipsis:
            out.append(k)
            dim += max(rest, 0)
        elif k is None:
            out.append(k)
        elif k == "t":
            out.append(torch.tensor([1, 0, 1]) % shape[min(dim, len(shape) - 1)])
            dim += 1
        elif k == "t2":
            out.append(torch.tensor([[0], [1]]) % shape[min(dim, len(shape) - 1)])
            dim += 1
        elif k == "m":
            if dim + 2 > len(shape):
                return None
            out.append(torch.ones(shape[dim], shape[dim + 1], dtype=torch.bool))
            dim += 2
        else:
            out.append(k)
            dim += 1
    return tuple(out) if dim <= len(shape) and rest >= 0 else None


class _Stub(_Builder):
    """Just enough of a builder to ask `_indexed_axis` about one value's channel axis."""

    def __init__(self, axis, size):
        self.slots = [Slot(0, "x", axis, size, 0, "pass")]
        self.value_slot = {}


def test_the_axis_rule_agrees_with_torch_on_every_small_index():
    checked = 0
    for draw in (1, 2, 3):
        for combo in _items(draw):
            for axis in range(len(SHAPE)):
                index = _materialize(combo, SHAPE, axis)
                if index is None:
                    continue
                try:
                    result = torch.arange(SHAPE[axis]).view([-1 if d == axis else 1 for d in range(4)]) \
                        .expand(SHAPE)[index]
                except (IndexError, RuntimeError):
                    continue
                stub = _Stub(axis, SHAPE[axis])
                entries = []
                for item in index:
                    if isinstance(item, torch.Tensor):
                        entries.append(("adv", item.dim() if item.dtype == torch.bool else 1, None))
                    elif item is None:
                        entries.append(("new", None, None))
                    elif item is Ellipsis:
                        entries.append(("ellipsis", None, None))
                    elif isinstance(item, slice):
                        entries.append(("axis", item, None))
                    else:
                        entries.append(("int", None, None))
                entries = _expand(entries, 4)
                try:
                    out_axis, _, _ = stub._indexed_axis(0, entries, tuple(result.shape))
                except _Pin as pin:
                    touched = _touches(entries, axis)
                    assert touched, (combo, axis, str(pin))
                    continue
                # the channel axis is where the channel index varies
                moved = result.movedim(out_axis, 0).reshape(SHAPE[axis], -1)
                assert torch.equal(moved, torch.arange(SHAPE[axis])[:, None].expand_as(moved)), (combo, axis, out_axis)
                checked += 1
    assert checked > 300


def _expand(entries, ndim):
    used = sum(e[1] if e[0] == "adv" else e[0] in ("int", "axis") for e in entries)
    whole = [("axis", None, None)] * (ndim - used)
    at = next((k for k, e in enumerate(entries) if e[0] == "ellipsis"), None)
    return entries[:at] + whole + entries[at + 1:] if at is not None else entries + whole


def _touches(entries, axis):
    dim = 0
    for kind, payload, _ in entries:
        if kind == "new":
            continue
        width = payload if kind == "adv" else 1
        if dim <= axis < dim + width:
            return kind != "axis"
        dim += width
    return False


# ----- size reads used as numbers ---------------------------------------------------------------

class ScaledAttention(nn.Module):
    """Single-head attention scaled by ``q.size(-1) ** -0.5`` (the tester's repro uses
    ``math.sqrt(q.size(-1))``)."""

    def __init__(self, d=32):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        s = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5 / math.sqrt(k.size(-1)) * 4
        return self.o(torch.softmax(s, -1) @ v)


class HeadsFromTheStream(nn.Module):
    """Multi-head attention whose scale reads the projected stream's width: ``q.size(-1)`` is
    the channel count (whole heads go), also read by the head split's size entries."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        B, T, C = q.shape
        scale = (q.size(-1) // self.h) ** -0.5
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = torch.softmax((q @ k.transpose(-2, -1)) * scale, -1) @ v
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class HeadDimScale(nn.Module):
    """Multi-head attention scaled by the head size ``q.size(-1)`` after the split (not the
    channel axis: that read was always free)."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.h, C // self.h).transpose(1, 2) for lin in (self.q, self.k, self.v))
        y = torch.softmax((q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5, -1) @ v
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class EmbeddingScale(nn.Module):
    """``x * math.sqrt(x.shape[-1])``, the Transformer's embedding scale."""

    def __init__(self, d=32):
        super().__init__()
        self.a, self.b = nn.Linear(6, d), nn.Linear(d, 4)

    def forward(self, x):
        x = self.a(x)
        return self.b(torch.relu(x * math.sqrt(x.shape[-1])))


SIZE_CASES = {
    "single_head": (ScaledAttention, lambda: torch.randn(2, 5, 32)),
    "heads_from_stream": (HeadsFromTheStream, lambda: torch.randn(2, 5, 32)),
    "head_dim": (HeadDimScale, lambda: torch.randn(2, 5, 32)),
    "embedding_scale": (EmbeddingScale, lambda: torch.randn(2, 5, 6)),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(SIZE_CASES))
def test_a_channel_count_read_as_a_number_keeps_its_original_value(name, mode):
    torch.manual_seed(0)
    build, make = SIZE_CASES[name]
    x = make()
    r = prune_and_mask(build().eval(), x, mode)
    assert not (r.original - r.masked).abs().max() < 1e-6, "the zeroed channels must matter"
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    r.pruned.graph.lint()
    assert not r.plan.channel_graph.pinned_nodes, r.plan.channel_graph.pinned_nodes
    assert not r.plan.applied["reexpansions"], "no value is re-expanded to read its size"
    assert r.plan.selection.removed == r.plan.selection.target
    for batch in (1, 3):  # the constants are channel counts: other sizes stay dynamic
        assert r.pruned(torch.randn(batch, *x.shape[1:])).shape[0] == batch


@pytest.mark.parametrize("name", sorted(SIZE_CASES))
def test_symbolic_capture_prunes_as_much_as_export_at_the_defaults(name):
    """The tester's repro: symbolic capture kept q and k whole (0.750 of the MACs; 1.0 for the
    embedding scale and the stream-read heads) where export, the size baked in, kept 0.5."""
    import fxopt
    from fxopt.measure import count_macs

    torch.manual_seed(0)
    build, make = SIZE_CASES[name]
    m, x = build().eval(), make()
    kept = {}
    for mode in MODES:
        res = fxopt.optimize(m, (x,), "prune{ratio=0.5}", mode=mode)
        assert not next(p.stats for p in res.passes if p.name == "prune")["pinned"]
        kept[mode] = count_macs(res.module, (x,)) / count_macs(m, (x,))
    assert kept["symbolic"] == pytest.approx(kept["export"]) and kept["symbolic"] < 0.55, kept


# ----- the shortfall warning --------------------------------------------------------------------

class PreNormStack(nn.Module):
    """The tester's small pre-LN residual stack (d=32): at the defaults the layer-normed stream
    stays whole (its pads and gathers are charged more than its MACs save), so prune removes
    about 57% of its target: above the old one-half threshold, it used to pass in silence."""

    def __init__(self, d=32, layers=2):
        super().__init__()
        self.inp = nn.Linear(12, d)
        self.ln = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers + 1))
        self.fc1 = nn.ModuleList(nn.Linear(d, 4 * d) for _ in range(layers))
        self.fc2 = nn.ModuleList(nn.Linear(4 * d, d) for _ in range(layers))
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        x = self.inp(x)
        for ln, f1, f2 in zip(self.ln, self.fc1, self.fc2):
            x = x + f2(torch.nn.functional.gelu(f1(ln(x))))
        return self.head(self.ln[-1](x))


def _prune_warnings(model, x, spec, mode):
    import fxopt

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fxopt.optimize(model, (x,), spec, mode=mode)
    stats = next(p.stats for p in res.passes if p.name == "prune")
    return [str(w.message) for w in caught if issubclass(w.category, PassWarning)], stats


@pytest.mark.parametrize("mode", MODES)
def test_a_shortfall_above_half_the_target_warns_with_its_cause_and_options(mode):
    torch.manual_seed(0)
    model, x = PreNormStack().eval(), torch.randn(2, 20, 12)
    r = prune_and_mask(model, x, mode, adapter_cost=1.0)  # the defaults: what the pass does
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    sel = r.plan.selection
    assert 0.5 * sel.target <= sel.removed < SHORTFALL_WARNING * sel.target, (sel.removed, sel.target)
    caught, stats = _prune_warnings(model, x, "prune{ratio=0.5}", mode)
    assert len(caught) == 1, caught
    assert caught[0] == f"prune: {stats['note']}"
    assert f"removed only {stats['removed_channels']} of the {r.plan.selection.total} prunable channels at " \
        f"ratio=0.5: {100 * stats['removed_channels'] / stats['target_channels']:.0f}% of the " \
        f"{stats['target_channels']} targeted" in caught[0]
    assert "re-expansion adapters" in caught[0]  # the cause
    assert "exact_norms=false" in caught[0] and "adapter_cost=0" in caught[0]  # the options
    # the options it names reach the target: no warning then
    for option in ("adapter_cost=0", "exact_norms=false"):
        caught, stats = _prune_warnings(model, x, f"prune{{ratio=0.5,{option}}}", mode)
        assert not caught and stats["removed_channels"] >= SHORTFALL_WARNING * stats["target_channels"], stats


@pytest.mark.parametrize("mode", MODES)
def test_a_shortfall_from_round_to_names_round_to(mode):
    torch.manual_seed(0)
    model, x = PreNormStack(d=12).eval(), torch.randn(2, 20, 12)
    r = prune_and_mask(model, x, mode, ratio=0.3, round_to=8)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    note = _shortfall(r.plan, 0.3, True)
    assert r.plan.selected == r.plan.selection.target > r.plan.selection.removed, note  # rounding's doing
    assert note and "round_to=8 gave" in note and "a smaller round_to" in note, note
    assert "adapter_cost=0" not in note, "the selection itself met its target"


def test_the_warning_threshold_is_ninety_percent_of_the_target():
    torch.manual_seed(0)
    r = prune_and_mask(PreNormStack().eval(), torch.randn(2, 20, 12), "export")
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    plan = r.plan
    target = plan.selection.target
    for removed, warns in ((target, False), (int(0.9 * target) + 1, False), (int(0.9 * target) - 1, True),
                           (target // 2, True), (0, True)):
        plan.selection.removed = plan.selected = removed
        assert (_shortfall(plan, 0.5, True) is not None) == warns, removed


def test_channels_given_back_to_keep_every_layer_alive_are_not_blamed_on_round_to():
    """With round_to=1 the channels given back after the selection are the ones that keep a
    layer from emptying: the note says so, and does not offer 'a smaller round_to'."""
    torch.manual_seed(0)
    r = prune_and_mask(PreNormStack().eval(), torch.randn(2, 20, 12), "export")
    plan = r.plan
    assert plan.options.get("round_to", 1) == 1
    plan.selected, plan.selection.removed = plan.selection.target, plan.selection.target // 2
    note = _shortfall(plan, 0.5, True)
    assert f"keeping at least one channel in every layer gave {plan.selected - plan.selection.removed} back" in note
    assert "round_to" not in note, note


class _TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.b(F.relu(self.a(x)))).mean((2, 3)))


@pytest.mark.parametrize("options, says", [
    ("ratio=0.01", r"0\.01 of the 16 prunable channels rounds to a target of 0; a larger ratio"),
    ("ignore=[b]", r"the ignored layers \(b\) read their inputs at full width.*Options: adapter_cost=0"),
])
def test_a_shortfall_names_a_target_of_nothing_and_the_ignored_layers(options, says):
    """ratio=0.01 of 8 channels per layer is a target of 0, which said 'nothing more could be
    removed'; a layer kept whole by ignore= was not named as what held its input back."""
    with pytest.warns(PassWarning, match=says):
        fxopt.optimize(_TwoConvs().eval(), torch.randn(2, 3, 8, 8), f"prune{{{options}}}", mode="symbolic")


class LiteralPermutation(nn.Module):
    """A constant channel permutation written as a literal in the forward."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        h = self.a(x).index_select(1, torch.tensor([1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14]))
        return self.b(torch.relu(h)).mean((2, 3))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_literal_channel_index_is_followed_in_both_front_ends(mode):
    """Export read the literal through a fresh copy (`lift_fresh_copy`), which the rule took for
    an index computed in the graph: the permutation was pinned in export only."""
    torch.manual_seed(0)
    r = prune_and_mask(LiteralPermutation().eval(), torch.randn(2, 3, 8, 8), mode)
    assert r.plan.channel_graph.pinned_nodes == {}
    assert r.pruned.get_parameter("a.weight").shape[0] < 16
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


class ChainedGroupedConvs(nn.Module):
    """Grouped convs of 4 and 6 groups on one 48-wide value: its channels go in classes of 12."""

    def __init__(self):
        super().__init__()
        self.a, self.d = nn.Conv2d(3, 48, 3, padding=1), nn.Conv2d(48, 10, 1)
        self.b, self.c = nn.Conv2d(48, 48, 3, padding=1, groups=4), nn.Conv2d(48, 48, 3, padding=1, groups=6)

    def forward(self, x):
        return self.d(F.relu(self.c(F.relu(self.b(F.relu(self.a(x)))))))


@pytest.mark.parametrize("mode", MODES)
def test_removing_far_more_than_the_target_warns_with_the_class_size(mode):
    """ratio=0.2 removed 36 channels for a target of 27, silently: the classes are whole."""
    torch.manual_seed(0)
    caught, stats = _prune_warnings(ChainedGroupedConvs().eval(), torch.randn(2, 3, 8, 8), "prune{ratio=0.2}", mode)
    assert stats["removed_channels"] > OVERSHOOT_WARNING * stats["target_channels"], stats
    assert len(caught) == 1 and "classes of up to 12" in caught[0] and "past the target" in caught[0], caught
    caught, stats = _prune_warnings(ChainedGroupedConvs().eval(), torch.randn(2, 3, 8, 8), "prune{ratio=0.5}", mode)
    assert not caught and stats["removed_channels"] == stats["target_channels"], (caught, stats)


class HalfZeroed(nn.Module):
    """Three convs whose odd output channels are all-zero (a model pruned by masking before)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 4, 1)
        with torch.no_grad():
            for conv in (self.a, self.b):
                conv.weight[1::2] = 0
                conv.bias[1::2] = 0

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


@pytest.mark.parametrize("mode", MODES)
def test_removing_far_more_than_the_target_for_free_says_the_channels_were_zero(mode):
    """ratio=0.1 removed the 16 all-zero channels for a target of 2 with no warning (every class
    was one channel): the warning now names the zero importance, not coupled classes."""
    torch.manual_seed(0)
    caught, stats = _prune_warnings(HalfZeroed().eval(), torch.randn(2, 3, 8, 8), "prune{ratio=0.1}", mode)
    assert stats["removed_channels"] == 16 and stats["target_channels"] <= 3, stats
    assert len(caught) == 1 and "16 of them have zero importance" in caught[0], caught


class StemBeforeAWideConv(nn.Module):
    """Each stem channel feeds 64 x 9 MACs of the wide conv: a global selection takes nearly
    every stem channel."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1), nn.Conv2d(64, 8, 1)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


@pytest.mark.parametrize("mode", MODES)
def test_a_layer_left_far_thinner_than_the_ratio_is_named(mode):
    """ratio=0.5 left a trained CNN's stride-2 conv at 1 of 64 channels with no word (mix
    tester: 19% after distillation, 91% with max_layer_ratio=0.75); the pass names it."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    caught, stats = _prune_warnings(StemBeforeAWideConv().eval(), x, "prune{ratio=0.5,scope=global}", mode)
    assert list(stats["thinned_layers"]) == ["a"], stats
    kept, size = map(int, stats["thinned_layers"]["a"].split(" of "))
    assert size == 32 and kept < 2
    assert any("keep under an eighth" in c and "'a'" in c and "max_layer_ratio" in c for c in caught), caught
    capped = "prune{ratio=0.5,scope=global,max_layer_ratio=0.75}"
    caught, stats = _prune_warnings(StemBeforeAWideConv().eval(), x, capped, mode)
    assert "thinned_layers" not in stats and not any("eighth" in c for c in caught), caught
