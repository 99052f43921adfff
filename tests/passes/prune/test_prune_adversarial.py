"""Models an adversarial tester built against the eighteenth session's new prune mechanisms
(parameters alone given a slot, ``expand(x.size())``, values that may lose every channel, the
graph output through a pinned op). Each was a wrong result, a crash in apply or a pruned model
that failed on every input; each must now run and match the zeroed model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxopt.passes.prune.prune_pass import NothingToPrune
from prune_masking import prune_and_mask

MODES = ("symbolic", "export")


def _exact(model, x, mode, **options):
    torch.manual_seed(0)
    r = prune_and_mask(model.eval(), x, mode, **options)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        r.pruned(torch.cat([x, x[:1]]))  # another batch size
    return r


class ParameterReadWhole(nn.Module):
    """``p - logsumexp(p)`` scales a layer's channels: logsumexp reads p whole (no rule, no
    channel input: free), so p must not be sliced for the product (it was: 0.19 off)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
        self.c, self.d = nn.Linear(8, 16), nn.Linear(16, 4)  # a branch that prunes
        self.logits = nn.Parameter(torch.randn(16))

    def forward(self, x):
        logw = self.logits - torch.logsumexp(self.logits, 0)
        return self.b(self.a(x) * logw) + self.d(torch.relu(self.c(x)))


@pytest.mark.parametrize("mode", MODES)
def test_a_parameter_a_free_op_reads_whole_is_never_sliced(mode):
    r = _exact(ParameterReadWhole(), torch.randn(2, 4, 8), mode, ratio=0.3)
    params = dict(r.pruned.named_parameters())
    assert params["logits"].shape == (16,) and params["c.weight"].shape[0] < 16


class ExpandToSize(nn.Module):
    def __init__(self, variant):
        super().__init__()
        self.variant = variant
        self.b, self.d = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 3, 1)
        self.p = nn.Parameter(torch.randn(8, 1, 1))

    def forward(self, x):
        h = torch.relu(self.b(x))
        if self.variant == "amax":
            return self.d(h - h.amax(1, keepdim=True).expand(h.size()))
        if self.variant == "param":
            return self.d(h * self.p.expand(h.size()))
        if self.variant == "input":
            return self.d(h * x.mean((2, 3), keepdim=True).expand(h.size()))
        return self.d(h + x.mean().view(1, 1, 1, 1).expand(h.shape))


@pytest.mark.parametrize("variant", ["amax", "param", "input", "scalar"])
@pytest.mark.parametrize("mode", MODES)
def test_an_expand_to_a_size_it_cannot_follow_reads_the_full_size(mode, variant):
    """When ``y.expand(x.size())`` cannot tie y to x, the expand is pinned: the size read must
    then give the full width too (it gave the pruned one: shape errors at every call)."""
    _exact(ExpandToSize(variant), torch.randn(2, 8, 6, 6), mode, ratio=0.5)


class PerHeadNormThenPinned(nn.Module):
    """StableLM's per-head norms, then an op with no rule reading the concatenation whole: a
    head's piece that lost every channel was re-expanded for it ("cannot re-expand an empty
    value")."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.heads, self.k, self.o = heads, nn.Linear(8, d), nn.Linear(d, 3)
        self.norms = nn.ModuleList(nn.LayerNorm(d // heads, bias=False) for _ in range(heads))
        with torch.no_grad():  # the last two heads matter least: they go whole
            self.k.weight[d // 2:] *= 0.01
            self.k.bias[d // 2:] *= 0.01

    def forward(self, x):
        b, t, _ = x.shape
        k = self.k(x).view(b, t, self.heads, -1).transpose(1, 2)
        pieces = torch.split(k, 1, dim=1)
        k = torch.special.i0(torch.cat([self.norms[i](pieces[i]) for i in range(self.heads)], 1))
        return self.o(k.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("adapter_cost", [0.0, 1.0])
@pytest.mark.parametrize("mode", MODES)
def test_a_piece_that_lost_every_channel_is_re_expanded_as_zeros(mode, adapter_cost):
    _exact(PerHeadNormThenPinned(), torch.randn(2, 5, 8), mode, ratio=0.5, adapter_cost=adapter_cost)


class PiecesThroughSpatialOps(nn.Module):
    """Res2Net-like: split pieces through ops torch refuses an empty channel axis to (pooling,
    interpolation, reflect padding, a reshape with -1): they keep a channel."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 3, 1)

    def _piece(self, p):
        if self.op == "pool":
            return F.avg_pool2d(p, 3, 1, 1)
        if self.op == "interpolate":
            return F.interpolate(F.avg_pool2d(p, 2), scale_factor=2.0)
        if self.op == "reflect":
            return F.pad(p, (1, 1, 1, 1), mode="reflect")[:, :, 1:-1, 1:-1]
        b, c, h, w = p.shape
        return p.reshape(b, c, -1).reshape(b, c, h, w) * 2

    def forward(self, x):
        pieces = torch.split(torch.relu(self.c1(x)), 2, dim=1)
        return self.c2(torch.cat([self._piece(pieces[i]) for i in range(4)], 1))


