"""Capture: both front ends, auto fallback, metadata, structured outputs, dynamic batch, errors."""
from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt import CaptureError, capture, frontend_of
from writing_models import AddsIntoItsInput

THIS_FILE = os.path.basename(__file__)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = self.drop(x)
        return self.fc(x.mean(dim=(2, 3)))


class ShapeBranch(nn.Module):
    """Python control flow on a shape: symbolic tracing cannot, export can."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[1] == 4:
            return torch.relu(self.fc(x))
        return self.fc(x)


class DataDependent(nn.Module):
    """Control flow on tensor *values*: neither front end can capture it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # CAPTURE-FAILS-HERE
            return self.fc(x)
        return -self.fc(x)


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return {"logits": self.a(x), "aux": torch.sigmoid(self.b(x))}


@dataclasses.dataclass
class PlainOut:
    y: torch.Tensor
    z: torch.Tensor


def _seed():
    torch.manual_seed(0)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before, training):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert model.training == training


def _assert_all_tensor_meta(gm):
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        assert "tensor_meta" in node.meta, node.name


# ----- front ends -----------------------------------------------------------------------------

def test_symbolic_gives_module_level_graph():
    _seed()
    model = ConvNet()
    x = torch.randn(2, 3, 8, 8)
    gm = capture(model, (x,), mode="symbolic")
    assert gm.meta["fxopt"]["frontend"] == "symbolic" == frontend_of(gm)
    modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"conv", "bn", "fc"} <= modules
    assert not any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)
    _assert_all_tensor_meta(gm)
    conv = next(n for n in gm.graph.nodes if n.target == "conv")
    assert tuple(conv.meta["tensor_meta"].shape) == (2, 8, 8, 8)
    assert conv.meta["tensor_meta"].dtype == torch.float32
    torch.testing.assert_close(gm(x), model.eval()(x))


def test_symbolic_capture_is_in_eval_mode_all_the_way_down():
    """fx rebuilds nested containers as fresh modules (training=True by default); a captured
    model must not look half in training mode to code that checks `m.training`."""
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), nn.ReLU()).train()
    gm = capture(model, (torch.randn(2, 3, 8, 8),), mode="symbolic")
    assert [name for name, m in gm.named_modules() if m.training] == []
    assert model.training and model[0].training, "the user's model keeps its own mode"


class _Postponed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":  # as under `from __future__ import annotations`
        return self.fc(x)


def test_symbolic_capture_with_string_annotations_can_be_saved():
    import io

    gm = capture(_Postponed().eval(), (torch.randn(2, 4),), mode="symbolic")
    assert all(not isinstance(n.type, str) for n in gm.graph.nodes)
    buf = io.BytesIO()
    torch.save(gm, buf)  # fx would emit the string as a global: "'str' object has no attribute '__name__'"
    buf.seek(0)
    x = torch.randn(3, 4)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x), gm(x))


class _Cache:  # not a tensor container torch knows (like transformers' DynamicCache)
    def __init__(self, t):
        self.t = t


class _ReturnsCache(nn.Module):
    def __init__(self, takes_use_cache):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.takes_use_cache = takes_use_cache

    def forward(self, x, use_cache=True):
        y = self.fc(x)
        if x.shape[0] > 0 and use_cache:  # data-independent, but symbolic tracing cannot take it
            return y, _Cache(y)
        return y


@pytest.mark.parametrize("takes_use_cache", [True, False])
def test_unknown_output_type_gets_an_actionable_hint(takes_use_cache):
    model = _ReturnsCache(takes_use_cache)
    if not takes_use_cache:
        model.forward = lambda x: (model.fc(x), _Cache(x))  # noqa: E731 (no use_cache parameter)
    with pytest.raises(CaptureError) as err:
        capture(model, (torch.randn(2, 4),))
    text = str(err.value)
    assert "hint: the output holds a _Cache, which is not a tensor container" in text
    if takes_use_cache:
        assert "use_cache': False" in text
        gm = capture(model, {"x": torch.randn(2, 4), "use_cache": False})  # and the hint works
        assert gm(x=torch.randn(3, 4), use_cache=False).shape == (3, 2)
    else:
        assert "return tensors" in text


def test_export_gives_aten_graph_with_get_attr_params():
    _seed()
    model = ConvNet()
    x = torch.randn(2, 3, 8, 8)
    gm = capture(model, (x,), mode="export")
    assert gm.meta["fxopt"]["frontend"] == "export" == frontend_of(gm)
    assert not any(n.op == "call_module" and not n.target.startswith("_guards") for n in gm.graph.nodes)
    aten_ops = {n.target.overloadpacket for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload)}
    assert torch.ops.aten.conv2d in aten_ops
    attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert {"conv.weight", "conv.bias", "fc.weight"} <= attrs
    _assert_all_tensor_meta(gm)
    torch.testing.assert_close(gm(x), model.eval()(x))


def test_auto_prefers_symbolic_when_it_works():
    gm = capture(ConvNet(), (torch.randn(2, 3, 8, 8),))
    info = gm.meta["fxopt"]
    assert info["frontend"] == "symbolic" and len(info["attempts"]) == 1  # no export tried


