"""Options, bad input, pipeline text, pinned reporting and distillation on the digits example."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.errors import PassError, PipelineError
from fxopt.measure import count_parameters
from fxopt.patterns import annotations
from fxopt.passes.prune.prune_pass import Prune, analyze


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.b(F.relu(self.a(x))))
        return self.fc(y.mean((2, 3)))


X = torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_out_of_range(ratio):
    with pytest.raises(ValueError, match="ratio"):
        Prune(ratio=ratio)
    with pytest.raises(PipelineError, match="ratio"):
        fxopt.optimize(Small(), (X,), f"prune{{ratio={ratio}}}")


def test_unknown_importance_and_round_to():
    with pytest.raises(PipelineError, match="importance"):
        fxopt.optimize(Small(), (X,), "prune{importance=magic}")
    with pytest.raises(ValueError, match="importance"):
        Prune(importance="magic")
    with pytest.raises(ValueError, match="round_to"):
        Prune(round_to=0)
    with pytest.raises(ValueError, match="adapter_cost"):
        Prune(adapter_cost=-1)


def test_everything_ignored():
    with pytest.raises(PassError, match="ignore.*every prunable layer is ignored"):
        fxopt.optimize(Small(), (X,), [Prune(ignore=("*",))])


def test_ignore_pattern_that_matches_nothing():
    with pytest.raises(PassError, match="pattern 'nope' matches no layer"):
        fxopt.optimize(Small(), (X,), [Prune(ignore=("nope",))])


def test_option_types_a_string_cannot_slip_through():
    """"false" is a true value in Python: refused, not read as exact_norms=True; one ignore
    pattern given as a string is one pattern, not its characters; unknown options name analyze."""
    with pytest.raises(ValueError, match="option 'exact_norms' must be True or False, got 'false'"):
        Prune(exact_norms="false")
    assert Prune(ignore="fc").ignore == ("fc",)
    assert "fc" not in analyze(Small(), (X,), ignore="fc").kept_channels()
    with pytest.raises(TypeError, match="analyze\\(\\): unknown option\\(s\\) bogus; the options are ratio"):
        analyze(Small(), (X,), bogus=1)


class TokenMixing(nn.Module):
    """A conv along the channel axis (token mixing): a's channels are t's length axis."""

    def __init__(self):
        super().__init__()
        self.a, self.t = nn.Conv1d(4, 16, 3, padding=1), nn.Conv1d(10, 10, 3, padding=1)
        self.b, self.fc = nn.Conv1d(16, 8, 1), nn.Linear(8, 3)

    def forward(self, x):
        y = F.relu(self.a(x))
        y = self.t(y.transpose(1, 2)).transpose(1, 2)
        return self.fc(self.b(F.relu(y)).mean(2))


class NoAffineBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16, affine=False)
        self.b, self.fc = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(F.relu(self.b(self.bn(self.a(x)))).mean((2, 3)))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("build, x, reason", [
    (TokenMixing, torch.randn(2, 4, 10), "conv over a value whose channels are not on axis 1"),
    (NoAffineBN, torch.randn(2, 3, 8, 8), "batch_norm without an affine weight"),
])
def test_ops_that_would_be_pruned_wrongly_are_pinned(build, x, reason, mode):
    """Pruning a's channels through these would be wrong (a shorter length axis for the mixing
    conv; -mean/std left in a removed channel after an affine-free batchnorm): pinned, named."""
    torch.manual_seed(0)
    model = build().eval()
    if isinstance(model, NoAffineBN):
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    res = fxopt.optimize(model, (x,), "prune{ratio=0.5}", mode=mode)
    assert any(reason in why for why in res.passes[0].stats["pinned"].values()), res.passes[0].stats["pinned"]
    assert res.module(x).shape == model(x).shape
    assert count_parameters(res.module) < count_parameters(model)


def test_taylor_without_calibration():
    # names the user's argument, not the pass context's attribute
    with pytest.raises(PassError, match=r"needs calibration batches .*fxopt\.optimize\(\.\.\., calibration=batches\)"):
        fxopt.optimize(Small(), (X,), [Prune(importance="taylor")])


def test_pipeline_text_round_trip_and_stats():
    res = fxopt.optimize(Small(), (X,), "prune{ratio=0.5,scope=local,ignore=[fc],adapter_cost=0}", verify=False)
    assert res.pipeline == "prune{ignore=[fc],adapter_cost=0.0}"  # defaults are not printed
    stats = res.passes[0].stats
    assert stats["removed_channels"] == 8 and stats["ignored"] == ["fc"]
    assert res.module.get_submodule("a").out_channels == 4
    assert res.module.get_submodule("fc").out_features == 4
    # global scope spends the same budget where MACs are cheapest to save (every slot keeps >= 1)
    res = fxopt.optimize(Small(), (X,), "prune{scope=global,adapter_cost=0}", verify=False)
    assert res.passes[0].stats["removed_channels"] >= 7


def test_ratio_zero_is_a_no_op():
    res = fxopt.optimize(Small(), (X,), [Prune(ratio=0.0)])
    assert not res.passes[0].modified and res.verification.passed


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        return self.b(torch.sigmoid(y) + torch.cumsum(y, 1))  # dirty, and a scan along the channels: pinned, never wrong


def test_unreasoned_nodes_are_pinned_and_named():
    from fxopt.passes.prune.apply import zero_removed

    x = torch.randn(2, 3, 8, 8)
    plan = analyze(Odd(), (x,), ratio=0.5, adapter_cost=0)
    pinned = plan.stats()["pinned"]
    assert "cumsum" in pinned and "sigmoid" in pinned
    # pinned readers get the removed channels back as zeros, so the result stays exact
    assert {v for _, v in plan.boundary.cut_edges} == {"pin:cumsum", "pin:sigmoid"}
    zero_removed(plan.gm, plan.channel_graph, plan.dead)
    masked = plan.gm(x)
    pruned = plan.apply()
    torch.testing.assert_close(pruned(x), masked, rtol=1e-4, atol=1e-5)
    assert pruned.get_submodule("a").out_channels == 4 and pruned.get_submodule("b").in_channels == 8


def test_a_plan_applies_again_with_another_mask_and_keeps_its_graph():
    import numpy as np

    torch.manual_seed(0)
    plan = analyze(Small(), (X,), ratio=0.5)
    before = {n: t.clone() for n, t in plan.gm.state_dict().items()}
    first = plan.apply()
    assert first is not plan.gm
    assert {n: tuple(t.shape) for n, t in plan.gm.state_dict().items()} == {n: tuple(t.shape) for n, t in before.items()}
    assert all(torch.equal(plan.gm.state_dict()[n], t) for n, t in before.items())
    # another mask from the same plan: one fewer dead channel in layer a, alive everywhere else
    dead = plan.dead.copy()
    a_classes = np.unique(plan.channel_graph.positions(
        [s.id for s in plan.channel_graph.slots if s.node == "a"][0]))
    revived = a_classes[dead[a_classes]][0]
    dead[revived] = False
    second = plan.apply(dead=dead)
    assert second.get_submodule("a").out_channels == first.get_submodule("a").out_channels + 1
    assert second(X).shape == first(X).shape == (2, 4)
    # the mask was for that call only: the plan still applies its own selection, and the
    # analyzed graph carries none of the pruned models' annotations
    again = plan.apply()
    assert again.get_submodule("a").out_channels == first.get_submodule("a").out_channels
    from fxopt.debug.listing import ANNOTATIONS

    assert any("prune.kept" in n.meta.get(ANNOTATIONS, {}) for n in again.graph.nodes)
    assert not any("prune.kept" in n.meta.get(ANNOTATIONS, {}) for n in plan.gm.graph.nodes)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(F.relu(self.a(x) + self.b(x)))


class _ConcatOfConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.o = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.o(torch.cat([self.a(x), self.b(x)], 1))


def test_the_analysis_and_its_pruned_graph_name_an_input_they_cannot_take():
    """Prune tester: `plan.gm` and `plan.apply()` of an export graph, called at a size it was
    not captured with, raised export's bare 'AssertionError: Guard failed' (copies lost the
    call check `optimize`'s results keep)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    plan = analyze(model, (torch.randn(2, 3, 16, 16),), mode="export", ratio=0.5)
    for gm in (plan.gm, plan.apply()):
        with pytest.raises(fxopt.InputMismatchError, match=r"input 0 \('input'\) has size 20 at dim 2"):
            gm(torch.randn(2, 3, 20, 20))


