"""The `fuse` pass: each built-in pattern on both front ends, numerics, counters, annotations."""
import copy
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.passes.fuse.rules import ACTIVATIONS, _bn_eval
from fxopt.patterns import annotations

MODES = ("symbolic", "export")


def _warm_bn(bn):
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.3, 3)
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
    return bn


def _run(model, x, mode, pipeline="fuse"):
    res = fxopt.optimize(model, (x,), pipeline=pipeline, mode=mode)
    assert res.verification.passed, res.summary()
    torch.testing.assert_close(res.module(x), model.eval()(x), rtol=1e-4, atol=1e-5)
    return res


def _kinds(gm):
    """The op kinds of `gm`, less the rank and size asserts a rewrite leaves (`hold_rank`)."""
    asserts = [n for n in gm.graph.nodes if n.target is torch._assert]
    guards = {a for n in asserts for a in (n, *n.all_input_nodes, *n.args[0].all_input_nodes)}
    out = []
    for n in gm.graph.nodes:
        v = fxopt.ir.op_view(gm, n)
        if v is not None and n not in guards:
            out.append(v.kind)
    return out


class ConvBNAct(nn.Module):
    def __init__(self, conv, bn, act):
        super().__init__()
        self.conv, self.bn, self.act = conv, _warm_bn(bn), act

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


CONV_CASES = [
    (nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6), (2, 3, 10)),
    (nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), (2, 3, 9, 9)),
    (nn.Conv2d(4, 8, 3, groups=2, bias=False), nn.BatchNorm2d(8), (2, 4, 7, 7)),
    (nn.Conv3d(2, 4, 2), nn.BatchNorm3d(4), (2, 2, 5, 5, 5)),
    (nn.ConvTranspose2d(4, 6, 2, stride=2), nn.BatchNorm2d(6), (2, 4, 5, 5)),  # an up-sampler keeps its bias
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv_bn_relu_folds_and_annotates(mode, case):
    conv, bn, shape = CONV_CASES[case]
    torch.manual_seed(case)
    model = ConvBNAct(conv, bn, nn.ReLU()).eval()
    res = _run(model, torch.randn(shape), mode)
    gm, stats = res.module, res.passes[0].stats
    assert stats["matches"]["conv+bn"] == 1 and stats["matches"]["conv+act"] == 1
    assert "batch_norm" not in _kinds(gm) and _kinds(gm).count("conv") == 1
    conv_node = next(n for n in gm.graph.nodes if (v := fxopt.ir.op_view(gm, n)) and v.kind == "conv")
    relu_node = next(iter(conv_node.users))
    assert annotations(conv_node)["fused"] == "conv+relu" and annotations(conv_node)["fusion_role"] == "anchor"
    assert annotations(relu_node)["fusion_anchor"] == conv_node.name
    assert annotations(relu_node)["fusion_role"] == "output"


class _TwoConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), _warm_bn(nn.BatchNorm2d(16))
        self.c2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), _warm_bn(nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.bn2(self.c2(torch.relu(self.bn1(self.c1(x))))))
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("mode", MODES)
def test_a_folded_conv_keeps_its_module_path_for_ignore_and_skip(mode):
    """Api tester: after `fuse` the conv with its batchnorm folded was a new op of no module, so
    `fuse,prune{ignore=[c1]}` pruned c1 silently (ignore took 'c1' for a module the graph never
    calls) and `fuse,quantize{skip=[c1]}` refused 'c1'."""
    torch.manual_seed(0)
    model = _TwoConvBN().eval()
    x = torch.randn(2, 3, 8, 8)
    fused = fxopt.optimize(model, x, "fuse", mode=mode).module
    convs = [n for n in fused.graph.nodes if (v := fxopt.ir.op_view(fused, n)) and v.kind == "conv"]
    assert [fxopt.ir.module_path(n) for n in convs] == ["c1", "c2"]
    pruned = fxopt.optimize(model, x, "fuse,prune{ratio=0.5,ignore=[c1]}", mode=mode).module
    widths = [fxopt.ir.op_view(pruned, n).param("weight").shape[0] for n in pruned.graph.nodes
              if (v := fxopt.ir.op_view(pruned, n)) and v.kind == "conv"]
    assert widths[0] == 16 and widths[1] < 16, widths
    int8 = fxopt.optimize(model, x, "fuse,quantize{skip=[c1]}", mode=mode, calibration=[(x,)])
    skipped = [name for name, why in int8.passes[-1].stats["float_ops"].items() if "(skip" in why]
    assert skipped == [convs[0].name], int8.passes[-1].stats  # the graphs of both runs name nodes alike
    assert int8.passes[-1].stats["quantized"] == {"conv+act": 1, "linear": 1}


class _SharedHead(nn.Module):
    """One conv + batchnorm head called on three feature maps (an FPN's), and two blocks that
    start out equal (deep copies) but are separate layers."""

    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), _warm_bn(nn.BatchNorm2d(8)))
        block = nn.Sequential(nn.Conv2d(8, 8, 1), _warm_bn(nn.BatchNorm2d(8)))
        self.twins = nn.ModuleList([block, copy.deepcopy(block)])

    def forward(self, x):
        levels = [x, F.avg_pool2d(x, 2), F.avg_pool2d(x, 4)]
        heads = [self.head(p).flatten(2) for p in levels]
        return torch.cat(heads, 2), self.twins[1](self.twins[0](x))


@pytest.mark.parametrize("mode", MODES)
def test_a_conv_and_batchnorm_called_at_several_sites_fold_into_one_shared_weight(mode):
    """Fuse tester: a head called at three FPN levels got three identical folded copies (+62%
    parameters on its model), trained apart where the model trains one; two equal-valued copies
    of a block are separate layers and stay separate."""
    torch.manual_seed(0)
    model = _SharedHead().eval()
    x = torch.randn(2, 8, 8, 8)
    gm = fxopt.optimize(model, x, "fuse", mode=mode).module
    folded = [name for name, _ in gm.named_parameters() if "folded_weight" in name]
    assert len(folded) == 3, folded  # the head's one, each twin's own
    readers = [sum(1 for n in gm.graph.nodes if n.op == "get_attr" and n.target == name) for name in folded]
    assert sorted(readers) == [1, 1, 3], readers
    with torch.no_grad():
        for got, want in zip(gm(x), model(x)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("groups, dim", [(2, 2), (1, 2), (1, 1), (1, 3)])
def test_a_transposed_conv_gets_its_folded_shift_as_an_add(mode, groups, dim):
    """torch's CPU conv_transpose with a bias takes a slower path than without one: ~10x grouped
    (`fuse` was 3.5-9.5x slower than eager), 1.3-2x at groups=1 (a decoder's folded
    ConvTranspose + BatchNorm ran 0.65-0.86x of eager's speed; fuse tester)."""
    torch.manual_seed(0)
    conv = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dim]
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
    model = ConvBNAct(conv(4, 6, 3, stride=2, groups=groups, bias=False), norm(6), nn.ReLU()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the conv+bias fold took the add back and it came out again, 8 rounds
        res = _run(model, torch.randn(2, 4, *[5] * dim), mode)
    gm = res.module
    assert res.passes[0].stats["matches"]["conv+bn"] == 1 and "batch_norm" not in _kinds(gm)
    assert "conv+bias" not in res.passes[0].stats["matches"]
    conv = next(v for n in gm.graph.nodes if (v := fxopt.ir.op_view(gm, n)) and v.kind == "conv")
    assert conv.attrs.get("bias") is None and conv.attrs["groups"] == groups
    assert [fxopt.ir.op_view(gm, u).kind for u in conv.node.users] == ["add"]
    x = torch.randn(3, 4, *[5] * dim)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("act,label", [(nn.ReLU6(), "hardtanh"), (nn.Hardswish(), "hardswish"),
                                       (nn.SiLU(), "silu"), (nn.GELU(), "gelu")])
def test_activation_groups(mode, act, label):
    model = ConvBNAct(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), act).eval()
    res = _run(model, torch.randn(2, 3, 6, 6), mode)
    labels = {annotations(n).get("fused") for n in res.module.graph.nodes}
    assert f"conv+{label}" in labels


@pytest.mark.parametrize("mode", MODES)
def test_linear_bn_and_linear_act(mode):
    model = nn.Sequential(nn.Linear(6, 5), _warm_bn(nn.BatchNorm1d(5)), nn.GELU()).eval()
    res = _run(model, torch.randn(4, 6), mode)
    assert res.passes[0].stats["matches"] == {"linear+bn": 1, "linear+act": 1}
    assert _kinds(res.module) == ["linear", "gelu"]


@pytest.mark.parametrize("mode", MODES)
def test_linear_bn_on_3d_input_is_not_folded(mode):
    # BatchNorm1d on (N, C, L) normalizes dim 1: not the linear's output features.
    model = nn.Sequential(nn.Linear(4, 4), _warm_bn(nn.BatchNorm1d(3))).eval()
    res = _run(model, torch.randn(2, 3, 4), mode)
    assert "batch_norm" in _kinds(res.module)


@pytest.mark.parametrize("order", ["bn+linear", "linear+bn"])
def test_a_batchnorm_folded_into_a_linear_holds_its_rank_in_a_symbolic_graph(order):
    """Fuse tester: folded at (N, C), the graph took (N, C, C) too, where BatchNorm1d
    normalizes dim 1 and the linear reads dim -1: 2.45 off, silently. The symbolic graph now
    asserts the rank the fold was made for (an export graph refuses other ranks at its entry)."""
    layers = [_warm_bn(nn.BatchNorm1d(8)), nn.Linear(8, 8)]
    model = nn.Sequential(*(layers if order == "bn+linear" else layers[::-1])).eval()
    res = _run(model, torch.randn(4, 8), "symbolic")
    assert res.passes[0].stats["matches"] == {order: 1}
    x = torch.randn(3, 8)
    torch.testing.assert_close(res.module(x), model(x))
    with pytest.raises(AssertionError, match=f"pattern '{re.escape(order)}' .* for 2 dims of .* runs only at that rank"):
        res.module(torch.randn(4, 8, 8))


@pytest.mark.parametrize("mode", MODES)
def test_a_tabular_chain_of_batchnorms_and_linears_folds_whole(mode):
    """BatchNorm1d -> Linear -> BatchNorm1d -> ReLU: the rank guard of one fold must not make a
    batchnorm a value of two readers, which the next fold refuses (adversary: the input
    batchnorm stayed in symbolic graphs)."""
    model = nn.Sequential(_warm_bn(nn.BatchNorm1d(16)), nn.Linear(16, 32), _warm_bn(nn.BatchNorm1d(32)),
                          nn.ReLU(), nn.Linear(32, 4)).eval()
    res = _run(model, torch.randn(8, 16), mode)
    assert res.passes[0].stats["matches"] == {"bn+linear": 1, "linear+bn": 1, "linear+act": 1}
    assert "batch_norm" not in _kinds(res.module)


class _BnBeforeReflectConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre, self.bn = _warm_bn(nn.BatchNorm2d(6)), _warm_bn(nn.BatchNorm2d(12))
        self.conv, self.head = nn.Conv2d(6, 12, 3, padding=1, padding_mode="reflect"), nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.head(F.hardswish(self.bn(self.conv(self.pre(x)))))


@pytest.mark.parametrize("mode", MODES)
def test_a_group_follows_its_anchor_when_a_later_fold_replaces_it(mode):
    """Fuse tester: the batchnorm before the conv is folded after the conv+act group was
    annotated; the group kept naming the replaced conv, and the new conv had no role."""
    res = _run(_BnBeforeReflectConv().eval(), torch.randn(2, 6, 10, 10), mode)
    nodes = {n.name: n for n in res.module.graph.nodes}
    groups = [annotations(n) for n in nodes.values() if annotations(n).get("fused") == "conv+hardswish"]
    assert len(groups) == 2, [annotations(n) for n in nodes.values()]
    for notes in groups:
        anchor = nodes.get(notes["fusion_anchor"])
        assert anchor is not None and annotations(anchor)["fusion_role"] == "anchor", notes
        assert fxopt.ir.op_view(res.module, anchor).kind == "conv"