class AttentionLeaf(nn.Module):
    """Attention with a zero key appended: symbolic tracing keeps this nn.MultiheadAttention
    as one opaque call (fxopt.nn_forwards does not cover `add_zero_attn`)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True, add_zero_attn=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        memory = x * 2
        return self.head(self.attn(x, memory, memory, need_weights=False)[0])


class RecurrentLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(8, 16, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


@pytest.mark.parametrize("model", [AttentionLeaf, RecurrentLeaf])
def test_auto_keeps_the_symbolic_graph_and_says_what_it_hides(model):
    """Export would read the attention's linears but fix the sequence length: auto keeps
    the symbolic graph, which runs at any length, and records what it hides and the way out."""
    _seed()
    model = model().eval()
    width = 16 if isinstance(model, AttentionLeaf) else 8
    gm = capture(model, (torch.randn(2, 5, width),))
    info = gm.meta["fxopt"]
    assert info["frontend"] == "symbolic" and len(info["attempts"]) == 1
    hidden, name = (1088, "attn") if isinstance(model, AttentionLeaf) else (1248, "rnn")
    assert info["attempts"][0]["reason"] == (
        f"left {hidden} parameters inside modules fxopt cannot read ({name}); "
        "mode='export' decomposes some of them (a graph for one sequence length)")
    longer = torch.randn(3, 9, width)
    with torch.no_grad():
        torch.testing.assert_close(gm(longer), model(longer))


def test_auto_falls_back_to_export_on_untraceable_control_flow():
    _seed()
    model = ShapeBranch()
    x = torch.randn(3, 4)
    gm = capture(model, (x,), mode="auto")
    info = gm.meta["fxopt"]
    assert info["frontend"] == "export"
    symbolic = info["attempts"][0]
    assert symbolic["frontend"] == "symbolic" and not symbolic["ok"]
    assert THIS_FILE in symbolic["location"] and "x.shape[1] == 4" in symbolic["location"]
    _assert_all_tensor_meta(gm)
    torch.testing.assert_close(gm(x), model(x))


def test_auto_falls_back_when_symbolic_trace_is_silently_wrong():
    """A trace that succeeds but bakes in state is caught by the output check."""

    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.fc(x) * self.calls

    gm = capture(Counter(), (torch.randn(2, 4),))
    assert gm.meta["fxopt"]["attempts"][0]["ok"] is False
    assert "differs" in gm.meta["fxopt"]["attempts"][0]["reason"]


def test_neither_front_end_raises_one_capture_error_with_source_line():
    with pytest.raises(CaptureError) as info:
        capture(DataDependent(), (torch.randn(2, 4),))
    text = str(info.value)
    assert "DataDependent" in text
    assert "symbolic:" in text and "export:" in text
    assert THIS_FILE in text
    line = next(i for i, l in enumerate(open(__file__), 1) if "CAPTURE-FAILS-HERE" in l)
    assert f"line {line}" in text
    assert "x.sum() > 0" in text


def test_single_mode_failure_names_only_that_front_end():
    with pytest.raises(CaptureError) as info:
        capture(ShapeBranch(), (torch.randn(2, 4),), mode="symbolic")
    assert "symbolic:" in str(info.value) and "export:" not in str(info.value)


def test_bad_mode_and_bad_model():
    with pytest.raises(ValueError, match="valid: auto, export, symbolic"):
        capture(ConvNet(), (torch.randn(1, 3, 4, 4),), mode="jit")
    with pytest.raises(TypeError, match="nn.Module"):
        capture(lambda x: x, (torch.randn(2),))


# ----- structured outputs -------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_dict_outputs(mode):
    _seed()
    model = DictOut()
    x = torch.randn(3, 4)
    gm = capture(model, (x,), mode=mode)
    out = gm(x)
    assert set(out) == {"logits", "aux"}
    torch.testing.assert_close(out["logits"], model(x)["logits"])
    torch.testing.assert_close(out["aux"], model(x)["aux"])
    assert fxopt.verify(model, gm, (x,)).passed


def test_dataclass_output_hf_model_output():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_outputs import BaseModelOutput

    class WithModelOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return BaseModelOutput(last_hidden_state=self.fc(x))

    _seed()
    model = WithModelOutput()
    x = torch.randn(2, 4)
    gm = capture(model, (x,), mode="auto")
    out = gm(x)
    assert isinstance(out, BaseModelOutput)
    torch.testing.assert_close(out.last_hidden_state, model(x).last_hidden_state)
    assert fxopt.verify(model, gm, (x,)).passed
    del transformers


# ----- batch sizes --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("example_batch", [1, 4])
def test_other_batch_sizes(mode, example_batch):
    _seed()
    model = ConvNet().eval()
    gm = capture(model, (torch.randn(example_batch, 3, 8, 8),), mode=mode)
    for batch in (1, 3, 4):
        x = torch.randn(batch, 3, 8, 8)
        torch.testing.assert_close(gm(x), model(x))
    if mode == "export":
        assert gm.meta["fxopt"]["dynamic_batch"] is True


# ----- the user's model is never touched ----------------------------------------------------

@pytest.mark.parametrize("mode", ["auto", "symbolic", "export"])
def test_capture_does_not_mutate_model(mode):
    _seed()
    model = ConvNet().train()
    before = _state(model)
    params = [id(p) for p in model.parameters()]
    gm = capture(model, (torch.randn(2, 3, 8, 8),), mode=mode)
    _assert_untouched(model, before, training=True)
    assert [id(p) for p in model.parameters()] == params
    assert all(m.training for m in model.modules())
    # and the graph uses inference semantics: dropout off, batchnorm on running stats
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(gm(x), gm(x))
    torch.testing.assert_close(gm(x), _eval_copy(before)(x))


def _eval_copy(state):
    m = ConvNet()
    m.load_state_dict(state)
    return m.eval()


def test_capture_of_export_graph_module_works_and_copies():
    """An export GraphModule refuses .eval(); capture must adopt it without calling it."""
    _seed()
    model = ConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    ep_gm = torch.export.export(model, (x,), strict=False).module()
    for mode in ("auto", "export", "symbolic"):
        gm = capture(ep_gm, (x,), mode=mode)
        assert gm is not ep_gm
        assert frontend_of(gm) == "export"
        _assert_all_tensor_meta(gm)
        torch.testing.assert_close(gm(x), model(x))
    res = fxopt.optimize(ep_gm, (x,), pipeline="remove-noops,dce")
    assert res.verification.passed


def test_keyword_inputs():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, mask=None):
            y = self.fc(x)
            return y if mask is None else y * mask

    _seed()
    model = KW()
    inputs = {"x": torch.randn(2, 4), "mask": torch.ones(2, 4)}
    for mode in ("symbolic", "export"):
        gm = capture(model, inputs, mode=mode)
        torch.testing.assert_close(gm(**inputs), model(**inputs))
        _assert_all_tensor_meta(gm)


# ----- Hugging Face -------------------------------------------------------------------------

def _tiny_bert(cls_name="BertForSequenceClassification"):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(config)


@pytest.mark.slow
def test_hugging_face_bert_auto_capture_optimize_verify():
    model = _tiny_bert()
    before = _state(model)
    training = model.training
    ids = torch.randint(0, 100, (2, 8))
    inputs = {"input_ids": ids, "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    res = fxopt.optimize(model, inputs, mode="auto", pipeline="remove-noops,fold-constants,dce")
    assert res.frontend == "export"
    attempts = res.original.meta["fxopt"]["attempts"]
    assert attempts[0]["frontend"] == "symbolic" and not attempts[0]["ok"]
    assert res.verification.passed, res.verification.summary()
    assert res.passes[0].stats["removed"].get("dropout", 0) > 0
    assert res.passes[-1].nodes_after < res.passes[0].nodes_before
    _assert_untouched(model, before, training)
    # a different batch size still gives the same output as the eager model
    model.eval()
    ids4 = torch.randint(0, 100, (4, 8))
    mask4 = torch.ones(4, 8, dtype=torch.long)
    mask4[0, 5:] = 0
    with torch.no_grad():
        expected = model(input_ids=ids4, attention_mask=mask4).logits
        got = res.module(input_ids=ids4, attention_mask=mask4)
    assert type(got).__name__ == "SequenceClassifierOutput"
    torch.testing.assert_close(got.logits, expected, rtol=1e-4, atol=1e-5)
    report = fxopt.verify(res.original, res.module, {"input_ids": ids4, "attention_mask": mask4})
    assert report.passed, report.summary()


def test_hugging_face_bert_batch_one_example():
    model = _tiny_bert("BertModel")
    gm = capture(model, {"input_ids": torch.randint(0, 100, (1, 6))})
    assert gm.meta["fxopt"]["frontend"] == "export"
    assert gm.meta["fxopt"]["dynamic_batch"] is True
    _assert_all_tensor_meta(gm)
    ids = torch.randint(0, 100, (3, 6))
    with torch.no_grad():
        out = gm(input_ids=ids)
        expected = model.eval()(input_ids=ids)
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=1e-4, atol=1e-5)


# ----- non-tensor inputs: specialized at capture, checked on every call ------------------------

class Flags(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x, scale=1.0, flag=False, mode="a", mask=None):
        y = self.fc(x) * scale
        if mask is not None:
            y = y * mask
        if mode == "b":
            y = y - 1
        return y.relu() if flag else y


_FLAGS = {"scale": 0.5, "flag": True, "mode": "b", "mask": None}


@pytest.mark.parametrize("mode", ["symbolic", "auto"])
@pytest.mark.parametrize("given", [
    {"flag": True, "mode": "a", "mask": None},  # scale left at its default: a graph input
    {"scale": 0.5, "flag": True, "mode": "a", "mask": None},
    dict(_FLAGS),
])
def test_non_tensor_keyword_inputs_are_specialized(mode, given):
    _seed()
    model = Flags().eval()
    x = torch.randn(2, 16)
    gm = capture(model, {"x": x, **given}, mode=mode)
    assert frontend_of(gm) == "symbolic"  # auto no longer has to fall back to export
    _assert_all_tensor_meta(gm)
    torch.testing.assert_close(gm(x, **given), model(x, **given))
    torch.testing.assert_close(gm(x=torch.ones(3, 16), **given), model(torch.ones(3, 16), **given))
    if "scale" not in given:  # not specialized: still an input of the graph
        torch.testing.assert_close(gm(x, scale=3.0, **given), model(x, scale=3.0, **given))
    # the graph keeps the argument's own name and refuses another value, naming it
    other = {"flag": False, "scale": 2.0, "mode": "c", "mask": torch.ones(8)}
    for name, value in given.items():
        if name in other:
            with pytest.raises(fxopt.InputMismatchError, match=f"captured with {name}={value!r}"):
                gm(x, **{**given, name: other[name]})
    with pytest.raises(fxopt.InputMismatchError, match="captured with flag=True"):
        gm(x, **{k: v for k, v in given.items() if k != "flag"})  # flag at its default (False)


@pytest.mark.parametrize("mode", ["symbolic", "auto"])
def test_non_tensor_positional_inputs_are_specialized(mode):
    _seed()
    model = Flags().eval()
    x = torch.randn(2, 16)
    args = (x, 0.5, True, "b", None)
    gm = capture(model, args, mode=mode)
    assert frontend_of(gm) == "symbolic"
    torch.testing.assert_close(gm(*args), model(*args))
    torch.testing.assert_close(gm(x, scale=0.5, flag=True, mode="b"), model(*args))
    # each names the value it was called with, as export's guard does (it said "another")
    with pytest.raises(fxopt.InputMismatchError, match="captured with flag=True: .* was called with False;"):
        gm(x, 0.5, False, "b", None)
    with pytest.raises(fxopt.InputMismatchError, match="captured with mode='b': .* was called with 'a';"):
        gm(x, 0.5, True, "a", None)
    with pytest.raises(fxopt.InputMismatchError, match=r"captured with mask=None: .* was called with a float32 "
                                                       r"tensor of shape \[8\];"):
        gm(x, 0.5, True, "b", torch.ones(8))


def test_non_tensor_inputs_through_optimize_dce_and_save(tmp_path):
    _seed()
    model = Flags().eval()
    x = torch.randn(2, 16)
    inputs = {"x": x, **_FLAGS}
    res = fxopt.optimize(model, inputs, "fuse,remove-noops,dce", mode="symbolic")
    assert res.verification.passed, res.verification.summary()
    torch.testing.assert_close(res.module(**inputs), model(**inputs))
    path = tmp_path / "gm.pt"
    torch.save(res.module, path)
    loaded = torch.load(path, weights_only=False)
    torch.testing.assert_close(loaded(**inputs), model(**inputs))
    for gm in (res.module, loaded):  # the guards survive dead-code removal and a reload
        with pytest.raises(fxopt.InputMismatchError, match="captured with flag=True: .* was called with False"):
            gm(**{**inputs, "flag": False})
        with pytest.raises(fxopt.InputMismatchError, match="captured with mask=None"):
            gm(**{**inputs, "mask": torch.ones(8)})


def test_non_tensor_input_export_guard_names_the_argument():
    _seed()
    model = Flags().eval()
    x = torch.randn(2, 16)
    gm = capture(model, (x, 0.5, True), mode="export")
    torch.testing.assert_close(gm(x, 0.5, True), model(x, 0.5, True))
    with pytest.raises(fxopt.errors.InputMismatchError, match=r"captured with input 2 \('flag'\)=True"):
        gm(x, 0.5, False)


@pytest.mark.parametrize("keyword", [False, True])
def test_inputs_holding_tensors_are_not_specialized(keyword):
    class Pair(nn.Module):
        def forward(self, x, ys):
            return x + ys[0] * ys[1]

    x, ys = torch.randn(2, 3), [torch.randn(2, 3), torch.randn(2, 3)]
    gm = capture(Pair(), {"x": x, "ys": ys} if keyword else (x, ys), mode="symbolic")
    other = [torch.ones(2, 3), torch.full((2, 3), 2.0)]
    torch.testing.assert_close(gm(x, other), x + 2.0)  # a graph input, not baked-in constants


@dataclasses.dataclass
class _Batch:  # not registered with pytree: a leaf of the inputs
    x: torch.Tensor
    scale: float = 2.0


class _ReadsABatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, batch):
        return self.fc(batch.x) * batch.scale


def test_an_object_holding_tensors_is_an_input_not_a_constant():
    """An unregistered dataclass holding a tensor is one leaf to pytree, taken for a flag and specialized: the
    graph's guard compared each call with `_Batch(x=tensor([...]))`, code that raised NameError ('_Batch' is not
    defined) and printed fx's traceback, and the symbolic attempt failed; the object is a graph input now."""
    model, batch = _ReadsABatch().eval(), _Batch(torch.randn(2, 4))
    gm = capture(model, (batch,), mode="symbolic")
    other = _Batch(torch.randn(5, 4), 3.0)
    torch.testing.assert_close(gm(other), model(other))


