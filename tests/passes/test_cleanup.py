"""Cleanup passes (dce, remove-noops, fold-constants) on symbolic and export graphs."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
from torch import nn

import fxopt
from fxopt import PassManager, capture
from fxopt.passes.cleanup import is_effectful

MODES = ["symbolic", "export"]


def _run(pipeline, model, inputs, mode):
    torch.manual_seed(0)
    gm = capture(model, inputs, mode=mode)
    result = PassManager(pipeline).run(gm, inputs)
    out = result.module
    out.graph.lint()
    ref = model.eval()(*inputs)
    got = out(*inputs)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    return gm, out, result.records


def _targets(gm):
    return [n.target for n in gm.graph.nodes]


def _names(gm):
    return {n.name for n in gm.graph.nodes}


# ----- dce ----------------------------------------------------------------------------------

class Dead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        dead = torch.sigmoid(x) * 3  # noqa: F841 — never used
        self.unused(x)
        return self.fc(x)


@pytest.mark.parametrize("mode", MODES)
def test_dce_removes_unused_nodes_and_modules(mode):
    x = (torch.randn(2, 4),)
    before, after, records = _run("dce", Dead(), x, mode)
    assert records[0].stats["nodes_removed"] >= 3
    kinds = lambda gm: {str(t) for t in _targets(gm)}  # noqa: E731
    assert any("sigmoid" in t for t in kinds(before))
    assert not any("sigmoid" in t for t in kinds(after)) and not any("mul" in t for t in kinds(after))
    assert not hasattr(after, "unused") or not any(True for _ in after.unused.parameters())
    assert records[0].stats["attributes_removed"] >= 1
    assert sum(p.numel() for p in after.parameters()) == 20  # only fc is left


class HalfUsedLayer(nn.Module):
    """A submodule whose weight feeds only dead code while its bias is still read."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x):
        dead = x @ self.layer.weight.T  # noqa: F841 — never used
        return x + self.layer.bias


@pytest.mark.parametrize("mode", MODES)
def test_dce_drops_a_nested_tensor_nothing_reads(mode):
    _, after, records = _run("dce", HalfUsedLayer(), (torch.randn(2, 4),), mode)
    assert [name for name, _ in after.named_parameters()] == ["layer.bias"]
    assert records[0].stats["attributes_removed"] == 1


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        z = y.clone()
        z.add_(1.0)          # result unused, but it writes z
        torch._assert(z.shape[0] > 0, "batch")
        return z * 2


def test_dce_keeps_in_place_and_side_effect_ops_symbolic():
    x = (torch.randn(2, 4),)
    _, after, _ = _run("dce", InPlace(), x, "symbolic")
    assert "add_" in _targets(after)
    assert torch._assert in _targets(after)


class UnusedInPlaceActivation(nn.Module):
    """The activation's result is dropped: only its write into `h` counts."""

    def __init__(self, spelling):
        super().__init__()
        self.fc1, self.fc2, self.act, self.spelling = nn.Linear(4, 8), nn.Linear(8, 2), nn.ReLU(inplace=True), spelling

    def forward(self, x):
        h = self.fc1(x)
        if self.spelling == "module":
            self.act(h)
        elif self.spelling == "functional":
            nn.functional.relu(h, inplace=True)
        elif self.spelling == "torch":
            torch.relu_(h)
        else:
            h += 1.0
        return self.fc2(h)


@pytest.mark.parametrize("spelling", ["module", "functional", "torch", "iadd"])
@pytest.mark.parametrize("pipeline", ["dce", "fuse", "fold-constants"])
def test_an_in_place_write_whose_result_is_unused_survives(spelling, pipeline):
    torch.manual_seed(0)
    model, x = UnusedInPlaceActivation(spelling).eval(), torch.randn(3, 4)
    res = fxopt.optimize(model, x, pipeline, mode="symbolic")
    assert res.verification.passed
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), model(x))


def test_dce_keeps_export_guards_and_asserts():
    x = (torch.randn(2, 4),)
    before, after, _ = _run("dce", InPlace(), x, "export")
    guards = [n for n in before.graph.nodes if n.op == "call_module" and n.target.startswith("_guards")]
    assert guards, "export graphs carry a guards call"
    assert {n.name for n in guards} <= _names(after)
    asserts = [n.name for n in before.graph.nodes if "assert" in str(n.target)]
    assert set(asserts) <= _names(after)


def test_is_effectful():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    pure = g.call_function(torch.relu, (x,))
    rand = g.call_function(torch.randn, ((2,),))
    inplace = g.call_method("add_", (x, 1))
    dunder = g.call_method("__add__", (x, 1))
    aten_mut = g.call_function(torch.ops.aten.add_.Tensor, (x, x))
    aten_pure = g.call_function(torch.ops.aten.add.Tensor, (x, x))
    g.output(pure)
    assert [is_effectful(n) for n in (x, pure, rand, inplace, dunder, aten_mut, aten_pure)] == \
        [True, False, True, True, False, True, False]