class ConditionalBatchNorm(nn.Module):
    """FiLM-style conditioning: the batchnorm's affine computed from a second input."""

    def __init__(self, which: str, order: str):
        super().__init__()
        self.which, self.order = which, order
        self.conv, self.fc = nn.Conv2d(4, 4, 3), nn.Linear(5, 4)
        self.register_buffer("rm", torch.randn(4))
        self.register_buffer("rv", torch.rand(4) + 0.5)

    def forward(self, x, z):
        cond = 1 + self.fc(z).mean(0)
        weight, bias = (cond, None) if self.which == "weight" else (None, cond)
        if self.order == "bn+conv":
            return self.conv(F.batch_norm(x, self.rm, self.rv, weight, bias, False, 0.1, 1e-5))
        return F.batch_norm(self.conv(x), self.rm, self.rv, weight, bias, False, 0.1, 1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", ["conv+bn", "bn+conv"])
@pytest.mark.parametrize("which", ["weight", "bias"])
def test_a_batchnorm_whose_affine_is_computed_is_not_folded(which, order, mode):
    """Fuse tester: a weight or bias computed from an input was read as absent (1 or 0) and
    the batchnorm folded: 0.4-5.8 off at the example itself."""
    model = ConditionalBatchNorm(which, order).eval()
    x, z = torch.randn(2, 4, 6, 6), torch.randn(2, 5)
    res = fxopt.optimize(model, (x, z), pipeline="fuse", mode=mode)
    assert res.verification.passed, res.summary()
    assert not any("bn" in name for name in res.passes[0].stats["matches"]), res.passes[0].stats
    assert "batch_norm" in _kinds(res.module)
    x, z = torch.randn(3, 4, 6, 6), torch.randn(3, 5)
    torch.testing.assert_close(res.module(x, z), model(x, z))
    gm = fxopt.capture(model, (x, z), mode=mode)
    bn = next(v for v in map(lambda n: fxopt.ir.op_view(gm, n), gm.graph.nodes) if v and v.kind == "batch_norm")
    assert f"batchnorm's {which} is computed in the graph" in _bn_eval(bn)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = F.relu(self.conv(x) + x)
        return self.conv2(y) + y, torch.relu(x + x.sin())


@pytest.mark.parametrize("mode", MODES)
def test_residual_and_add_relu(mode):
    res = _run(Residual().eval(), torch.randn(2, 4, 5, 5), mode)
    m = res.passes[0].stats["matches"]
    assert m["conv+add+relu"] == 1 and m["conv+add"] == 1 and m["add+relu"] == 1


@pytest.mark.parametrize("mode", MODES)
def test_dropout_identity_removed(mode):
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3), nn.Identity(), nn.Tanh()).eval()
    res = _run(model, torch.randn(3, 4), mode)
    # export already drops nn.Identity; symbolic keeps both for fuse to remove
    assert res.passes[0].stats["matches"]["remove-noop"] == (2 if mode == "symbolic" else 1)
    assert "dropout" not in _kinds(res.module) and "identity" not in _kinds(res.module)


class _Extrema(nn.Module):
    """Maxima and minima over an axis read three ways: values only, values and indices, and the
    two forms that are no reduction over an axis (of every element, of two tensors)."""

    def forward(self, x):
        pooled = torch.max(x, 2, keepdim=True)[0]  # PointNet's global max
        lowest = x.min(dim=1)[0]
        values, indices = x.max(-1)  # indices read: stays
        return pooled.sum() + lowest.sum() + values.sum() + indices.sum() + torch.max(x) + torch.max(x, x * 2).sum()


@pytest.mark.parametrize("mode", MODES)
def test_a_max_or_min_whose_indices_nobody_reads_becomes_amax_or_amin(mode):
    """Fuse tester: a PointNet's ``torch.max(x, 2, keepdim=True)[0]`` took 1-2.7 ms of a 2-6 ms
    batch-1 call; max computes the indices too (amax: 5-20x faster on the same values)."""
    x = torch.randn(2, 3, 5)
    res = _run(_Extrema(), x, mode)
    assert res.passes[0].stats["matches"]["extremum-values"] == 2
    targets = [n.target for n in res.module.graph.nodes]
    assert targets.count(torch.amax) == 1 and targets.count(torch.amin) == 1
    y = torch.randn(4, 3, 5)
    torch.testing.assert_close(res.module(y), _Extrema()(y))
    y[0, 1, 2] = float("nan")  # max and amax both propagate NaN
    assert torch.isnan(res.module(y)) and torch.isnan(_Extrema()(y))
    why = fxopt.optimize(_Extrema(), x, "fuse{debug=getitem_2}", mode="symbolic").passes[0].stats["why_not"]
    assert why["extremum-values"].endswith("its indices are read by getitem_3"), why


class _MaskedConv(nn.Module):
    """PixelCNN's masked conv: ``conv2d(x, weight * mask)``, then a batchnorm."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.register_buffer("mask", (torch.rand(8, 3, 3, 3) > 0.5).float())
        self.bn = _warm_bn(nn.BatchNorm2d(8))

    def forward(self, x):
        return self.bn(F.conv2d(x, self.weight * self.mask))


@pytest.mark.parametrize("mode", MODES)
def test_a_conv_weight_computed_from_stored_tensors_says_to_fold_constants_first(mode):
    """fuse does not fold into a weight the graph computes; where it is computed from stored
    tensors alone the reason says which pass makes it one tensor, and that pipeline folds it."""
    model, x = _MaskedConv().eval(), torch.randn(2, 3, 8, 8)
    bn = "bn" if mode == "symbolic" else "batch_norm"
    why = fxopt.optimize(model, (x,), f"fuse{{debug={bn}}}", mode=mode).passes[0].stats["why_not"]["conv+bn"]
    assert "its weight is computed in the graph ('mul') from stored tensors alone: run fold-constants first" in why
    res = _run(model, x, mode, pipeline="fold-constants,fuse")
    assert "batch_norm" not in _kinds(res.module) and "mul" not in _kinds(res.module), _kinds(res.module)


class _InstanceNorms(nn.Module):
    """Instance norms by input statistics (module with and without affine, 1-D and 3-D, the
    functional form) and one that keeps running statistics (eval: a per-channel affine)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.affine, self.plain = nn.InstanceNorm2d(8, affine=True), nn.InstanceNorm2d(8, eps=1e-3)
        self.tracked = nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.seq, self.vol = nn.InstanceNorm1d(8, affine=True), nn.InstanceNorm3d(2)
        with torch.no_grad():
            for norm in (self.affine, self.tracked, self.seq):
                norm.weight.uniform_(0.5, 2)
                norm.bias.uniform_(-1, 1)
            self.tracked.running_mean.uniform_(-1, 1)
            self.tracked.running_var.uniform_(0.5, 2)

    def forward(self, x):
        h = F.relu(self.affine(self.conv(x)))
        h = self.plain(h) + F.instance_norm(h * 2) + self.tracked(h)
        return self.seq(h.flatten(2)).sum() + self.vol(h.unflatten(1, (2, 4))).sum(), h


@pytest.mark.parametrize("mode", MODES)
def test_an_instance_norm_by_input_statistics_becomes_a_group_norm_of_one_channel_each(mode):
    """torch's CPU instance_norm runs batch_norm over a reshaped copy: its group_norm of C
    groups computes the same values 4-50x faster (fuse tester: CycleGAN). One that reads
    running statistics stays."""
    torch.manual_seed(0)
    model, x = _InstanceNorms().eval(), torch.randn(2, 3, 9, 9) * 3 + 1
    res = _run(model, x, mode)
    assert res.passes[0].stats["matches"]["instance-norm-as-group-norm"] == 5
    assert _kinds(res.module).count("instance_norm") == 1 and _kinds(res.module).count("group_norm") == 5
    why = fxopt.optimize(model, (x,), "fuse{norms=false}", mode=mode).passes[0].stats["matches"]
    assert "instance-norm-as-group-norm" not in why


class _StackSums(nn.Module):
    """Sums over the axis a stack made (SKNet's ``stack(branches, 1).sum(1)`` and
    ``(stack * attention).sum(1)``), with factors of each shape, and sums that are no such."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.branches = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1 + i, dilation=1 + i) for i in range(3)])
        self.scale = nn.Parameter(torch.rand(3, 8, 1, 1))

    def forward(self, x):
        fs = torch.stack([b(x) for b in self.branches], 1)
        a = self.scale.softmax(0) * x.mean((1, 2, 3)).view(-1, 1, 1, 1, 1)  # (N, 3, 8, 1, 1)
        return {"plain": lambda: fs.sum(1),
                "keepdim": lambda: fs.sum(dim=1, keepdim=True),
                "per_sample": lambda: (fs * a).sum(1),
                "stored": lambda: (self.scale * fs).sum(1),
                "no_axis": lambda: (fs * self.scale[0]).sum(1),
                "size_one": lambda: (fs * a[:, :1]).sum(1),
                "last": lambda: torch.stack([b(x) for b in self.branches], -1).sum(-1),
                "other_axis": lambda: fs.sum(2),
                "widening": lambda: (torch.stack([b(x).mean((2, 3), keepdim=True) for b in self.branches], 1)
                                     * fs.new_ones(1, 3, 8, 6, 6)).sum(1),
                "cast": lambda: fs.sum(1, dtype=torch.float64)}[self.how]()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["plain", "keepdim", "per_sample", "stored", "no_axis", "size_one", "last",
                                 "other_axis", "widening", "cast"])
def test_a_sum_over_a_stacked_axis_becomes_a_sum_of_the_pieces(mode, how):
    """``stack(xs, d).sum(d)`` is the pieces added, and ``(stack(xs, d) * w).sum(d)`` each times
    its slice of w (fuse tester: SKNet's sums read lowered convs' channels-last values through a
    stack, 4-18x slower). A sum over another axis, a factor that widens the stack, a sum that
    casts stay."""
    torch.manual_seed(0)
    model, x = _StackSums(how).eval(), torch.randn(2, 8, 6, 6)
    res = _run(model, x, mode)
    rewritten = how not in ("other_axis", "widening", "cast")
    assert ("stack" in _kinds(res.module)) != rewritten, _kinds(res.module)
    matches = res.passes[0].stats["matches"]
    assert sum(n for name, n in matches.items() if "sum-of-stack" in name) == rewritten, matches


class _NormsLeftAlone(nn.Module):
    """Instance norms the group-norm form would get wrong or slow (adversary): a module called
    on one sample ((C, H, W): its channels on axis 0), float16, maps of 2x2 pixels."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(6, 6, 1)
        self.norm = nn.InstanceNorm2d(6, affine=True)

    def forward(self, x):
        return self.norm(self.conv(x))


@pytest.mark.parametrize("how", ["unbatched", "half", "tiny"])
def test_an_instance_norm_the_group_norm_form_would_break_or_slow_stays(how):
    torch.manual_seed(0)
    model = _NormsLeftAlone(how).eval()
    x = {"unbatched": torch.randn(6, 10, 12), "half": torch.randn(2, 6, 8, 8), "tiny": torch.randn(2, 6, 2, 2)}[how]
    if how == "half":
        model, x = model.half(), x.half()
    res = fxopt.optimize(model, (x,), "fuse", mode="symbolic")
    assert "instance-norm-as-group-norm" not in res.passes[0].stats["matches"]
    torch.testing.assert_close(res.module(x), model(x))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.float16])
def test_a_stack_sum_of_pieces_whose_sum_promotes_or_rounds_once_stays(mode, dtype):
    """torch.sum makes int64 of narrower integers and bools, and accumulates float16 in
    float32: the pieces added would not (the pass failed on int32 pieces; adversary)."""
    class Sums(nn.Module):
        def forward(self, x):
            q = (x * 4).to(dtype)
            return torch.stack([q, q * 2 if dtype != torch.bool else ~q, q], 1).sum(1)

    x = torch.randn(3, 5)
    res = fxopt.optimize(Sums(), (x,), "fuse", mode=mode)
    assert not any("sum-of-stack" in name for name in res.passes[0].stats["matches"])
    torch.testing.assert_close(res.module(x), Sums()(x))