@pytest.mark.parametrize("op", ["pool", "interpolate", "reflect", "reshape"])
@pytest.mark.parametrize("mode", MODES)
def test_pieces_through_ops_that_refuse_an_empty_axis_keep_a_channel(mode, op):
    _exact(PiecesThroughSpatialOps(op), torch.randn(2, 3, 6, 6), mode, ratio=0.8, adapter_cost=0.0)


class LogSoftmaxClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return F.log_softmax(self.b(torch.relu(self.a(x))), -1)


@pytest.mark.parametrize("mode", MODES)
def test_the_classes_stay_when_the_output_reads_them_through_a_pinned_op(mode):
    """``log_softmax(logits)`` is pinned (it reads every class): the logits reached the output
    only through it, were not marked as the output's, and lost classes (4 -> 2)."""
    r = _exact(LogSoftmaxClassifier(), torch.randn(3, 8), mode, ratio=0.5, adapter_cost=0.0)
    assert r.pruned.get_submodule("b").weight.shape[0] == 4
    assert r.pruned.get_submodule("a").weight.shape[0] < 16  # the hidden layer still prunes


class InPlaceMath(nn.Module):
    """Export keeps ``h.pow_(2)``, ``h.erf_()``, ``h.sqrt_()`` as in-place ATen ops, which had
    no op kind: they pinned the conv before them (0.5 of the MACs kept; 0.31 symbolic)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3), nn.Linear(16, 4)

    def forward(self, x):
        h = self.a(x)
        h.pow_(2)
        h.erf_()
        h.sqrt_()
        return self.fc(self.b(h).mean((2, 3)))


@pytest.mark.parametrize("mode", MODES)
def test_in_place_elementwise_math_does_not_pin(mode):
    r = _exact(InPlaceMath(), torch.randn(2, 3, 12, 12), mode)
    assert dict(r.pruned.named_parameters())["a.weight"].shape[0] < 16


class StraightThrough(nn.Module):
    """A gate whose gradient is stopped (``sigmoid(h.detach())``) and a straight-through
    quantizer (``h + (round(h * 4) / 4 - h).detach()``): identities and f(0) = 0 in the forward."""

    def __init__(self, rounding):
        super().__init__()
        self.rounding = rounding
        self.c1, self.c2, self.out = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(32, 4, 1)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = self.c2(h * torch.sigmoid(h.detach()))
        q = self.rounding(h * 4) / 4
        return self.out(F.relu(h + (q - h).detach()))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("rounding", [torch.round, torch.floor, torch.ceil, torch.trunc])
def test_detach_and_rounding_follow_the_channels(mode, rounding):
    """They were pinned ("no channel rule for this op"), which put adapters around them."""
    r = _exact(StraightThrough(rounding), torch.randn(2, 3, 8, 8), mode)
    assert r.plan.channel_graph.pinned_nodes == {}
    assert r.pruned.get_parameter("c2.weight").shape[:2] == (16, 16)


class EmptyCacheAttention(nn.Module):
    """Hugging Face's first KV-cache step: an empty stored tensor concatenated before k and v
    (``torch.cat([torch.tensor([]), k], dim=-2)``); `dtype` float64 promotes the result."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)
        self.register_buffer("past_k", torch.tensor([], dtype=dtype))
        self.register_buffer("past_v", torch.tensor([], dtype=dtype))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 4, 4).permute(2, 0, 3, 1, 4)
        k = torch.cat([self.past_k, k], dim=-2).to(q.dtype)
        v = torch.cat([self.past_v, v], dim=-2).to(q.dtype)
        out = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, 16))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_an_empty_stored_tensor_concatenated_to_the_keys_does_not_pin_them(mode):
    """It pinned k and v ("cat input ... tracks channels on another axis") in every decoder
    run with its default use_cache=True; it adds nothing, so it goes before the analysis. An
    empty float64 tensor changes the result's dtype and stays."""
    r = _exact(EmptyCacheAttention(), torch.randn(2, 5, 16), mode)
    assert r.plan.channel_graph.pinned_nodes == {}
    assert r.pruned.get_parameter("qkv.weight").shape[0] < 48
    with pytest.raises(NothingToPrune, match="cat input past_k"):
        _exact(EmptyCacheAttention(torch.float64), torch.randn(2, 5, 16), mode)


