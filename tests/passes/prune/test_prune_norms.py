"""`exact_norms`: layer/group norm gathered exactly or pruned with their stream (Torch-Pruning's way),
and the adapter charges that keep the exact mode from paying more than it saves."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.measure import count_parameters
from fxopt.passes.prune.prune_pass import Prune, analyze
from prune_masking import prune_and_mask


class NormBlock(nn.Module):
    """linear -> layer norm -> linear, plus a post-norm residual like BERT's."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 16)
        self.norm2, self.head = nn.LayerNorm(16), nn.Linear(16, 3)

    def forward(self, x):
        h = self.norm(self.fc1(x))
        return self.head(self.norm2(h + F.relu(self.fc2(h))))


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.gn, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.b(F.relu(self.gn(self.a(x))))


class RMSNorm(nn.Module):
    """Llama's and T5's norm, spelled out as Hugging Face writes it (no module fxopt knows)."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.rand(d) + 0.5), eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).type_as(x)  # Gemma casts back


class RMSNormBlock(nn.Module):
    """A pre-norm residual MLP block: the stream between the norms is the hidden size."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(6, 16), RMSNorm(16), nn.Linear(16, 16)
        self.norm2, self.head = RMSNorm(16), nn.Linear(16, 3)

    def forward(self, x):
        h = self.fc1(x)
        h = h + F.relu(self.fc2(self.norm(h)))
        return self.head(self.norm2(h))