def test_a_research_mask_that_empties_a_conv_read_by_a_cat_alone_is_refused():
    """Prune tester: a cat runs on an empty input, so the check let a mask through that left
    conv 'a' no output channel; apply then failed inside shape propagation with torch's
    'expected weight to be at least 1 at dimension 0'."""
    import numpy as np

    plan = analyze(_ConcatOfConvs().eval(), (torch.randn(1, 3, 8, 8),), ratio=0.3)
    cg = plan.channel_graph
    dead = np.zeros(cg.n_classes, bool)
    dead[cg.positions(next(s.id for s in cg.slots if s.node == "a"))] = True
    with pytest.raises(ValueError, match=r"removes every channel of 'a' \(axis 1\)"):
        plan.apply(dead=dead)


def test_a_research_mask_that_cannot_be_applied_names_the_value_at_fault():
    """A mask that emptied a layer failed inside torch ("expected weight to be at least 1 at
    dimension 0"); the other refusals named no node."""
    import numpy as np

    plan = analyze(Small(), (X,), ratio=0.5)
    cg = plan.channel_graph
    dead = np.zeros(cg.n_classes, bool)
    dead[cg.positions(next(s.id for s in cg.slots if s.node == "relu"))] = True
    with pytest.raises(ValueError, match=r"removes every channel of 'a' \(axis 1\), the input of 'relu'"):
        plan.apply(dead=dead)
    with pytest.raises(ValueError, match=r"shape \(3,\); the plan has \d+ channel classes"):
        plan.apply(dead=np.zeros(3, bool))
    # scores for a mask (prune tester): cast to bool they removed everything, and a pinned channel was blamed
    with pytest.raises(ValueError, match=r"holds float64 values other than 0 and 1 \(e.g. 0.5\): give a bool"):
        plan.apply(dead=np.full(cg.n_classes, 0.5))
    ones = np.zeros(cg.n_classes)  # a 0/1 mask is a mask
    torch.testing.assert_close(plan.apply(dead=ones)(X), plan.apply(dead=ones.astype(bool))(X))
    plan = analyze(_Residual(), (X,), ratio=0.5, adapter_cost=0)
    cg = plan.channel_graph
    if cg.precedence:  # the sum's channel dies only with both writers' channels
        u, _ = next(iter(cg.precedence))
        dead = np.zeros(cg.n_classes, bool)
        dead[u] = True
        with pytest.raises(ValueError, match=r"removes a channel of 'add' \(axis 1\) but keeps the channel of '[ab]' \(axis 1\) that feeds it"):
            plan.apply(dead=dead)