class _ChannelLayerNorm(nn.Module):
    """A layer norm over an image's channels spelled out: ConvNeXt's (`x - u` computed twice),
    with rsqrt, without affine; and spellings that are no such norm (a cube, another axis)."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.weight, self.bias = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8))

    def forward(self, x):
        x = self.conv(x)
        axis = 2 if self.how == "other_axis" else 1
        u = x.mean(axis, keepdim=True)
        if self.how == "rsqrt":
            d = x - u
            y = d * torch.rsqrt(d.pow(2).mean(1, keepdim=True) + 1e-6)
        else:
            spread = (x - u).pow(3).abs() if self.how == "cube" else (x - u).pow(2)
            y = (x - u) / torch.sqrt(spread.mean(axis, keepdim=True) + 1e-6)
        if self.how == "plain":
            return y
        return self.weight[:, None, None] * y + self.bias[:, None, None]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["convnext", "rsqrt", "plain", "cube", "other_axis"])
def test_a_layer_norm_over_the_channels_spelled_out_is_one_call(mode, how):
    """ConvNeXt's and NAFNet's LayerNorm2d: five ops over axis 1, 5-13x slower on the
    channels-last values lower-cpu writes than one layer_norm over the (N, H, W, C) view."""
    torch.manual_seed(0)
    model, x = _ChannelLayerNorm(how).eval(), torch.randn(2, 3, 6, 6)
    res = _run(model, x, mode)
    matched = sum(n for name, n in res.passes[0].stats["matches"].items() if name.startswith("channel-layer-norm"))
    assert matched == (how in ("convnext", "rsqrt", "plain")), res.passes[0].stats["matches"]
    if matched:
        assert "mean" not in _kinds(res.module), _kinds(res.module)
    if how == "convnext":  # the user's affine parameters: they train and load as before (adversary)
        res.module(x).sum().backward()
        assert res.module.get_parameter("weight").grad is not None and res.module.get_parameter("bias").grad is not None
        cl = x.double().contiguous(memory_format=torch.channels_last)  # another dtype at call time
        if mode == "symbolic":
            torch.testing.assert_close(res.module.double()(cl), model.double()(cl))


@pytest.mark.parametrize("mode", MODES)
def test_consecutive_linears_merge(mode):
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 8), nn.Linear(8, 64), nn.Linear(64, 2)).eval()
    res = _run(model, torch.randn(3, 8), mode)
    # 8->4->8 merges (8*8 <= 4*16), then 8->64 would cost more merged with 8->8? no: the
    # merged 8->8 and 8->64 merge (8*64 <= 8*72), then 8->64->2 merges (8*2 <= 64*10).
    assert _kinds(res.module) == ["linear"]
    assert res.passes[0].stats["matches"]["linear+linear"] == 3


def test_linear_merge_skipped_when_costlier():
    model = nn.Sequential(nn.Linear(64, 2), nn.Linear(2, 64)).eval()
    res = _run(model, torch.randn(3, 64), "symbolic")
    assert _kinds(res.module) == ["linear", "linear"]


class Attention(nn.Module):
    """Spelled-out attention; `mask`: "" (none), "add" (additive float), "fill" (a boolean causal
    mask filled with -inf, nanoGPT's way) or "fill_finite" (filled with -1e4: not SDPA's meaning)."""

    def __init__(self, use_mul, mask):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.use_mul, self.mask = use_mul, mask
        self.register_buffer("additive_mask", torch.tensor([0.0, 0.0, 0.0, -1e4, 0.0]).view(1, 1, 1, 5))
        self.register_buffer("causal", torch.tril(torch.ones(5, 5)).bool())

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, 2, 8).transpose(1, 2) for f in (self.q, self.k, self.v))
        s = q @ k.transpose(-2, -1)
        s = s * (1 / math.sqrt(8)) if self.use_mul else s / math.sqrt(8)
        if self.mask == "add":
            s = s + self.additive_mask
        elif self.mask.startswith("fill"):
            s = s.masked_fill(~self.causal, -1e4 if self.mask == "fill_finite" else float("-inf"))
        return (s.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, 16)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("use_mul,mask", [(False, ""), (True, ""), (False, "add"), (True, "fill")])
def test_attention_becomes_sdpa(mode, use_mul, mask):
    torch.manual_seed(0)
    res = _run(Attention(use_mul, mask).eval(), torch.randn(2, 5, 16), mode)
    assert _kinds(res.module).count("sdpa") == 1
    assert "softmax" not in _kinds(res.module)
    name = {"": "attention", "add": "attention+mask", "fill": "attention+masked_fill"}[mask]
    assert res.passes[0].stats["matches"][name] == 1


@pytest.mark.parametrize("mode", MODES)
def test_a_finite_masked_fill_is_not_sdpa(mode):
    # replacing scores by -1e4 is not adding a mask: left as written, still verified
    res = _run(Attention(False, "fill_finite").eval(), torch.randn(2, 5, 16), mode)
    assert "sdpa" not in _kinds(res.module) and "softmax" in _kinds(res.module)


class Shared(nn.Module):
    """One conv and one batchnorm called twice; the second call is followed by a relu."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = _warm_bn(nn.BatchNorm2d(3))

    def forward(self, x):
        y = self.bn(self.conv(x))
        return torch.relu(self.bn(self.conv(y))), self.conv(x)


@pytest.mark.parametrize("mode", MODES)
def test_shared_modules_called_twice(mode):
    model = Shared().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = _run(model, torch.randn(2, 3, 6, 6), mode)
    assert res.passes[0].stats["matches"]["conv+bn"] == 2
    # the third conv site (no batchnorm) still uses the original weights, untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_debug_says_why_not():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ELU()).eval()
    res = fxopt.optimize(model, (torch.randn(1, 3, 5, 5),), pipeline="fuse{debug=_1}", mode="symbolic")
    why = res.passes[0].stats["why_not"]
    assert "'elu'" in why["conv+act"] and "relu" in why["conv+act"]


def test_debug_answers_for_the_graph_the_node_ends_up_in():
    """conv+act cannot match the relu of conv-bn-relu until the batchnorm is folded (round 2)."""
    model = ConvBNAct(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    relu = [n.name for n in fxopt.capture(model, (torch.randn(1, 3, 5, 5),), mode="symbolic").graph.nodes
            if n.op == "call_module" and "act" in n.target][0]
    res = fxopt.optimize(model, (torch.randn(1, 3, 5, 5),), pipeline=f"fuse{{debug={relu}}}", mode="symbolic")
    assert res.passes[0].stats["why_not"]["conv+act"] == "matched"


def test_debug_on_an_unknown_node_names_the_closest_ops():
    model = ConvBNAct(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with pytest.raises(fxopt.PassError, match="debug node 'actt' is not in the graph; closest: act"):
        fxopt.optimize(model, (torch.randn(1, 3, 5, 5),), pipeline="fuse{debug=actt}", mode="symbolic")


def test_options_switch_steps_off():
    model = ConvBNAct(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    res = fxopt.optimize(model, (torch.randn(1, 3, 5, 5),), pipeline="fuse{fold_bn=false}", mode="symbolic")
    assert "conv+bn" not in res.passes[0].stats["matches"]
    assert "batch_norm" in _kinds(res.module)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_on_cuda():
    model = ConvBNAct(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    res = fxopt.optimize(model, (torch.randn(2, 3, 8, 8),), pipeline="fuse", mode="export", devices=["cuda"])
    assert res.verification_by_device["cuda"].passed, res.summary()


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: the scale and the causal mask are computed from the input's shape,
    so a symbolic trace keeps them as graph values, not constants."""

    def __init__(self, spelling="nanogpt", n_embd=32, n_head=4):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.n_head, self.spelling = n_head, spelling
        self.temp = nn.Parameter(torch.full((1,), 2.0))

    def forward(self, x):
        B, T, C = x.size()
        hd = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, hd).transpose(1, 2) for t in (q, k, v))
        s = q @ k.transpose(-2, -1)
        if self.spelling == "nanogpt":
            s = s * (1.0 / math.sqrt(k.size(-1)))
        elif self.spelling == "div_pow":
            s = s / (hd ** 0.5)
        elif self.spelling == "mul_pow":
            s = s * hd ** -0.5
        elif self.spelling == "pow_first":  # the scale on the left, read from `.shape`
            s = k.shape[-1] ** -0.5 * s
        elif self.spelling == "tensor_temp":  # a learned temperature: a stored one-element tensor
            s = s / self.temp
        s = s.masked_fill(~x.new_ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        y = (s.softmax(dim=-1) @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


def _same_at_other_sizes(gm, model):
    # the scale and mask must stay computed from the input, not baked in from the example
    for batch in (1, 3):
        for seq in (4, 9):
            x = torch.randn(batch, seq, 32)
            torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spelling,pattern", [
    ("nanogpt", "attention+masked_fill/mul-shape"), ("div_pow", "attention+masked_fill/div-shape"),
    ("mul_pow", "attention+masked_fill/mul-shape"), ("pow_first", "attention+masked_fill/mul-shape")])
def test_attention_with_a_computed_scale_becomes_sdpa(spelling, pattern):
    torch.manual_seed(0)
    model = CausalSelfAttention(spelling).eval()
    res = _run(model, torch.randn(2, 6, 32), "symbolic")
    kinds = _kinds(res.module)
    assert kinds.count("sdpa") == 1 and "softmax" not in kinds and "matmul" not in kinds
    assert res.passes[0].stats["matches"] == {pattern: 1}
    sdpa = next(n for n in res.module.graph.nodes if n.target is F.scaled_dot_product_attention)
    assert isinstance(sdpa.kwargs["scale"], torch.fx.Node)  # read at run time, not a constant
    _same_at_other_sizes(res.module, model)


def test_a_computed_scale_still_folds_to_a_constant_in_export():
    res = _run(CausalSelfAttention("div_pow").eval(), torch.randn(2, 6, 32), "export")
    assert res.passes[0].stats["matches"] == {"attention+masked_fill": 1}


def test_a_stored_tensor_divisor_is_evaluated_into_sdpa_scale():
    # SDPA's scale= is a float: a learned one-element temperature is read once when fusing (as
    # a batchnorm's statistics are folded), and the result holds at other sizes
    torch.manual_seed(0)
    model = CausalSelfAttention("tensor_temp").eval()
    res = _run(model, torch.randn(2, 6, 32), "symbolic")
    kinds = _kinds(res.module)
    assert kinds.count("sdpa") == 1 and "softmax" not in kinds
    assert res.passes[0].stats["matches"] == {"attention+masked_fill/stored-scale": 1}
    _same_at_other_sizes(res.module, model)


class _SeparateBias(nn.Module):
    """Falcon-style layers: `x @ W.T` then `+ b`; `bias_shape` other than (out,) broadcasts."""

    def __init__(self, bias_shape=(16,), module=False):
        super().__init__()
        self.module = nn.Linear(8, 16, bias=False) if module else None
        self.w = nn.Parameter(torch.randn(16, 8))
        self.b = nn.Parameter(torch.randn(bias_shape))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        y = self.module(x) if self.module is not None else x @ self.w.T
        return self.head(torch.relu(self.b + y))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("module", [False, True])
def test_a_bias_added_after_a_bias_less_linear_folds_into_it(mode, module):
    x = torch.randn(3, 5, 8)
    res = _run(_SeparateBias(module=module).eval(), x, mode)
    assert res.passes[0].stats["matches"]["linear+bias"] == 1
    assert "add" not in _kinds(res.module) and _kinds(res.module).count("linear") == 2
    assert fxopt.optimize(_SeparateBias().eval(), (x,), "fuse{fold_bias=false}", mode=mode) \
        .passes[0].stats["matches"].get("linear+bias", 0) == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias_shape", [(1,), (5, 16), ()])
def test_a_broadcast_added_tensor_is_no_bias(mode, bias_shape):
    res = _run(_SeparateBias(bias_shape).eval(), torch.randn(3, 5, 8), mode)
    assert res.passes[0].stats["matches"].get("linear+bias", 0) == 0 and "add" in _kinds(res.module)


class _Unusual(nn.Module):
    """Ops a fusion must leave alone: their extra arguments change the result."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(8, 8, bias=False)
        self.b = nn.Parameter(torch.randn(8))

    def forward(self, x):
        if self.kind == "bias_alpha":  # x W + 3 b, not a bias
            return torch.add(self.fc(x), self.b, alpha=3)
        q = self.fc(x)
        s = q @ x.transpose(-2, -1)
        if self.kind == "floor_div":
            s = torch.div(s, 3.0, rounding_mode="floor")
        elif self.kind == "div_zero":
            s = s / 0.0
        elif self.kind == "mask_alpha":
            s = torch.add(s / 8.0, torch.tril(torch.ones(5, 5)), alpha=2)
        return s.softmax(-1) @ x


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["bias_alpha", "floor_div", "div_zero", "mask_alpha"])
def test_rewrites_that_would_drop_an_argument_are_declined(kind, mode):
    """`alpha`, a rounding division and a `/ 0.0` scale have no place in linear's bias or SDPA:
    the patterns do not match them (each once became a wrong fused op, or a crash)."""
    torch.manual_seed(0)
    model, x = _Unusual(kind).eval(), torch.randn(2, 5, 8)
    res = fxopt.optimize(model, (x,), "fuse", mode=mode)
    assert not res.passes[0].stats["matches"], res.passes[0].stats["matches"]
    torch.testing.assert_close(res.module(x), model(x), equal_nan=True)


SPELLED = {
    "swish": (lambda x: x * torch.sigmoid(x), "silu", {}),
    "swish_left": (lambda x: torch.sigmoid(x) * x, "silu", {}),
    "hardswish": (lambda x: x * F.relu6(x + 3.0) / 6.0, "hardswish", {}),
    "hardswish_grouped": (lambda x: x * (F.hardtanh(x + 3, 0.0, 6.0) / 6), "hardswish", {}),
    "hardsigmoid": (lambda x: F.relu6(x + 3.0) * (1 / 6), "hardsigmoid", {}),
    "gelu_bert": (lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))), "gelu", {"approximate": "none"}),
    "gelu_scaled": (lambda x: 0.5 * x * (1 + torch.erf(x * 0.7071067811865476)), "gelu", {"approximate": "none"}),
    "gelu_half_last": (lambda x: (x * (1.0 + torch.erf(x / math.sqrt(2.0)))) * 0.5, "gelu", {"approximate": "none"}),
    "gelu_gpt2": (lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))),
                  "gelu", {"approximate": "tanh"}),
    "gelu_tanh_cubed": (lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * (x * x * x)))),
                        "gelu", {"approximate": "tanh"}),
    "gelu_tanh_cubed_right": (lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * (x * (x * x))))),
                              "gelu", {"approximate": "tanh"}),
}