def test_an_export_whose_batch_axis_was_specialized_warns():
    """A GRU fed sequence-first (S, B, E): export keeps dim 0 static, so the graph runs at the
    example's shapes only — the capture says so instead of failing at the next call."""

    class SequenceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru, self.head = nn.GRU(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.gru(x)[0][-1])

    with pytest.warns(UserWarning, match="static batch size .*specialized dim 0"):
        gm = fxopt.capture(SequenceFirst().eval(), (torch.randn(5, 2, 8),), mode="export")
    assert gm.meta["fxopt"]["dynamic_batch"] is False


class BiasInput(nn.Module):
    """A side input whose dim 0 is no batch (a bias vector [d]) beside the batched input."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x, b):
        return self.fc(x) + b


def test_an_export_keeps_the_batch_dynamic_beside_a_side_input_of_another_size():
    """The inputs' dim 0 disagree (2 and 16): the first input's is the batch, and the side
    input keeps its size. Export used to specialize every input in silence, and the next call
    at another batch failed with a bare guard error."""
    _seed()
    model, b = BiasInput().eval(), torch.randn(16)
    gm = capture(model, (torch.randn(2, 10, 16), b), mode="export")
    assert gm.meta["fxopt"]["dynamic_batch"] is True
    x = torch.randn(5, 10, 16)
    with torch.no_grad():
        torch.testing.assert_close(gm(x, b), model(x, b))


def test_an_export_whose_inputs_name_no_batch_warns():
    """With a batch of 1 beside a side input of 16, either could be the batch: static, and said."""
    with pytest.warns(UserWarning, match=r"static batch size .*dim 0 sizes \[1, 16\] name no batch"):
        gm = capture(BiasInput().eval(), (torch.randn(1, 10, 16), torch.randn(16)), mode="export")
    assert gm.meta["fxopt"]["dynamic_batch"] is False


class StepCounter(nn.Module):
    """Updates a buffer in forward, and its output depends on it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x):
        self.steps += 1
        return self.fc(x) * self.steps


def test_a_forward_that_writes_its_buffers_is_exported_with_the_write():
    _seed()
    model, x = StepCounter().eval(), torch.randn(3, 4)
    with pytest.raises(CaptureError, match=r"writes buffer 'steps' in place"):
        capture(model, (x,), mode="symbolic")
    gm = capture(model, (x,))
    assert gm.meta["fxopt"]["frontend"] == "export"
    assert model.steps.item() == 0 and gm.get_buffer("steps").item() == 0, "capture runs leave the state as it was"
    eager = copy.deepcopy(model)
    with torch.no_grad():
        for _ in range(2):  # the state advances call by call, as the model's does
            torch.testing.assert_close(gm(x), eager(x))


def test_optimize_verifies_a_stateful_model_from_its_state():
    _seed()
    model, x = StepCounter().eval(), torch.randn(3, 4)
    res = fxopt.optimize(model, x, "fuse")
    assert res.verification.passed
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), copy.deepcopy(model)(x))


def test_a_model_on_the_meta_device_is_refused_by_name():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(CaptureError, match=r"'0.weight' is on the meta device.*to_empty"):
        fxopt.capture(model, (torch.randn(1, 2),))


def test_an_uninitialized_lazy_module_is_refused_by_name_and_left_lazy():
    """capture initialized a private copy with random weights the user's model never got."""
    model, x = nn.Sequential(nn.Linear(3, 3), nn.LazyLinear(4), nn.ReLU()).eval(), torch.randn(2, 3)
    with pytest.raises(CaptureError, match=r"'1.weight' of LazyLinear '1' is not initialized \(a lazy module "
                                           r"that has not run yet\).*run the model once .*or load its weights"):
        fxopt.optimize(model, x, "fuse")
    assert isinstance(model[1], nn.LazyLinear)
    model(x)  # once it ran, its weights are the model's own
    res = fxopt.optimize(model, x, "fuse")
    torch.testing.assert_close(res.module(x), model(x))


# ----- bad example inputs, and what capture prints ---------------------------------------------

class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, y):
        return self.fc(x) + y  # ADDS-Y-HERE


@pytest.mark.parametrize("model, example, expected", [
    (nn.Linear(4, 4), ("hello",), "example input 0 ('input') is a str ('hello')"),
    (nn.Linear(4, 4), ([torch.randn(2, 4)],), "example input 0 ('input') is a list of 1 item"),
    (TwoInputs(), {"x": torch.randn(2, 4), "y": "oops"}, "example input 'y' is a str ('oops')"),
    (TwoInputs(), (torch.randn(2, 4), None), "example input 1 ('y') is None"),
])
def test_inputs_forward_cannot_take_are_named_with_their_type(model, example, expected):
    with pytest.raises(CaptureError) as info:
        capture(model, example)
    text = str(info.value)
    assert "does not run on the example inputs, so there is nothing to capture: TypeError: " in text
    assert expected in text
    assert "hint: pass a tensor where forward computes with one" in text
    assert '"<string>"' not in text and "<eval_with_key" not in text  # generated code has no line to show
    if isinstance(model, TwoInputs):
        line = next(i for i, l in enumerate(open(__file__), 1) if "ADDS-Y-HERE" in l)
        assert f"{THIS_FILE}\", line {line}, in forward" in text


@pytest.mark.parametrize("mode", ["auto", "symbolic", "export"])
def test_an_empty_example_batch_is_refused_with_why(mode):
    """A batch of 0 made prune fail with a ZeroDivisionError deep in its analysis, and verifying
    on it compares nothing."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten())
    with pytest.raises(CaptureError, match=r"empty batch \(the first tensor input has shape \(0, 3, 10, 10\)\).*"
                                           r"at least one sample"):
        capture(model, (torch.randn(0, 3, 10, 10),), mode=mode)
    import fxopt

    with pytest.raises(CaptureError, match="empty batch"):
        fxopt.optimize(model, (torch.randn(0, 3, 10, 10),), "prune{ratio=0.5}")


def test_inputs_that_do_not_bind_to_forward_are_refused_before_tracing():
    with pytest.raises(CaptureError, match=r"do not fit Linear.forward\(input: torch.Tensor\).*missing a "
                                           r"required argument: 'input' \(example_inputs is None"):
        capture(nn.Linear(4, 4), None)
    with pytest.raises(CaptureError, match=r"too many positional arguments \(given \(torch.Tensor, str\)\)"):
        capture(nn.Linear(4, 4), (torch.randn(2, 4), "extra"))
    with pytest.raises(CaptureError, match="unexpected keyword argument 'z'"):
        capture(TwoInputs(), {"x": torch.randn(2, 4), "y": torch.randn(2, 4), "z": 1})


def test_an_array_is_refused_with_the_conversion_to_make():
    np = pytest.importorskip("numpy")
    with pytest.raises(CaptureError, match=r"example input 1 \('y'\) is a numpy.ndarray, not a torch.Tensor: "
                                           r"convert it first \(torch.from_numpy"):
        capture(TwoInputs(), (torch.randn(2, 4), np.ones((2, 4), dtype="float32")))


def test_the_location_shown_is_the_users_line_not_generated_code():
    """fx's `<eval_with_key>.N` and export's `<string>` lambdas have no line to show: the
    location is the deepest frame of real user code."""
    from fxopt.capture import _user_frame

    namespace: dict = {}
    for name in ("<string>", "<eval_with_key>.7"):
        exec(compile("def generated(x):\n    return x + 'a'\n", name, "exec"), namespace)
        with pytest.raises(TypeError) as info:
            namespace["generated"](torch.randn(2))  # CALLS-GENERATED-CODE
        where = _user_frame(info.value)
        assert THIS_FILE in where and "CALLS-GENERATED-CODE" in where, where


class NestedInputs(nn.Module):
    """Containers of tensors, ints, flags and an optional mask: all valid example inputs."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, pair, extra, mask=None, scale=2, use_bias=True):
        a, (b, repeat) = pair
        y = self.fc(a + b) * extra["gain"] * scale * repeat
        if mask is not None:
            y = y * mask
        return y + extra["shift"] if use_bias else y


def test_nested_and_non_tensor_inputs_are_not_refused():
    model = NestedInputs().eval()
    x = torch.randn(2, 4)
    example = ((x, (x, 3)), {"gain": torch.ones(4), "shift": 0.5}, None, 2, False)
    torch.testing.assert_close(capture(model, example)(*example), model(*example))
    keywords = {"pair": (x, (x, 1)), "extra": {"gain": torch.ones(4), "shift": 1.0}, "mask": torch.ones(4)}
    torch.testing.assert_close(capture(model, keywords)(**keywords), model(**keywords))


def test_data_dependent_control_flow_fails_quietly_with_a_hint(capfd, caplog):
    import logging

    levels = {name: logging.getLogger(name).level for name in ("torch", "torch.fx.experimental.symbolic_shapes")}
    with caplog.at_level(logging.DEBUG), pytest.raises(CaptureError) as info:
        capture(DataDependent(), (torch.randn(2, 4),))
    assert "hint: forward branches on a tensor's values" in str(info.value)
    assert "torch.cond(" in str(info.value) and "fxopt.register_traceable_forward" in str(info.value)
    out, err = capfd.readouterr()
    assert err == "" and out == ""  # no "Unable to find user code", no partial graphs
    assert not [r for r in caplog.records if r.name.startswith("torch")]
    assert {name: logging.getLogger(name).level for name in levels} == levels  # restored