def test_analysis_is_cached_and_networkx():
    import networkx as nx

    from fxopt.analysis import AnalysisManager
    from fxopt.passes.prune.channel_graph import ChannelGraphAnalysis

    gm = fxopt.capture(Small(), (X,))
    am = AnalysisManager(gm, (X,))
    cg = am.get(ChannelGraphAnalysis)
    assert am.get(ChannelGraphAnalysis) is cg
    assert isinstance(cg.graph, nx.MultiDiGraph)
    assert ("a:1", "relu:1") in {(u, v) for u, v in cg.graph.edges()}


def test_distill_improves_pruned_digits_accuracy():
    from fxopt.examples import digits

    model, _ = digits.load_example(progress=False)
    train, test = digits.load_digits_data()
    x = train.tensors[0][:32]
    res = fxopt.optimize(model, (x,), [Prune(ratio=0.7)], mode="export", verify=False)
    before = digits.evaluate_accuracy(res.module)
    data = [(train.tensors[0][i:i + 64],) for i in range(0, 1024, 64)]
    tuned = fxopt.distill(res.module, model, data, epochs=4, lr=3e-3, progress=False)
    after = digits.evaluate_accuracy(tuned)
    assert after > before + 1.0, (before, after)
    # the teacher and the pruned module are left as they were
    assert digits.evaluate_accuracy(res.module) == before


def test_distill_can_be_called_twice_and_leaves_teacher_alone():
    teacher = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    student = fxopt.capture(nn.Sequential(nn.Linear(4, 3)), (torch.randn(2, 4),), mode="export")
    before = [p.clone() for p in teacher.parameters()]
    data = [(torch.randn(16, 4),) for _ in range(2)]
    for _ in range(2):  # the submodule import must not shadow fxopt.distill
        tuned = fxopt.distill(student, teacher, data, epochs=1, progress=False)
    assert tuned is not student
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    with pytest.raises(ValueError, match="temperature"):
        fxopt.distill(student, teacher, data, temperature=0)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_taylor_on_a_model_without_producers_refuses_like_l1(mode):
    """A lone batchnorm has nothing to probe: taylor must give l1's clear refusal, not crash in
    autograd (fuzzer reproducer case_2000_4_9606dd77)."""
    model = nn.Sequential(nn.BatchNorm2d(3)).eval()
    x = torch.randn(1, 3, 6, 6)
    for importance in ("l1", "taylor"):
        with pytest.warns(fxopt.PassWarning, match="nothing to prune: the model has no prunable channels") as caught:
            res = fxopt.optimize(model, (x,), [Prune(ratio=0.3, importance=importance)], calibration=[(x,)],
                                 mode=mode)
        assert not res.passes[0].modified and res.verification.passed
        assert caught[0].filename == __file__, "the warning points at the user's call, not into fxopt"


class _RecurrentHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.fc = nn.GRU(8, 16, batch_first=True), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