class _Spelled(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.fc, self.out, self.act = nn.Linear(8, 16), nn.Linear(16, 4), act

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(SPELLED))
def test_a_spelled_out_activation_becomes_one_op_grouped_with_its_linear(name, mode):
    fn, kind, attrs = SPELLED[name]
    res = _run(_Spelled(fn), torch.randn(3, 8), mode)
    gm = res.module
    kinds = _kinds(gm)
    assert kinds.count(kind) == 1 and not {"erf", "tanh", "sigmoid", "pow"} & set(kinds), kinds
    act = next(n for n in gm.graph.nodes if (v := fxopt.ir.op_view(gm, n)) is not None and v.kind == kind)
    assert all(fxopt.ir.op_view(gm, act).attrs.get(k) == v for k, v in attrs.items())
    if kind in ACTIVATIONS:  # the kinds a kernel fuses after a linear (not hardsigmoid)
        assert annotations(act)["fused"] == f"linear+{kind}"
    matches = res.passes[0].stats["matches"]
    assert sum(n for p, n in matches.items() if p.split("/")[0] in (kind, kind + "-tanh")) == 1, matches


@pytest.mark.parametrize("fn", [
    lambda x: x * 0.5 * (1.0 + torch.erf(x / 1.4)),        # not √2
    lambda x: x * 0.4 * (1.0 + torch.erf(x / math.sqrt(2.0))),  # not 0.5
    lambda x: x * torch.sigmoid(x * 1.702),                 # quick GELU: sigmoid of another value
    lambda x: x * F.relu6(x + 3.0) / 5.0,
])
def test_a_near_miss_is_not_taken_for_an_activation(fn):
    res = _run(_Spelled(fn), torch.randn(3, 8), "symbolic")
    assert not {"gelu", "silu", "hardswish", "hardsigmoid"} & set(_kinds(res.module))


def test_activations_option_switches_the_forms_off():
    res = _run(_Spelled(SPELLED["swish"][0]), torch.randn(3, 8), "symbolic", pipeline="fuse{activations=false}")
    assert "silu" not in _kinds(res.module) and "sigmoid" in _kinds(res.module)


class _EagerAttention(nn.Module):
    """Hugging Face's `eager_attention_forward`: `(q @ kᵀ) * scaling + mask`, a softmax spelled by
    `probs` (Llama's `softmax(s, dim=-1, dtype=torch.float32).to(query.dtype)`), eval dropout, `@ v`;
    `return_probs` also returns the attention weights (`output_attentions=True`)."""

    def __init__(self, probs, return_probs=False):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.probs, self.return_probs, self.scaling = probs, return_probs, 8 ** -0.5

    def forward(self, x, attention_mask):
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, 2, 8).transpose(1, 2) for f in (self.q, self.k, self.v))
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling + attention_mask
        probs = F.dropout(self.probs(scores, q), p=0.1, training=self.training)
        out = torch.matmul(probs, v).transpose(1, 2).contiguous().reshape(b, n, 16)
        return (out, probs) if self.return_probs else out


EAGER_PROBS = {
    "llama": lambda s, q: F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype),
    "dtype_only": lambda s, q: F.softmax(s, dim=-1, dtype=torch.float32),
    "to_literal": lambda s, q: s.softmax(-1).to(torch.float32),
    "to_keyword": lambda s, q: s.softmax(dim=-1).to(dtype=q.dtype),
    "type_as": lambda s, q: s.softmax(-1).type_as(q),
    "float": lambda s, q: s.softmax(-1).float(),
}