def test_a_successful_export_still_shows_what_it_printed(capfd):
    class Prints(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            import sys
            print("forward ran", file=sys.stderr)
            return self.fc(x)

    capture(Prints(), (torch.randn(2, 4),), mode="export")
    assert "forward ran" in capfd.readouterr().err


def test_inputs_a_decorated_forward_takes_are_not_refused_by_the_signature_it_wraps():
    """A decorator may accept what the forward it wraps does not (a deprecated keyword renamed)."""
    import functools

    def renames_old_keyword(forward):
        @functools.wraps(forward)
        def wrapper(self, *args, **kwargs):
            if "inp" in kwargs:
                kwargs["x"] = kwargs.pop("inp")
            return forward(self, *args, **kwargs)
        return wrapper

    class Renamed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        @renames_old_keyword
        def forward(self, x):
            return self.fc(x)

    model = Renamed()
    model(inp=torch.randn(2, 4))  # runs eagerly: the inputs are not what is wrong
    with pytest.raises(CaptureError) as info:  # the front ends bind to the inner signature
        capture(model, {"inp": torch.randn(2, 4)})
    assert "do not fit" not in str(info.value) and "front ends tried" in str(info.value)


class OptionalMask(nn.Module):
    """`forward(x, mask=None)` with a branch on the mask: the common optional input."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x, mask=None, causal=False):
        if mask is not None:
            x = x * mask
        return self.fc(x).cumsum(1) if causal else self.fc(x)


def test_an_argument_left_out_takes_its_default_in_the_symbolic_trace():
    """fx made the left-out `mask` an input (a Proxy, so `mask is not None` held): the trace
    failed with a bare TypeError and auto fell back to export at one sequence length."""
    _seed()
    model, x = OptionalMask().eval(), torch.randn(2, 3)
    gm = capture(model, (x,), mode="auto")
    assert frontend_of(gm) == "symbolic"
    other = torch.randn(4, 3)
    torch.testing.assert_close(gm(other), model(other))
    with pytest.raises(fxopt.InputMismatchError, match="captured with mask=None"):
        gm(x, mask=torch.zeros(2, 3))
    with pytest.raises(fxopt.InputMismatchError, match="captured with causal=False"):
        gm(x, causal=True)


def test_a_transformer_encoder_traces_symbolically_as_the_root_model():
    """nn.TransformerEncoder's forward(src, mask=None, src_key_padding_mask=None, is_causal=None)
    as the root: symbolic failed ('_none_or_dtype'), auto exported a graph pinned to the
    example's sequence length."""
    _seed()
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2).eval()
    gm = capture(enc, (torch.randn(2, 5, 16),), mode="auto")
    assert frontend_of(gm) == "symbolic"
    longer = torch.randn(3, 9, 16)
    torch.testing.assert_close(gm(longer), enc(longer), rtol=1e-4, atol=1e-5)


def test_an_exported_graph_refuses_a_tensor_where_none_was_captured():
    """Export checks no input captured as None: a mask given later was ignored (a wrong answer)."""
    _seed()
    model, x = OptionalMask().eval(), torch.randn(2, 3)
    gm = capture(model, {"x": x, "mask": None}, mode="export")
    torch.testing.assert_close(gm(x=x, mask=None), model(x))
    with pytest.raises(fxopt.InputMismatchError, match="captured with mask=None"):
        gm(x=x, mask=torch.zeros(2, 3))


class OptionalBias(nn.Module):
    """`forward(x, bias=None)`: the layer's own bias unless the caller gives one."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x, bias=None):
        return self.fc(x) if bias is None else F.linear(x, self.fc.weight, bias)


def test_a_symbolic_graph_refuses_none_where_a_tensor_was_captured(tmp_path):
    """fx keeps `bias=None` in the graph's signature: `gm(x)` ran F.linear(x, w, None), dropping
    the bias the model adds, without a word."""
    _seed()
    model, x, bias = OptionalBias().eval(), torch.randn(2, 3), torch.randn(3)
    res = fxopt.optimize(model, (x, bias), "fuse,dce")
    assert res.frontend == "symbolic"
    fxopt.save(res.module, tmp_path / "m.pt")
    for gm in (res.module, fxopt.load(tmp_path / "m.pt")):
        torch.testing.assert_close(gm(x, bias), model(x, bias))
        for call in (lambda: gm(x), lambda: gm(x, None), lambda: gm(x, bias=None)):
            with pytest.raises(fxopt.InputMismatchError, match=r"input 'bias' is None \(or left out\), where the "
                                                               r"graph was captured with a tensor.*bias=None"):
                call()


class Reduce(nn.Module):
    """Non-tensor inputs that are containers: a tuple of dims, a dict of options, a list of sizes."""

    def forward(self, x, dims=(1,), opts=None, sizes=(2,)):
        y = x.sum(dims, keepdim=True)
        if opts is not None and opts["double"]:
            y = y * 2
        return y.expand(-1, *sizes)


def test_a_tuple_list_or_dict_input_is_specialized_by_symbolic_tracing(tmp_path):
    """fx flattened a container into a placeholder per item and wrote code that is no Python: a
    SyntaxError blamed on the model's line, and auto fell back to export."""
    model, x = Reduce().eval(), torch.randn(3, 4)
    given = {"dims": (1,), "opts": {"double": True}, "sizes": [5]}
    gm = capture(model, {"x": x, **given}, mode="auto")
    assert frontend_of(gm) == "symbolic"
    fxopt.save(gm, tmp_path / "m.pt")
    for graph in (gm, fxopt.load(tmp_path / "m.pt")):
        torch.testing.assert_close(graph(x, **given), model(x, **given))
        assert graph(torch.randn(6, 4), **given).shape == (6, 5)
        for name, other in (("dims", (0,)), ("opts", {"double": False}), ("sizes", [6])):
            with pytest.raises(fxopt.InputMismatchError, match=rf"captured with {name}={re.escape(repr(given[name]))}"):
                graph(x, **{**given, name: other})
    assert capture(model, x, mode="symbolic")(x).shape == (3, 2)  # left out at its tuple default


class _Forces(nn.Module):
    """Forces as -dE/dx, computed in forward (machine-learned potentials do)."""

    def __init__(self):
        super().__init__()
        self.energy = nn.Linear(3, 1)

    def forward(self, pos):
        pos = pos.requires_grad_(True)
        return -torch.autograd.grad(self.energy(torch.tanh(pos)).sum(), pos)[0]


def test_a_forward_that_computes_gradients_is_named_as_such():
    """It said the model "does not run on the example inputs", which it does: capture's own
    no-grad run was what failed."""
    with pytest.raises(CaptureError, match=r"_Forces's forward computes gradients itself.*runs with gradients on "
                                           r"only \(RuntimeError under torch.no_grad\(\)"):
        capture(_Forces().eval(), torch.randn(5, 3))


class Noisy(nn.Module):
    def __init__(self, source):
        super().__init__()
        self.fc, self.source = nn.Linear(3, 3), source

    def forward(self, x):
        if self.source == "torch":  # noise injection, and dropout left on in the forward
            return self.fc(x) + 0.1 * torch.rand_like(x) + F.dropout(x, 0.5, training=True)
        return self.fc(x) * np.random.rand()


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_random_draws_from_torch_are_the_same_in_both_runs_of_a_comparison(mode):
    """Both front ends refused a forward with `rand_like`, blaming 'Python control flow or
    state'; the comparisons now draw the same numbers on both sides."""
    _seed()
    model, x = Noisy("torch").eval(), torch.randn(2, 3)
    res = fxopt.optimize(model, x, "fuse", mode=mode)
    assert res.verification.passed, res.verification.summary()
    assert not torch.equal(res.module(x), res.module(x))  # still random when the caller runs it


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_random_draws_no_graph_records_are_named(mode):
    _seed()
    with pytest.raises(CaptureError, match="not deterministic.*NumPy"):
        capture(Noisy("numpy").eval(), torch.randn(2, 3), mode=mode)


class _KwargsForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, **extra):
        return self.fc(x) * extra["scale"] + extra["shift"]


def test_inputs_through_var_keyword_are_named_by_both_front_ends():
    """Symbolic said "missing input 'extra'" (a name the caller never gave); export warned in
    torch's words ("Must provide a tree_name when there might be a mismatch")."""
    inputs = {"x": torch.randn(2, 4), "shift": torch.randn(2, 4), "scale": torch.tensor(2.0)}
    with pytest.raises(fxopt.CaptureError, match=r"_KwargsForward.forward takes inputs 'shift', 'scale' through "
                                                 r"\*\*extra, which symbolic tracing cannot pass .* mode='export'"):
        fxopt.capture(_KwargsForward().eval(), inputs, mode="symbolic")
    with pytest.warns(UserWarning, match=r"static batch size \(dim 0 of the inputs could not stay dynamic: "
                                         r"torch.export cannot make inputs passed through \*\*extra dynamic"):
        fxopt.capture(_KwargsForward().eval(), inputs, mode="export")


@dataclasses.dataclass
class _PairOut:
    logits: torch.Tensor
    hidden: torch.Tensor


class _ReturnsPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        return _PairOut(h.relu(), h)


def test_an_unregistered_dataclass_output_gets_the_advice_that_works():
    """The hint said to return "dataclasses of them", which is what the model did."""
    x = torch.randn(3, 4)
    with pytest.raises(CaptureError, match=r"hint: the output is a _PairOut, a dataclass torch.export does not "
                                           r"know: register it with torch.export.register_dataclass\(_PairOut\)"):
        capture(_ReturnsPair().eval(), x, mode="export")
    torch.export.register_dataclass(_PairOut)
    try:
        gm = capture(_ReturnsPair().eval(), x, mode="export")
        assert isinstance(gm(x), _PairOut)
    finally:
        torch.utils._pytree._deregister_pytree_node(_PairOut)


class _CountsInPython(nn.Module):
    """Keeps a call count in a Python attribute, which no graph records."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x) * self.calls


def test_auto_exports_from_a_fresh_copy_not_the_one_the_symbolic_attempt_ran():
    """auto's export baked calls == 5 (the copy had run 4 times in the failed symbolic attempt),
    where mode='export' bakes 1: the result depended on fxopt's own trial runs."""
    x = torch.randn(2, 4)
    model = _CountsInPython().eval()
    with pytest.raises(CaptureError, match=r"not deterministic.*state forward keeps in Python attributes"):
        capture(model, x, mode="symbolic")
    auto, export = capture(model, x, mode="auto"), capture(model, x, mode="export")
    assert frontend_of(auto) == "export" and model.calls == 0
    assert torch.allclose(auto(x), export(x)) and torch.allclose(auto(x), model.fc(x))