def test_nothing_to_prune_names_the_layer_without_a_rule():
    """A GRU (kept whole by symbolic capture) holds the only channels fxopt could prune: the
    warning names it rather than saying nothing is pinned."""
    with pytest.warns(fxopt.PassWarning, match="Pinned nodes: rnn: no channel rule for GRU"):
        res = fxopt.optimize(_RecurrentHead().eval(), (torch.randn(2, 5, 8),), "prune{ratio=0.5}", mode="symbolic")
    assert not res.passes[0].modified


class _ComputedWeights(nn.Module):
    """Weights computed in forward from the input (a dynamic layer's gain): no layer has fixed rows."""

    def __init__(self):
        super().__init__()
        self.v1, self.g1 = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.rand(8, 1))
        self.v2, self.g2 = nn.Parameter(torch.randn(3, 8)), nn.Parameter(torch.rand(3, 1))

    def forward(self, x):
        gain = x.mean().sigmoid()
        return F.linear(F.relu(F.linear(x, self.v1 * self.g1 * gain)), self.v2 * self.g2 * gain)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_model_with_nothing_prunable_names_what_pins_it(mode):
    """analyze() refuses, naming the pinned node; the pass warns and the pipeline goes on."""
    from fxopt.passes.prune.prune_pass import NothingToPrune

    model, x = _ComputedWeights().eval(), torch.randn(4, 6)
    with pytest.raises(NothingToPrune, match=r"no prunable channels.*Pinned nodes: linear: .*not a parameter"):
        analyze(model, (x,), mode=mode, ratio=0.5)
    with pytest.warns(UserWarning, match="Pinned nodes: linear"):
        res = fxopt.optimize(model, (x,), "prune{ratio=0.5},fuse", mode=mode)
    assert [r.modified for r in res.passes][0] is False and res.verification.passed


class _WeightNormed(nn.Module):
    def __init__(self):
        super().__init__()
        wn = torch.nn.utils.parametrizations.weight_norm
        self.a, self.b, self.c = wn(nn.Conv1d(3, 16, 3, padding=1)), wn(nn.Conv1d(16, 16, 1)), nn.Conv1d(16, 4, 1)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


def test_a_weight_norm_layer_is_pinned_with_the_call_that_frees_it():
    """Symbolic capture keeps a parametrized conv whole (its weight is computed): the pin says
    so and how to undo it (it was silent), and after that call the same model prunes. Export
    traces the parametrization, whose computed weight prunes as is."""
    from fxopt.passes.prune.prune_pass import NothingToPrune

    model, x = _WeightNormed().eval(), torch.randn(2, 3, 20)
    with pytest.raises(NothingToPrune, match=r"a: ParametrizedConv1d computes its weight with a parametrization "
                                             r"\(WeightNorm\): call torch.nn.utils.parametrize.remove_parametrizations"
                                             r"\(module, 'weight'\) before pruning, or capture with mode='export'"):
        analyze(model, (x,), mode="symbolic", ratio=0.5)
    exported = analyze(model, (x,), mode="export", ratio=0.5)
    assert exported.channel_graph.pinned_nodes == {} and exported.selection.removed > 0
    plain = copy.deepcopy(model)
    for layer in (plain.a, plain.b):
        torch.nn.utils.parametrize.remove_parametrizations(layer, "weight")
    plan = analyze(plain, (x,), mode="symbolic", ratio=0.5)
    assert plan.channel_graph.pinned_nodes == {} and plan.selection.removed > 0


def test_taylor_scores_skip_outputs_that_do_not_depend_on_producers():
    from fxopt.passes.prune.channel_graph import build_channel_graph
    from fxopt.passes.prune.importance import _taylor_scores

    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.a(x).detach() * 2  # no gradient reaches the probe

    gm = fxopt.capture(Detached(), (X,))
    assert _taylor_scores(gm, build_channel_graph(gm), [(X,)]) == {}
    gm = fxopt.capture(Small(), (X,))
    scores = _taylor_scores(gm, build_channel_graph(gm), [(X,)])
    assert {k: v.shape for k, v in scores.items()} == {"a": (8,), "b": (8,), "fc": (4,)}
    assert all((v > 0).any() for v in scores.values())


@pytest.mark.parametrize("bad", [0, 1.5, -0.2, True])
def test_max_layer_ratio_out_of_range(bad):
    with pytest.raises(ValueError, match="max_layer_ratio"):
        Prune(max_layer_ratio=bad)


class Wide(nn.Module):
    """A wide cheap layer feeding an expensive narrow one: global scope empties `a` the most."""

    def __init__(self):
        super().__init__()
        self.wide, self.a, self.b = nn.Conv2d(3, 32, 1), nn.Conv2d(32, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.b(F.relu(self.a(F.relu(self.wide(x)))))).mean((2, 3)))