class ConvTokenGate(nn.Module):
    """gMLP's spatial gating unit with the token mixing written ``nn.Conv1d(seq, seq, 1)`` (as
    lucidrains' g-mlp does): the channels sit on the conv's length axis."""

    def __init__(self, bias=True, kernel=1):
        super().__init__()
        self.up, self.down = nn.Linear(12, 64), nn.Linear(32, 5)
        self.mix = nn.Conv1d(16, 16, kernel, padding=kernel // 2, bias=bias)

    def forward(self, x):
        u, v = F.gelu(self.up(x)).chunk(2, -1)
        return self.down(u * self.mix(v))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("bias", [True, False])
def test_a_pointwise_conv_over_tokens_follows_the_channels(mode, bias):
    """It was pinned ("conv over a value whose channels are not on axis 1") where the same
    layer as a Linear over the transposed tokens was followed. A wider kernel mixes
    neighbouring channels and stays pinned."""
    r = _exact(ConvTokenGate(bias), torch.randn(2, 16, 12), mode, exact_norms=False)
    assert r.plan.channel_graph.pinned_nodes == {}
    assert r.pruned.get_parameter("up.weight").shape[0] < 64
    r = _exact(ConvTokenGate(bias, kernel=3), torch.randn(2, 16, 12), mode, exact_norms=False)
    assert any("not on axis 1" in why for why in r.plan.channel_graph.pinned_nodes.values())


class HeadBiasTable(nn.Module):
    """Attention plus Swin's learned relative-position bias, a table [N·N, heads] read directly."""

    def __init__(self, d=32, heads=4, n=16):
        super().__init__()
        self.heads, self.inp, self.qkv = heads, nn.Linear(8, d), nn.Linear(d, 3 * d)
        self.proj, self.out = nn.Linear(d, d), nn.Linear(d, 3)
        self.table = nn.Parameter(torch.randn(n * n, heads) * 0.1)

    def forward(self, x):
        x = self.inp(x)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5
        a = (a + self.table.view(n, n, self.heads).permute(2, 0, 1).unsqueeze(0)).softmax(-1)
        return self.out(x + self.proj((a @ v).transpose(1, 2).reshape(b, n, c)))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_round_to_does_not_round_a_tables_head_axis(mode):
    """round_to=4 rounded the table's 4-entry head axis as if it were a layer width: 2 heads
    kept became 4, every pruned head given back. The layers' widths stay multiples of 4."""
    r = _exact(HeadBiasTable(), torch.randn(2, 16, 8), mode, round_to=4)
    assert r.pruned.get_parameter("table").shape == (256, 2)
    widths = [r.pruned.get_parameter(f"{name}.weight").shape[0] for name in ("qkv", "proj", "inp")]
    assert all(w % 4 == 0 for w in widths) and widths[0] == 48, widths


class UnbatchedConv(nn.Module):
    """A conv on an unbatched (C, L) value: its channels are on axis 0."""

    def __init__(self):
        super().__init__()
        self.fc, self.conv, self.out = nn.Linear(16, 32), nn.Conv1d(6, 6, 1), nn.Linear(32, 3)

    def forward(self, x):
        return self.out(self.conv(torch.relu(self.fc(x))))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_an_unbatched_conv_is_pinned_with_its_reason(mode):
    """The conv rule read axis 1 as its channels and importance failed ("array is not
    broadcastable"); it is pinned and named now, and the rest stays exact."""
    torch.manual_seed(0)
    r = prune_and_mask(UnbatchedConv().eval(), torch.randn(6, 16), mode, ratio=0.3)  # (6 is no batch)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    assert any("unbatched conv" in why for why in r.plan.channel_graph.pinned_nodes.values())


class SpreadAxes(nn.Module):
    """``h.flip(2, 1)`` and ``h.permute(0, 2, 3, 1)`` write their axes spread over the call: the
    analysis read only the first (flip over axis 2 alone), paired output channel j with input
    channel j where the flip reverses them, and pruned the wrong columns of `b` (0.98 off)."""

    def __init__(self, op):
        super().__init__()
        self.a, self.b, self.op = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), op

    def forward(self, x):
        return self.b(self.op(torch.relu(self.a(x))))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", [lambda h: h.flip(2, 1), lambda h: h.permute(0, 2, 3, 1).permute(0, 3, 1, 2)])
def test_axes_spread_over_a_method_call_are_all_read(mode, op):
    r = _exact(SpreadAxes(op), torch.randn(2, 3, 8, 8), mode)
    assert r.pruned.b.weight.shape[1] < 8



class MeanOverAxis(nn.Module):
    """``h.mean(axis=(2, 3))`` (torch's numpy keyword) was read as a mean over every axis: c2's
    channels went and fc's columns stayed (a pruned model that failed on every input)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean(axis=(2, 3)))


class BitsView(nn.Module):
    """``h.view(torch.int32)`` reinterprets bytes; it was taken for a reshape (prune: IndexError)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        return self.c2((h.view(torch.int32) ^ -2147483648).view(torch.float32))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", [MeanOverAxis, BitsView])
def test_numpy_axis_keywords_and_dtype_views(mode, model):
    _exact(model(), torch.randn(2, 3, 6, 6), mode, adapter_cost=0.0)