class _ScalesByCallCount(nn.Module):
    def __init__(self, scaled: bool = True):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.calls, self.scaled = 0, scaled

    def forward(self, x):
        self.calls += 1
        return self.fc(x) * self.calls if self.scaled else self.fc(x)


@pytest.mark.parametrize("mode", ["export", "auto"])
def test_state_kept_in_a_python_attribute_that_changes_the_output_is_warned_of(mode):
    """Export baked `self.calls` in as 1 and passed the check against one eager call, silently,
    where symbolic refused the same model: the graph computes the first call's value forever."""
    with pytest.warns(UserWarning, match=r"depends on state its forward keeps in Python attributes \(calls: 0 -> 1\)"):
        gm = fxopt.capture(_ScalesByCallCount(), torch.randn(3, 4), mode=mode)
    assert frontend_of(gm) == "export"


def test_a_python_counter_the_output_does_not_read_is_captured_without_a_word():
    model = _ScalesByCallCount(scaled=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = fxopt.capture(model, torch.randn(3, 4), mode="export")
    x = torch.randn(2, 4)
    torch.testing.assert_close(gm(x), model(x))


class _DrawsNoise(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        noise = torch.randn(8) * 0  # no traced value: fx runs it once and keeps its values
        return self.fc(x) + noise + torch.rand_like(x).round() * 0.01


def test_symbolic_names_a_random_draw_it_would_freeze():
    """It said 'the trace baked in Python control flow or state' and named no line."""
    with pytest.raises(CaptureError, match=r"forward draws random numbers from no traced value \(randn at "
                                           r"\".*test_capture.py\", line \d+: noise = torch.randn\(8\) \* 0"):
        capture(_DrawsNoise().eval(), torch.randn(4, 8), mode="symbolic")
    assert frontend_of(capture(_DrawsNoise().eval(), torch.randn(4, 8))) == "export"


def _passes_everything_through(forward):
    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        return forward(self, *args, **kwargs)
    return wrapper


class _DecoratedForward(nn.Module):
    """A forward wrapped as Hugging Face wraps theirs: symbolic tracing cannot rebuild its signature."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    @_passes_everything_through
    def forward(self, x, mask=None, **kwargs):
        return self.fc(x)


def test_symbolic_failing_on_a_decorated_forward_says_what_to_do():
    """GPT-2 gave only 'ValueError: code: co_varnames is too small'."""
    with pytest.raises(CaptureError, match=r"co_varnames is too small\n  hint: symbolic tracing cannot rebuild the "
                                           r"signature .* capture with mode='export'"):
        capture(_DecoratedForward(), {"x": torch.randn(2, 4)}, mode="symbolic")


@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
def test_a_hook_on_the_model_itself_is_named_when_symbolic_tracing_misses_it(kind):
    """fx traces forward, not __call__: the check blamed "Python control flow or state"."""
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    hook = {"forward": lambda mod, i, o: o * 3 + 1, "forward_pre": lambda mod, i: (i[0] * 3,)}[kind]
    getattr(model, f"register_{kind}_hook")(hook)
    kind_text = {"forward": "forward hook", "forward_pre": "forward pre-hook"}[kind]
    with pytest.raises(CaptureError, match=rf"output 0 differs from the model by [\d.]+: Sequential has a {kind_text} "
                                           r"on itself \(<lambda> at .*test_capture.py:\d+\); symbolic tracing runs "
                                           r"forward without it, mode='export' records it"):
        capture(model, (torch.randn(2, 4),), mode="symbolic")
    gm = capture(model, (torch.randn(2, 4),))   # auto falls back to export, which records the hook
    x = torch.randn(3, 4)
    assert gm.meta["fxopt"]["frontend"] == "export"
    torch.testing.assert_close(gm(x), model(x))


def test_a_list_for_a_forward_that_takes_one_list_says_to_wrap_it():
    """A list is read as positional inputs, and only the dict case said to wrap it (api F7)."""
    class ListIn(nn.Module):
        def forward(self, xs):
            return xs[0] + xs[1]

    with pytest.raises(CaptureError, match=r"too many positional arguments .*; a list is read as positional inputs "
                                           r"\(2 of them\); to pass it as forward's one list input, wrap it in a "
                                           r"tuple: \(\[\.\.\.\],\)"):
        capture(ListIn(), [torch.randn(3, 4), torch.randn(3, 4)])


def test_a_mapping_for_a_forward_that_takes_one_mapping_is_named_by_its_class():
    """The hint said "a dict is read as keyword inputs" for a UserDict (advB B7)."""
    import collections

    class MappingIn(nn.Module):
        def forward(self, td):
            return td["x"] * 2

    with pytest.raises(CaptureError, match=r"a UserDict is read as keyword inputs \('x'\); to pass it as forward's "
                                           r"one dict input, wrap it in a tuple"):
        capture(MappingIn(), collections.UserDict(x=torch.randn(3, 4)))


def test_a_dict_for_a_forward_that_takes_one_dict_says_to_wrap_it():
    class DictIn(nn.Module):
        def forward(self, d):
            return d["x"] + d["y"]

    inputs = {"x": torch.randn(3, 4), "y": torch.randn(3, 4)}
    with pytest.raises(CaptureError, match=r"a dict is read as keyword inputs \('x', 'y'\); to pass it as forward's "
                                           r"one dict input, wrap it in a tuple: \(\{\.\.\.\},\)"):
        capture(DictIn(), inputs)
    gm = capture(DictIn(), (inputs,))   # the advice works
    torch.testing.assert_close(gm(inputs), inputs["x"] + inputs["y"])


def test_an_exported_program_or_a_torchscript_module_is_named_with_what_to_pass():
    model = nn.Linear(4, 2).eval()
    x = torch.randn(3, 4)
    ep = torch.export.export(model, (x,), strict=False)
    with pytest.raises(TypeError, match=r"got an ExportedProgram: pass its module \(fxopt.capture\(ep.module\(\), inputs\)\)"):
        capture(ep, (x,))
    with pytest.raises(CaptureError, match=r"RecursiveScriptModule is a TorchScript module.*pass the nn.Module"):
        capture(torch.jit.script(model), (x,))
    with pytest.raises(CaptureError, match=r"is a TorchScript module"):
        capture(torch.jit.trace(model, x), (x,))


class _Log(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.seen = []

    def forward(self, x):
        self.seen.append(1)
        return self.fc(x) * len(self.seen)


def test_output_depending_on_a_python_list_attribute_warns_like_a_counter():
    """An int counter warned; a list the forward appends to was captured silently (the graph
    repeats the captured length on every call)."""
    model = _Log().eval()
    with pytest.warns(UserWarning, match=r"depends on state its forward keeps in Python attributes \(seen: \[\] -> "
                                         r"\[1(, 1)*\]\)"):
        capture(model, (torch.randn(3, 4),))
    assert model.seen == []   # the user's model is left as it was


class _DictStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.state = {"step": 0}

    def forward(self, x):
        self.state["step"] += 1
        return x * self.state["step"]


class _Running(nn.Module):
    def __init__(self):
        super().__init__()
        self.prev = torch.zeros(1)

    def forward(self, x):
        out = x + self.prev
        self.prev = x.detach().mean().reshape(1)
        return out


@pytest.mark.parametrize("model, says", [(_DictStep(), r"state: \{'step': 0\} -> \{'step': \d+\}"),
                                         (_Running(), r"prev: a tensor of shape \(1,\) -> a tensor of shape \(1,\)")])
def test_state_kept_in_a_dict_or_a_plain_tensor_attribute_warns_too(model, says):
    """A count in a dict, or a tensor rebound to a plain attribute: captured without a word, the
    graph repeating the captured call's value."""
    with pytest.warns(UserWarning, match=r"depends on state its forward keeps in Python attributes \(" + says):
        capture(model.eval(), (torch.randn(3, 4),))


def test_a_tensor_kept_in_a_python_attribute_is_named_by_symbolic_capture():
    """It said "captured graph returns a Tensor, the model a Proxy"; an output that reads the
    attribute back on the next call is the Python state capture warns about."""
    class Cache(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.cache = None

        def forward(self, x):
            h = self.fc(x)
            out = h if self.cache is None else h + self.cache
            self.cache = h.detach()
            return out

    model = Cache().eval()
    with pytest.warns(fxopt.CaptureWarning, match=r"depends on state its forward keeps in Python attributes \(cache: "
                                                  r"None -> a tensor of shape \(3, 4\)\)"):
        capture(model, (torch.randn(3, 4),), mode="symbolic")
    assert model.cache is None


class _FirstBatchCenter(nn.Module):
    """Centers every batch on the first batch's mean, computed once into a Python attribute."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.center = None

    def forward(self, x):
        if self.center is None:
            self.center = x.mean(0).detach()
        return self.fc(x - self.center)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_value_forward_computes_once_and_keeps_is_warned_of(mode):
    """A set-once cache: the graph computes it again on every call, where the model keeps the
    first call's. Both agree on the example, so symbolic capture said nothing (the next batch
    was off by 4.9), and export blamed a branch on the batch size and refused a batch of 1."""
    model, x = _FirstBatchCenter().eval(), torch.randn(8, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = capture(model, x, mode=mode)
    said = [str(w.message) for w in caught if issubclass(w.category, fxopt.CaptureWarning)]
    assert len(said) == 1, said
    assert "depends on state its forward keeps in Python attributes (center: None -> a tensor of shape (4,))" in said[0]
    assert model.center is None
    one = torch.randn(1, 4)
    torch.testing.assert_close(gm(one), model.fc(one - one.mean(0)))  # what the model computes on a first call


def test_a_tensor_attribute_the_output_does_not_read_keeps_the_symbolic_graph():
    """`self.last = y.detach()` (a debug probe) made symbolic capture fail, and auto export
    silently, though the output does not depend on it."""
    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.last = None

        def forward(self, x):
            y = self.fc(x)
            self.last = y.detach()
            return y.relu()

    model = Probe().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxopt.CaptureWarning)
        gm = capture(model, (torch.randn(3, 4),), mode="auto")
    assert frontend_of(gm) == "symbolic"
    x = torch.randn(5, 4)
    torch.testing.assert_close(gm(x), model(x))


def test_a_tensor_default_is_named_by_symbolic_capture():
    """fx's generated code failed with "name '_tensor_constant0' is not defined"."""
    class Biased(nn.Module):
        def forward(self, x, b=torch.ones(4)):
            return x + b

    x = torch.randn(2, 4)
    for inputs in ((x,), (x, torch.full((4,), 2.0))):
        with pytest.raises(CaptureError, match=r"forward's input 'b' defaults to a tensor \(or an object holding one\), "
                                               r"which the code of a symbolic graph cannot spell; capture with "
                                               r"mode='export'"):
            capture(Biased(), inputs, mode="symbolic")
    gm = capture(Biased(), (x,))
    assert gm.meta["fxopt"]["frontend"] == "export"   # auto goes on to export
    torch.testing.assert_close(gm(x), x + 1.0)


def test_a_symbolic_graph_refuses_another_flag_with_input_mismatch_error_under_python_O(tmp_path):
    """Its guard was torch._assert: an AssertionError, which `except fxopt.InputMismatchError`
    missed (export graphs raise that), and an `assert`, which python -O strips."""
    import subprocess
    import sys as _sys

    script = tmp_path / "flag.py"
    script.write_text(
        "import torch, fxopt\n"
        "class F(torch.nn.Module):\n"
        "    def forward(self, x, flag=True):\n"
        "        return x if flag else -x\n"
        "gm = fxopt.capture(F(), (torch.randn(2, 3), True), mode='symbolic')\n"
        "try:\n"
        "    gm(torch.randn(2, 3), False)\n"
        "except fxopt.InputMismatchError as exc:\n"
        "    print('refused:', str(exc).split(':')[0])\n")
    out = subprocess.run([_sys.executable, "-O", str(script)], capture_output=True, text=True, timeout=300)
    assert "refused: captured with flag=True" in out.stdout, out.stderr[-2000:]


def test_a_symbolic_guard_survives_dead_code_removal_and_torch_load():
    import io

    class F(nn.Module):
        def forward(self, x, flag=True):
            return x if flag else -x

    gm = fxopt.optimize(F(), (torch.randn(2, 3), True), "dce", mode="symbolic").module
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    for module in (gm, torch.load(buffer, weights_only=False)):
        with pytest.raises(fxopt.InputMismatchError, match="captured with flag=True"):
            module(torch.randn(2, 3), False)


class _LinearPlus(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, a, b):
        return self.fc(a) + b


class _Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, inp):
        a, (b, c) = inp
        return self.fc(a) * b - c


@pytest.mark.parametrize("model, example, call", [
    (_LinearPlus, lambda x: (x, x), lambda a, b, c: (a, b)),
    (_Nested, lambda x: ((x, (x, x)),), lambda a, b, c: ((a, (b, c)),)),
])
def test_an_example_passing_one_tensor_as_two_inputs_exports_a_graph_that_reads_both(model, example, call):
    """torch.export took one tensor given as two inputs ((x, x): a self-attention example of a
    cross-attention model) for one input: the graph read the last in place of the first, and
    verification on the same example passed."""
    torch.manual_seed(0)
    m = model().eval()
    gm = capture(m, example(torch.randn(3, 4)), mode="export")
    a, b, c = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(gm(*call(a, b, c)), m(*call(a, b, c)))


class _Ema(nn.Module):
    """A running mean kept in a buffer, as the README advises for state."""

    def __init__(self, update):
        super().__init__()
        self.register_buffer("m", torch.zeros(4))
        self.update = update

    def forward(self, x):
        self.update(self.m, x)
        return x - self.m


def _mul_then_add(m, x):
    m.mul_(0.5).add_(x.mean(0) * 0.5)


def _zero_then_add(m, x):
    m.zero_()
    m.add_(x.mean(0))


def _copy_of_scaled(m, x):
    m.copy_(m * 0.5 + x.mean(0))


@pytest.mark.parametrize("update", [_mul_then_add, _zero_then_add, _copy_of_scaled])
def test_a_buffer_update_the_trace_ran_in_part_is_refused_by_symbolic_and_auto_exports(update):
    """fx runs the part of a buffer update that reads no traced value (`m.mul_(0.5)`,
    `m.zero_()`, `m * 0.5`) once at trace time and records the rest: the graph was right on the
    first call only, the one the capture check made, and auto chose it."""
    with pytest.raises(CaptureError, match=r"symbolic.*buffer 'm'"):
        capture(_Ema(update).eval(), torch.randn(3, 4), mode="symbolic")
    eager, gm = _Ema(update).eval(), capture(_Ema(update).eval(), torch.randn(3, 4))
    assert frontend_of(gm) == "export"
    for step in range(3):
        x = torch.full((3, 4), step + 1.0)
        torch.testing.assert_close(gm(x), eager(x))


def test_a_buffer_update_traced_whole_stays_symbolic_and_runs_on_every_call():
    eager = _Ema(lambda m, x: m.add_(x.mean(0))).eval()
    gm = capture(_Ema(lambda m, x: m.add_(x.mean(0))).eval(), torch.randn(3, 4))
    assert frontend_of(gm) == "symbolic"
    for step in range(3):
        x = torch.full((3, 4), step + 1.0)
        torch.testing.assert_close(gm(x), eager(x))


class _DictBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, d):
        return self.fc(d["x"]) + (d["bias"] if d.get("bias") is not None else 0)