def test_max_layer_ratio_caps_every_layer_and_keeps_the_budget():
    def lost(plan):
        sizes = {"wide": 32, "a": 8, "b": 8}
        return {k: n - int(plan.kept_channels().get(k, f"{n}/{n}").split("/")[0]) for k, n in sizes.items()}

    torch.manual_seed(0)
    options = dict(ratio=0.5, scope="global", adapter_cost=0, ignore=("fc",))
    free = analyze(Wide(), (X,), **options)
    capped = analyze(Wide(), (X,), max_layer_ratio=0.6, **options)
    assert lost(free)["a"] > 0.6 * 8, "uncapped, layer a loses most of its channels"
    assert all(lost(capped)[k] <= 0.6 * n for k, n in (("wide", 32), ("a", 8), ("b", 8)))
    assert abs(capped.selection.removed - 24) <= 1, "the budget moves to other layers, it does not shrink"
    pruned = capped.apply()
    assert pruned.get_submodule("a").out_channels == 8 - lost(capped)["a"]
    assert pruned(X).shape == (2, 4)
    res = fxopt.optimize(Wide(), (X,), "prune{max_layer_ratio=0.6}", verify=False)
    assert res.pipeline == "prune{max_layer_ratio=0.6}"


def test_class_importance_is_the_mean_over_its_producers_and_norms():
    """A channel read by several batchnorms (a DenseNet concat) is not worth more per norm."""
    from fxopt.passes.prune.channel_graph import build_channel_graph
    from fxopt.passes.prune.importance import class_costs

    class TwoNorms(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn1, self.bn2 = nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
            self.b, self.c = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(self.bn1(y)) + self.c(self.bn2(y))

    torch.manual_seed(0)
    model = TwoNorms().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight.uniform_(0.5, 2)
            bn.bias.zero_()
    gm = fxopt.capture(model, (X,))
    cg = build_channel_graph(gm)
    imp = class_costs(gm, cg)["imp"][cg.positions(cg.value_slot["a"])]

    def normalized(t):
        s = t.detach().abs().flatten(1).sum(1)
        return s / s.mean()

    expected = (normalized(model.a.weight) + normalized(model.bn1.weight[:, None]) +
                normalized(model.bn2.weight[:, None])) / 3
    torch.testing.assert_close(torch.as_tensor(imp), expected.double())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_prune_in_their_dtype(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 8, 3, padding=1)).eval().to(dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    for importance in ("l1", "bn_scale"):
        pruned = analyze(model, (x,), ratio=0.5, importance=importance).apply()
        assert pruned.get_submodule("0").weight.shape[0] < 16
        assert pruned(x).dtype == dtype and pruned(x).shape == (2, 8, 8, 8)


class TwiceRead(nn.Module):
    """One weight read twice in the same channel spaces: both uses lose the same channels."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.shared = nn.Parameter(torch.randn(16, 16) / 4)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.fc1(x)
        y = nn.functional.linear(h, self.shared) + nn.functional.linear(torch.relu(h), self.shared)
        return self.head(torch.relu(y))


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.fc, self.head = nn.Embedding(50, 32), nn.Linear(32, 32), nn.Linear(32, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.fc(self.embed(ids))))


def test_a_weight_pruned_alike_at_both_uses_stays_one_tensor():
    torch.manual_seed(0)
    plan = analyze(TwiceRead(), (torch.randn(2, 8),), mode="export", ratio=0.5, adapter_cost=0.0)
    pruned = plan.apply()
    shared = [t for n, t in pruned.named_parameters(remove_duplicate=False) if "shared" in n]
    assert len(shared) == 2 and shared[0] is shared[1] and shared[0].shape[0] < 16


class UnevenSiamese(nn.Module):
    """One conv called on two branches whose consumers differ (a large conv after one call, a
    mean after the other), so each call alone would keep different channels."""

    def __init__(self):
        super().__init__()
        self.stem, self.other = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3, 16, 3, padding=1)
        self.shared, self.big = nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
        self.head = nn.Linear(96, 4)

    def forward(self, x):
        a = self.big(F.relu(self.shared(F.relu(self.stem(x))))).mean((2, 3))
        b = F.relu(self.shared(F.relu(self.other(x)))).mean((2, 3))
        return self.head(torch.cat([a, b], 1))


def _shared_weights(gm):
    return [t for n, t in gm.named_parameters(remove_duplicate=False) if n.startswith("shared")
            and n.endswith("weight") or n.startswith("shared_weight")]


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_layer_called_twice_loses_the_same_channels_at_both_calls_and_stays_one_layer(mode):
    """Pruned apart, the calls kept two copies of different rows (more parameters than one
    layer, and a model that no longer trains the layer as one)."""
    torch.manual_seed(0)
    model, x = UnevenSiamese().eval(), torch.randn(2, 3, 8, 8)
    plan = analyze(model, (x,), mode=mode, ratio=0.5)
    pruned = plan.apply()
    shared = _shared_weights(pruned)
    assert len(shared) == 2 and shared[0] is shared[1] and shared[0].shape[0] < 32
    assert count_parameters(pruned) < count_parameters(model)
    with torch.no_grad():
        assert pruned(x).shape == (2, 4)


def test_a_layer_called_twice_keeps_every_channel_where_one_call_is_pinned():
    class OneCallPinned(UnevenSiamese):
        def forward(self, x):
            a = self.big(F.relu(self.shared(F.relu(self.stem(x)))))
            # the second call convolves over the rows of a 16 x 16 image (its channels on axis 2)
            return a, self.shared(F.relu(self.other(x)).transpose(1, 2))

    torch.manual_seed(0)
    model, x = OneCallPinned().eval(), torch.randn(2, 3, 16, 16)
    plan = analyze(model, (x,), mode="symbolic", ratio=0.5, adapter_cost=0.0)
    assert plan.channel_graph.pinned_nodes == {
        "shared_1": "conv over a value whose channels are not on axis 1",
        "shared": "shares its weights with a node that reads them whole (pruning it would store a second, pruned copy)"}
    assert plan.selection.removed > 0
    pruned = plan.apply()
    shared = _shared_weights(pruned)
    assert len(shared) == 2 and shared[0] is shared[1] and shared[0].shape == (32, 16, 3, 3)


class TiedDecoder(nn.Module):
    """An autoencoder whose decoder reads the encoder's weight transposed."""

    def __init__(self):
        super().__init__()
        self.enc, self.mid = nn.Linear(16, 32), nn.Linear(32, 32)

    def forward(self, x):
        return F.linear(F.relu(self.mid(F.relu(self.enc(x)))), self.enc.weight.t())


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_weight_read_whole_elsewhere_keeps_its_layer_whole(mode):
    """The decoder reads enc.weight whole (pinned): a pruned private copy of it for enc was stored
    beside the full tensor (a tied autoencoder grew from 991 to 1463 parameters)."""
    torch.manual_seed(0)
    model, x = TiedDecoder().eval(), torch.randn(4, 16)
    plan = analyze(model, (x,), mode=mode, ratio=0.5, adapter_cost=0.0)
    pinned = plan.channel_graph.pinned_nodes
    enc = next(n for n, m in plan.channel_graph.module_names.items() if m == "enc")
    assert pinned[enc].startswith("shares its weights with a node that reads them whole")
    assert any(why.startswith("linear weight is a transposed parameter (F.linear(x, W.t())): write it x @ W")
               for why in pinned.values())
    with pytest.warns(UserWarning, match="nothing to prune|removed"):
        res = fxopt.optimize(model, (x,), "prune{ratio=0.5}", mode=mode)
    assert count_parameters(res.module) <= count_parameters(model)


def test_pruning_an_exported_tied_model_leaves_no_full_size_copy_behind():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 8))
    sizes = {mode: count_parameters(fxopt.optimize(TiedLM(), ids, "prune{ratio=0.5}", mode=mode).module)
             for mode in ("symbolic", "export")}
    assert sizes["export"] == sizes["symbolic"] < count_parameters(TiedLM())