def _randomize_affine(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_inexact_layer_norm_normalizes_over_the_kept_channels(mode):
    torch.manual_seed(0)
    model, x = _randomize_affine(NormBlock()), torch.randn(2, 5, 6)
    plan = analyze(model, (x,), mode=mode, ratio=0.5, exact_norms=False)
    assert not plan.stats()["pinned"], "layer norm is not pinned any more"
    cg = plan.channel_graph
    keep = torch.as_tensor((~plan.dead[cg.positions(cg.value_slot[_node(plan, "fc1")])]).nonzero()[0])
    assert 0 < len(keep) < 16
    pruned = plan.apply()
    # the reference: the original model with the stream restricted to the kept channels
    m = model
    h = F.layer_norm(m.fc1(x)[..., keep], (len(keep),), m.norm.weight[keep], m.norm.bias[keep])
    inner = F.relu(F.linear(h, m.fc2.weight[keep][:, keep], m.fc2.bias[keep]))
    y = F.layer_norm(h + inner, (len(keep),), m.norm2.weight[keep], m.norm2.bias[keep])
    expected = F.linear(y, m.head.weight[:, keep], m.head.bias)
    torch.testing.assert_close(pruned(x), expected, rtol=1e-4, atol=1e-5)
    assert count_parameters(pruned) < count_parameters(model)
    if mode == "symbolic":
        norm = pruned.get_submodule("norm")
        assert norm.normalized_shape == (len(keep),) and norm.weight.shape == (len(keep),)
        assert pruned.get_submodule("fc1").weight.shape == (len(keep), 6)
        assert pruned.get_submodule("head").weight.shape == (3, len(keep))
    assert pruned(torch.randn(4, 5, 6)).shape == (4, 5, 3)


def _node(plan, module):
    return next(n for n, mod in plan.channel_graph.module_names.items() if mod == module)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_inexact_group_norm_keeps_groups_equal(mode):
    torch.manual_seed(0)
    model, x = _randomize_affine(GroupNormNet()), torch.randn(2, 3, 8, 8)
    plan = analyze(model, (x,), mode=mode, ratio=0.5, exact_norms=False)
    cg = plan.channel_graph
    dead = plan.dead[cg.positions(cg.value_slot[_node(plan, "a")])]
    keep = torch.as_tensor((~dead).nonzero()[0])
    assert len(keep) == 8 and (~dead).reshape(4, 4).sum(1).tolist() == [2, 2, 2, 2], "2 of 4 in every group"
    pruned = plan.apply()
    m = model
    h = F.group_norm(F.conv2d(x, m.a.weight[keep], m.a.bias[keep], padding=1), 4, m.gn.weight[keep], m.gn.bias[keep])
    expected = F.conv2d(F.relu(h), m.b.weight[:, keep], m.b.bias)
    torch.testing.assert_close(pruned(x), expected, rtol=1e-4, atol=1e-5)
    if mode == "symbolic":
        gn = pruned.get_submodule("gn")
        assert (gn.num_groups, gn.num_channels, gn.weight.shape[0]) == (4, 8, 8)


class PostNormEncoder(nn.Module):
    """BERT's shape: every stream value is a layer norm's output (post-norm residual blocks)."""

    def __init__(self, d=64, norm=nn.LayerNorm):
        super().__init__()
        self.embed, self.norm0 = nn.Linear(6, d), norm(d)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(att=nn.Linear(d, d), n1=norm(d), up=nn.Linear(d, 4 * d),
                                                       down=nn.Linear(4 * d, d), n2=norm(d))) for _ in range(2))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.norm0(self.embed(x))
        for b in self.blocks:
            h = b["n1"](h + b["att"](h))
            h = b["n2"](h + b["down"](F.gelu(b["up"](h))))
        return self.head(h[:, 0])


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm])
def test_exact_norms_prune_the_hidden_size_exactly(norm, mode):
    """With exact_norms=true (the default) a layer norm reads its input at full width (zeros
    padded back in) and its kept output channels are gathered after it; an RMS norm is simply
    sliced, its weight and eps rescaled to the original channel count. Either way the hidden size
    shrinks, nothing is pinned, and zeroing the removed channels (norm affine included) gives the
    pruned output."""
    torch.manual_seed(0)
    model, x = _randomize_affine(PostNormEncoder(norm=norm)), torch.randn(2, 5, 6)
    r = prune_and_mask(model, x, mode)  # adapter_cost=0: a model this small never pays for them
    assert r.plan.stats()["pinned"] == {}
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    assert count_parameters(r.pruned) < 0.6 * r.params_before
    # the layers reading norm outputs lost input columns: the hidden size shrank
    assert r.pruned.get_parameter("blocks.1.up.weight").shape[1] < 64
    targets = [n.target for n in r.pruned.graph.nodes]
    norm_width = r.pruned.get_parameter("blocks.1.n2.weight").shape[0]
    if norm is nn.LayerNorm:
        assert F.pad in targets  # a narrowed norm input: zeros appended, the affine permuted to match
        assert norm_width == 64  # the norms run at full width
    else:
        assert F.pad not in targets and norm_width < 64
    x7 = torch.randn(7, 5, 6)  # another batch size runs through the same adapters
    zeroed = r.plan.gm
    torch.testing.assert_close(r.pruned(x7), zeroed(x7), rtol=1e-4, atol=1e-5)


def test_a_norm_without_affine_weight_is_pinned_in_exact_mode():
    """Its removed output channels would not be zero: nothing to zero them with."""
    torch.manual_seed(0)
    model = NormBlock()
    model.norm = nn.LayerNorm(16, elementwise_affine=False)
    plan = analyze(model.eval(), (torch.randn(2, 5, 6),), ratio=0.5)
    assert "affine" in plan.stats()["pinned"].get("norm", "")


def test_pipeline_text_round_trips_exact_norms():
    x = torch.randn(2, 5, 6)
    res = fxopt.optimize(_randomize_affine(NormBlock()), (x,), "prune{exact_norms=false,ignore=[head]}", verify=False)
    assert res.pipeline == "prune{ignore=[head],exact_norms=false}"
    assert res.passes[0].stats["pinned"] == {}
    assert fxopt.optimize(NormBlock().eval(), (x,), [Prune(exact_norms=True)], verify=False).pipeline == "prune"
    with pytest.raises(fxopt.errors.PipelineError, match="exact_norms"):
        fxopt.optimize(NormBlock().eval(), (x,), "prune{exact_norms=maybe}")