def _eager_attention_inputs(dtype=torch.float32):
    torch.manual_seed(0)
    mask = torch.zeros(2, 1, 5, 5, dtype=dtype)
    mask[0, ..., -2:] = torch.finfo(dtype).min  # the padding of the first sequence
    return torch.randn(2, 5, 16, dtype=dtype), mask


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spelling", sorted(EAGER_PROBS))
def test_hugging_face_eager_attention_becomes_sdpa(mode, spelling):
    """A softmax whose dtype is its input's and a cast that changes nothing are no reason to leave
    attention spelled out (export writes `aten.softmax.int(s, -1, torch.float32)`, an
    `_assert_tensor_metadata` check and `aten.to.dtype` / `_to_copy`)."""
    torch.manual_seed(0)
    model, inputs = _EagerAttention(EAGER_PROBS[spelling]).eval(), _eager_attention_inputs()
    res = fxopt.optimize(model, inputs, pipeline="fuse", mode=mode)
    assert res.verification.passed, res.summary()
    kinds = _kinds(res.module)
    assert kinds.count("sdpa") == 1 and not {"softmax", "to", "assert_metadata", "matmul"} & set(kinds), kinds
    pattern = "attention+mask" if spelling == "dtype_only" else "attention+mask/cast"
    assert res.passes[0].stats["matches"][pattern] == 1
    torch.testing.assert_close(res.module(*inputs), model(*inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["float64_softmax", "bfloat16", "probs_returned"])
def test_eager_attention_that_sdpa_would_change_stays(mode, case):
    """A float32 softmax of bfloat16 scores, a float64 softmax, and attention weights the model
    also returns are not SDPA's: the ops stay, and the result is still the model's."""
    probs = (lambda s, q: F.softmax(s, dim=-1, dtype=torch.float64).to(q.dtype)) if case == "float64_softmax" \
        else EAGER_PROBS["llama"]
    dtype = torch.bfloat16 if case == "bfloat16" else torch.float32
    model = _EagerAttention(probs, return_probs=case == "probs_returned").eval().to(dtype)
    inputs = _eager_attention_inputs(dtype)
    res = fxopt.optimize(model, inputs, pipeline="fuse", mode=mode)
    assert res.verification.passed, res.summary()
    kinds = _kinds(res.module)
    assert "sdpa" not in kinds and "softmax" in kinds, kinds
    torch.testing.assert_close(res.module(*inputs), model(*inputs), rtol=0, atol=0)


@pytest.mark.parametrize("case,why", [
    ("float64_softmax", "node 'to' (call_method to): a cast from torch.float64 to torch.float32"),
    ("bfloat16", "node 'to' (call_method to): a cast from torch.float32 to torch.bfloat16"),
    ("to_device", "node 'to' (call_method to): the cast also sets device='cpu'"),
])
def test_why_an_eager_attention_is_not_sdpa(case, why):
    probs = {"float64_softmax": lambda s, q: F.softmax(s, dim=-1, dtype=torch.float64).to(q.dtype),
             "bfloat16": EAGER_PROBS["llama"],
             "to_device": lambda s, q: s.softmax(-1).to(dtype=q.dtype, device="cpu")}[case]
    dtype = torch.bfloat16 if case == "bfloat16" else torch.float32
    model, inputs = _EagerAttention(probs).eval().to(dtype), _eager_attention_inputs(dtype)
    res = fxopt.optimize(model, inputs, pipeline="fuse{debug=matmul_1}", mode="symbolic")
    assert res.passes[0].stats["why_not"]["attention+mask/cast"] == why
    assert "sdpa" not in _kinds(res.module)


def _tiny_hugging_face(arch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
                 max_position_embeddings=64)
    if arch == "bert":
        return transformers.BertModel(transformers.BertConfig(**sizes, attn_implementation="eager")).eval()
    return transformers.LlamaModel(transformers.LlamaConfig(**sizes, attn_implementation="eager")).eval()


@pytest.mark.slow
@pytest.mark.parametrize("arch,pattern", [("bert", "attention+mask"), ("llama", "attention+mask/cast")])
def test_hugging_face_eager_models_get_sdpa(arch, pattern):
    """BERT's eager attention (a plain softmax) and Llama's (a float32 softmax cast back to the
    query's dtype), captured by `fxopt.capture` (export): one SDPA per layer, same outputs."""
    model = _tiny_hugging_face(arch)
    assert model.config._attn_implementation == "eager"
    ids, mask = torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    mask[0, 6:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, **({"use_cache": False} if arch == "llama" else {})}
    gm = fxopt.capture(model, inputs)
    assert fxopt.frontend_of(gm) == "export" and "softmax" in _kinds(gm)
    res = fxopt.optimize(gm, inputs, pipeline="fuse")
    assert res.verification.passed, res.summary()
    kinds = _kinds(res.module)
    assert kinds.count("sdpa") == 2 and "softmax" not in kinds, kinds
    assert res.passes[0].stats["matches"][pattern] == 2
    with torch.no_grad():
        torch.testing.assert_close(res.module(**inputs).last_hidden_state, model(**inputs).last_hidden_state,
                                   rtol=1e-4, atol=1e-5)


class LayerScale(nn.Module):
    """CaiT/ConvNeXt layer scale after a linear (channels last) and after a conv, a factor that
    broadcasts over positions (not a layer scale) and one computed in the graph."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc, self.fc2 = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 8), nn.Linear(8, 8, bias=False)
        self.gamma_c = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.per_position = nn.Parameter(torch.rand(6, 1) + 0.5)

    def forward(self, x):
        h = (self.gamma_c * self.conv(x)).flatten(2).transpose(1, 2)  # (B, 36, 8)
        h = h + self.fc(h) * self.gamma
        h = h[:, :6] + self.per_position * self.fc2(h[:, :6])          # broadcasts over the positions
        return h * (self.gamma * 2)                                      # computed: not a stored factor


@pytest.mark.parametrize("mode", MODES)
def test_a_layer_scale_is_folded_into_its_conv_or_linear(mode):
    torch.manual_seed(0)
    model = LayerScale().eval()
    res = _run(model, torch.randn(2, 3, 6, 6), mode)
    matches = res.passes[0].stats["matches"]
    assert matches.get("conv+scale") == 1 and matches.get("linear+scale") == 1, matches
    assert _kinds(res.module).count("mul") == 3  # per-position factor, gamma * 2, and its product
    x = torch.randn(3, 3, 6, 6)
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-5, atol=1e-6)
    off = fxopt.optimize(model, (torch.randn(2, 3, 6, 6),), "fuse{fold_scale=false}", mode=mode)
    assert "conv+scale" not in off.passes[0].stats["matches"]


class ScaledResidual(nn.Module):
    """EDSR's residual scaling (``x + body(x) * 0.1``, its ``res_scale`` of 1) in the
    spellings a number takes after a conv or linear."""

    def __init__(self, form):
        super().__init__()
        self.form, self.c1, self.c2 = form, nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        r = self.c2(torch.relu(self.c1(x)))
        r = {"mul": lambda: r * 0.1, "rmul": lambda: 0.1 * r, "div": lambda: r / 4, "one": lambda: r.mul(1.0),
             "int": lambda: r * 2}[self.form]()
        return self.fc((x + r).mean((2, 3))) / 0.5


@pytest.mark.parametrize("form", ["mul", "rmul", "div", "one", "int"])
@pytest.mark.parametrize("mode", MODES)
def test_a_number_scaling_a_conv_or_linear_is_folded_into_it(mode, form):
    torch.manual_seed(0)
    model = ScaledResidual(form).eval()
    res = _run(model, torch.randn(2, 8, 6, 6), mode)
    matches = res.passes[0].stats["matches"]
    assert matches.get("conv+scale/number") == 1 and matches.get("linear+scale/number") == 1, matches
    assert matches.get("conv+add") == 1, matches  # the scaled conv then takes the residual add
    assert not {"mul", "div"} & set(_kinds(res.module))
    x = torch.randn(3, 8, 6, 6)
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-5, atol=1e-6)
    off = fxopt.optimize(model, (torch.randn(2, 8, 6, 6),), "fuse{fold_scale=false}", mode=mode)
    assert "conv+scale/number" not in off.passes[0].stats["matches"]


def test_a_zero_factor_is_not_folded():
    """``conv(x) * 0`` is NaN where the conv gives inf; folded weights of zero would give 0."""
    class Zero(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.c(x) * 0.0

    model = Zero().eval()
    res = fxopt.optimize(model, (torch.randn(1, 2, 3, 3),), "fuse")
    assert "conv+scale/number" not in res.passes[0].stats["matches"]
    x = torch.full((1, 2, 3, 3), float("inf"))
    torch.testing.assert_close(res.module(x), model(x), equal_nan=True)


def test_a_scaled_residual_stays_one_int8_chain():
    """The scale folded first, EDSR's blocks quantize as int8 conv + int8 add: one quantize at
    the input (a float multiply between them cost a float-output conv and a quantize per block,
    2.4x torch.ao's time at batch 16)."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return x + self.c2(torch.relu(self.c1(x))) * 0.1

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(), Block(), nn.Conv2d(8, 3, 3, padding=1)).eval()
    calibration = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    res = fxopt.optimize(model, (calibration[0],), "fuse,quantize", calibration=calibration)
    quantizes = [n for n in res.module.graph.nodes if "quantize_per_tensor" in str(n.target)]
    assert len(quantizes) == 1, res.module.graph
    assert res.verification.passed, res.summary()


class IndexedLayerScale(nn.Module):
    """A layer scale stored as a vector and shaped in the forward: ``gamma[:, None, None]``,
    ``gamma.view(1, C, 1, 1)``, on either side of the product."""

    def __init__(self, how):
        super().__init__()
        self.how, self.conv = how, nn.Conv2d(8, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        if self.how == "index":
            return self.gamma[:, None, None] * self.conv(x)
        return self.conv(x) * self.gamma.view(1, -1, 1, 1)


@pytest.mark.parametrize("how", ["index", "view"])
@pytest.mark.parametrize("mode", MODES)
def test_a_layer_scale_shaped_in_the_forward_is_folded(mode, how):
    """Only a stored tensor read as it is folded (docs/fusion.md named ``gamma[:, None, None]``);
    a factor computed from stored tensors alone is evaluated once and folded too."""
    torch.manual_seed(0)
    model = IndexedLayerScale(how).eval()
    res = _run(model, torch.randn(2, 8, 6, 6), mode)
    assert res.passes[0].stats["matches"].get("conv+scale") == 1
    assert "mul" not in _kinds(res.module)
    x = torch.randn(3, 8, 6, 6)
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-5, atol=1e-6)


class InPlaceSwish(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.c(x)
        y.mul_(torch.sigmoid(y))  # y is read after the write: the output
        return y


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_an_in_place_swish_fuses_and_keeps_its_write(mode):
    """The silu pattern matched `mul_` and replaced it by an out-of-place silu nobody read:
    fuse returned the conv alone (1.43 off). The write is made out of place first, so the
    swish fuses into the conv and the output reads it."""
    torch.manual_seed(0)
    m, x = InPlaceSwish().eval(), torch.randn(2, 8, 6, 6)
    res = fxopt.optimize(m, x, "fuse", mode=mode)
    torch.testing.assert_close(res.module(x), m(x), rtol=1e-4, atol=1e-5)
    assert res.passes[0].stats["matches"].get("silu") == 1


class ConvClamp(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.c, self.how = nn.Conv2d(8, 16, 3, padding=1), how

    def forward(self, x):
        y = self.c(x)
        if self.how == "relu6":
            return torch.clamp(y, 0, 6)
        if self.how == "relu":
            return y.clamp(min=0)
        if self.how == "hardswish":
            return y * torch.clamp(y + 3, 0, 6) / 6
        if self.how == "relu-then-cap":
            return y.clamp(min=0).clamp(max=6)
        if self.how == "cap-then-relu":
            return torch.relu(y.clamp(max=6.0))
        if self.how == "relu-read-twice":
            r = torch.relu(y)
            return r.clamp(max=6) + r  # the relu is read outside the pair: not a relu6
        if self.how == "cap-below-zero":
            return torch.relu(y.clamp(max=-1.0))  # zero everywhere: no relu6
        return y.clamp(max=1.0)  # no activation kernel computes it


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("how, fused", [("relu6", True), ("relu", True), ("hardswish", True), ("upper", False),
                                        ("relu-then-cap", True), ("cap-then-relu", True),
                                        ("relu-read-twice", True), ("cap-below-zero", False)])
def test_a_clamp_is_the_activation_it_computes(mode, how, fused):
    """clamp(conv(x), 0, 6) was neither grouped by fuse nor fused into the conv by lower-cpu
    (quantize already took it as relu6); relu6 written as a relu and an upper clamp stayed two
    ops."""
    torch.manual_seed(0)
    model, x = ConvClamp(how).eval(), torch.randn(2, 8, 16, 16) * 4
    res = fxopt.optimize(model, x, "fuse,lower-cpu{min_macs=0}", mode=mode)
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-4, atol=1e-5)
    assert (res.passes[1].stats["lowered"].get("conv+act", 0) == 1) is fused
    relu6 = sum(res.passes[0].stats["matches"].get(k, 0) for k in ("relu-clamp", "clamp-relu"))
    assert relu6 == (how in ("relu-then-cap", "cap-then-relu"))


class TimmStyleAttention(nn.Module):
    """timm's fallback path scales q before the product; some models scale nothing."""

    def __init__(self, how):
        super().__init__()
        self.qkv, self.how, self.scale = nn.Linear(32, 96), how, 8 ** -0.5

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
        if self.how == "scaled-q":
            q = q * self.scale
        return ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("how", ["scaled-q", "unscaled"])
def test_attention_with_q_scaled_first_or_unscaled_becomes_sdpa(mode, how):
    torch.manual_seed(0)
    model, x = TimmStyleAttention(how).eval(), torch.randn(2, 10, 32)
    res = fxopt.optimize(model, x, "fuse", mode=mode)
    assert res.passes[0].stats["matches"].get(f"attention/{how}") == 1
    assert "scaled_dot_product_attention" in res.module.code
    other = torch.randn(3, 10, 32)
    torch.testing.assert_close(res.module(other), model(other), rtol=1e-4, atol=1e-5)


class InPlaceScores(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1)
        if self.how == "div_":
            s /= 8.0
        else:
            s.masked_fill_(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
        return s.softmax(-1) @ v


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("how", ["div_", "masked_fill_"])
def test_attention_with_in_place_scores_becomes_sdpa_in_both_front_ends(mode, how):
    """Export keeps aten.div_ / aten.masked_fill_, which had no op kind: SDPA from a symbolic
    graph only."""
    q, k, v = (torch.randn(2, 2, 5, 4) for _ in range(3))
    res = fxopt.optimize(InPlaceScores(how), (q, k, v), "fuse", mode=mode)
    assert "scaled_dot_product_attention" in res.module.code
    torch.testing.assert_close(res.module(q, k, v), InPlaceScores(how)(q, k, v), rtol=1e-4, atol=1e-5)


class InPlaceActivations(nn.Module):
    """GELU with `erf_`, relu6 with `clamp_max_` then `relu_`."""

    def __init__(self, how):
        super().__init__()
        self.lin, self.how = nn.Linear(16, 32), how

    def forward(self, x):
        h = self.lin(x)
        if self.how == "erf_":
            e = h / math.sqrt(2)
            e.erf_()
            return h * 0.5 * (1 + e)
        return (h * 1.0).clamp_max_(6.0).relu_()


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("how, pattern", [("erf_", "gelu/0"), ("clamp_max_", "clamp-relu")])
def test_activations_written_in_place_fuse_in_both_front_ends(mode, how, pattern):
    """Export keeps aten.erf_ / aten.clamp_max_, which had no op kind: the activation stayed
    spelled out in an exported graph."""
    torch.manual_seed(0)
    model, x = InPlaceActivations(how).eval(), torch.randn(2, 5, 16) * 4
    res = fxopt.optimize(model, x, "fuse", mode=mode)
    assert res.passes[0].stats["matches"].get(pattern) == 1
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-4, atol=1e-5)


class EinsumAttention(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.qkv, self.how = nn.Linear(32, 96), how

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
        if self.how == "letters":
            p = (torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(8)).softmax(-1)
            o = torch.einsum("bhqk,bhkd->bhqd", p, v)
        elif self.how == "ellipsis":
            p = torch.einsum("...qd,...kd->...qk", q * 8 ** -0.5, k).softmax(-1)
            o = torch.einsum("...qk,...kd->...qd", p, v)
        else:  # a product with no softmax near it stays an einsum
            o = torch.einsum("bhqd,bhkd->bhqk", q, k) @ v
        return o.transpose(1, 2).reshape(b, n, c)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("how, pattern", [("letters", "attention"), ("ellipsis", "attention/scaled-q"),
                                          ("no-softmax", None)])
def test_attention_spelled_with_einsum_becomes_sdpa(mode, how, pattern):
    """einsum-spelled attention (`einsum("bhqd,bhkd->bhqk", q, k)`) stayed as written."""
    torch.manual_seed(0)
    model, x = EinsumAttention(how).eval(), torch.randn(2, 10, 32)
    res = fxopt.optimize(model, x, "fuse", mode=mode)
    matches = res.passes[0].stats["matches"]
    assert matches.get("attention/einsum-as-matmul", 0) == (2 if pattern else 0)
    assert ("scaled_dot_product_attention" in res.module.code) is bool(pattern) and matches.get(pattern or "-", 1) == 1
    other = torch.randn(3, 10, 32)  # another batch (export keeps the sequence length)
    torch.testing.assert_close(res.module(other), model(other), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("dim", [1, 2])
def test_a_conv_padding_other_than_zeros_folds_its_batchnorm(mode, padding_mode, dim):
    """The padding comes before the conv, so the fold is exact: the folded conv pads the input
    the same way and convolves it unpadded (the batchnorm was kept before)."""
    conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dim == 1 else (nn.Conv2d, nn.BatchNorm2d)
    torch.manual_seed(0)
    model = nn.Sequential(conv(3, 8, 3, padding=(1 if dim == 1 else (1, 2)), padding_mode=padding_mode), bn(8),
                          nn.ReLU())
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(2, 3, *([10] * dim))
    res = fxopt.optimize(model, (x,), pipeline="fuse", mode=mode)
    gm = res.module
    assert not any((v := fxopt.ir.op_view(gm, n)) is not None and v.kind == "batch_norm" for n in gm.graph.nodes)
    other = torch.randn(3, 3, *([10] * dim))  # export keeps a reflect-padded input's size
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
        torch.testing.assert_close(gm(other), model(other))


class _TwoTermAttention(nn.Module):
    """T5's attention: no scale, a position bias and then a mask added to the scores; the
    patterns took one additive term only, so it stayed as written."""

    def __init__(self, read_scores: bool = False):
        super().__init__()
        self.read_scores = read_scores

    def forward(self, q, k, v, position_bias, mask):
        s = torch.matmul(q, k.transpose(3, 2))
        s = s + position_bias
        s = s + mask
        if self.read_scores:  # the masked scores are an output too: nothing to rewrite
            return s
        return torch.matmul(torch.softmax(s, dim=-1), v)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_two_terms_added_to_the_scores_are_one_sdpa_mask(mode):
    torch.manual_seed(0)
    b, h, n, d = 2, 4, 6, 8
    mask = torch.zeros(b, 1, 1, n)
    mask[0, ..., -2:] = -math.inf
    inputs = (torch.randn(b, h, n, d), torch.randn(b, h, n, d), torch.randn(b, h, n, d), torch.randn(1, h, n, n), mask)
    res = fxopt.optimize(_TwoTermAttention(), inputs, pipeline="fuse", mode=mode)
    assert sum("scaled_dot_product" in str(n.target) for n in res.module.graph.nodes) == 1
    torch.testing.assert_close(res.module(*inputs), _TwoTermAttention()(*inputs), rtol=1e-5, atol=1e-5)
    kept = fxopt.optimize(_TwoTermAttention(read_scores=True), inputs, pipeline="fuse", mode=mode)
    assert "attention/one-mask" not in kept.passes[0].stats["matches"]
    torch.testing.assert_close(kept.module(*inputs), _TwoTermAttention(True)(*inputs), rtol=0, atol=0)


class _CastBeforeSoftmax(nn.Module):
    """Meta's LLaMA: ``softmax(scores.float(), dim=-1).type_as(q)``, scaled by ``/ sqrt(d)`` from
    q's shape, kᵀ as a permute, a position bias and a mask added; T5 before transformers 5:
    unscaled, the terms added in place, ``.type_as(scores)`` (a second reader of the scores)."""

    def __init__(self, t5: bool = False):
        super().__init__()
        self.t5 = t5

    def forward(self, q, k, v, position_bias, mask):
        if self.t5:
            s = torch.matmul(q, k.transpose(3, 2))
            s += position_bias
            s += mask
            return torch.matmul(F.dropout(torch.softmax(s.float(), dim=-1).type_as(s), 0.1, self.training), v)
        s = torch.matmul(q, k.permute(0, 1, 3, 2)) / math.sqrt(q.shape[-1])
        s = s + position_bias
        s = s + mask
        return torch.matmul(torch.softmax(s.float(), dim=-1).type_as(q), v)


@pytest.mark.parametrize("t5", [False, True])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_cast_that_changes_nothing_before_the_softmax_is_attention(mode, t5):
    torch.manual_seed(0)
    b, h, n, d = 2, 4, 6, 8
    mask = torch.zeros(b, 1, 1, n)
    mask[0, ..., -2:] = -math.inf
    inputs = (torch.randn(b, h, n, d), torch.randn(b, h, n, d), torch.randn(b, h, n, d), torch.randn(1, h, n, n), mask)
    model = _CastBeforeSoftmax(t5).eval()
    res = fxopt.optimize(model, inputs, pipeline="fuse", mode=mode)
    assert res.passes[0].stats["matches"]["attention/cast-into-softmax"] == 1
    assert sum("scaled_dot_product" in str(n.target) for n in res.module.graph.nodes) == 1
    assert not any("softmax" in str(n.target) for n in res.module.graph.nodes)
    torch.testing.assert_close(res.module(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)
    # float16 scores: `.float()` makes a float32 softmax, which SDPA does not compute; nor is
    # the mask merged for a softmax that stays
    half = tuple(t.half() for t in inputs)
    kept = fxopt.optimize(model, half, pipeline="fuse", mode=mode)
    assert not set(kept.passes[0].stats["matches"]) - {"remove-noop"}
    assert not any("scaled_dot_product" in str(n.target) for n in kept.module.graph.nodes)


class _FilledWith(nn.Module):
    """Hugging Face's classic ``scores.masked_fill(mask == 0, torch.finfo(dtype).min)``."""

    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, mask):
        s = (q @ k.transpose(-1, -2) / 4.0).masked_fill(mask == 0, self.fill)
        return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_fill_that_swallows_the_score_is_an_additive_sdpa_mask(mode):
    """``finfo.min`` plus any score is ``finfo.min``: an additive mask of it is the same scores,
    so SDPA gives eager's result, also on a row whose every key is masked (uniform weights, no
    NaN). A ``-1e4`` fill replaces scores in a way no mask says and stays."""
    torch.manual_seed(0)
    b, h, n, d = 2, 4, 6, 16
    mask = torch.ones(b, 1, n, n)
    mask[0, ..., -2:] = 0
    mask[1, :, 2, :] = 0  # a fully masked row
    inputs = (torch.randn(b, h, n, d), torch.randn(b, h, n, d), torch.randn(b, h, n, d), mask)
    model = _FilledWith(torch.finfo(torch.float32).min)
    res = fxopt.optimize(model, inputs, pipeline="fuse", mode=mode)
    assert sum("scaled_dot_product" in str(n.target) for n in res.module.graph.nodes) == 1
    assert res.verification.passed
    torch.testing.assert_close(res.module(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)
    kept = fxopt.optimize(_FilledWith(-1e4), inputs, pipeline="fuse", mode=mode)
    assert not any("scaled_dot_product" in str(n.target) for n in kept.module.graph.nodes)


class _PermutedKey(nn.Module):
    def __init__(self, order):
        super().__init__()
        self.order = order

    def forward(self, q, k, v):
        return torch.softmax(q @ k.permute(*self.order) / 4.0, dim=-1) @ v


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("order, k_shape", [((0, 1, 3, 2), (2, 3, 5, 16)),   # kᵀ alone
                                            ((1, 0, 3, 2), (3, 2, 5, 16)),   # heads and batch swapped too
                                            ((0, 2, 3, 1), (2, 5, 3, 16))])  # DETR: (B, N, H, D) in one step
def test_a_key_transposed_by_permute_is_attention(mode, order, k_shape):
    """``k.permute(0, 1, 3, 2)`` is kᵀ (only transpose(-2, -1) was); a permute that moves other
    axes too is kᵀ of k permuted, which SDPA reads as its key."""
    torch.manual_seed(0)
    q, v, k = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16), torch.randn(*k_shape)
    res = fxopt.optimize(_PermutedKey(order), (q, k, v), pipeline="fuse", mode=mode)
    assert sum("scaled_dot_product" in str(n.target) for n in res.module.graph.nodes) == 1
    torch.testing.assert_close(res.module(q, k, v), _PermutedKey(order)(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["conv", "grouped", "conv1d", "padded", "linear", "linear-3d"])
def test_a_batchnorm_before_a_conv_or_linear_folds_where_exact(mode, case):
    """``conv(bn(x))`` is a conv with weights ``W * s`` and bias ``b + Σ W t``; a conv that pads
    would see a zero border where the normalized input has ``t``, so it stays, as does a
    BatchNorm1d over (N, C, L) before a linear over L (another axis)."""
    torch.manual_seed(0)
    model, x = {
        "conv": (nn.Sequential(_warm_bn(nn.BatchNorm2d(8)), nn.Conv2d(8, 16, 3)), torch.randn(2, 8, 10, 10)),
        "grouped": (nn.Sequential(_warm_bn(nn.BatchNorm2d(8)), nn.Conv2d(8, 12, 3, groups=4, stride=2, dilation=2,
                                                                           bias=False)), torch.randn(2, 8, 10, 10)),
        "conv1d": (nn.Sequential(_warm_bn(nn.BatchNorm1d(8)), nn.Conv1d(8, 4, 3)), torch.randn(2, 8, 10)),
        "padded": (nn.Sequential(_warm_bn(nn.BatchNorm2d(8)), nn.Conv2d(8, 16, 3, padding=1)), torch.randn(2, 8, 10, 10)),
        "linear": (nn.Sequential(_warm_bn(nn.BatchNorm1d(8)), nn.Dropout(0.2), nn.Linear(8, 5)), torch.randn(4, 8)),
        "linear-3d": (nn.Sequential(_warm_bn(nn.BatchNorm1d(8)), nn.Linear(6, 5)), torch.randn(4, 8, 6)),
    }[case]
    res = _run(model.eval(), x, mode)
    stays = ("padded", "linear-3d")
    assert ("batch_norm" in _kinds(res.module)) == (case in stays), _kinds(res.module)
    other = torch.randn(3, *x.shape[1:])
    torch.testing.assert_close(res.module(other), model(other), rtol=1e-5, atol=1e-5)


class _ScaledConv(nn.Module):
    """A conv times a factor computed from a stored tensor, in ways a fold must not freeze."""

    def __init__(self, how):
        super().__init__()
        self.how, self.conv = how, nn.Conv2d(4, 4, 1)
        if how == "written-through-a-view":
            self.register_buffer("gamma", torch.rand(4) + 0.5)
        else:  # a parameter: fx's trace would compute an expression of a buffer itself
            self.gamma = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        if self.how == "written-through-a-view":  # the forward sets the factor first
            self.gamma.view(-1).view(4).fill_(2.0)
            return self.conv(x) * self.gamma.view(1, -1, 1, 1)
        if self.how == "dropout":  # a new draw on every call
            return self.conv(x) * F.dropout(self.gamma, 0.5, training=True).view(1, -1, 1, 1)
        return self.conv(x) * (self.gamma * 0).reciprocal().view(1, -1, 1, 1)  # infinite


@pytest.mark.parametrize("how", ["written-through-a-view", "dropout", "infinite"])
def test_a_factor_that_is_no_fixed_finite_value_is_not_folded(how):
    """A buffer written through a view of it was folded at its value before the write (every
    call off); a dropout of it was evaluated once (one draw for ever); an infinite factor times
    a weight row of mixed signs made NaN where eager has ±inf."""
    torch.manual_seed(0)
    model, x = _ScaledConv(how).eval(), torch.randn(2, 4, 3, 3)
    modes = ["export"] if how == "written-through-a-view" else list(MODES)  # symbolic refuses the write
    for mode in modes:
        # a random model's symbolic capture may fail its check against eager: trace it as it is
        captured = torch.fx.symbolic_trace(model) if mode == "symbolic" else model
        res = fxopt.optimize(captured, (x,), pipeline="fuse", mode=mode, verify=False)
        assert "conv+scale" not in res.passes[0].stats["matches"], (mode, res.passes[0].stats["matches"])
        if how != "dropout":
            torch.testing.assert_close(res.module(x), model(x))


@pytest.mark.parametrize("mode", MODES)
def test_folds_leave_an_unbatched_conv_alone(mode):
    """An unbatched conv has its channels on axis 0: a BatchNorm1d over the length (or a factor
    over it) of the same size as the channels was folded as if per channel."""
    torch.manual_seed(0)
    before = nn.Sequential(_warm_bn(nn.BatchNorm1d(4)), nn.Conv1d(4, 4, 1)).eval()
    after = nn.Sequential(nn.Conv1d(4, 4, 1), _warm_bn(nn.BatchNorm1d(4))).eval()
    x = torch.randn(4, 4)  # (channels, length), no batch
    for model in (before, after):
        res = fxopt.optimize(model, (x,), pipeline="fuse", mode=mode)
        assert "batch_norm" in _kinds(res.module)
        torch.testing.assert_close(res.module(x), model(x))


class _KeyMask(nn.Module):
    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, mask):
        return ((q @ k.transpose(-2, -1) * 0.5).masked_fill(mask, self.fill)).softmax(-1) @ v


@pytest.mark.parametrize("fill", [-math.inf, torch.finfo(torch.float32).min])
@pytest.mark.parametrize("mode", MODES)
def test_a_one_dimensional_key_mask_reaches_sdpa_as_two(mode, fill):
    """A (keys,) or 0-D mask broadcasts in eager; SDPA refuses one of fewer than 2 dims (an
    IndexError at run time)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    for mask in (torch.tensor([False, False, True, False, True]), torch.tensor(False)):
        res = fxopt.optimize(_KeyMask(fill), (q, k, v, mask), pipeline="fuse", mode=mode)
        assert sum("scaled_dot_product" in str(n.target) for n in res.module.graph.nodes) == 1
        torch.testing.assert_close(res.module(q, k, v, mask), _KeyMask(fill)(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_a_fill_that_does_not_swallow_huge_scores_stays():
    """-1e30 plus a score of 1e23 is not -1e30 in float32: only fills of finfo.min's order are
    additive masks."""
    q, k, v = torch.full((1, 1, 3, 4), 1e11), torch.full((1, 1, 3, 4), 1e11), torch.randn(1, 1, 3, 4)
    mask = torch.ones(3, 3, dtype=torch.bool)
    res = fxopt.optimize(_KeyMask(-1e30), (q, k, v, mask), pipeline="fuse")
    assert not any("scaled_dot_product" in str(n.target) for n in res.module.graph.nodes)


class _TensorScaled(nn.Module):
    """A scale written as a tensor: ``* torch.rsqrt(torch.tensor(d))`` (export keeps the literal
    as a stored constant), or a stored one-element temperature."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.temperature = nn.Parameter(torch.tensor(0.3))

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1)
        if self.how == "rsqrt":
            s = s * torch.rsqrt(torch.tensor(q.size(-1), dtype=torch.float32))
        else:
            s = s / self.temperature
        return s.softmax(-1) @ v


@pytest.mark.parametrize("how", ["rsqrt", "temperature"])
def test_a_scale_of_stored_values_is_evaluated_into_sdpa(how):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 16) for _ in range(3))
    model = _TensorScaled(how).eval()
    res = fxopt.optimize(model, (q, k, v), pipeline="fuse", mode="export")
    assert res.passes[0].stats["matches"].get("attention/stored-scale") == 1
    other = tuple(torch.randn(3, 3, 5, 16) for _ in range(3))
    torch.testing.assert_close(res.module(*other), model(*other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_learned_temperature_keeps_training_after_sdpa(mode):
    """Fuse tester: a learned temperature was evaluated into SDPA's float scale= and left the
    module's parameters, so fine-tuning after `fuse` no longer trained it (eager's grad -5.4).
    Applied to q, it stays a parameter and gets eager's gradient."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 16) for _ in range(3))
    model = _TensorScaled("temperature").eval()
    gm = fxopt.optimize(model, (q, k, v), pipeline="fuse", mode=mode).module
    assert any("scaled_dot_product" in str(n.target) for n in gm.graph.nodes)
    assert "temperature" in dict(gm.named_parameters())
    gm(q, k, v).square().sum().backward()
    model(q, k, v).square().sum().backward()
    # a sum of ~200 products in another order: 2.4e-6 relative on an AMD EPYC
    torch.testing.assert_close(dict(gm.named_parameters())["temperature"].grad, model.temperature.grad,
                               rtol=1e-5, atol=1e-5)


class _ComputedBias(nn.Module):
    """A conv and a linear whose bias the forward computes (``b.to(x.device)``, ``b * 1.0``)."""

    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3), nn.Parameter(torch.randn(8))
        self.lw = nn.Parameter(torch.randn(4, 8) * 0.3)
        self.bn, self.bn1d = _warm_bn(nn.BatchNorm2d(8)), _warm_bn(nn.BatchNorm1d(4))

    def forward(self, x):
        h = self.bn(F.conv2d(x, self.w, self.b.to(x.device)))
        return self.bn1d(F.linear(h.mean((2, 3)), self.lw, self.b[:4] * 1.0))


@pytest.mark.parametrize("mode", MODES)
def test_a_batchnorm_after_a_layer_with_a_computed_bias_is_not_folded(mode):
    """The folds read the layer's stored bias: a computed one was taken for none and dropped
    (2.9 off on the conv, 1.0 on the linear)."""
    torch.manual_seed(0)
    model = _ComputedBias().eval()
    res = _run(model, torch.randn(2, 3, 8, 8), mode)
    assert not {"conv+bn", "linear+bn"} & set(res.passes[0].stats["matches"])


class _BaddbmmScores(nn.Module):
    """Bloom's spelling: an ALiBi bias added to q @ kᵀ inside one ``baddbmm``."""

    def __init__(self, beta, alpha):
        super().__init__()
        self.beta, self.alpha = beta, alpha

    def forward(self, q, k, v, bias):
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), beta=self.beta, alpha=self.alpha)
        return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("beta, alpha", [(1.0, 0.25), (2.0, 1.0), (0.0, 0.25)])
def test_baddbmm_scores_become_sdpa(mode, beta, alpha):
    """``baddbmm(bias, q, kᵀ, beta, alpha)`` is SDPA with scale α and mask β·bias; with β = 0
    baddbmm ignores the bias, NaN included, and so does the result."""
    torch.manual_seed(0)
    q, k, v, bias = torch.randn(6, 5, 16), torch.randn(6, 5, 16), torch.randn(6, 5, 16), torch.randn(6, 5, 5)
    if beta == 0:
        bias[0, 0, 0] = math.nan
    model = _BaddbmmScores(beta, alpha)
    res = fxopt.optimize(model, (q, k, v, bias), pipeline="fuse", mode=mode)
    assert "baddbmm" not in _kinds(res.module) and "scaled_dot_product_attention" in str(res.module.code)
    assert res.passes[0].stats["matches"]["attention/baddbmm-as-matmul"] == 1, res.passes[0].stats
    other = (torch.randn(3, 5, 16), torch.randn(3, 5, 16), torch.randn(3, 5, 16), torch.randn(3, 5, 5))
    torch.testing.assert_close(res.module(*other), model(*other), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.module(q, k, v, bias), model(q, k, v, bias), rtol=1e-5, atol=1e-5)


class _MaskBeforeScale(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, q, k, v, m):
        s = q @ k.transpose(-2, -1)
        if self.how == "add":
            s = (s + m) / 8.0
        elif self.how == "mul":
            s = 0.125 * (m + s)
        elif self.how == "shape":
            s = (s + m) / math.sqrt(q.size(-1))
        elif self.how == "fill":
            s = s.masked_fill(m < -1, float("-inf")) * 0.125
        elif self.how == "negative":  # −inf times −0.125 is +inf: the fill cannot move past it
            s = s.masked_fill(m < -1, float("-inf")) * -0.125
        elif self.how == "finfo":  # finfo.min / 8 no longer swallows every score
            s = s.masked_fill(m < -1, torch.finfo(torch.float32).min) / 8.0
        elif self.how == "finfo-up":  # finfo.min * 4 is -inf in float32 (a Python float would not fit it)
            s = s.masked_fill(m < -1, torch.finfo(torch.float32).min) * 4.0
        elif self.how == "sub":  # a penalty subtracted (ALiBi-like, distances): the mask -m
            s = (s - m) / 8.0
        elif self.how == "sub-after":
            s = s / 8.0 - m
        elif self.how == "sub-from":  # m - s: the scores negated, no mask
            s = (m - s) / 8.0
        return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how, fused", [("add", True), ("mul", True), ("shape", True), ("fill", True),
                                        ("negative", False), ("finfo", False), ("finfo-up", True),
                                        ("sub", True), ("sub-after", True), ("sub-from", False)])