def test_a_plan_dumps_its_analyzed_graph_with_groups(tmp_path):
    torch.manual_seed(0)
    plan = analyze(Small(), (X,), ratio=0.5)
    index = fxopt.dump(plan, tmp_path / "plan", svg=False)
    listing = (tmp_path / "plan" / "graph.txt").read_text()
    assert index.exists() and "prune.group" in listing
    # each value is labelled with its pruning group: a's output channels (a, its relu, b's input)
    # are one group, b's (b, its relu, the mean, fc's input) another
    group = {n.name: annotations(n).get("prune.group") for n in plan.gm.graph.nodes}
    assert group["a"] == group["relu"] != group["b"] == group["relu_1"] == group["mean"]
    assert set(group.values()) - {None} == set(range(len(plan.groups)))
    with pytest.raises(TypeError, match="dump expects a torch.fx.GraphModule"):
        fxopt.dump(object(), tmp_path / "nothing", svg=False)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_zeroing_a_plan_keeps_its_tied_weights_tied(mode):
    """The exactness oracle zeroes the removed channels on the plan's module; the same plan
    applied after it must still store a module called twice once (it stored a copy per call:
    more parameters than the unpruned model on a tiny ALBERT)."""
    from fxopt.passes.prune.apply import zero_removed

    class Siamese(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
            self.fc = nn.Linear(16, 2)

        def forward(self, a, b):
            return self.fc(torch.cat([self.enc(a).mean((2, 3)), self.enc(b).mean((2, 3))], 1))

    torch.manual_seed(0)
    model, a, b = Siamese().eval(), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    plan = analyze(model, (a, b), mode=mode, ratio=0.5)
    pruned = plan.apply()
    zero_removed(plan.gm, plan.channel_graph, plan.dead)
    masked = plan.gm(a, b)
    again = plan.apply()
    assert count_parameters(again) == count_parameters(pruned) < count_parameters(model)
    torch.testing.assert_close(again(a, b), pruned(a, b))
    torch.testing.assert_close(again(a, b), masked, rtol=1e-5, atol=1e-6)


def test_zeroing_a_plan_keeps_an_embedding_tied_to_its_head():
    """An embedding tied to the LM head is one tensor read as producer columns (the embedding)
    and as consumer columns (the head): zeroing the removed channels changes only the former, so
    the plan's module holds two tensors after it. The plan records its ties when it is made, and
    apply re-ties the pruned pair as before (it stored the weight twice: 600 parameters, not 440)."""
    from fxopt.passes.prune.apply import tied_parameters, zero_removed

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mid, self.mid2 = nn.Embedding(20, 16), nn.Linear(16, 32), nn.Linear(32, 16)
            self.head = nn.Linear(16, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            h = self.emb(ids)
            return self.head(h + self.mid2(F.gelu(self.mid(h))))

    torch.manual_seed(0)
    model, ids = TiedLM().eval(), torch.randint(0, 20, (2, 7))
    plan = analyze(model, ids, ratio=0.5, mode="symbolic")
    pruned = plan.apply()
    zero_removed(plan.gm, plan.channel_graph, plan.dead)
    again = plan.apply()
    assert tied_parameters(again) == tied_parameters(pruned) == [["emb.weight", "head.weight"]]
    assert count_parameters(again) == count_parameters(pruned)
    torch.testing.assert_close(again(ids), plan.gm(ids), rtol=1e-5, atol=1e-6)


def test_a_plan_applied_by_hand_is_verified_as_pruned_not_as_exact():
    """`analyze(...).apply()` carried no record: `fxopt.verify` held the pruned model to `exact`
    and said FAIL, where `optimize(..., "prune")`'s result says NOT CHECKED (lossy)."""
    from fxopt.passes.prune.prune_pass import analyze

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    pruned = analyze(model, (x,), ratio=0.5).apply()
    assert pruned.meta["fxopt"]["tolerance"] == "lossy" and pruned.meta["fxopt"]["pipeline"] == "prune"
    report = fxopt.verify(model, pruned, x)
    assert report.verdict == "NOT CHECKED" and report.passed


def test_ignore_takes_module_objects_as_torch_pruning_does():
    """`ignore=[model.fc]` (Torch-Pruning's `ignored_layers` idiom) failed with a bare
    "TypeError: object of type 'Linear' has no len()"."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    by_object = analyze(model, (x,), ratio=0.5, ignore=[model[2]])
    by_name = analyze(model, (x,), ratio=0.5, ignore=["2"])
    assert by_object.ignored == by_name.ignored and by_object.ignored
    assert count_parameters(by_object.apply()) == count_parameters(by_name.apply())
    with pytest.raises(ValueError, match="option 'ignore': the Linear given is not a submodule of the model"):
        analyze(model, (x,), ignore=[torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="option 'ignore' takes module names or glob patterns .*got a int"):
        fxopt.optimize(model, x, Prune(ignore=(3,)))


@pytest.mark.parametrize("first", ["quantize{backend=x86}", "fuse,lower-cpu{min_macs=0}"])
def test_prune_after_an_inference_lowering_says_to_run_it_first(first):
    """`quantize,prune` warned that the model had no prunable channels: the layers were int8
    kernels by then."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 8, 3, padding=1)).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(PassError, match=r"prune.*inference kernel \(int8 or oneDNN\) whose channels cannot be "
                                        r"removed; run prune before quantize and lower-cpu"):
        fxopt.optimize(model, x, f"{first},prune{{ratio=0.5}}", calibration=[(x,)])


class _AuxiliaryHead(torch.nn.Module):
    """A head only training runs (Inception's aux logits): eval graphs never call it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3)
        self.aux = torch.nn.Linear(8, 2)

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        return (h, self.aux(h.mean((2, 3)))) if self.training else h


def test_ignore_takes_a_module_the_graph_never_calls():
    """Prune tester: `ignore=[model.aux]`, a module of the model that eval never calls, failed
    with "pattern 'aux' matches no layer" (Torch-Pruning takes it); a name that is no module
    of the model still fails, with the closest names."""
    model, x = _AuxiliaryHead().eval(), torch.randn(2, 3, 12, 12)
    assert not analyze(model, (x,), ignore=[model.aux]).ignored
    assert not analyze(model, (x,), ignore=["aux"]).ignored
    with pytest.raises(ValueError, match="pattern 'auxx' matches no layer"):
        analyze(model, (x,), ignore=["auxx"])
    for mode in ("symbolic", "export"):  # the pass reads the names capture records
        res = fxopt.optimize(model, (x,), "prune{ignore=[aux]}", mode=mode)
        assert res.passes[0].stats["ignored"] == [], res.passes[0].stats


@pytest.mark.parametrize("where", ["input", "overflow"])
def test_a_taylor_calibration_batch_with_non_finite_values_is_named(where):
    """Prune tester: one NaN pixel in batch 1 made 542 of 769 class importances NaN (a layer's
    scores are normalized by their mean), the selection removed 370 channels instead of 538,
    and the shortfall warning blamed the adapters."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3)).eval()
    x = torch.randn(2, 3, 16, 16)
    bad = x.clone()
    if where == "input":
        bad[0, 0, 5, 5] = float("nan")
    else:
        bad[0, 0] = 1e38  # finite, but the squared output overflows float32
    why = "it holds NaN or inf" if where == "input" else "its values overflow in the model"
    with pytest.raises(fxopt.PassError, match=rf"calibration batch 1: .* is not finite \({why}\)"):
        fxopt.optimize(model, x, "prune{importance=taylor}", calibration=[x, bad])


def test_taylor_scores_a_model_whose_outputs_are_infinite_by_design():
    """Adversary: masked logits (-inf where an action is not allowed) made every batch 'not
    finite'; they have no gradient there, and the scores are finite."""
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 6)
            self.register_buffer("allowed", torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool))

        def forward(self, x):
            return self.b(F.relu(self.a(x))).masked_fill(~self.allowed, float("-inf"))

    torch.manual_seed(0)
    x = torch.randn(4, 8)
    res = fxopt.optimize(Masked().eval(), x, "prune{ratio=0.5,importance=taylor}", calibration=[x, torch.randn(4, 8)])
    assert res.module.get_submodule("a").out_features == 8


