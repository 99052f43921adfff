"""`lower-eager`: export graphs' ATen overload calls become the eager bindings, bit for bit."""
from __future__ import annotations

import os

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt import PassManager, capture
from fxopt.examples import zoo
from fxopt.ir import EagerCall, aten_op_of, eager_call, op_view
from fxopt.passes.cleanup import DeadCodeElimination
from fxopt.passes.lower_eager import LowerEager

aten = torch.ops.aten


def _overloads(gm):
    return [n.target for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload)]


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_encoders_run_bit_for_bit_at_other_batches(name):
    model, x2 = zoo.get(name, batch=2)
    gm = capture(model, x2, mode="export")
    result = PassManager("lower-eager").run(gm, x2)
    out = result.module
    out.graph.lint()
    stats = result.records[0].stats
    assert stats["lowered"]["linear"] == 25 and stats["lowered"]["layer_norm"] >= 8
    # what stays an OpOverload is exactly what the stats report, with its reason
    assert {str(t) for t in _overloads(out)} == set(stats["kept"])
    assert stats["kept"]["aten.slice.Tensor"] == "no Python binding"
    assert stats["kept"]["aten.dropout.default"] == "draws random numbers"
    targets = {n.target for n in out.graph.nodes if n.op in ("call_method", "call_function")}
    assert {"view", "size", torch.transpose, torch.nn.functional.linear} <= targets  # sym_size -> Tensor.size
    with torch.no_grad():
        for batch in (1, 3):  # the batch stays dynamic through Tensor.size
            _, x = zoo.get(name, batch=batch, seed=batch)
            torch.testing.assert_close(out(*x), gm(*x), rtol=0, atol=0)


def test_symbolic_graphs_are_left_unchanged():
    model, x = zoo.get("digits", batch=2)
    gm = capture(model, x, mode="symbolic")
    before = gm.code
    result = LowerEager().run(gm, None)
    assert not result.modified and result.stats == {"lowered": {}, "kept": {}}
    assert gm.code == before


@pytest.mark.parametrize("op, reason", [
    (aten.add_.Tensor, "writes into an input"),
    (aten.bernoulli.default, "draws random numbers"),
    (aten._assert_tensor_metadata.default, "an assertion"),
    (aten.slice.Tensor, "no Python binding"),
    (torch.ops.quantized.linear.default, "namespace 'quantized'"),
])
def test_ops_that_keep_their_overload_say_why(op, reason):
    assert eager_call(op) == reason


def test_bindings_are_the_functions_eager_code_calls():
    assert eager_call(aten.linear.default) == EagerCall("call_function", torch.nn.functional.linear)
    assert eager_call(aten.add.Tensor) == EagerCall("call_function", torch.add)
    assert eager_call(aten.view.default) == EagerCall("call_method", "view")
    assert eager_call(aten.sym_size.int) == EagerCall("call_method", "size")


def test_in_place_ops_stay_visible_to_dce():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(aten.relu.default, (x,))
    graph.call_function(aten.add_.Tensor, (x, y))  # result unused: only the write matters
    graph.output(x)
    gm = torch.fx.GraphModule(nn.Module(), graph)
    LowerEager().run(gm, None)
    DeadCodeElimination().run(gm, None)
    gm.recompile()
    assert aten.add_.Tensor in _overloads(gm)
    inp = torch.tensor([-1.0, 2.0])
    assert gm(inp).tolist() == [-1.0, 4.0]


def _view_record(gm, node):
    view = op_view(gm, node)
    if view is None:
        return None
    return view.kind, [i.name for i in view.inputs], sorted(view.params), repr(sorted(view.attrs.items()))


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_op_view_reads_lowered_nodes_as_their_overloads(name):
    model, x = zoo.get(name, batch=2)
    gm = capture(model, x, mode="export")
    before = {n.name: _view_record(gm, n) for n in gm.graph.nodes}
    lowered = PassManager("lower-eager").run(gm, x).module
    after = {n.name: _view_record(lowered, n) for n in lowered.graph.nodes}
    assert after == before
    assert {"layer_norm", "embedding" if name == "bert" else "conv"} <= {r[0] for r in after.values() if r}


def test_a_stale_overload_record_is_ignored():
    gm = capture(nn.Sequential(nn.Linear(4, 4)), (torch.randn(2, 4),), mode="export")
    LowerEager().run(gm, None)
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.linear)
    assert aten_op_of(node) is aten.linear.default
    node.target = torch.relu  # a pass retargets the node and keeps its meta
    assert aten_op_of(node) is None and op_view(gm, node).kind == "relu"


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_prune_reads_the_lowered_spelling(name):
    model, x = zoo.get(name, batch=2)
    params = []
    for pipeline in ("prune{ratio=0.5,exact_norms=false}", "lower-eager,prune{ratio=0.5,exact_norms=false}"):
        res = fxopt.optimize(model, x, pipeline=pipeline, mode="export", verify=False)
        params.append(sum(p.numel() for p in res.module.parameters()))
    assert params[0] == params[1] < 0.4 * sum(p.numel() for p in model.parameters())