def test_a_mask_applied_before_the_scale_becomes_sdpa(mode, how, fused):
    """``(q @ kᵀ + m) / c`` is ``q @ kᵀ / c + m / c``, and a −inf fill moves past a positive
    scale unchanged: both are SDPA. A negative scale or a finite fill the scale shrinks stay.
    A subtracted penalty is the mask ``-m`` (it stayed spelled out: 1.46x slower at batch 16)."""
    torch.manual_seed(0)
    inputs = (torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16), torch.randn(2, 1, 5, 5))
    model = _MaskBeforeScale(how)
    res = fxopt.optimize(model, inputs, pipeline="fuse", mode=mode)
    assert ("scaled_dot_product_attention" in str(res.module.code)) == fused, res.module.code
    matches = res.passes[0].stats.get("matches", {})
    assert matches.get("attention/subtracted-mask", 0) == (how in ("sub", "sub-after")), matches
    # +inf scores (the negative scale) are NaN in eager and must stay NaN
    torch.testing.assert_close(res.module(*inputs), model(*inputs), rtol=1e-5, atol=1e-5, equal_nan=True)


class _AliasedAttention(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, q, k, v):
        if self.how == "mT":
            return torch.softmax(q @ k.mT / 4.0, dim=-1) @ v
        if self.how == "divide":
            return torch.softmax(torch.divide(q @ k.transpose(-2, -1), 4.0), dim=-1) @ v
        return torch.special.softmax(torch.multiply(q @ k.transpose(-2, -1), 0.25), -1) @ v


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["mT", "divide", "special"])
def test_attention_spelled_with_aliases_becomes_sdpa(mode, how):
    """``k.mT``, ``torch.divide``, ``torch.multiply`` and ``torch.special.softmax`` are the ops
    they alias: the attention patterns find them."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16)
    res = fxopt.optimize(_AliasedAttention(how), (q, k, v), pipeline="fuse", mode=mode)
    assert "scaled_dot_product_attention" in str(res.module.code), res.module.code
    torch.testing.assert_close(res.module(q, k, v), _AliasedAttention(how)(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("eps", [0.0, 1e-50])
def test_a_batchnorm_dividing_by_zero_is_not_folded(mode, eps):
    """eps=0 and a zero running_var: eager gives -inf in that channel; folded, the infinite
    weights of mixed sign summed to NaN. Such a batchnorm stays, and says why. eps=1e-50 is
    0 in float32, where the batchnorm adds it (a float64 check folded it to 1e25)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16, eps=eps)).eval()
    model[1].running_var[1] = 0.0
    model[1].running_mean.fill_(0.5)
    x = torch.randn(4, 16)
    res = fxopt.optimize(model, (x,), pipeline="fuse", mode=mode)
    assert "batch_norm" in _kinds(res.module)
    torch.testing.assert_close(res.module(x), model(x))
    bn = next(n.name for n in res.module.graph.nodes if fxopt.ir.op_view(res.module, n) is not None
              and fxopt.ir.op_view(res.module, n).kind == "batch_norm")
    why = fxopt.optimize(model, (x,), pipeline=f"fuse{{debug={bn}}}", mode=mode).passes[0].stats["why_not"]
    assert "running_var + eps is not positive" in why["linear+bn"], why