class _ListBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, xs):
        return self.fc(xs[0]) + (xs[1] if xs[1] is not None else 0)


@pytest.mark.parametrize("model, captured, called", [
    (_DictBias, lambda x: {"x": x, "bias": None}, lambda x, b: {"x": x, "bias": b}),
    (_ListBias, lambda x: [x, None], lambda x, b: [x, b]),
    (_ListBias, lambda x: (x, None), lambda x, b: (x, b)),
])
def test_an_exported_graph_refuses_a_tensor_where_it_was_captured_with_none_inside_a_container(model, captured,
                                                                                                 called, tmp_path):
    """Only a None given as a whole input was guarded: one inside a dict, list or tuple (an
    optional feature of a batch dict) took a tensor later and computed as if it were None."""
    torch.manual_seed(0)
    x, b = torch.randn(3, 4), torch.randn(3, 4)
    m = model().eval()
    gm = capture(m, (captured(x),), mode="export")
    fxopt.save(gm, tmp_path / "g.pt")
    for graph in (gm, fxopt.load(tmp_path / "g.pt")):
        with pytest.raises(fxopt.InputMismatchError, match=r"captured with (d|xs)\[('bias'|1)\]=None"):
            graph(called(x, b))
        torch.testing.assert_close(graph(captured(x)), m(captured(x)))


def test_a_branch_on_values_in_torchs_own_code_under_export_says_to_capture_symbolically():
    """nn.TransformerEncoder given a mask branches in torch's _detect_is_causal_mask: the hint said
    to rewrite the branch with torch.cond, in code that is not the user's; symbolic takes it."""
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2,
                                  enable_nested_tensor=False).eval()
    inputs = (torch.randn(2, 5, 8), nn.Transformer.generate_square_subsequent_mask(5))
    with pytest.raises(CaptureError) as info:
        capture(model, inputs, mode="export")
    message = str(info.value)
    assert "no line of the model's own code" in message and "mode='symbolic'" in message
    assert frontend_of(capture(model, inputs, mode="symbolic")) == "symbolic"


def test_a_named_dim_the_model_fixes_says_which_size_and_what_to_do():
    """torch.export's 'Constraints violated (T)! For more information, run with TORCH_LOGS=...'
    was all the error said."""
    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(5, 8))

        def forward(self, x):
            return x + self.pos

    length = torch.export.Dim("T", min=2, max=64)
    with pytest.raises(CaptureError) as info:
        capture(Positional(), torch.randn(2, 5, 8), mode="export", dynamic_shapes={"x": {1: length}})
    message = str(info.value)
    assert "the model's code fixes T to 5" in message
    assert "torch.export.Dim.AUTO" in message and "mode='symbolic'" in message