# ----- remove-noops -------------------------------------------------------------------------

class NoOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.ident = nn.Identity()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        y = self.ident(self.fc(x))
        y = self.drop(y)
        y = torch.nn.functional.dropout(y, 0.1, training=self.training)
        c = y.contiguous()                 # of a linear's result (dropouts removed): row-major, removed
        t = y.transpose(0, 1).contiguous()  # transposed: the copy is real, kept
        return c + t.transpose(0, 1)


@pytest.mark.parametrize("mode", MODES)
def test_remove_noops(mode):
    x = (torch.randn(6, 6),)
    before, after, records = _run("remove-noops", NoOps(), x, mode)
    removed = records[0].stats["removed"]
    assert removed.get("dropout") == 2
    if mode == "symbolic":
        assert removed.get("identity") == 1
        assert "ident" not in _targets(after) and "drop" not in _targets(after)
    # export already drops contiguous() on a contiguous value while tracing
    assert removed.get("contiguous", 0) == (1 if mode == "symbolic" else 0)
    text = " ".join(map(str, _targets(after)))
    assert "dropout" not in text
    assert text.count("contiguous") == 1
    cont = next(n for n in after.graph.nodes if "contiguous" in str(n.target))
    assert "transpose" in str(cont.args[0].target)


def test_remove_noops_contiguous_on_export_graph():
    """An aten.contiguous on a contiguous value goes; one on a transposed value stays."""
    torch.manual_seed(0)
    x = (torch.randn(6, 6),)
    gm = capture(NoOps(), x, mode="export")
    linear = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default)
    with gm.graph.inserting_after(linear):
        extra = gm.graph.call_function(torch.ops.aten.contiguous.default, (linear,))
    linear.replace_all_uses_with(extra, delete_user_cb=lambda u: u is not extra)
    gm.recompile()
    gm = capture(gm, x)  # re-record shapes on the edited graph
    result = PassManager("remove-noops").run(gm, x)
    assert result.records[0].stats["removed"]["contiguous"] == 1
    conts = [n for n in result.module.graph.nodes if n.target == torch.ops.aten.contiguous.default]
    assert len(conts) == 1 and conts[0].args[0].target == torch.ops.aten.transpose.int
    torch.testing.assert_close(result.module(*x), gm(*x), rtol=0, atol=0)


def test_remove_noops_drops_an_exported_in_place_dropout():
    """`nn.Dropout(inplace=True)` (Hugging Face MobileNetV2's classifier) exports as
    `aten.dropout_`: no op fxopt knew, so it stayed, and pruning pinned its input."""
    model = nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.2, inplace=True), nn.Linear(6, 2)).eval()
    x = (torch.randn(3, 6),)
    gm = capture(model, x, mode="export")
    assert torch.ops.aten.dropout_.default in _targets(gm)
    result = PassManager("remove-noops").run(gm, x)
    assert result.records[0].stats["removed"] == {"dropout": 1}
    assert "dropout" not in " ".join(map(str, _targets(result.module)))
    torch.testing.assert_close(result.module(*x), model(*x))


def test_remove_noops_drops_torch_dropout_spelled_positionally_or_by_keyword():
    """``torch.dropout(x, p, False)`` (and its kin; the flag is named ``train`` there) is the
    input itself: it stayed, so quantization saw a float op between a norm and its readers."""
    class Functional(nn.Module):
        def forward(self, x):
            a = torch.dropout(x, 0.1, False)
            b = torch.dropout(x, 0.1, train=False)
            c = torch.feature_alpha_dropout(x, 0.2, False)
            d = torch.dropout_(x * 2, 0.3, False)  # in place, in eval: the value itself
            return a + b + c + d, torch.dropout(x, 0.1, True)

    model, x = Functional(), (torch.randn(2, 3),)
    result = PassManager("remove-noops").run(capture(model, x, mode="symbolic"), x)
    assert result.records[0].stats["removed"] == {"dropout": 4}
    assert [n.args[1:] for n in result.module.graph.nodes if n.target is torch.dropout] == [(0.1, True)]
    x = torch.randn(2, 3)
    torch.testing.assert_close(result.module(x)[0], model(x)[0])


def test_remove_noops_keeps_training_dropout():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    d = g.call_function(torch.nn.functional.dropout, (x, 0.5, True))
    g.output(d)
    gm = torch.fx.GraphModule(nn.Module(), g)
    result = PassManager("remove-noops").run(gm, (torch.randn(3),))
    assert torch.nn.functional.dropout in _targets(result.module)
    assert not result.records[0].modified


def test_remove_noops_contiguous_needs_no_example_inputs():
    """Which contiguous() is a no-op follows from the ops alone (a linear's result is
    row-major), not from the example's layouts: the same answer without example inputs."""
    gm = torch.fx.symbolic_trace(NoOps().eval())
    result = PassManager("remove-noops").run(gm)
    assert result.records[0].stats["removed"].get("contiguous", 0) == 1