class Stream(nn.Module):
    """A post-norm residual stream: the block output is written into a pinned (exact) stream."""

    def __init__(self, hidden=64):
        super().__init__()
        self.inp, self.norm = nn.Linear(8, 32), nn.LayerNorm(32)
        self.up, self.down = nn.Linear(32, hidden), nn.Linear(hidden, 32)
        self.norm2, self.head = nn.LayerNorm(32), nn.Linear(32, 2)

    def forward(self, x):
        h = self.norm(self.inp(x))
        return self.head(self.norm2(h + self.down(F.gelu(self.up(h)))))


def test_exact_mode_does_not_pay_adapters_that_cost_more_than_they_save():
    """Removing rows of `down` saves 10·64 MACs each but needs a scatter back into the 32-wide
    stream before the add (an adapter worth far more): the selection leaves `down` whole, and
    still prunes the hidden layer, which needs no adapter."""
    torch.manual_seed(0)
    model, x = Stream().eval(), torch.randn(2, 5, 8)
    plan = analyze(model, (x,), ratio=0.5, ignore=("head",))
    kept = plan.kept_channels()
    assert "down" not in kept and "inp" not in kept
    assert kept["up"] == "32/64"
    stats = plan.stats()
    assert stats["removed_channels"] < stats["target_channels"]  # the ratio gives way to the charge
    plan.apply()
    assert plan.applied["adapters"] == 0
    # without the charge, the ratio is spent on `down` too and a scatter goes into the stream
    free = analyze(model, (x,), ratio=0.5, ignore=("head",), adapter_cost=0)
    assert "down" in free.kept_channels()
    free.apply()
    assert free.applied["reexpansions"]


def _rms_norm(x, weight, eps=1e-6):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("exact_norms", [True, False])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_spelled_out_rms_norm_prunes_its_stream_exactly_without_adapters(mode, exact_norms):
    """Llama's RMSNorm as Hugging Face writes it: the mean of squares over the channel axis is a
    sum over the kept channels (the removed ones are zero) divided by the original count, so the
    stream shrinks, exactly, with no re-expansion, whatever `exact_norms` says."""
    torch.manual_seed(0)
    model, x = RMSNormBlock().eval(), torch.randn(2, 5, 6)
    r = prune_and_mask(model, x, mode, exact_norms=exact_norms, adapter_cost=1.0)
    assert not r.plan.stats()["pinned"], r.plan.stats()["pinned"]
    keep = (~r.plan.dead[r.plan.channel_graph.positions(r.plan.channel_graph.value_slot[_node(r.plan, "fc1")])]).sum()
    assert 0 < keep < 16
    torch.testing.assert_close(r.out, r.masked, rtol=1e-5, atol=1e-6)
    assert r.plan.applied["adapters"] == 0
    rescaled = [n for n in r.pruned.graph.nodes if "prune.rescale" in str(n.meta)]
    assert len(rescaled) == 2  # one per norm: mean(x²) over the kept channels × kept / 16


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_modules_are_sliced_and_rescaled(affine, mode):
    """nn.RMSNorm (and its ATen form): weight·√(C/C') and eps·C/C' on the kept channels; without
    a weight, one multiply by √(C/C') after the norm."""
    torch.manual_seed(0)
    model = PostNormEncoder(norm=lambda d: nn.RMSNorm(d, eps=1e-2, elementwise_affine=affine)).eval()
    r = prune_and_mask(model, torch.randn(2, 5, 6), mode, adapter_cost=1.0)
    assert r.plan.stats()["pinned"] == {}
    torch.testing.assert_close(r.out, r.masked, rtol=1e-5, atol=1e-5)
    assert count_parameters(r.pruned) < 0.6 * r.params_before
    rescales = [n for n in r.pruned.graph.nodes if "prune.rescale" in str(n.meta)]
    assert len(rescales) == (0 if affine else 5)
    if mode == "symbolic":
        norm = r.pruned.get_submodule("blocks.1.n2")
        assert norm.normalized_shape[0] < 64 and norm.eps > 1e-2