class _EvenLengths(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(x) if x.shape[1] % 2 == 0 else -self.fc(x)


def test_a_named_dim_the_model_guards_keeps_export_reason_and_suggested_fixes():
    """Only 'Constraints violated (seq)! For more information, run with TORCH_LOGS="+dynamic".' was
    kept (api F5): export's next lines, the guard the range fails and the Dim to use, are the answer."""
    seq = torch.export.Dim("seq", min=2, max=32)
    with pytest.raises(CaptureError) as info:
        capture(_EvenLengths().eval(), torch.randn(2, 8, 16), mode="export", dynamic_shapes={"x": {1: seq}})
    message = str(info.value)
    assert "Not all values of seq = L['x'].size()[1] in the specified range seq <= 32 satisfy the generated " \
           "guard (L['x'].size()[1] % 2) == 0" in message, message
    assert "suggested fixes: _seq = Dim('_seq', min=1, max=16); seq = 2*_seq" in message, message


def test_the_capture_record_names_every_submodule_of_the_model_called_or_not():
    """prune's ignore= names a module the graph never calls (a training-only head); the graph
    alone cannot tell it from a typo."""
    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
            self.aux = nn.Linear(4, 2)

        def forward(self, x):
            return self.body(x)

    for mode in ("symbolic", "export"):
        gm = capture(WithAux().eval(), torch.randn(2, 4), mode=mode)
        assert gm.meta["fxopt"]["module_names"] == ["body", "body.0", "body.1", "aux"]


class _AugmentsAnAlias(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        y = h
        y += 1  # eager: h changes too; a trace: y = y + 1, h as it was
        return self.b(h)


def test_an_augmented_assignment_on_an_alias_is_named_when_symbolic_capture_fails():
    """`y = h; y += 1` was blamed on "Python control flow or state"."""
    model = _AugmentsAnAlias().eval()
    with pytest.raises(CaptureError, match=r"differs from the model by .*: the graph uses 'add' nowhere: an augmented "
                                           r"assignment on a tensor another name holds \(y = h; y \+= 1\)\? .*"
                                           r"mode='export'"):
        capture(model, torch.randn(2, 4), mode="symbolic")
    gm = capture(model, torch.randn(2, 4))  # auto: export records the write
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm(x), model(x))


def test_a_forward_that_writes_into_its_input_is_not_captured_symbolically():
    """Symbolic tracing records `x += h` as `x + h`: the output agreed, the caller's tensor was
    left unchanged, and capture, optimize and verify all passed it."""
    model, x = AddsIntoItsInput().eval(), torch.randn(2, 4, 6, 6)
    with pytest.raises(CaptureError, match=r"forward writes into input 0 \('x'\) in place, and the graph does not"):
        capture(model, x, mode="symbolic")
    gm = capture(model, x)
    assert frontend_of(gm) == "export"
    mine, theirs = x.clone(), x.clone()
    torch.testing.assert_close(gm(mine), model(theirs))
    torch.testing.assert_close(mine, theirs)  # written as eager writes it


def _weight_normed():
    conv = nn.utils.weight_norm  # the classic hook form (TCN, WaveNet, HiFi-GAN code)
    return nn.Sequential(conv(nn.Conv1d(4, 8, 3, padding=1)), nn.ReLU(), conv(nn.Conv1d(8, 4, 3, padding=1))).eval()


class _ComputedBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("scale", self.fc.weight.sum(0) * 2)  # holds autograd's graph: no graph leaf

    def forward(self, x):
        return self.fc(x) * self.scale


class _HoldsALock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.lock = nn.Linear(4, 4), threading.Lock()

    def forward(self, x):
        return self.fc(x)


class _HoldsAPythonModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.ops = nn.Linear(4, 4), F  # (deepcopy: "cannot pickle 'module' object")

    def forward(self, x):
        return self.ops.relu(self.fc(x))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("make, x", [(_weight_normed, torch.randn(2, 4, 16)),
                                     (lambda: _HoldsALock().eval(), torch.randn(2, 4)),
                                     (lambda: _ComputedBuffer().eval(), torch.randn(2, 4)),
                                     (lambda: _HoldsAPythonModule().eval(), torch.randn(2, 4))],
                         ids=["weight_norm", "lock", "computed buffer", "python module"])
def test_a_model_copy_deepcopy_refuses_is_captured(make, x, mode):
    """capture copies the model first: torch.nn.utils.weight_norm's computed weight (no graph
    leaf) failed with torch's "Only Tensors created explicitly by the user ... support the
    deepcopy protocol", a threading.Lock attribute with "cannot pickle '_thread.lock'", and one holding a
    Python module (``self.ops = F``) with "cannot pickle 'module' object" (it is shared: code, not state)."""
    model = make()
    gm = capture(model, x, mode=mode)
    torch.testing.assert_close(gm(x), model(x))


def test_a_misspelt_mode_is_named_with_the_one_meant():
    with pytest.raises(ValueError, match=r"capture mode 'exprot' is unknown \(did you mean 'export'\?\); valid: auto"):
        capture(nn.ReLU(), torch.ones(2), mode="exprot")


@dataclasses.dataclass
class _Scale:
    value: torch.Tensor


torch.utils._pytree.register_dataclass(_Scale)


class _ScaledIntoItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, scale, x):
        x += self.fc(x) * scale.value
        return x


def test_a_write_into_an_input_after_a_registered_pytree_input_is_found():
    """The check paired the inputs' labels (tuples, lists, dicts only) with pytree leaves (into
    registered dataclasses too): shifted by the dataclass, it compared the wrong tensors and
    `x += h` was captured silently again."""
    with pytest.raises(CaptureError, match=r"forward writes into input 1 \('x'\) in place"):
        capture(_ScaledIntoItsInput().eval(), (_Scale(torch.ones(8)), torch.randn(4, 8)), mode="symbolic")


class _Metrics:
    """Counts rows under a lock: deepcopy refuses it, and sharing it let capture's runs (and
    symbolic tracing's Proxies) into the caller's object."""

    def __init__(self):
        self.lock, self.rows = threading.Lock(), 0

    def record(self, n):
        with self.lock:
            self.rows += n


class _Logs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.metrics = nn.Linear(4, 4), _Metrics()

    def forward(self, x):
        self.metrics.record(x.shape[0])
        return self.fc(x)


def test_an_attribute_deepcopy_refuses_and_capture_cannot_stand_in_for_is_named():
    model = _Logs().eval()
    with pytest.raises(CaptureError, match=r"copy.deepcopy refuses its attribute 'metrics' \(a _Metrics: TypeError: "
                                           r"cannot pickle '_thread.lock' object\)"):
        capture(model, torch.randn(2, 4))
    assert model.metrics.rows == 0