class _ChompedConv(nn.Module):
    """A TCN block: a padded causal conv, its right padding cut off (the "chomp"), then BN."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv = nn.Conv1d(4, 16, 3, padding=2)
        self.bn = _warm_bn(nn.BatchNorm1d(8 if how == "channels" else 16))

    def forward(self, x):
        y = self.conv(x)
        y = {"shape": lambda: y[..., : x.shape[-1]], "const": lambda: y[:, :, :-2], "narrow": lambda: y.narrow(2, 0, 20),
             "batch": lambda: y[1:], "channels": lambda: y[:, :8]}[self.how]()
        return F.relu(self.bn(y))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["shape", "const", "narrow", "batch", "channels"])
def test_a_batchnorm_after_a_slice_of_a_conv_folds_into_the_conv(mode, how):
    """An eval batchnorm is a per-channel affine: before or after a slice of other axes it gives
    the same values, so it moves before the slice and folds (a TCN's chomp kept its BN). A
    slice of the channels stays as written."""
    torch.manual_seed(0)
    model, x = _ChompedConv(how).eval(), torch.randn(3, 4, 20)
    res = _run(model, x, mode)
    assert ("batch_norm" in _kinds(res.module)) == (how == "channels"), _kinds(res.module)
    other = torch.randn(5, 4, 20)
    torch.testing.assert_close(res.module(other), model(other), rtol=1e-5, atol=1e-5)


class _CatThenBN(nn.Module):
    """Branches concatenated along the channels, then one batchnorm: a CSP block's
    ``act(bn(cat(y1, y2)))`` and its variants. `how` picks the branches."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.b = nn.Conv2d(4, 24, 1)
        self.c = nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=2)
        self.d = nn.ConvTranspose2d(4, 8, 3, padding=1)
        self.e = nn.Conv2d(4, 8, 1)
        width = {"two": 32, "five": 56, "sliced": 32, "identity": 12, "reused": 32, "spatial": 8, "twice": 16}[how]
        self.bn = _warm_bn(nn.BatchNorm2d(width))

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        pieces = {"two": lambda: [a, b], "five": lambda: [a, b, self.c(x), self.d(x), self.e(x)],
                  "sliced": lambda: [a, b[:, :, :, :]], "identity": lambda: [x, a], "reused": lambda: [a, b],
                  "spatial": lambda: [a, a.flip(2)], "twice": lambda: [a, a]}[self.how]()
        y = F.leaky_relu(self.bn(torch.cat(pieces, 2 if self.how == "spatial" else 1)), 0.1)
        return y + b.mean() if self.how == "reused" else y


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["two", "five", "sliced", "identity", "reused", "spatial", "twice"])
def test_a_batchnorm_after_a_channel_cat_of_convs_folds_into_each_conv(mode, how):
    """``bn(cat(conv_a(x), conv_b(x)))``: each conv takes its slice of the batchnorm (a CSP
    block kept its merge batchnorm). A piece that is no conv, a conv read elsewhere too, a
    concatenation along another axis or of one value twice keeps the batchnorm."""
    torch.manual_seed(0)
    model, x = _CatThenBN(how).eval(), torch.randn(2, 4, 9, 9)
    res = _run(model, x, mode)
    assert ("batch_norm" in _kinds(res.module)) == (how not in ("two", "five", "sliced")), _kinds(res.module)
    other = torch.randn(3, 4, 9, 9)
    torch.testing.assert_close(res.module(other), model(other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_a_cat_batchnorm_block_called_twice_folds_once(mode):
    """One block called at two places: both calls read the same folded weights (the per-piece
    statistics are shared stored tensors), so the parameter count does not grow."""
    torch.manual_seed(0)
    block = _CatThenBN("two").eval()
    model = nn.Sequential(block, nn.Conv2d(32, 4, 1), block).eval()
    x = torch.randn(2, 4, 9, 9)
    res = _run(model, x, mode)
    assert "batch_norm" not in _kinds(res.module), _kinds(res.module)
    assert sum(p.numel() for p in res.module.parameters()) <= sum(p.numel() for p in model.parameters())


class _SwappedLinear(nn.Module):
    """A linear over (N, L, C), its features moved to axis 1 for a batchnorm."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.fc = nn.Linear(16, 32)
        self.bn = _warm_bn({"4d": nn.BatchNorm2d(32), "other": nn.BatchNorm1d(7)}.get(how, nn.BatchNorm1d(32)))

    def forward(self, x):
        y = self.fc(x)
        y = {"transpose": lambda: y.transpose(1, 2), "negative": lambda: y.transpose(-1, -2),
             "permute": lambda: y.permute(0, 2, 1), "4d": lambda: y.permute(0, 3, 1, 2),
             "other": lambda: y.transpose(0, 2)}[self.how]()
        return F.relu(self.bn(y))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["transpose", "negative", "permute", "4d", "other"])
def test_a_batchnorm_after_a_linears_features_are_swapped_to_axis_1_folds(mode, how):
    """``bn(linear(x).transpose(1, 2))`` normalizes the linear's features: it folds into the
    linear's rows (it stayed). A swap that puts another axis on axis 1 keeps its batchnorm."""
    torch.manual_seed(0)
    model = _SwappedLinear(how).eval()
    x = torch.randn(3, 5, 6, 16) if how == "4d" else torch.randn(3, 7, 16)
    res = _run(model, x, mode)
    assert ("batch_norm" in _kinds(res.module)) == (how == "other"), _kinds(res.module)
    other = torch.randn(5, *x.shape[1:])
    torch.testing.assert_close(res.module(other), model(other), rtol=1e-5, atol=1e-5)


class _SpelledMish(nn.Module):
    def __init__(self, beta):
        super().__init__()
        self.fc, self.beta = nn.Linear(16, 16), beta

    def forward(self, x):
        y = self.fc(x)
        return y * torch.tanh(F.softplus(y, beta=self.beta))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_a_spelled_out_mish_is_one_mish(mode, beta):
    """``x * tanh(softplus(x))`` is F.mish (3 ops as written); a softplus with another β is not."""
    torch.manual_seed(0)
    model, x = _SpelledMish(beta).eval(), torch.randn(4, 16) * 10
    res = _run(model, x, mode)
    assert ("mish" in _kinds(res.module)) == (beta == 1.0), _kinds(res.module)


class _ZeroShapeScale(nn.Module):
    def forward(self, q, k, v, m):
        return torch.softmax((q @ k.mT + m) / (q.size(-1) - 8), -1) @ v


def test_a_scale_computed_from_sizes_that_is_zero_stays_spelled_out():
    """``/ (d - 8)`` with d = 8: the SDPA form's ``1 / n`` raised ZeroDivisionError inside the
    pass (PassError on a model eager runs); it declines now."""
    inputs = (torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 1, 5, 5))
    res = fxopt.optimize(_ZeroShapeScale(), inputs, pipeline="fuse", mode="symbolic")
    assert "scaled_dot_product_attention" not in str(res.module.code)
    torch.testing.assert_close(res.module(*inputs), _ZeroShapeScale()(*inputs), equal_nan=True)


class _NotAttentionScores(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, q, k, v, m):
        qk = q @ k.transpose(-2, -1)
        s = 2.0 / qk if self.how == "reciprocal" else qk / 2.0
        return torch.softmax((s + m) / 3.0, dim=-1) @ v


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["reciprocal", "scaled-twice"])
def test_a_mask_before_a_scale_is_moved_only_where_attention_follows(mode, how):
    """``2 / (q @ kᵀ)`` passed for scaled scores, and scores scaled before the mask and after
    it got the mask moved for no SDPA: ops added, nothing fused."""
    torch.manual_seed(0)
    inputs = (torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 1, 5, 5))
    model = _NotAttentionScores(how)
    res = fxopt.optimize(model, inputs, pipeline="fuse", mode=mode)
    assert not any(name.startswith("attention") for name in res.passes[0].stats["matches"]), res.passes[0].stats
    torch.testing.assert_close(res.module(*inputs), model(*inputs))