class ScaledByAStatistic(nn.Module):
    """h times a per-token statistic of its own channels, between two linears."""

    def __init__(self, statistic):
        super().__init__()
        self.fc1, self.fc2, self.statistic = nn.Linear(6, 16), nn.Linear(16, 3), statistic

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * self.statistic(h))


def test_a_mean_over_the_channels_of_a_dirty_value_pins_its_source():
    """x + 1 is 1 on a removed channel: a mean over the channels reads it, so the add is pinned."""
    torch.manual_seed(0)
    model = ScaledByAStatistic(lambda h: (h + 1).mean(-1, keepdim=True)).eval()
    r = prune_and_mask(model, torch.randn(2, 5, 6), "symbolic")
    assert "not zero-preserving" in r.plan.stats()["pinned"].get("add", ""), r.plan.stats()["pinned"]
    torch.testing.assert_close(r.out, r.masked, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("order, exact", [(2, True), (1, True), (float("inf"), True), (-1, False)])
def test_a_p_norm_over_the_channels_is_followed_for_orders_zeros_do_not_change(order, exact):
    torch.manual_seed(0)
    model = ScaledByAStatistic(lambda h: 1 / (torch.linalg.vector_norm(h, order, -1, keepdim=True) + 1)).eval()
    r = prune_and_mask(model, torch.randn(2, 5, 6), "export")
    pinned = r.plan.stats()["pinned"]
    assert (pinned == {}) == exact, pinned
    torch.testing.assert_close(r.out, r.masked, rtol=1e-5, atol=1e-6)


def test_a_prune_that_removes_nothing_says_why():
    torch.manual_seed(0)
    model, x = RMSNormBlock().eval(), torch.randn(2, 5, 6)
    model.norm, model.norm2 = nn.LayerNorm(16, elementwise_affine=False), nn.LayerNorm(16, elementwise_affine=False)
    with pytest.warns(fxopt.PassWarning, match=r"removed no channel at ratio=0.5.*norm: layer_norm without an "
                                                r"affine.*exact_norms=false") as caught:
        res = fxopt.optimize(model, (x,), "prune{ratio=0.5}")
    assert not res.passes[0].modified and res.passes[0].stats["note"] in str(caught[0].message)


class NormedStream(nn.Module):
    """A narrow stream through layer norms (exact by default: each reads the stream whole, so
    narrowing it costs adapters) beside a small MLP: most of the target is on the stream."""

    def __init__(self, d=32):
        super().__init__()
        self.a, self.n, self.b, self.n2 = nn.Linear(8, d), nn.LayerNorm(d), nn.Linear(d, d), nn.LayerNorm(d)
        self.f1, self.f2, self.c = nn.Linear(d, 8), nn.Linear(8, d), nn.Linear(d, 4)

    def forward(self, x):
        h = self.n(self.a(x))
        h = self.n2(h + F.relu(self.b(h)))
        return self.c(h + self.f2(F.relu(self.f1(h))))


def test_a_prune_far_short_of_its_target_says_why_and_what_to_try():
    """Removing a few channels where the user asked for half used to pass without a word."""
    torch.manual_seed(0)
    model, x = NormedStream().eval(), torch.randn(2, 5, 8)
    with pytest.warns(UserWarning, match=r"removed only \d+ of the \d+ prunable channels at ratio=0.5: \d+% of the \d+ targeted.*adapter_cost=0"):
        res = fxopt.optimize(model, (x,), "prune{ratio=0.5}")
    stats = res.passes[0].stats
    assert res.passes[0].modified and 0 < 2 * stats["removed_channels"] < stats["target_channels"], stats
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the options it names reach the target, without a warning
        fxopt.optimize(model, (x,), "prune{ratio=0.5,adapter_cost=0}")


class NormWeightReadTwice(nn.Module):
    """A functional norm whose weight is read again by a product (one get_attr, two users)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 32), nn.Linear(32, 3)
        self.w = nn.Parameter(torch.rand(32) + 0.5)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(F.layer_norm(h, (32,), self.w) * self.w)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("exact_norms", [True, False])
def test_a_norm_weight_read_by_another_op_gets_a_copy_of_its_own(mode, exact_norms):
    """Symbolic capture gives the norm and the product one weight node: slicing or permuting it
    for the norm alone broke the product (a shape error inside apply), so it was pinned. The
    norm reads a private name for the same tensor now (as a shared layer's weight does), and
    each reader is narrowed on its own: exact where the norm is (`exact_norms`)."""
    torch.manual_seed(0)
    model, x = NormWeightReadTwice().eval(), torch.randn(2, 5, 6)
    r = prune_and_mask(model, x, mode, exact_norms=exact_norms)
    assert r.plan.channel_graph.pinned_nodes == {}
    assert r.pruned.get_parameter("fc1.weight").shape[0] < 32 and r.out.shape == r.original.shape
    if exact_norms:  # a norm pruned with its stream computes statistics over fewer channels
        torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


class TwoNormsOneAffine(nn.Module):
    """Two functional norms reading one weight and bias by keyword (a symbolic trace keeps
    ``weight=``): each pinned as "shared with another op" in symbolic graphs, pruned by export."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 4)
        self.w, self.bias = nn.Parameter(torch.rand(32) + 0.5), nn.Parameter(torch.randn(32))

    def forward(self, x):
        h1 = F.layer_norm(self.a(x), (32,), weight=self.w, bias=self.bias)
        h2 = F.layer_norm(self.b(x), (32,), weight=self.w, bias=self.bias)
        return self.out(torch.relu(h1) + torch.relu(h2))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_norms_sharing_one_affine_are_pruned_in_both_front_ends(mode):
    torch.manual_seed(0)
    r = prune_and_mask(TwoNormsOneAffine().eval(), torch.randn(8, 16), mode, exact_norms=False)
    assert r.plan.channel_graph.pinned_nodes == {}
    assert r.pruned.get_parameter("a.weight").shape[0] < 32
    assert r.pruned(torch.randn(3, 16)).shape == (3, 4)
    r = prune_and_mask(TwoNormsOneAffine().eval(), torch.randn(8, 16), mode)
    assert r.plan.channel_graph.pinned_nodes == {}
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


class RescaledNormReadFullWidth(nn.Module):
    """A weightless RMS norm (rescaled by a multiply after it) whose output a pinned op reads."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm = nn.Linear(6, 16), nn.RMSNorm(16, elementwise_affine=False)
        self.fc2, self.fc3 = nn.Linear(16, 3), nn.Linear(16, 3)

    def forward(self, x):
        h = self.norm(self.fc1(x))
        return self.fc2(h) + self.fc3(h.cumsum(-1))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_rescaled_norm_output_is_re_expanded_after_its_rescale(mode):
    """The re-expansion for the pinned cumsum starts from the rescaling multiply (it was wired to
    the norm itself, which nothing read any more: a shape error)."""
    torch.manual_seed(0)
    r = prune_and_mask(RescaledNormReadFullWidth().eval(), torch.randn(2, 5, 6), mode)
    assert r.plan.applied["reexpansions"] and r.plan.selection.removed > 0
    torch.testing.assert_close(r.out, r.masked, rtol=1e-5, atol=1e-6)


class GlobalContext(nn.Module):
    """GCNet's global context block: attention pooling to a [B, C, 1, 1] context, then a
    bottleneck whose layer norm is ``LayerNorm([C', 1, 1])``: statistics over the channels alone."""

    def __init__(self, c=16, mid=8):
        super().__init__()
        self.stem, self.mask = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, 1, 1)
        self.t1, self.ln, self.t2 = nn.Conv2d(c, mid, 1), nn.LayerNorm([mid, 1, 1]), nn.Conv2d(mid, c, 1)
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 1.5)
            self.ln.bias.normal_(0, 0.1)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        b, c, height, width = h.shape
        w = self.mask(h).view(b, 1, height * width).softmax(-1)
        ctx = torch.bmm(h.view(b, c, height * width), w.transpose(1, 2)).view(b, c, 1, 1)
        return self.head((h + self.t2(torch.relu(self.ln(self.t1(ctx))))).mean((2, 3)))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_layer_norm_over_channels_and_unit_axes_is_gathered(mode):
    """``LayerNorm([C, 1, 1])`` normalizes over the channels alone: an exact norm like any other,
    its input padded on the channel axis (not the last) and its output gathered. It was pinned
    ("over more than the channel axis"), and the bottleneck with it."""
    torch.manual_seed(0)
    r = prune_and_mask(GlobalContext().eval(), torch.randn(2, 3, 8, 8), mode)
    assert not [n for n, why in r.plan.channel_graph.pinned_nodes.items() if "norm" in why]
    assert r.pruned.get_parameter("ln.weight").shape == (8, 1, 1)     # the norm runs at full width
    assert r.pruned.get_parameter("t1.weight").shape[0] < 8           # its input is narrower
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


class ShapeReadNorm(nn.Module):
    """``F.layer_norm(h, h.shape[1:])``: a norm over C, H and W whose normalized shape a symbolic
    trace computes from a size read."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 3)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = F.layer_norm(h, h.shape[1:])
        return self.fc(F.relu(self.c2(h)).mean((2, 3)))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_normalized_shape_computed_from_sizes_is_read_from_its_metadata(mode):
    """The symbolic graph's normalized shape is a node: it was taken for one axis, the norm
    for one over W alone, and the pruned graph failed to run (``normalized_shape=[16, 16, 16]``
    against 8 channels). It is pinned as export's literal ``[16, 16, 16]`` is."""
    torch.manual_seed(0)
    r = prune_and_mask(ShapeReadNorm().eval(), torch.randn(2, 3, 16, 16), mode)
    pinned = r.plan.channel_graph.pinned_nodes
    assert any(why == "layer_norm over more than the channel axis" for why in pinned.values()), pinned
    assert r.plan.selection.removed > 0
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


class ComputedNormOperand(nn.Module):
    """A functional norm whose per-channel operand the forward computes: running statistics
    filled from the channel count, or a weight scaled by a constant."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.c1, self.c2, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 3)
        self.w, self.b = nn.Parameter(torch.rand(16) + 0.5), nn.Parameter(torch.randn(16) * 0.2)

    def forward(self, x):
        h = F.relu(self.c1(x))
        c = h.shape[1]
        if self.kind == "batch_norm":
            h = F.batch_norm(h, torch.zeros(c), torch.ones(c), self.w, self.b, False)
        elif self.kind == "layer_norm":
            h = F.layer_norm(h.permute(0, 2, 3, 1), (c,), self.w * 2, self.b).permute(0, 3, 1, 2)
        elif self.kind == "group_norm":
            h = F.group_norm(h, 4, torch.ones(c), self.b)
        else:
            h = F.instance_norm(h, weight=torch.ones(c), bias=self.b)
        return self.fc(F.relu(self.c2(h)).mean((2, 3)))


@pytest.mark.parametrize("kind", ["batch_norm", "layer_norm", "group_norm", "instance_norm"])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("exact_norms", [True, False])
def test_a_norm_operand_computed_in_the_graph_pins_the_norm(kind, mode, exact_norms):
    """apply slices a norm's stored affine and statistics with its channels; a computed one kept
    the full width and the pruned graph failed (``running_mean should contain 8 elements not
    16``). The norm is pinned, naming the operand."""
    torch.manual_seed(0)
    r = prune_and_mask(ComputedNormOperand(kind).eval(), torch.randn(2, 3, 8, 8), mode, exact_norms=exact_norms)
    why = [why for why in r.plan.channel_graph.pinned_nodes.values() if why.startswith(kind)]
    assert why and "computed in the graph" in why[0], r.plan.channel_graph.pinned_nodes
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


class SizedNorms(nn.Module):
    """Functional norms whose arguments come from sizes or share one stored tensor."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.c1, self.c2 = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 4, 1)
        shape = (16, 1, 1) if how == "context" else (16,)
        self.w, self.b = nn.Parameter(torch.rand(*shape) + 0.5), nn.Parameter(torch.randn(*shape) * 0.2)
        self.register_buffer("rm", torch.randn(16) * 0.1)
        self.register_buffer("rv", torch.rand(16) + 0.5)

    def forward(self, x):
        h = F.relu(self.c1(x))
        if self.how == "context":  # GCNet's LayerNorm([C, 1, 1]) with C read off a size
            h = h.mean((2, 3), keepdim=True)
            return self.c2(F.layer_norm(h, [h.shape[1], 1, 1], self.w, self.b))
        if self.how == "groups":  # a group count computed from the width
            return self.c2(F.group_norm(h, h.shape[1] // 4, self.w, self.b))
        # one tensor as the weight of two norms and the bias of one of them
        return self.c2(F.batch_norm(h, self.rm, self.rv, self.w, self.b)
                       + F.batch_norm(h, self.rm, self.rv, self.w, self.w))


@pytest.mark.parametrize("how", ["context", "groups", "shared"])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_norm_arguments_from_sizes_or_shared_prune_exactly(mode, how):
    """``[h.shape[1], 1, 1]`` was rewritten to ``[C']`` (the unit axes dropped: the pruned graph
    failed); a tensor read as two norms' weight, or one norm's weight and bias, was sliced twice
    (an IndexError)."""
    torch.manual_seed(0)
    r = prune_and_mask(SizedNorms(how).eval(), torch.randn(2, 3, 8, 8), mode)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


def test_a_group_count_read_off_a_size_pins_the_inexact_group_norm():
    """``exact_norms=false`` prunes a group norm's channels with its groups kept equal, from its
    group count; one the graph computes (``h.shape[1] // 4``) crashed the analysis."""
    torch.manual_seed(0)
    r = prune_and_mask(SizedNorms("groups").eval(), torch.randn(2, 3, 8, 8), "symbolic", exact_norms=False)
    assert "group count computed in the graph" in r.plan.channel_graph.pinned_nodes["group_norm"]
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


class NanoGPTLayerNorm(nn.Module):
    """nanoGPT's LayerNorm with optional bias: ``F.layer_norm(x, self.weight.shape, ...)``."""

    def __init__(self, d):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(d) + 0.5), nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoGPTBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(6, 32), NanoGPTLayerNorm(32), nn.Linear(32, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.ln(self.fc1(x))))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_norm_shaped_by_its_own_weight_is_not_shared(mode):
    """The read of ``self.weight.shape`` counted as a second use of the weight: the norm was
    pinned in symbolic graphs ("shared with another op"), half of export's channels removed."""
    torch.manual_seed(0)
    r = prune_and_mask(NanoGPTBlock().eval(), torch.randn(2, 5, 6), mode)
    assert r.plan.channel_graph.pinned_nodes == {}
    assert r.pruned.get_parameter("fc1.weight").shape[0] < 32
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)


class LucidrainsLayerNorm(nn.Module):
    """x-transformers' LayerNorm: ``F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)`` with a
    learned gamma and a zero beta buffer."""

    def __init__(self, d):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(d) + 0.5)
        self.register_buffer("beta", torch.zeros(d))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


class SliceShapedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(6, 32), LucidrainsLayerNorm(32), nn.Linear(32, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.ln(self.fc1(x))))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("exact_norms", [True, False])
def test_a_normalized_shape_sliced_off_the_size_follows_the_channels(mode, exact_norms):
    """``x.shape[-1:]`` read the channel count as a slice: the read was pinned in symbolic
    graphs and an adapter re-expanded the stream only so that `.shape` could be read (export,
    with a literal shape, pruned without one). apply writes the width the norm normalizes."""
    torch.manual_seed(0)
    r = prune_and_mask(SliceShapedBlock().eval(), torch.randn(2, 5, 6), mode, exact_norms=exact_norms)
    assert r.plan.channel_graph.pinned_nodes == {}
    assert r.pruned.get_parameter("fc1.weight").shape[0] < 32
    if not exact_norms:  # the norm follows its stream: no adapter around it
        assert not any("index_select" in str(n.target) for n in r.pruned.graph.nodes)
    else:
        torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