def test_fused_encoder_lowers_and_saves(tmp_path):
    from fxopt.passes.quantize import load, save

    model, x = zoo.get("bert", batch=2)
    res = fxopt.optimize(model, x, pipeline="fuse,lower-eager", mode="export")
    assert res.verification.passed
    stats = res.passes[-1].stats
    assert stats["lowered"]["linear"] == 25
    assert {str(t) for t in _overloads(res.module)} == set(stats["kept"]) == {"aten.slice.Tensor"}
    path = os.fspath(tmp_path / "bert.pt")
    save(res.module, path)
    restored = load(path)
    with torch.no_grad():
        torch.testing.assert_close(restored(*x), res.module(*x), rtol=0, atol=0)


def test_dunder_ops_become_methods_fx_can_print():
    class Mask(nn.Module):
        def forward(self, x):
            return (x > 0) & (x < 1)

    x = torch.randn(2, 5)
    res = fxopt.optimize(Mask(), (x,), pipeline="lower-eager", mode="export")
    assert eager_call(aten.__and__.Tensor) == EagerCall("call_method", "__and__")
    assert res.passes[0].stats["lowered"]["__and__"] == 1
    torch.testing.assert_close(res.module(x), Mask()(x))


def test_a_binding_that_rejects_the_arguments_keeps_the_overload():
    # GPT-2's export graph calls aten.to.dtype_layout with `layout=`, which the hand-written
    # Tensor.to binding does not take: the meta trial must catch it before the rewrite.
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(aten.to.dtype_layout, (x,), {"dtype": torch.float64, "layout": torch.strided})
    graph.output(graph.call_function(aten.mul.Tensor, (y, 2)))
    inp = torch.randn(2, 3)
    gm = capture(torch.fx.GraphModule(nn.Module(), graph), (inp,))
    result = PassManager("lower-eager").run(gm, (inp,))
    out = result.module
    assert result.records[0].stats["kept"] == {
        "aten.to.dtype_layout": "its Python binding takes other arguments (TypeError)"}
    assert result.records[0].stats["lowered"] == {"mul": 1}
    assert aten.to.dtype_layout in _overloads(out)
    torch.testing.assert_close(out(inp), inp.double() * 2, rtol=0, atol=0)


def test_quantized_values_keep_their_overloads():
    # int8 tensors have no meta form, so an op reading one cannot be tried: it must be kept
    # with its reason, not crash the pass (found by tools/fuzz.py, seed 91)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(4, 8)
    calibration = [(torch.randn(4, 8),) for _ in range(4)]
    quantized = fxopt.optimize(model, (x,), "quantize{backend=x86}", mode="export", calibration=calibration).module
    result = PassManager("lower-eager").run(quantized, (x,))
    assert result.records[0].stats["kept"]["aten.dequantize.self"] == \
        "its arguments cannot be made as meta tensors (NotImplementedError)"
    torch.testing.assert_close(result.module(x), quantized(x), rtol=0, atol=0)


def test_a_lowered_graph_still_trains_with_distill():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4)).eval()
    x = torch.randn(4, 8)
    res = fxopt.optimize(teacher, (x,), pipeline="prune{ratio=0.5,exact_norms=false},lower-eager",
                         mode="export", verify=False)
    student = res.module
    assert res.passes[-1].stats["lowered"]["linear"] == 2
    data = [(torch.randn(16, 8),) for _ in range(8)]
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    tuned = fxopt.distill(student, teacher, data, epochs=2, progress=False)
    assert any(not torch.equal(before[n], p) for n, p in tuned.named_parameters())
    assert tuned(x).shape == (4, 4)


_WRAPPED = {  # torch functions that are Python wrappers in torch/functional.py, with other arguments
    "stft": (lambda x: torch.stft(x, 8, hop_length=2, window=torch.hann_window(8), return_complex=True).abs(),
             torch.randn(2, 32)),
    "tensordot": (lambda x: torch.tensordot(x, x, dims=([2], [2])), torch.randn(2, 4, 8)),
    "block_diag": (lambda x: torch.block_diag(x[0], x[1]), torch.randn(2, 4, 8)),
    "cartesian_prod": (lambda x: torch.cartesian_prod(x[0], x[1]), torch.randn(2, 5)),
    "cdist": (lambda x: torch.cdist(x, x + 1, compute_mode="use_mm_for_euclid_dist"), torch.randn(2, 4, 8)),
}


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("name", sorted(_WRAPPED))
def test_an_op_whose_printed_name_is_a_python_wrapper_keeps_its_overload(name):
    """fx prints `_VariableFunctions.block_diag` as `torch.block_diag`, which calls the Python
    wrapper of torch/functional.py: the lowered module raised where the export graph ran."""
    fn, x = _WRAPPED[name]
    res = fxopt.optimize(_Fn(fn), x, "lower-eager", mode="export")
    assert res.verification.passed, res.verification.summary()
    torch.testing.assert_close(res.module(x), fn(x))