class _FirstBatchCenterOfIds(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.center = None

    def forward(self, ids):
        h = self.emb(ids)
        if self.center is None:
            self.center = h.mean((0, 1)).detach()
        return h - self.center


@pytest.mark.parametrize("ids", [torch.randint(0, 50, (2, 5)), torch.zeros(2, 5, dtype=torch.long)],
                         ids=["ids", "dummy zeros"])
def test_a_value_kept_from_the_first_batch_of_token_ids_is_warned_of(ids):
    """Only floating inputs were varied: a model fed ids kept its first batch's value silently."""
    torch.manual_seed(0)
    with pytest.warns(fxopt.CaptureWarning, match=r"depends on state its forward keeps in Python attributes "
                                                  r"\(center: None -> a tensor of shape \(8,\)\)"):
        capture(_FirstBatchCenterOfIds().eval(), ids, mode="symbolic")


class _ReturnsItsShape(nn.Module):
    def __init__(self, as_dict: bool):
        super().__init__()
        self.fc, self.as_dict = nn.Linear(4, 4), as_dict

    def forward(self, x):
        h = self.fc(x)
        return {"y": h, "shape": h.shape} if self.as_dict else (h, h.shape)


@pytest.mark.parametrize("as_dict, where", [(False, "output [1]"), (True, "output ['shape']")])
def test_an_output_export_changes_the_structure_of_is_named(as_dict, where):
    """A torch.Size among the outputs comes back from torch.export as a tuple: the error said "captured
    graph returns a tuple, the model a tuple (output structure differs)" (api F2), naming neither the
    entry nor the fix. The symbolic graph returns the Size."""
    model, x = _ReturnsItsShape(as_dict).eval(), torch.randn(2, 4)
    with pytest.raises(CaptureError, match=re.escape(f"{where}: captured graph returns a tuple of 2, the model a Size")
                       + r".*return tuple\(x\.shape\), or capture with mode='symbolic'"):
        capture(model, x, mode="export")
    out = capture(model, x)(torch.randn(3, 4))
    assert (out["shape"] if as_dict else out[1]) == torch.Size([3, 4])


class _ReadsGradMode(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        return h * 2 if torch.is_grad_enabled() else h


class _ReadsAParametersFlag(_ReadsGradMode):
    def forward(self, x):
        return self.fc(x) * 2 if self.fc.weight.requires_grad else self.fc(x)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_forward_reading_the_grad_state_is_warned_about(mode):
    """Captured under torch.no_grad(), the graph keeps the no-grad branch and computed it with grad on too,
    silently (api F3); torch's own reads (nn.Linear, attention's fast-path checks) are not warned about."""
    x = torch.randn(2, 4)
    with torch.no_grad(), pytest.warns(fxopt.CaptureWarning, match=r"forward reads the grad state "
                                       r"\(torch.is_grad_enabled\(\): \".*test_capture.py\", line \d+\)"):
        model = _ReadsGradMode().eval()
        gm = capture(model, x, mode=mode)
        torch.testing.assert_close(gm(x), model(x))  # under no_grad, as checked
    layer = nn.TransformerEncoderLayer(8, 2, batch_first=True).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*grad state")
        capture(layer, torch.randn(2, 3, 8), mode=mode)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_forward_reading_the_grad_state_captured_with_grad_on_is_refused_naming_the_read(mode):
    """Traced with grad on it took the grad branch, and the check under no_grad blamed 'Python control flow or
    state', though the watch had found the read (advB F6)."""
    # (the fix comes before the read's file path: capture cuts each front end's reason at 300
    # characters, and from a clone in a deeper folder the fix was cut off)
    with pytest.raises(CaptureError, match=r"forward reads the grad state \(torch.is_grad_enabled\(\)\): capture "
                                           r"under torch.no_grad\(\)"):
        capture(_ReadsGradMode().eval(), torch.randn(2, 4), mode=mode)


def _helper_module(tmp_path, source: str):
    """A module of the user's beside the model's, loaded from `source` (a helper the forward calls)."""
    import importlib.util

    (tmp_path / "grad_helper.py").write_text(source)
    spec = importlib.util.spec_from_file_location("grad_helper", tmp_path / "grad_helper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _CallsAHelper(nn.Module):
    def __init__(self, helper):
        super().__init__()
        self.fc, self.scale = nn.Linear(4, 4), helper.scale

    def forward(self, x):
        return self.scale(self.fc(x))


_HELPERS = {
    "imported under another name": "from torch import is_grad_enabled as training_now\n\n"
                                   "def scale(h):\n    return h * 2 if training_now() else h\n",
    "held by a class": "import torch\n\nclass Mode:\n    on = staticmethod(torch.is_grad_enabled)\n\n"
                       "def scale(h):\n    return h * 2 if Mode.on() else h\n",
    "a default argument": "import torch\n\ndef scale(h, on=torch.is_grad_enabled):\n    return h * 2 if on() else h\n",
    "a functools.partial": "import functools\nimport torch\n\non = functools.partial(torch.is_grad_enabled)\n\n"
                           "def scale(h):\n    return h * 2 if on() else h\n",
}


@pytest.mark.parametrize("binding", list(_HELPERS))
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_grad_state_read_through_a_helper_modules_own_name_is_found(tmp_path, binding, mode):
    """The watch swapped the names torch and the forwards' modules bind, so `from torch import is_grad_enabled
    as g` in a helper module the forward calls went unseen: captured under no_grad, no warning, and verify
    said PASS for a call with grad on that the graph computes wrong; captured with grad on, the refusal blamed
    'Python control flow or state'. The call of the builtin itself is watched now."""
    helper = _helper_module(tmp_path, _HELPERS[binding])
    model, x = _CallsAHelper(helper).eval(), torch.randn(2, 4)
    line = 4 if binding == "imported under another name" else len(_HELPERS[binding].splitlines())
    with torch.no_grad(), pytest.warns(fxopt.CaptureWarning, match=re.escape(
            f'forward reads the grad state (torch.is_grad_enabled(): "{tmp_path / "grad_helper.py"}", line {line})')):
        gm = capture(model, x, mode=mode)
    report = fxopt.verify(model, gm, x)  # with grad on, as this test runs
    assert not report.passed and "forward reads the grad state: torch.is_grad_enabled()" in report.message
    assert report.max_abs_error > 0.1
    with pytest.raises(CaptureError, match=r"forward reads the grad state \(torch.is_grad_enabled\(\)\): capture "
                                           r"under torch.no_grad\(\)"):
        capture(model, x, mode=mode)


def test_the_grad_state_watch_leaves_a_profiler_of_the_users_in_place():
    """The watch sees the call through a profile hook; where the user's own profiler holds it, the watch
    leaves it there (the profiler sees every run of forward) and falls back to the names torch and the
    forward's module bind (a read through torch.is_grad_enabled is still seen)."""
    import sys

    class Counted(_ReadsGradMode):
        runs = 0

        def forward(self, x):
            Counted.runs += 1
            return super().forward(x)

    seen = []

    def users_profiler(frame, event, arg):
        if event == "call" and frame.f_code is Counted.forward.__code__:
            seen.append(frame)

    model, x = Counted().eval(), torch.randn(2, 4)
    sys.setprofile(users_profiler)
    try:
        with torch.no_grad(), pytest.warns(fxopt.CaptureWarning, match=re.escape("reads the grad state (torch.is_")):
            capture(model, x, mode="symbolic")
        assert sys.getprofile() is users_profiler
    finally:
        sys.setprofile(None)
    assert Counted.runs >= 2 and len(seen) == Counted.runs  # the trace and the checked run at least
    with torch.no_grad(), pytest.warns(fxopt.CaptureWarning, match="reads the grad state"):
        capture(model, x, mode="symbolic")
    assert sys.getprofile() is None  # the watch's own hook is gone after the capture


def _users_profiler(kind: str):
    """A profiler of the user's, started: `kind` 'python' (a function given to sys.setprofile, which
    counts its calls) or 'cProfile' (a profiler in C, which sys.setprofile could not put back)."""
    import cProfile
    import sys

    if kind == "cProfile":
        profiler = cProfile.Profile()
        profiler.enable()
        return sys.getprofile(), profiler.disable

    def counting(frame, event, arg):
        counting.calls += 1

    counting.calls = 0
    sys.setprofile(counting)
    return counting, lambda: sys.setprofile(None)


@pytest.mark.parametrize("profiler", ["python", "cProfile"])
@pytest.mark.parametrize("binding", list(_HELPERS))
def test_a_grad_state_read_through_any_binding_is_found_under_a_profiler_of_the_users(tmp_path, binding, profiler):
    """Under a profiler of the user's the watch swapped only the names torch and the forwards' modules bind:
    a helper module's own name (`from torch import is_grad_enabled as g`, a staticmethod, a default argument)
    went unseen, so did a functools.partial of it with no profiler at all (called from C code, which a profile
    hook does not see): no warning under no_grad and a graph of the no-grad branch. A Python profiler is now
    called from the watch's hook; under a C one (cProfile) the places the model reaches are swapped; every
    place is put back after."""
    import sys

    helper = _helper_module(tmp_path, _HELPERS[binding])
    before = {key: value for key, value in vars(helper).items() if not key.startswith("__")}
    defaults = helper.scale.__defaults__
    model, x = _CallsAHelper(helper).eval(), torch.randn(2, 4)
    line = 4 if binding == "imported under another name" else len(_HELPERS[binding].splitlines())
    users, stop = _users_profiler(profiler)
    try:
        with torch.no_grad(), pytest.warns(fxopt.CaptureWarning, match=re.escape(
                f'forward reads the grad state (torch.is_grad_enabled(): "{tmp_path / "grad_helper.py"}", '
                f'line {line})')):
            gm = capture(model, x, mode="symbolic")
        assert sys.getprofile() is users
        assert profiler == "cProfile" or users.calls > 100  # the user's profiler saw the capture's calls
    finally:
        stop()
    torch.testing.assert_close(gm(x), model.fc(x))  # the no-grad branch, as the warning says
    assert {key: value for key, value in vars(helper).items() if not key.startswith("__")} == before
    assert helper.scale.__defaults__ is defaults
    if binding == "a functools.partial":
        assert helper.on.func is torch.is_grad_enabled
    if binding == "held by a class":
        assert vars(helper.Mode)["on"].__func__ is torch.is_grad_enabled


def test_a_grad_state_read_through_a_partial_the_model_holds_is_found():
    """`self.on = functools.partial(torch.is_grad_enabled)`, called in forward, was not seen (the partial
    calls the builtin from C code): captured with grad on, the refusal blamed 'Python control flow or state';
    verify with grad on said PASS for a graph of the no-grad branch."""
    class HoldsAPartial(_ReadsGradMode):
        def __init__(self):
            super().__init__()
            self.on = functools.partial(torch.is_grad_enabled)

        def forward(self, x):
            h = self.fc(x)
            return h * 2 if self.on() else h

    model, x = HoldsAPartial().eval(), torch.randn(2, 4)
    with pytest.raises(CaptureError, match=r"forward reads the grad state \(torch.is_grad_enabled\(\)\): capture "
                                           r"under torch.no_grad\(\)"):
        capture(model, x, mode="symbolic")
    with torch.no_grad(), pytest.warns(fxopt.CaptureWarning, match="forward reads the grad state"):
        gm = capture(model, x, mode="symbolic")
    report = fxopt.verify(model, gm, x)  # with grad on, as this test runs
    assert not report.passed and "forward reads the grad state: torch.is_grad_enabled()" in report.message
    assert model.on.func is torch.is_grad_enabled


def test_a_branch_on_a_parameters_requires_grad_is_warned_about():
    """The warning said 'x.requires_grad' for `self.fc.weight.requires_grad` (api F4): it says a tensor's, and
    that the branch follows the parameters' flag at capture (export traces the parameters as tensors of its
    own: which one is not known). Symbolic tracing refuses such a branch: the flag is a proxy's."""
    model, x = _ReadsAParametersFlag().eval(), torch.randn(2, 4)
    with pytest.warns(fxopt.CaptureWarning, match=r"reads the grad state \(a tensor's .requires_grad: .* the "
                                                  r"parameters' requires_grad as they are"):
        gm = capture(model, x, mode="export")
    model.requires_grad_(False)  # the model now takes the other branch, the graph the one it was captured with
    assert not torch.allclose(gm(x), model(x))


def test_the_checked_run_of_the_model_takes_the_path_a_plain_call_takes():
    """The grad-state watch (a torch function mode) around the model's checked run turned torch's fast
    paths off: an encoder with a padding mask, which a plain call runs through nested tensors (zeros at the
    padded positions), was checked on its slow path, and the symbolic graph (calling the encoder) refused."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x, mask = torch.randn(2, 5, 16), torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 3:] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's note on the nested-tensor path
        gm = capture(_Encodes(encoder), (x, mask), mode="symbolic")
        with torch.no_grad():
            torch.testing.assert_close(gm(x, mask), encoder(x, src_key_padding_mask=mask))


class _Encodes(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x, mask):
        return self.encoder(x, src_key_padding_mask=mask)


class _HoldsAScriptedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))

    def forward(self, x):
        return self.block(x) + 1


@pytest.mark.parametrize("mode", ["auto", "export"])
def test_a_model_holding_a_torchscript_submodule_is_captured_and_verified(mode):
    """The grad-state watch read `type(module).forward` of every submodule, and a ScriptModule's class holds a
    descriptor that raises so: every capture and verify of such a model failed with AttributeError (advB F12)."""
    model, x = _HoldsAScriptedBlock().eval(), torch.randn(2, 4)
    gm = capture(model, x, mode=mode)
    torch.testing.assert_close(gm(x), model(x))
    assert fxopt.verify(model, model, x).passed


def _scale_relus(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
    return output * 1.5 if isinstance(module, nn.ReLU) else None


def test_a_global_forward_hook_that_changes_the_output_is_not_traced_symbolically():
    """A global module forward hook runs on the symbolic graph's leaf calls too, so the capture
    check passed, and fuse then folded the ReLU into its conv and dropped the hook: 0.21 off
    (api tester). auto now takes export, which records what the hook computes; symbolic refuses
    naming the hook; a hook that only looks keeps the symbolic graph."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(512, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    handle = torch.nn.modules.module.register_module_forward_hook(_scale_relus)
    try:
        expected = model(x)
        res = fxopt.optimize(model, (x,), "fuse")
        assert res.frontend == "export" and res.verification.verdict == "PASS"
        torch.testing.assert_close(res.module(x), expected)
        with pytest.raises(CaptureError, match=r"a global module forward hook changes the output \(output 0 differs "
                                               r"from the model by [\d.]+\); use mode='export'.*\(forward hook "
                                               r"_scale_relus at .*test_capture\.py:\d+\)"):
            capture(model, (x,), mode="symbolic")
    finally:
        handle.remove()
    logger = torch.nn.modules.module.register_module_forward_hook(lambda module, inputs, output: None)
    try:
        assert frontend_of(capture(model, (x,))) == "symbolic"
    finally:
        logger.remove()
    assert not torch.nn.modules.module._global_forward_hooks  # the check put back only what was there