def test_a_taylor_calibration_batch_that_does_not_fit_is_named():
    """Prune tester: importance=taylor on a batch of the wrong shape raised torch's text and a
    tlparse hint; quantize and distill name the batch."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3)).eval()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(fxopt.PassError, match=r"calibration batch 1 \(tensor shapes \[\(2, 5, 16, 16\)\]\) does not "
                                              r"run through the model: RuntimeError: .*5 channels"):
        fxopt.optimize(model, x, "prune{importance=taylor}", calibration=[x, torch.randn(2, 5, 16, 16)])


def _cbr(i, o, k=3, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(i, o, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class _XBlock(nn.Module):
    """ResNeXt's block: 1x1, grouped 3x3 (8 groups), 1x1, and a projected shortcut."""

    def __init__(self, i, o, stride=1, width=32):
        super().__init__()
        self.body = nn.Sequential(_cbr(i, width, 1), _cbr(width, width, 3, stride, groups=8),
                                  nn.Conv2d(width, o, 1, bias=False), nn.BatchNorm2d(o))
        self.shortcut = nn.Sequential() if stride == 1 and i == o else \
            nn.Sequential(nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o))

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


def test_a_shortfall_of_tied_importances_says_so_and_names_an_importance_that_tells_channels_apart():
    """Prune tester: bn_scale on a freshly initialized ResNeXt (every batchnorm scale 1.0)
    removed 208 of the 496 channels targeted, the warning blaming the adapters alone; l1
    removed them all. Classes of one importance and cost are taken together or not at all."""
    torch.manual_seed(0)
    model = nn.Sequential(_cbr(3, 32, 3, 2), _XBlock(32, 64), _XBlock(64, 64), _XBlock(64, 128, 2, 64),
                          _XBlock(128, 128, width=64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match=r"classes have the same importance \(importance=bn_scale: [\d.]+\), so a "
                                         r"layer's channels tie.*Options: importance=l1 or l2"):
        fxopt.optimize(model, (x,), "prune{ratio=0.5,importance=bn_scale}", mode="symbolic", verify=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no shortfall once the weights tell the channels apart
        fxopt.optimize(model, (x,), "prune{ratio=0.5,importance=l1}", mode="symbolic", verify=False)