class _LayerScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.gamma = nn.Linear(64, 8), nn.Parameter(torch.full((8,), 1e4))
        with torch.no_grad():
            self.fc.weight.fill_(100.0)

    def forward(self, x):
        return self.gamma * self.fc(x)


def _two_linears():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    with torch.no_grad():
        for lin in model:
            lin.weight.fill_(300.0)
            lin.bias.zero_()
    return model


def _tiny_bn():
    conv, bn = nn.Conv2d(64, 8, 1, bias=False), nn.BatchNorm2d(8)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        bn.weight.fill_(1e-6)
        bn.running_var.fill_(1e4)
    return nn.Sequential(conv, bn, nn.Flatten())


@pytest.mark.parametrize("build, scale, shape", [(_two_linears, 2e-5, (4, 64)), (_LayerScale, 1e-4, (4, 64)),
                                                 (_tiny_bn, 1e3, (1, 64, 2, 2))])
def test_a_fold_float16_cannot_hold_is_declined(build, scale, shape):
    """W2 @ W1 of two float16 linears of 300s is 5.8e6 (inf in float16) where W2 (W1 x) stays
    finite: the merged layer gave inf everywhere. Same for a layer scale of 1e4 times weights of
    100; a batchnorm scale of 1e-6 / 100 flushed the folded weights to 0 (eager: 4e-5). A fold
    whose result the layer's dtype cannot hold to one rounding is declined."""
    torch.manual_seed(0)
    model, x = build().eval().half(), (torch.rand(*shape) * scale).half()
    res = fxopt.optimize(model, (x,), "fuse", mode="symbolic")
    assert res.verification.passed, res.summary()
    out, ref = res.module(x), model(x)
    assert torch.isfinite(ref).all() and torch.equal(out, ref)
    fp32 = fxopt.optimize(build().eval(), (x.float(),), "fuse", mode="symbolic").module
    assert any(n.op == "get_attr" and ("merged" in n.target or "folded" in n.target) for n in fp32.graph.nodes), \
        "in float32 the same fold is taken"


@pytest.mark.parametrize("act, label", [(lambda y: F.leaky_relu_(y, 0.2), "conv+leaky_relu"),
                                        (lambda y: F.hardtanh_(y, 0.0, 6.0), "conv+hardtanh"),
                                        (lambda y: F.elu_(y), None)])
def test_in_place_functional_activations_after_a_conv_fuse_like_their_twins(act, label):
    """``F.leaky_relu_(conv(x))`` stayed a separate in-place op where ``F.leaky_relu`` fused:
    torch.nn.functional's in-place functions have their out-of-place twin there, not in torch."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return act(self.conv(x))

    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    res = fxopt.optimize(model, (x,), "fuse", mode="symbolic")
    assert res.verification.passed
    assert not any(str(getattr(n.target, "__name__", n.target)).endswith("_") for n in res.module.graph.nodes
                   if n.op == "call_function"), "the write is made out of place"
    fused = {annotations(n).get("fused") for n in res.module.graph.nodes if annotations(n).get("fused")}
    assert fused == ({label} if label else set())
    torch.testing.assert_close(res.module(x), model(x))


def test_a_setitem_spelled_as_a_method_call_is_kept():
    """A symbolic trace records ``y.__setitem__(idx, v)`` as a call_method, which fx's
    is_impure does not know: DCE (every pipeline) dropped the write (0.6 off), and prune's
    preparation dropped one into a captured constant."""
    class Writes(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            y.__setitem__((slice(None), 0), 0.0)
            return y

    model, x = Writes().eval(), torch.randn(2, 3, 8, 8)
    for pipeline in ("dce", "fuse", "prune{ratio=0.01}"):
        res = fxopt.optimize(model, (x,), pipeline, mode="symbolic")
        assert any(n.target == "__setitem__" for n in res.module.graph.nodes), pipeline
        torch.testing.assert_close(res.module(x), model(x))


def _stats(bn):
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("build", [
    lambda: nn.Sequential(nn.Conv2d(3, 8, 3), _stats(nn.SyncBatchNorm(8)), nn.ReLU()),  # a DDP checkpoint's
    lambda: nn.Sequential(_stats(nn.BatchNorm2d(3)), nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")),
    lambda: nn.Sequential(_stats(nn.BatchNorm2d(3)), nn.Conv2d(3, 8, 3, padding=1, padding_mode="circular")),
    lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.FeatureAlphaDropout(0.2), nn.ReLU()),
    lambda: nn.Sequential(_stats(nn.BatchNorm2d(3)), nn.ReflectionPad2d(2), nn.Conv2d(3, 8, 3)),  # CycleGAN's
    lambda: nn.Sequential(_stats(nn.BatchNorm2d(3)), nn.ReplicationPad2d((1, 0, 2, 1)), nn.Conv2d(3, 8, 3)),
])
def test_more_batchnorms_fold_and_eval_dropouts_go(mode, build):
    """An eval SyncBatchNorm folds like a BatchNorm; a batchnorm before a conv that pads with
    copies of its input (reflect, circular; an nn.ReflectionPad2d module between them too)
    folds exactly (the copies are normalized values); an eval FeatureAlphaDropout is an identity."""
    torch.manual_seed(0)
    model, x = build().eval(), torch.randn(2, 3, 10, 10)
    res = fxopt.optimize(model, (x,), "fuse", mode=mode)
    assert res.verification.passed
    views = [fxopt.ir.op_view(res.module, n) for n in res.module.graph.nodes]
    kinds = {v.kind for v in views if v is not None}
    assert not kinds & {"batch_norm", "dropout"}, kinds
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-5, atol=1e-5)


class _ConvPlus(nn.Module):
    """A conv without bias and a stored value added after it (`how` says which)."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 3, bias=how == "with bias")
        self.b = nn.Parameter(torch.randn(8))
        self.register_buffer("c", torch.tensor(0.5))
        self.register_buffer("full", torch.randn(1, 8, 8, 8))

    def forward(self, x):
        y = self.conv(x)
        if self.how in ("per channel", "with bias"):
            y = y + self.b.view(1, -1, 1, 1)
        elif self.how == "number":
            y = self.c + y
        elif self.how == "alpha":
            y = torch.add(y, self.b.view(1, -1, 1, 1), alpha=2)
        else:  # a value per position: no bias
            y = y + self.full
        return torch.relu(y)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("how, folds", [("per channel", True), ("with bias", True), ("number", True),
                                        ("alpha", False), ("per position", False)])
def test_a_stored_value_added_after_a_conv_joins_its_bias(mode, how, folds):
    """``conv(x) + b.view(1, -1, 1, 1)`` stayed an add outside the conv's kernel (done for
    linears already); a per-position value is no bias."""
    torch.manual_seed(0)
    model, x = _ConvPlus(how).eval(), torch.randn(2, 3, 10, 10)
    res = fxopt.optimize(model, (x,), "fuse", mode=mode)
    assert res.verification.passed
    views = [fxopt.ir.op_view(res.module, n) for n in res.module.graph.nodes]
    assert ("add" not in {v.kind for v in views if v is not None}) == folds
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layer, x", [(nn.Conv2d(8, 8, 3), torch.randn(2, 8, 10, 10)), (nn.Linear(8, 8), torch.randn(4, 8))])
def test_a_batchnorm_of_inputs_far_from_zero_is_not_folded_into_the_next_layer(mode, layer, x):
    """Fuse tester: bn(x) then a conv, on inputs around 1e6 at unit variance (raw features):
    the folded conv sums terms of 1e6 that cancel in float32, 0.2 of the output off where eager
    (which subtracts the mean first) is 3e-3 off. Inputs near zero still fold."""
    torch.manual_seed(0)
    for mean, folded in ((1e6, False), (2.0, True)):
        bn = nn.BatchNorm2d(8) if isinstance(layer, nn.Conv2d) else nn.BatchNorm1d(8)
        bn.running_mean.fill_(mean), bn.running_var.fill_(1.0)
        model = nn.Sequential(bn, layer).eval()
        xm = x + mean
        res = _run(model, xm, mode)
        assert ("batch_norm" not in _kinds(res.module)) == folded
        with torch.no_grad():
            truth = model.double()(xm.double())
            model.float()
            error = (res.module(xm).double() - truth).abs().max() / truth.abs().max()
            eager = (model(xm).double() - truth).abs().max() / truth.abs().max()
        assert error <= 2 * eager + 1e-6, (error, eager)


def test_fuse_after_lower_cpu_says_to_run_it_first():
    """API tester: `lower-cpu,fuse` left every batchnorm and relu unfused, silently."""
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64)).eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(fxopt.PassWarning, match="fuse: the graph holds kernels lower-cpu wrote .* run fuse before"):
        res = fxopt.optimize(model, (x,), "lower-cpu,fuse")
    assert res.verification.passed
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxopt.PassWarning)
        fxopt.optimize(model, (x,), "fuse,lower-cpu")