# ----- fold-constants -----------------------------------------------------------------------

class Consts(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 4))
        self.register_buffer("scale", torch.tensor(3.0))

    def forward(self, x):
        y = x @ self.w.t()                 # transposed weight: folded
        return y * (self.w * 2).sum() + self.scale * self.scale


@pytest.mark.parametrize("mode", MODES)
def test_fold_constants(mode):
    torch.manual_seed(0)
    x = (torch.randn(3, 4),)
    before, after, records = _run("fold-constants,dce", Consts(), x, mode)
    assert records[0].stats["folded"] >= 2
    folded = [n for n in after.graph.nodes if n.op == "get_attr" and "folded" in n.target]
    assert len(folded) >= 2
    # the transposed weight is stored as a (4, 5) tensor equal to w.t()
    model = Consts()
    torch.manual_seed(0)
    values = [fxopt.ir.get_attr_value(after, n.target) for n in folded]
    assert any(v.shape == (4, 5) for v in values)
    # nothing computes on parameters any more: every op has an activation input
    consts = {n for n in after.graph.nodes if n.op == "get_attr"}
    for n in after.graph.nodes:
        if n.op in ("call_function", "call_method") and n.all_input_nodes and "assert" not in str(n.target):
            assert not all(i in consts for i in n.all_input_nodes), n.name
    del model


@pytest.mark.parametrize("mode", MODES)
def test_fold_constants_numerically_identical(mode):
    torch.manual_seed(0)
    model = Consts().eval()
    x = torch.randn(3, 4)
    res = fxopt.optimize(model, (x,), pipeline="fold-constants,dce", mode=mode)
    assert res.verification.passed
    torch.testing.assert_close(res.module(x), model(x), rtol=0, atol=0)
    x2 = torch.randn(7, 4)
    torch.testing.assert_close(res.module(x2), model(x2), rtol=0, atol=0)


def test_fold_constants_keeps_random_and_respects_growth():
    class Grow(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.randn(1, 4))

        def forward(self, x):
            big = self.b.expand(64, 4)  # 16x the bytes it reads
            return x + big[: x.shape[0]]

    x = (torch.randn(2, 4),)
    _, after, records = _run("fold-constants{max_growth=4}", Grow(), x, "symbolic")
    assert records[0].stats["folded"] == 0
    _, after, records = _run("fold-constants{max_growth=100}", Grow(), x, "symbolic")
    assert records[0].stats["folded"] == 1


def test_cleanup_pipeline_on_both_front_ends_matches():
    torch.manual_seed(0)
    model = NoOps()
    x = torch.randn(6, 6)
    outs = []
    for mode in MODES:
        res = fxopt.optimize(model, (x,), pipeline="remove-noops,fold-constants,dce", mode=mode)
        assert res.frontend == mode and res.verification.passed
        outs.append(res.module(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert operator is not None


class ContiguousInput(nn.Module):
    def forward(self, x):
        return x.contiguous().view(x.shape[0], -1) * 2


def test_contiguous_of_a_value_that_was_contiguous_on_the_example_stays():
    """The example input was contiguous; the next may not be: removing the copy made `.view`
    fail on a transposed input of the same shape. (torch.export itself drops this copy while
    tracing, so only the symbolic graph has one to keep.)"""
    res = fxopt.optimize(ContiguousInput(), torch.randn(2, 4, 6), "remove-noops", mode="symbolic")
    transposed = torch.randn(2, 6, 4).transpose(1, 2)
    torch.testing.assert_close(res.module(transposed), ContiguousInput()(transposed))


class _WriteThroughEvalDropout(torch.nn.Module):
    """A buffer written through an eval-mode dropout's result, which is the buffer itself."""

    def __init__(self):
        super().__init__()
        self.register_buffer("n", torch.zeros(4))

    def forward(self, x):
        torch.nn.functional.dropout(self.n, 0.5, False).add_(1)
        return x * (self.n * 2 + 1)


@pytest.mark.parametrize("mode", ["export"])
def test_a_buffer_written_through_an_eval_dropout_is_no_constant(mode):
    """fold-constants took `n * 2 + 1` for a constant: the write through the dropout was lost."""
    x = torch.ones(1, 4)
    res = fxopt.optimize(_WriteThroughEvalDropout().eval(), x, "fold-constants", mode=mode)
    model = _WriteThroughEvalDropout().eval()
    for _ in range(3):
        torch.testing.assert_close(res.module(x), model(x))


def test_cleanup_passes_need_no_example_inputs():
    """They read no shapes: PassManager warns about a graph without them for passes that do."""
    import warnings

    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Identity(), torch.nn.ReLU()))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxopt.PassWarning)
        result = fxopt.PassManager("dce,remove-noops,fold-constants").run(gm)
    assert "Identity" not in str(result.module.code) and len(list(result.module.graph.nodes)) == 4
