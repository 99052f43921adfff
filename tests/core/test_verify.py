"""verify(): statistics, tolerance presets, localization, structured outputs."""
from __future__ import annotations

import copy
import math
import os
import re
import warnings

import pytest
import torch
from torch import is_grad_enabled
import torch.fx
from torch import nn
from torch.nn import functional as F

import fxopt
from fxopt import Tolerance, VerificationError, capture, verify
from fxopt.ir import node_values, origin, replace_uses
from fxopt.verify import (
    TOLERANCES, compare_outputs, compare_tensors, first_divergence, get_tolerance, loosest,
)
from writing_models import AddsIntoItsInput, RenormedEmbedding

THIS_FILE = os.path.basename(__file__)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h) * 2.0


class Noisy(nn.Module):
    """`inner(x)` plus a fixed perturbation of a chosen relative size."""

    def __init__(self, inner, rel):
        super().__init__()
        self.inner = inner
        self.rel = rel

    def forward(self, x):
        y = self.inner(x)
        g = torch.Generator().manual_seed(3)
        noise = torch.randn(y.shape, generator=g)
        return y + self.rel * y.abs().max() * noise / noise.abs().max()


def _x():
    torch.manual_seed(5)
    return torch.randn(3, 6)


def _net():
    torch.manual_seed(0)
    return Net().eval()


def test_identical_models_pass_with_zero_error():
    m = _net()
    for other in (m, copy.deepcopy(m), capture(m, (_x(),), mode="symbolic"), capture(m, (_x(),), mode="export")):
        r = verify(m, other, (_x(),))
        assert r.passed, r.summary()
        assert r.max_abs_error == 0.0 and r.sqnr_db == math.inf and r.cosine == pytest.approx(1.0)
        assert r.summary().startswith("PASS (exact, cpu)")
        r.raise_if_failed()


def test_perturbed_model_fails_with_stats():
    m = _net()
    bad = copy.deepcopy(m)
    with torch.no_grad():
        bad.fc2.bias += 0.5
    r = verify(m, bad, _x())
    assert not r.passed
    assert r.max_abs_error == pytest.approx(1.0, rel=1e-5)  # bias + 0.5, times 2
    (out,) = r.outputs
    assert out.shape == (3, 4)
    assert r.divergence is None  # not GraphModules: nothing to localize
    assert r.summary().startswith("FAIL (exact, cpu): max_abs=1")
    with pytest.raises(VerificationError, match="FAIL"):
        r.raise_if_failed()


def test_sqnr_and_cosine_on_a_hand_example():
    ref = torch.tensor([3.0, 4.0])
    cand = torch.tensor([3.3, 3.6])
    c = compare_tensors(ref, cand, "y")
    # noise = 0.3^2 + 0.4^2 = 0.25, signal = 25 -> 10*log10(100) = 20 dB
    assert c.sqnr_db == pytest.approx(20.0, abs=1e-5)  # float32 inputs
    expected_cos = (3 * 3.3 + 4 * 3.6) / (5.0 * math.sqrt(3.3 ** 2 + 3.6 ** 2))
    assert c.cosine == pytest.approx(expected_cos, abs=1e-6)
    assert c.max_abs_error == pytest.approx(0.4, abs=1e-6)
    assert c.max_rel_error == pytest.approx(0.1, abs=1e-6)
    assert c.ref_scale == 4.0
    same = compare_tensors(ref, ref.clone())
    assert same.sqnr_db == math.inf and same.cosine == pytest.approx(1.0) and same.max_abs_error == 0.0
    nan = compare_tensors(ref, torch.tensor([float("nan"), 4.0]))
    assert math.isnan(nan.max_abs_error) and nan.sqnr_db == -math.inf
    assert not TOLERANCES["lossy"].accepts(nan.max_abs_error, nan.ref_scale, nan.sqnr_db)


@pytest.mark.parametrize("rel, verdicts", [
    (1e-7, dict(exact=True, float=True, int8=True, lossy=True)),
    (1e-3, dict(exact=False, float=True, int8=True, lossy=True)),
    (2e-2, dict(exact=False, float=False, int8=True, lossy=True)),
    (1.0, dict(exact=False, float=False, int8=False, lossy=True)),
])
def test_tolerance_presets(rel, verdicts):
    m = _net()
    noisy = Noisy(m, rel)
    got = {name: verify(m, noisy, _x(), tolerance=name).passed for name in verdicts}
    assert got == verdicts
    r = verify(m, noisy, _x(), tolerance="int8")
    assert r.tolerance.name == "int8" and "int8" in r.summary()


def test_tolerance_helpers():
    assert get_tolerance("float") is TOLERANCES["float"]
    custom = Tolerance("mine", rtol=0.0, atol=0.5)
    assert get_tolerance(custom) is custom
    with pytest.raises(ValueError, match="exact, float, int8, lossy"):
        get_tolerance("loose")
    assert loosest("exact", "int8", "float").name == "int8"
    assert loosest().name == "exact"
    m = _net()
    assert verify(m, Noisy(m, 0.05), _x(), tolerance=custom).passed


def _graph(fn):
    class F(nn.Module):
        def forward(self, x):
            return fn(x)

    return torch.fx.symbolic_trace(F())


def test_localization_names_first_diverging_node():
    ref = capture(_net(), (_x(),), mode="symbolic")
    cand = copy.deepcopy(ref)
    with torch.no_grad():
        cand.fc1.weight.mul_(1.5)  # fc1 diverges first, then relu, fc2, mul
    r = verify(ref, cand, _x())
    assert not r.passed
    assert r.divergence is not None
    assert r.divergence.node == "fc1" and r.divergence.reference_node == "fc1"
    assert "first diverging node 'fc1'" in r.summary()
    assert r.divergence.comparison.max_abs_error > 0


def test_localization_on_export_graph_names_source_line():
    ref = capture(_net(), (_x(),), mode="export")
    cand = copy.deepcopy(ref)
    with torch.no_grad():
        cand.fc2.bias.add_(1.0)
    r = verify(ref, cand, _x())
    assert not r.passed
    node = r.divergence.node
    linear2 = [n for n in cand.graph.nodes if n.target == torch.ops.aten.linear.default][1]
    assert node == linear2.name
    assert r.divergence.source is not None and THIS_FILE in r.divergence.source
    assert "self.fc2(h)" in r.divergence.source


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_localization_against_the_users_model_captures_it(mode):
    # the README's call: the user's nn.Module against the optimized graph names the node too
    model = _net()
    cand = capture(model, (_x(),), mode=mode)
    with torch.no_grad():
        dict(cand.named_parameters())[next(k for k, _ in cand.named_parameters() if "fc2" in k)].add_(1.0)
    r = verify(model, cand, _x())
    assert not r.passed and r.divergence is not None, r.summary()
    linear2 = [n for n in cand.graph.nodes if n.target in ("fc2", torch.ops.aten.linear.default)][-1]
    assert r.divergence.node == linear2.name
    assert "first diverging node" in r.summary()


def test_localization_names_the_module_of_an_export_node():
    ref = capture(_net(), (_x(),), mode="export")
    cand = copy.deepcopy(ref)
    with torch.no_grad():
        cand.fc2.bias.add_(1.0)
    r = verify(ref, cand, _x())
    assert r.divergence.module == "'fc2' (Linear)"  # 'linear_1' alone does not say which layer
    assert "in module 'fc2' (Linear)" in r.summary()


def test_a_divergence_in_torchs_own_code_names_the_module_not_torchs_line():
    """An nn.Sequential has no forward of the user's: the node's only frames are torch's, and the
    report pointed at torch/nn/modules/linear.py, line 134."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    cand = capture(model, (_x(),), mode="export")
    with torch.no_grad():
        cand.get_parameter("2.bias").add_(1.0)
    r = verify(model, cand, _x())
    assert r.divergence.module == "'2' (Linear)" and r.divergence.source is None, r.summary()
    assert "linear.py" not in r.summary()


def test_a_divergence_at_a_symbolic_module_call_names_the_module_and_its_type():
    """A symbolic graph's call_module node '_0' was reported as "first diverging node '_0' (stands
    for '_0')", naming no module: '_0' is no path, and a node that kept its name stands for itself."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    ref = capture(model, (_x(),), mode="symbolic")
    cand = copy.deepcopy(ref)
    with torch.no_grad():
        cand.get_parameter("0.bias").add_(1.0)
    for reference in (ref, model):
        r = verify(reference, cand, _x())
        assert r.divergence.module == "'0' (Linear)", r.summary()
        assert str(r.divergence).startswith("first diverging node '_0' in module '0' (Linear): "), r.summary()


def test_no_localization_against_another_model_class():
    class Other(Net):
        pass

    torch.manual_seed(0)
    cand = capture(Other().eval(), (_x(),), mode="symbolic")
    with torch.no_grad():
        cand.fc1.weight.mul_(2)
    r = verify(_net(), cand, _x())  # a graph of another class: its node names prove nothing here
    assert not r.passed and r.divergence is None
    traced = torch.fx.symbolic_trace(Other().eval())  # no record: fx names its class after the model's
    assert verify(_net(), traced, _x()).divergence is None
    traced = torch.fx.symbolic_trace(_net())
    with torch.no_grad():
        traced.fc2.bias.add_(1.0)
    assert verify(_net(), traced, _x()).divergence.node == "fc2"


def test_localization_follows_provenance_of_replaced_nodes():
    def fn(x):
        a = torch.relu(x)
        b = a * 2.0
        c = b + 1.0
        return c - 3.0

    ref = _graph(fn)
    cand = copy.deepcopy(ref)
    b = next(n for n in cand.graph.nodes if n.name == "mul")
    a = b.args[0]
    with cand.graph.inserting_after(b):
        wrong = cand.graph.call_function(torch.add, (a, a))  # a + a == a * 2: exact
        wrong.name  # noqa: B018
    replace_uses(b, wrong)
    assert origin(wrong) == "mul"
    cand.recompile()
    x = torch.randn(4, 5)
    assert verify(ref, cand, x).passed
    # now make the replacement wrong: a + a + 0.5
    cand2 = copy.deepcopy(ref)
    b = next(n for n in cand2.graph.nodes if n.name == "mul")
    with cand2.graph.inserting_after(b):
        bad = cand2.graph.call_function(torch.add, (b.args[0], 0.5), name="shifted")
    replace_uses(b, bad)
    cand2.recompile()
    r = verify(ref, cand2, x)
    assert not r.passed
    assert r.divergence.node == "shifted" and r.divergence.reference_node == "mul"
    assert "'shifted' (stands for 'mul')" in r.summary()


class InplaceNet(nn.Module):
    """Convs whose outputs in-place ops overwrite: activation modules, `F.relu_`, a write into a
    view and a residual `add_` (or all out of place, with `inplace=False`)."""

    def __init__(self, inplace=True):
        super().__init__()
        self.inplace = inplace
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act2 = nn.SiLU(inplace=inplace)
        self.conv3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.act1(self.bn1(self.conv1(x)))
        y = self.act2(self.conv2(h))
        if self.inplace:
            y[:, :2].mul_(0.5)
            y.add_(h)
            return F.relu_(self.conv3(y))
        y = torch.cat([y[:, :2] * 0.5, y[:, 2:]], dim=1) + h
        return F.relu(self.conv3(y))


def _inplace_net(inplace=True):
    torch.manual_seed(0)
    m = InplaceNet(inplace)
    with torch.no_grad():
        m.bn1.running_mean.uniform_(-0.5, 0.5)
        m.bn1.bias.uniform_(-1, 1)  # about half of bn1's output negative: relu_ changes it
    return m.eval()


def _image():
    torch.manual_seed(5)
    return torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_localization_is_not_fooled_by_inplace_writes(mode):
    """Regression: the reference value recorded for a node (conv1, bn1) was overwritten by the
    in-place op after it (relu_), so that node was named as diverging instead of conv2."""
    ref = capture(_inplace_net(), (_image(),), mode=mode)
    assert first_divergence(ref, copy.deepcopy(ref), (_image(),), {}, TOLERANCES["exact"]) is None
    cand = copy.deepcopy(ref)
    with torch.no_grad():
        cand.conv2.weight.mul_(1.5)
    r = verify(ref, cand, _image())
    assert not r.passed
    conv2 = "conv2" if mode == "symbolic" else "conv2d_1"  # export: the second aten.conv2d
    assert r.divergence is not None and r.divergence.node == conv2, r.summary()
    assert r.divergence.reference_node == conv2


@pytest.mark.parametrize("ref_inplace, cand_inplace", [(True, False), (False, True)])
def test_localization_across_inplace_and_out_of_place_versions(ref_inplace, cand_inplace):
    """The same function with and without in-place ops, on either side: no node diverges."""
    ref = capture(_inplace_net(ref_inplace), (_image(),), mode="symbolic")
    cand = capture(_inplace_net(cand_inplace), (_image(),), mode="symbolic")
    assert verify(ref, cand, _image()).passed
    assert first_divergence(ref, cand, (_image(),), {}, TOLERANCES["exact"]) is None


def test_node_values_are_snapshots_of_what_is_kept():
    def fn(x):
        a = x * 2.0
        b = a[:, :1]
        b.add_(1.0)  # writes into a through a view
        c = torch.relu(a)
        x.mul_(10.0)  # writes into the input
        return c.neg_()

    gm = _graph(fn)
    x = torch.randn(3, 2)
    x0 = x.clone()
    values = node_values(gm, (x,))
    assert torch.equal(x, x0)  # the caller's input is not written
    assert torch.equal(values["x"], x0)
    assert torch.equal(values["mul"], x0 * 2.0)  # before add_ wrote into it
    assert torch.equal(values["add_"], x0[:, :1] * 2.0 + 1.0)
    expected_relu = torch.relu(torch.cat([x0[:, :1] * 2.0 + 1.0, x0[:, 1:] * 2.0], dim=1))
    assert torch.equal(values["relu"], expected_relu)  # before neg_
    assert torch.equal(values["neg_"], -expected_relu)
    assert set(node_values(gm, (x,), names=["relu", "mul"])) == {"relu", "mul"}

    # nothing written in place: nothing copied (a view still shares its base's storage)
    values = node_values(_graph(lambda x: (x + 1.0).view(-1) * 2.0), (x,))
    assert values["view"].untyped_storage().data_ptr() == values["add"].untyped_storage().data_ptr()


class DictNet(nn.Module):
    def __init__(self, bump=0.0, key="b"):
        super().__init__()
        self.bump = bump
        self.key = key

    def forward(self, x):
        return {"a": x * 2, self.key: (x + 1 + self.bump, x.sum(dim=1))}


def test_structured_outputs_compared_leaf_by_leaf():
    x = _x()
    r = verify(DictNet(), DictNet(bump=0.25), x)
    assert not r.passed
    by_path = {o.path: o for o in r.outputs}
    assert set(by_path) == {"['a']", "['b'][0]", "['b'][1]"}
    assert by_path["['a']"].max_abs_error == 0.0
    assert by_path["['b'][0]"].max_abs_error == pytest.approx(0.25)
    assert by_path["['b'][1]"].max_abs_error == 0.0
    assert by_path["['b'][1]"].shape == (3,)
    assert verify(DictNet(), DictNet(), x).passed


def test_a_changed_output_dtype_fails_even_when_the_values_agree():
    class Half(nn.Module):
        def forward(self, x):
            return x.half() * 2

    class PromotedToFloat(nn.Module):
        def forward(self, x):
            return x.half().float() * 2

    r = verify(Half(), PromotedToFloat(), torch.randn(4, 3))
    assert not r.passed and "dtype torch.float16 became torch.float32" in r.message


class _Nested(nn.Module):
    def __init__(self, keep: int = 2, more: int = 0):
        super().__init__()
        self.fc, self.keep, self.more = nn.Linear(4, 4), keep, more

    def forward(self, x):
        h = self.fc(x)
        return {"a": h, "b": [h * 2, h.argmax(-1)][:self.keep] + [h] * self.more}


def test_an_output_structure_of_another_size_names_the_outputs_apart():
    """'output structure differs: 3 vs 2 values' said nothing of which value was missing."""
    x = torch.randn(3, 4)
    reference = _Nested().eval()
    shorter, longer = _Nested(keep=1).eval(), _Nested(more=4).eval()
    shorter.load_state_dict(reference.state_dict()), longer.load_state_dict(reference.state_dict())
    r = verify(reference, shorter, x)
    assert r.message == "output structure differs: 3 vs 2 values; the candidate lacks output ['b'][1]"
    r = verify(reference, longer, x)
    assert r.message == ("output structure differs: 3 vs 7 values; the candidate has besides outputs ['b'][2], "
                         "['b'][3], ['b'][4] and 1 more")


def test_mismatched_output_structure_is_reported():
    x = _x()
    r = verify(DictNet(), DictNet(key="c"), x)
    assert not r.passed and "output structure differs" in r.message
    assert "['b'][0]" in r.message and "['c'][0]" in r.message

    class TwoOut(nn.Module):
        def forward(self, x):
            return x, x * 2

    class OneOut(nn.Module):
        def forward(self, x):
            return (x,)

    r = verify(TwoOut(), OneOut(), x)
    assert not r.passed and "2 vs 1 values" in r.message

    class Wider(nn.Module):
        def forward(self, x):
            return x.repeat(1, 2), x * 2

    r = verify(TwoOut(), Wider(), x)
    assert not r.passed and "[0] shape (3, 6) became (3, 12)" in r.message


def test_candidate_that_raises_is_a_failure_not_a_crash():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("kaboom")

    r = verify(_net(), Boom(), _x())
    assert not r.passed and "candidate raised RuntimeError: kaboom" in r.message
    # nothing was compared: no numbers that read as a perfect match (max_abs=0, cos=1)
    assert r.summary() == "FAIL (exact, cpu): no output compared; candidate raised RuntimeError: kaboom"
    assert all(math.isnan(v) for v in (r.max_abs_error, r.max_rel_error, r.sqnr_db, r.cosine))


class _Masked(nn.Module):
    def forward(self, x):
        keep = x > 0
        return x * (keep & (x < 1))


def test_a_graph_candidate_that_raises_names_the_node_and_the_models_line():
    """A pass that left a float where a bool mask was: the report said only "candidate raised
    NotImplementedError: "bitwise_and_cpu" not implemented for 'Float'", naming no node."""
    model, x = _Masked().eval(), torch.randn(6)
    broken = fxopt.capture(model, x, mode="export")
    gt = next(n for n in broken.graph.nodes if n.name == "gt")
    with broken.graph.inserting_after(gt):
        as_float = broken.graph.call_function(torch.ops.aten._to_copy.default, (gt,), {"dtype": torch.float32})
    gt.replace_all_uses_with(as_float, delete_user_cb=lambda user: user is not as_float)
    broken.recompile()
    r = verify(model, broken, x)
    assert r.message.startswith("candidate raised NotImplementedError at node 'and_1' "
                                "(call_function aten::__and__.Tensor) at File "), r.message
    assert "return x * (keep & (x < 1))" in r.message and '"bitwise_and_cpu" not implemented' in r.message


class _OptionalMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(50, 8), nn.Linear(8, 2)

    def forward(self, ids, mask=None):
        h = self.emb(ids)
        if mask is not None:
            h = h * mask[..., None]
        return self.fc(h.mean(1))


def test_a_call_the_graph_refuses_at_its_inputs_names_no_node():
    """A keyword the graph was captured with, left out: the report blamed "node 'emb_weight'
    (get_attr emb.weight)", the first node, though no node had run."""
    model, ids = _OptionalMask().eval(), torch.randint(0, 50, (2, 6))
    gm = capture(model, {"ids": ids, "mask": torch.ones(2, 6)}, mode="export")
    r = verify(model, gm, {"ids": ids})
    assert r.message.startswith("candidate raised InputMismatchError: input 'mask' is missing"), r.message


def test_compare_outputs_non_tensor_leaves():
    assert compare_outputs((torch.ones(2), 3), (torch.ones(2), 3))[1] is None
    _, problem = compare_outputs((torch.ones(2), 3), (torch.ones(2), 4))
    assert "non-tensor output [1] differs: 3 vs 4" in problem


def test_dataclass_outputs_compared_by_field():
    import dataclasses

    @dataclasses.dataclass
    class Out:
        y: torch.Tensor
        z: torch.Tensor

    class A(nn.Module):
        def __init__(self, bump):
            super().__init__()
            self.bump = bump

        def forward(self, x):
            return Out(x * 2, x + self.bump)

    assert verify(A(0.0), A(0.0), _x()).passed
    r = verify(A(0.0), A(0.1), _x())
    assert not r.passed
    assert {o.path: o.max_abs_error > 0 for o in r.outputs} == {"['y']": False, "['z']": True}


def test_verify_leaves_modules_and_inputs_alone():
    m = _net().train()
    x = _x()
    x0 = x.clone()
    w = m.fc1.weight.detach().clone()
    verify(m, copy.deepcopy(m), x)
    assert torch.equal(x, x0) and torch.equal(m.fc1.weight, w) and m.training


def test_verify_refuses_to_run_an_uninitialized_lazy_module_and_leaves_it_lazy():
    """verify ran the reference as given: its first forward turned the user's LazyLinear into a Linear."""
    x = torch.randn(2, 3)
    ready = nn.Sequential(nn.Linear(3, 4), nn.ReLU()).eval()
    lazy = nn.Sequential(nn.LazyLinear(4), nn.ReLU()).eval()
    with pytest.raises(ValueError, match=r"verify: the reference Sequential cannot be run as it is: '0.weight' of "
                                         r"LazyLinear '0' is not initialized.*run the model once"):
        verify(lazy, ready, x)
    with pytest.raises(ValueError, match="the candidate Sequential"):
        verify(ready, lazy, x)
    assert isinstance(lazy[0], nn.LazyLinear)


def test_verify_on_cpu_rejects_cuda_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="verify: got device 'cuda', but this machine has no CUDA GPU"):
        verify(_net(), _net(), _x(), device="cuda")   # a ValueError like optimize(devices=['cuda'])'s


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_verify_on_cuda():
    m = _net()
    gm = capture(m, (_x(),), mode="export")
    r = verify(m, gm, _x(), device="cuda", tolerance="float")
    assert r.passed and r.device == "cuda"
    assert next(m.parameters()).device.type == "cpu"
    bad = copy.deepcopy(gm)
    with torch.no_grad():
        bad.fc1.weight.mul_(2)
    r = verify(gm, bad, _x(), device="cuda")
    assert not r.passed and r.divergence is not None


# ----- precision: bfloat16 / float16 are judged at their own resolution -------------------------

def _cbr(ci, co, stride=1):
    return nn.Sequential(nn.Conv2d(ci, co, 3, stride, 1, bias=False), nn.BatchNorm2d(co), nn.ReLU())


class _Block(nn.Module):
    def __init__(self, ci, co, stride):
        super().__init__()
        self.c1 = _cbr(ci, co, stride)
        self.c2 = nn.Sequential(nn.Conv2d(co, co, 3, 1, 1, bias=False), nn.BatchNorm2d(co))
        self.sc = nn.Sequential(nn.Conv2d(ci, co, 1, stride, bias=False), nn.BatchNorm2d(co)) \
            if stride > 1 else nn.Sequential()

    def forward(self, x):
        return F.relu(self.c2(self.c1(x)) + self.sc(x))


def _res_cnn():
    """The ResNet-style CNN whose bfloat16 fusion used to FAIL at float32 tolerances."""
    torch.manual_seed(0)
    m = nn.Sequential(_cbr(3, 16), _Block(16, 16, 1), _Block(16, 32, 2), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(32, 10))
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.momentum = None
            b.weight.data.uniform_(0.5, 1.5)
            b.bias.data.normal_(0, 0.3)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(4, 3, 32, 32))
    return m.eval(), torch.randn(3, 3, 32, 32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_through_fuse_passes(dtype):
    import fxopt

    model, x = _res_cnn()
    model, x = model.to(dtype), x.to(dtype)
    res = fxopt.optimize(model, (x,), "fuse")
    report = res.verification
    name = str(dtype).removeprefix("torch.")
    rtol = 4 * torch.finfo(dtype).eps
    assert report.passed, report.summary()
    assert report.precision == name
    assert report.summary().startswith(f"PASS (float, {name}: rtol={rtol:.3g}, cpu)")
    # the fused model is a rounding away from the eager one, not a float32 tolerance away
    assert report.max_abs_error <= rtol * max(o.ref_scale for o in report.outputs)


def test_broken_bfloat16_transformation_still_fails():
    import fxopt

    model, x = _res_cnn()
    model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    reference = capture(model, (x,), mode="symbolic")
    fused = fxopt.optimize(model, (x,), "fuse").module
    first_conv = next(n.target for n in fused.graph.nodes if n.op == "get_attr" and "weight" in n.target)
    for target in ("5.weight", first_conv):  # the classifier; the first (folded) conv
        broken = copy.deepcopy(fused)
        with torch.no_grad():
            broken.get_parameter(target).mul_(1.1)
        r = verify(reference, broken, (x,), tolerance="float")
        assert not r.passed, (target, r.summary())
        assert r.summary().startswith("FAIL (float, bfloat16: rtol=0.0312, cpu)")
        assert r.divergence is not None and r.divergence.comparison.dtype == torch.bfloat16
        assert "bfloat16" in str(r.divergence)


def test_rtol_for_dtype():
    exact, float_, int8 = TOLERANCES["exact"], TOLERANCES["float"], TOLERANCES["int8"]
    for dtype in (None, torch.float32, torch.float64, torch.int64, torch.quint8, torch.bool):
        assert exact.rtol_for(dtype) == exact.rtol and float_.rtol_for(dtype) == float_.rtol
    assert float_.rtol_for(torch.bfloat16) == 4 * 2 ** -7
    assert exact.rtol_for(torch.bfloat16) == 2 * 2 ** -7
    assert float_.rtol_for(torch.float16) == 4 * 2 ** -10
    assert float_.rtol_for(torch.float8_e4m3fn) == 4 * 2 ** -3
    assert int8.rtol_for(torch.bfloat16) == math.inf
    # never tighter than stated: a custom tolerance already loose keeps its rtol
    assert Tolerance("loose", rtol=0.1, atol=0.0).rtol_for(torch.bfloat16) == 0.1
    assert Tolerance("strict", rtol=0.0, atol=0.0, ulps=0.0).rtol_for(torch.bfloat16) == 0.0


@pytest.mark.parametrize("ulps, verdicts", [
    (1.0, dict(exact=True, float=True)),
    (3.0, dict(exact=False, float=True)),
    (8.0, dict(exact=False, float=False)),
])
def test_bfloat16_error_judged_in_its_ulps(ulps, verdicts):
    ref = torch.tensor([4.0, -2.0, 1.0, 0.5], dtype=torch.bfloat16)
    cand = ref.clone()
    cand[0] += ulps * 2 ** -7 * 4.0  # `ulps` units of bfloat16 eps at the scale (4.0)
    c = compare_tensors(ref, cand)
    assert c.dtype == torch.bfloat16
    assert {name: c.passes(TOLERANCES[name]) for name in verdicts} == verdicts
    # the same error on float32 values is far outside the float32 tolerances
    c32 = compare_tensors(ref.float(), cand.float())
    assert not c32.passes(TOLERANCES["float"]) and not c32.passes(TOLERANCES["exact"])


class _TwoDtypes(nn.Module):
    def __init__(self, rel):
        super().__init__()
        self.rel = rel

    def forward(self, x):
        y = x * 3.0
        return y * (1 + self.rel), (y * (1 + self.rel)).to(torch.bfloat16)


def test_each_output_is_judged_at_its_own_dtype():
    x = torch.randn(4, 8)
    ref = _TwoDtypes(0.0)
    # 1% error: within bfloat16's resolution, far outside float32's
    r = verify(ref, _TwoDtypes(0.01), (x,), tolerance="float")
    assert not r.passed and r.precision == "bfloat16"
    assert [o.passes(r.tolerance) for o in r.outputs] == [False, True]
    assert "bfloat16" in str(r.outputs[1]) and "float" not in str(r.outputs[0]).split(":")[0]


def test_candidate_that_drops_precision_is_held_to_the_reference_dtype():
    model, x = _net(), _x()

    class Lowered(nn.Module):
        def forward(self, x):
            return model.to(torch.bfloat16)(x.to(torch.bfloat16))

    r = verify(model, Lowered(), (x,), tolerance="float")
    model.float()
    assert not r.passed and r.precision == "float32"
    assert r.summary().startswith("FAIL (float, cpu)")


def test_float32_reports_are_unchanged():
    m = _net()
    r = verify(m, Noisy(m, 1e-3), _x(), tolerance="float")
    assert r.passed and r.precision == "float32"
    assert r.summary().startswith("PASS (float, cpu): max_abs=")
    assert all(o.dtype == torch.float32 for o in r.outputs)
    assert str(r.outputs[0]).startswith("output [3, 4]: max_abs=")


def test_infinities_are_compared_not_crashed_on():
    """An inf where the reference has a number fails with an infinite error (it raised a math
    domain error inside the report); equal infinities on both sides are no error."""
    from fxopt.verify import compare_tensors

    ref = torch.tensor([1.0, float("inf"), 2.0])
    same = compare_tensors(ref, ref.clone())
    assert same.max_abs_error == 0 and same.sqnr_db == math.inf and same.cosine == 1.0
    broken = compare_tensors(torch.tensor([1.0, 2.0, 2.0]), ref)
    assert broken.max_abs_error == math.inf and broken.sqnr_db == -math.inf


class _NaNs(nn.Module):
    def forward(self, x):
        return x * float("nan")


class _Log(nn.Module):
    def forward(self, x):
        return torch.log(x)


def test_nan_the_reference_itself_computes_is_matched_by_position():
    """A model whose output holds NaN (log of a negative input) against a faithful copy: equal;
    a NaN elsewhere, or a number where the reference has NaN, still fails."""
    x = torch.tensor([[1.0, -1.0, 2.0]])
    assert verify(_Log(), _Log(), (x,)).verdict == "PASS"

    class Shifted(nn.Module):
        def forward(self, x):
            return torch.log(x.roll(1, -1))

    class Patched(nn.Module):
        def forward(self, x):
            return torch.nan_to_num(torch.log(x))

    for candidate in (Shifted(), Patched()):
        report = verify(_Log(), candidate, (x,))
        assert report.verdict == "FAIL", (type(candidate).__name__, report.summary())


class _Reciprocal(nn.Module):
    def __init__(self, k: float = 1.0, inf_to: float | None = None):
        super().__init__()
        self.k, self.inf_to = k, inf_to

    def forward(self, x):
        y = self.k / torch.relu(x)  # +inf where x <= 0
        return y if self.inf_to is None else torch.nan_to_num(y, posinf=self.inf_to)


@pytest.mark.parametrize("tolerance", ["exact", "float", "int8"])
@pytest.mark.parametrize("candidate", [_Reciprocal(2.0), _Reciprocal(-1.0), _Reciprocal(1.0, inf_to=5.0)],
                         ids=["finite-doubled", "inf-negated", "inf-replaced"])
def test_an_infinity_in_the_reference_does_not_make_every_error_pass(candidate, tolerance):
    """The bound was atol + rtol * max|ref|: one inf (a masked score) made it infinite, so a
    doubled output, -inf for +inf and 5 for inf all read PASS."""
    x = torch.tensor([[-1.0, 0.5, 2.0, 3.0]])
    assert verify(_Reciprocal(), _Reciprocal(), (x,), tolerance=tolerance).verdict == "PASS"
    report = verify(_Reciprocal(), candidate, (x,), tolerance=tolerance)
    assert report.verdict == "FAIL", report.summary()
    assert math.isfinite(report.outputs[0].ref_scale)


def test_a_lossy_report_says_it_checked_nothing():
    """`lossy` bounds no error: a pruned model whose accuracy collapsed must not read as PASS."""
    m = _net()
    report = verify(m, Noisy(m, 0.9), _x(), tolerance="lossy")
    assert report.passed and report.verdict == "NOT CHECKED"
    assert report.summary().startswith("NOT CHECKED (lossy, cpu): max_abs=")
    assert not TOLERANCES["lossy"].checks_values
    assert all(TOLERANCES[name].checks_values for name in ("exact", "float", "int8"))
    broken = verify(nn.Identity(), _NaNs(), _x(), tolerance="lossy")  # NaN still fails a lossy check
    assert broken.verdict == "FAIL" and broken.summary().startswith("FAIL (lossy, cpu)")
    assert verify(m, m, _x()).verdict == "PASS"


def test_verify_holds_an_optimized_module_to_the_tolerance_it_recorded(tmp_path):
    import fxopt

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(32, 8)
    res = fxopt.optimize(model, (x,), "quantize", calibration=[(x,)])
    assert res.module.meta["fxopt"]["tolerance"] == "int8"
    assert res.module.meta["fxopt"]["pipeline"] == "quantize"
    assert "tolerance" not in res.original.meta["fxopt"]  # the captured graph is not the result
    report = verify(model, res.module, (x,))
    assert report.tolerance.name == "int8" and report.passed, report.summary()
    assert not verify(model, res.module, (x,), tolerance="exact").passed  # an explicit one wins
    fxopt.save(res.module, tmp_path / "int8.pt")
    assert verify(model, fxopt.load(tmp_path / "int8.pt"), (x,)).tolerance.name == "int8"
    assert verify(model, copy.deepcopy(model), (x,)).tolerance.name == "exact"  # nothing recorded


def test_optimizing_an_optimized_module_again_keeps_the_loosest_tolerance_of_its_history(tmp_path):
    """An int8 module saved, loaded and run through `lower-cpu` (or any exact pass) is still an
    int8 module: `fxopt.verify` against the float model held it to `float`/`exact` and failed."""
    import fxopt

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(32, 8)
    res = fxopt.optimize(model, (x,), "quantize", calibration=[(x,)])
    fxopt.save(res.module, tmp_path / "int8.pt")
    again = fxopt.optimize(fxopt.load(tmp_path / "int8.pt"), (x,), "dce")
    assert again.module.meta["fxopt"]["tolerance"] == "int8"
    assert again.module.meta["fxopt"]["pipeline"] == "quantize,dce"
    report = verify(model, again.module, (x,))
    assert report.tolerance.name == "int8" and report.passed, report.summary()


def test_a_custom_tolerance_given_to_optimize_is_the_one_recorded():
    import fxopt

    mine = Tolerance("mine", rtol=0.5, atol=0.5)
    res = fxopt.optimize(_net(), (_x(),), "dce", tolerance=mine)
    assert res.module.meta["fxopt"]["tolerance"] == mine
    assert verify(_net(), res.module, (_x(),)).tolerance == mine


class _CountsCalls(nn.Module):
    """A buffer the forward writes as it runs (a call counter)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.fc(x) * self.calls


def test_the_optimized_module_has_its_own_copy_of_the_state_it_writes():
    """Passes share tensors with the captured original: calling the result moved the
    original's counter, so `res.original(x)` no longer matched the eager model."""
    import fxopt

    torch.manual_seed(0)
    x = torch.randn(3, 6)
    res = fxopt.optimize(_CountsCalls().eval(), (x,), "fuse,dce", mode="export")
    counter = lambda gm: next(v for k, v in gm.named_buffers() if k.endswith("calls")).item()  # noqa: E731
    start = counter(res.original)
    res.module(x)
    res.module(x)
    assert counter(res.original) == start and counter(res.module) == counter(res.original) + 2


class _Ids(nn.Module):
    """Token ids from a 30k vocabulary, some shifted: a relative bound would pass them."""

    def __init__(self, shifts=()):
        super().__init__()
        self.shifts = dict(shifts)

    def forward(self, x):
        ids = torch.arange(200).reshape(2, 100) * 150 + 5   # up to 29855
        for index, shift in self.shifts.items():
            ids[index] += shift
        return x * 2, ids, ids > 100


@pytest.mark.parametrize("tolerance", ["exact", "float", "int8"])
def test_integer_outputs_are_compared_element_by_element_not_by_a_relative_bound(tolerance):
    x = torch.randn(2, 3)
    assert verify(_Ids(), _Ids(), x, tolerance=tolerance).passed
    r = verify(_Ids(), _Ids({(1, 40): 2, (1, 60): 50}), x, tolerance=tolerance)
    ids = r.outputs[1]
    assert ids.mismatches == 2 and ids.first_mismatch == ((1, 40), 21005, 21007)
    # 2 of 200 differ: 99% agree, which int8 accepts (a class a rounding away flips); exact and float never
    assert r.passed == (tolerance == "int8")
    assert "integer output [1]: 2/200 elements differ (1.00%), first at (1, 40): 21005 vs 21007" in r.summary()
    worse = verify(_Ids(), _Ids({(0, i): 1 for i in range(3)}), x, tolerance=tolerance)
    assert not worse.passed and "3/200 elements differ" in worse.summary()


def test_the_headline_numbers_are_over_the_float_outputs_not_an_integer_ones_values():
    """An index output off by one element (21005 vs 21055: an error of 50) set the report's max_abs and its
    SQNR, which tools/bench_quantize.py tabulates, while the float output was exact (quant F1); integer
    outputs are judged by count, and the headline is the float outputs'. All-integer outputs keep theirs."""
    x = torch.randn(2, 3)
    r = verify(_Ids(), _Ids({(1, 40): 50}), x, tolerance="int8")
    assert r.outputs[1].max_abs_error == 50 and r.outputs[0].max_abs_error == 0
    assert r.max_abs_error == 0 and r.max_rel_error == 0 and r.sqnr_db == math.inf and r.cosine == 1.0
    assert r.summary().startswith("PASS (int8, cpu): max_abs=0 max_rel=0 sqnr=")
    ids_only = verify(_IdsOnly(_Ids()), _IdsOnly(_Ids({(1, 40): 50})), x, tolerance="int8")
    assert ids_only.max_abs_error == 50


class _IdsOnly(nn.Module):
    def __init__(self, ids: nn.Module):
        super().__init__()
        self.ids = ids

    def forward(self, x):
        return self.ids(x)[1]


def test_bool_outputs_are_compared_exactly_and_lossy_judges_no_integer():
    x = torch.randn(2, 3)
    r = verify(_Ids(), _Ids({(0, 0): 200}), x, tolerance="float")   # 5 -> 205 also flips ids > 100
    assert not r.passed and r.outputs[2].mismatches == 1 and r.outputs[2].first_mismatch == ((0, 0), False, True)
    lossy = verify(_Ids(), _Ids({(0, i): 1 for i in range(50)}), x, tolerance="lossy")
    assert lossy.verdict == "NOT CHECKED" and "50/200 elements differ" in lossy.summary()


class _TrainTimeScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return y * 0.5 if self.training else y   # a branch on self.training, no batchnorm or dropout


def test_a_fail_always_says_why_and_names_a_reference_in_training_mode():
    """verify(model, res.module) printed FAIL with an empty message for a model left in training mode."""
    torch.manual_seed(0)
    model, x = _TrainTimeScale(), torch.randn(2, 4)
    with pytest.warns(fxopt.TrainingModeWarning, match=r"_TrainTimeScale \(the model itself\).*code that reads "
                                                       r"self.training takes its eval-mode path"):
        res = fxopt.optimize(model, x, "fuse")
    r = verify(model, res.module, x)
    assert not r.passed
    assert re.search(r"the output is off by [0-9.]+, above the float bound [0-9.]+; the reference is in training "
                     r"mode \(_TrainTimeScale \(the model itself\)\).*compare against model.eval\(\)", r.message)
    assert verify(model.eval(), res.module, x).passed
    plain = verify(_net(), Noisy(_net(), 0.05), _x(), tolerance="float")
    assert plain.message.startswith("the output is off by") and "training" not in plain.message


class _Scaled(nn.Module):
    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x * self.k


@pytest.mark.parametrize("tolerance", ["exact", "float"])
def test_a_small_output_is_held_to_its_own_scale_not_passed_under_the_absolute_floor(tolerance):
    """atol (1e-5 under exact) was a fixed floor: an output of scale 1e-6 passed doubled
    (max_rel=1, SQNR 0 dB). It now shrinks with an output smaller than 1."""
    x = torch.randn(4, 8)
    doubled = verify(_Scaled(1e-6), _Scaled(2e-6), x, tolerance=tolerance)
    assert doubled.verdict == "FAIL" and "above the" in doubled.message, doubled.summary()
    close = verify(_Scaled(1e-6), _Scaled(1e-6 * (1 + 1e-5)), x, tolerance=tolerance)  # 1e-5 relative
    assert close.verdict == "PASS", close.summary()
    tol = TOLERANCES[tolerance]
    assert tol.bound(1e-6) == pytest.approx((tol.atol + tol.rtol) * 1e-6)
    assert tol.bound(10.0) == pytest.approx(tol.atol + tol.rtol * 10.0)   # full floor at scale >= 1


class _FFT(nn.Module):
    def __init__(self, conj: bool = False):
        super().__init__()
        self.conj = conj

    def forward(self, x):
        y = torch.fft.fft(x)
        return y.conj().resolve_conj() if self.conj else y


def test_complex_outputs_are_compared_with_their_imaginary_part():
    """The complex output was cast to float64, dropping the imaginary part: a conjugated FFT
    read PASS with max_abs=0 (and a torch warning)."""
    x = torch.randn(4, 8)
    assert verify(_FFT(), _FFT(), x).verdict == "PASS"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = verify(_FFT(), _FFT(conj=True), x)
    assert report.verdict == "FAIL" and report.max_abs_error > 1, report.summary()
    assert report.outputs[0].shape == (4, 8) and report.outputs[0].dtype == torch.complex64


def test_python_float_outputs_are_judged_as_floats_and_dicts_regardless_of_key_order():
    """A `.item()` output off by 1e-9 failed every tolerance (compared by `!=`); a dict with
    the same keys in another order failed as "output structure differs"."""
    x = torch.randn(4, 3)
    outputs, problem = compare_outputs((x, 1.5), (x, 1.5 + 1e-9))
    assert problem is None and outputs[1].path == "[1]" and outputs[1].max_abs_error == pytest.approx(1e-9)
    assert all(o.passes(TOLERANCES["exact"]) for o in outputs)
    outputs, problem = compare_outputs((x, 1.5), (x, 2.5))
    assert problem is None and not all(o.passes(TOLERANCES["float"]) for o in outputs)
    outputs, problem = compare_outputs({"a": x, "b": (x * 2, {"c": x, "d": x})},
                                       {"b": (x * 2, {"d": x, "c": x}), "a": x})
    assert problem is None and [o.path for o in outputs] == ["['a']", "['b'][0]", "['b'][1]['c']", "['b'][1]['d']"]


def test_a_non_tensor_output_mismatch_is_described_briefly():
    """None against a tensor printed the tensor's whole repr; 3 against a tensor raised."""
    x = torch.randn(64, 64)
    _, problem = compare_outputs((x, None), (x, x))
    assert problem == "non-tensor output [1] differs: None vs a tensor [64, 64] float32"
    _, problem = compare_outputs((x, 3), (x, x))
    assert problem == "non-tensor output [1] differs: 3 vs a tensor [64, 64] float32"
    _, problem = compare_outputs((x, 1.5), (x, None))
    assert problem == "non-tensor output [1] differs: 1.5 vs None"


class _Classes(nn.Module):
    """Logits and their argmax for a batch of 8; `flips` rows take another class."""

    def __init__(self, flips: int = 0):
        super().__init__()
        self.flips = flips

    def forward(self, x):
        classes = x.argmax(-1)
        classes[:self.flips] = (classes[:self.flips] + 1) % x.shape[-1]
        return x, classes


def test_int8_lets_one_class_of_a_small_batch_flip():
    """99% of 8 elements let none differ: one legitimate flip failed a healthy int8 classifier."""
    x = torch.randn(8, 5)
    one = verify(_Classes(), _Classes(flips=1), x, tolerance="int8")
    assert one.passed, one.summary()
    two = verify(_Classes(), _Classes(flips=2), x, tolerance="int8")
    assert not two.passed and "99% (or all but one) of its integer elements" in two.message
    assert not verify(_Classes(), _Classes(flips=1), x, tolerance="float").passed


def test_a_report_says_when_an_output_had_no_value_to_compare():
    """An output NaN everywhere on both sides read as a perfect match (max_abs=0, sqnr=inf) and
    said nothing of having compared nothing."""
    report = verify(_NaNs(), _NaNs(), _x())
    assert report.verdict == "NOT CHECKED" and report.passed and report.outputs[0].finite == 0
    assert report.summary().startswith("NOT CHECKED (exact, cpu)")
    assert report.summary().endswith("; output is NaN or infinite everywhere, on both sides: no value was compared "
                                     "(verify on inputs with finite outputs)")
    assert "no value was compared" not in verify(_Log(), _Log(), (torch.tensor([[1.0, -1.0]]),)).summary()


def test_a_broken_pass_on_an_all_nan_example_is_not_passed():
    """An example that makes every output NaN hid a pass that drops a ReLU: PASS, and no warning."""
    class DropRelu(fxopt.Pass):
        name, tolerance = "drop-relu", "exact"

        def run(self, gm, ctx):
            for node in list(gm.graph.nodes):
                if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.ReLU):
                    node.replace_all_uses_with(node.args[0])
                    gm.graph.erase_node(node)
            return fxopt.PassResult(gm, modified=True)

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with pytest.warns(fxopt.VerificationWarning, match=r"verification compared no value: NOT CHECKED"):
        res = fxopt.optimize(model, torch.full((3, 4), float("nan")), [DropRelu()])
    assert res.verification.verdict == "NOT CHECKED"


class _KeepsPythonState(nn.Module):
    """State kept in a Python attribute, which no buffer snapshot sees."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        self.last_batch = x.shape[0]
        return self.fc(x)


def test_verify_leaves_python_attributes_as_they_were():
    model = _KeepsPythonState().eval()
    assert fxopt.verify(model, model, torch.randn(2, 4)).passed
    assert model.calls == 0 and not hasattr(model, "last_batch")


def test_verify_does_not_feed_an_observed_modules_observers():
    """optimize(..., "insert-observers") verified by default: its observers came back holding the
    example's ranges, and lower-int8 then ran with no calibration at all (SQNR 4.9 dB)."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)).eval(), torch.randn(4, 8)
    observed = fxopt.optimize(model, x, "insert-observers", verify=True).module
    fxopt.verify(model, observed, x)
    with pytest.raises(fxopt.PassError, match="has seen no data"):
        fxopt.optimize(observed, x, "lower-int8")
    with pytest.raises(fxopt.PassError, match="has seen no data"):
        fxopt.optimize(model, x, "insert-observers,lower-int8", verify_each=True)


def test_verify_each_accepts_a_candidate_sharing_a_buffer_with_the_reference():
    """quantize{backend=reference} keeps the float bias as a buffer of the reference's very tensor:
    verify wrote every buffer back after each run, and under verify_each the pass manager's write
    guard refused that as the instrument writing into the reference."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)).eval(), torch.randn(4, 8)
    batches = [(torch.randn(4, 8),) for _ in range(4)]
    res = fxopt.optimize(model, x, "quantize{backend=reference}", calibration=batches, verify_each=True)
    assert res.verification.passed


@pytest.mark.parametrize("role", ["reference", "candidate"])
def test_verify_of_a_function_says_it_takes_modules(role):
    """A function reached named_parameters(): "'function' object has no attribute ..."."""
    model = torch.nn.Linear(4, 2)
    pair = (lambda x: x, model) if role == "reference" else (model, lambda x: x)
    with pytest.raises(TypeError, match=rf"verify: the {role} is a function, not a torch.nn.Module"):
        fxopt.verify(*pair, torch.randn(3, 4))


def test_a_report_says_when_the_reference_output_is_0_everywhere():
    """An output of 0 everywhere matched a candidate 1.5 times it (sqnr=inf) with no word."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)    # every output 0 after the ReLU
    scaled = nn.Sequential(model, nn.Linear(4, 4)).eval()
    with torch.no_grad():
        scaled[1].weight.copy_(torch.eye(4) * 1.5)
        scaled[1].bias.zero_()
    report = verify(model, scaled, torch.randn(3, 4))
    assert report.verdict == "PASS" and report.summary().endswith(
        "; output is 0 everywhere in the reference: a result scaled by any factor would match it too (verify on "
        "inputs whose outputs are not all 0)")
    assert "0 everywhere" not in verify(model[0], model[0], torch.randn(3, 4)).summary()


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("batch, wrong", [(1, [0]), (2, [0]), (4, [1])])
def test_int8_does_not_pass_a_small_integer_output_whose_one_element_differs(batch, wrong):
    """'All but one' passed a batch-1 classifier's only class, wrong, and a batch of 2 half
    wrong: below 8 elements a flip cannot be told from a wrong result, so it proves nothing."""
    x = torch.randn(batch, 10)

    def flipped(t):
        classes = t.argmax(1)
        classes[wrong] = t[wrong].argmin(1)
        return classes

    report = verify(_Fn(lambda t: t.argmax(1)), _Fn(flipped), x, tolerance="int8")
    assert report.passed and report.verdict == "NOT CHECKED"
    assert f"1/{batch} elements differ" in report.summary()
    assert "fewer than 8 elements" in report.summary() and "verify on a batch of 8 or more" in report.summary()
    assert verify(_Fn(lambda t: t.argmax(1)), _Fn(lambda t: t.argmax(1)), x, tolerance="int8").verdict == "PASS"


def test_optimize_warns_when_a_small_integer_output_proved_nothing():
    class Flip(fxopt.Pass):
        name, tolerance = "test-flip", "int8"

        def run(self, gm, ctx):
            out = gm.graph.find_nodes(op="output")[0]
            with gm.graph.inserting_before(out):
                out.args = (gm.graph.call_function(torch.argmin, (out.args[0].args[0], 1)),)
            return fxopt.PassResult(gm, modified=True)

    with pytest.warns(fxopt.VerificationWarning, match=r"verification proved nothing: NOT CHECKED"):
        fxopt.optimize(_Fn(lambda t: torch.argmax(t, 1)), torch.randn(1, 10), [Flip()], mode="symbolic")


@pytest.mark.parametrize("ref, cand, tolerance, says", [
    (lambda x: x / 0, lambda x: x * 1e30, "exact", "the reference is NaN or infinite everywhere"),
    (lambda x: x, lambda x: x * float("nan"), "lossy", "the candidate is NaN or infinite everywhere"),
    (lambda x: x / 0, lambda x: -x / 0, "exact", "NaN or infinite everywhere, on both sides"),
])
def test_a_report_says_which_side_had_no_finite_value(ref, cand, tolerance, says):
    """'NaN or infinite everywhere, on both sides' was said where only one side was."""
    report = verify(_Fn(ref), _Fn(cand), (torch.rand(4, 8) + 1,), tolerance=tolerance)
    assert not report.passed and says in report.summary()


def test_an_sqnr_just_below_the_floor_is_not_printed_as_the_floor():
    """'SQNR 20.0dB, below the int8 floor 20 dB'."""
    torch.manual_seed(0)
    x = torch.randn(64, 64)
    noise = torch.randn(64, 64)
    noise = noise * (x.norm() / noise.norm()) * 10 ** (-19.999 / 20)
    report = verify(_Fn(lambda t: t), _Fn(lambda t: t + noise), (x,), tolerance="int8")
    assert not report.passed and "has SQNR 19.999dB, below the int8 floor 20 dB" in report.message


@pytest.mark.parametrize("ref, cand, kinds", [(True, 1, "bool became int"), (1, 1.0, "int became float"),
                                              (2.0, 2, "float became int"), (1.0, True, "float became bool")])
def test_a_python_number_output_of_another_type_is_reported(ref, cand, kinds):
    """True == 1 == 1.0 in Python: a bool output that became an int passed as the same value,
    though a caller's `isinstance`, f-string or JSON dump tells them apart."""
    x = torch.randn(4, 3)
    _, problem = compare_outputs((x, ref), (x, cand))
    assert problem == f"output [1] type {kinds} ({ref!r} vs {cand!r})"


def test_a_tensor_output_that_became_a_python_number_names_both():
    """A 0-d bool tensor output that became a Python bool read "the output shape () became False"."""
    mask = torch.zeros(3) > 1
    _, problem = compare_outputs(mask.all(), False)
    assert problem == "the output, a tensor [] bool, became False (a Python bool)"


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_verify_leaves_a_parameter_the_forward_writes_as_it_was(mode):
    """nn.Embedding(max_norm=1) renormalizes the rows it reads in place: verify put buffers
    back, not parameters, and the caller's weight moved by 1.93."""
    torch.manual_seed(0)
    model, ids = RenormedEmbedding().eval(), torch.randint(10, 20, (3, 5))
    candidate = fxopt.optimize(model, torch.randint(0, 10, (2, 5)), "fuse", mode=mode).module
    before = model.e.weight.detach().clone(), candidate.get_submodule("e").weight.detach().clone()
    assert fxopt.verify(model, candidate, ids).passed
    assert torch.equal(model.e.weight, before[0]) and torch.equal(candidate.get_submodule("e").weight, before[1])


def test_inputs_the_reference_cannot_take_are_refused_naming_the_reference():
    """Torch's bare "mat1 and mat2 must have the same dtype" came out of verify, not saying that
    the reference (not the candidate) failed on the inputs given."""
    model, x = nn.Linear(4, 4).eval(), torch.randn(2, 4)
    gm = capture(model, x)
    with pytest.raises(ValueError, match=r"verify: the reference Linear raised on the inputs \(a tensor \[2, 4\] "
                                         r"float64\): RuntimeError: mat1 and mat2 must have the same dtype"):
        verify(model, gm, x.double())


class _KeepsStatistics(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.stats = nn.Linear(4, 4), torch.zeros(4)

    def forward(self, x):
        y = self.fc(x)
        self.stats.add_(y.detach().abs().mean(0))  # a plain tensor attribute, no buffer
        return y


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_verify_leaves_a_plain_tensor_attribute_the_forward_writes_as_it_was(mode):
    model = _KeepsStatistics().eval()
    candidate = fxopt.optimize(model, torch.randn(2, 4), "fuse", mode=mode).module
    assert fxopt.verify(model, candidate, torch.randn(3, 4)).passed
    assert torch.equal(model.stats, torch.zeros(4))


def test_a_candidate_that_leaves_an_input_the_model_writes_fails():
    """torch.fx.symbolic_trace records `x += h` as `x + h`: the outputs agree, the caller's
    tensor is no longer written, and verify said PASS."""
    model, x = AddsIntoItsInput().eval(), torch.randn(2, 4, 6, 6)
    report = verify(model, torch.fx.symbolic_trace(model), x)
    assert not report.passed
    assert report.message.startswith("input 0 is written in place by the reference, and the candidate leaves "
                                     "it otherwise: max_abs="), report.message
    assert verify(model, capture(model, x, mode="export"), x).passed  # export records the write


def test_a_misspelt_tolerance_is_named_with_the_one_meant():
    with pytest.raises(ValueError, match=r"unknown tolerance 'exakt' \(did you mean 'exact'\?\); valid: exact, float"):
        verify(nn.ReLU(), nn.ReLU(), torch.ones(2), tolerance="exakt")


def test_an_input_mismatch_of_an_exported_reference_passes_unchanged():
    """It came out as a bare ValueError wrapping it, not the InputMismatchError callers catch."""
    gm = capture(nn.Linear(4, 4).eval(), torch.randn(2, 4), mode="export")
    with pytest.raises(fxopt.errors.InputMismatchError, match="has size 5 at dim 1"):
        verify(gm, gm, torch.randn(2, 5))


class _SparseAdjacency(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, adjacency, x):
        return torch.sparse.mm(adjacency, self.fc(x))


def test_a_sparse_input_is_captured_and_verified():
    """The input-write checks called torch.equal on it, which refuses sparse tensors: a GNN with a
    sparse adjacency, captured and verified before, crashed both."""
    model, inputs = _SparseAdjacency().eval(), (torch.eye(5).to_sparse(), torch.randn(5, 4))
    assert verify(model, capture(model, inputs, mode="symbolic"), inputs).passed


class _AddsIntoStatisticsByOut(_KeepsStatistics):
    def forward(self, x):
        y = self.fc(x)
        torch.add(self.stats, y.detach().abs().mean(0), out=self.stats)  # written through out=, no in-place name
        return y


def test_verify_leaves_a_tensor_written_through_out_as_it_was():
    """The watch skips calls that write nothing by their function alone; an out= write is told by the call."""
    model = _AddsIntoStatisticsByOut().eval()
    assert verify(model, model, torch.randn(3, 4)).passed
    assert torch.equal(model.stats, torch.zeros(4))


def test_verify_watches_the_model_runs_not_its_own_comparison(monkeypatch):
    """The in-place write watch (a torch function mode) saw every torch call verify made, 92 on a
    two-layer model, most of them the comparison's own (isfinite, abs, max): verify took ~40% longer."""
    import fxopt.manager as manager

    seen: list[str] = []
    note = manager.TensorWrites.note
    monkeypatch.setattr(manager.TensorWrites, "note",
                        lambda self, func, args, kwargs: (seen.append(func.__name__), note(self, func, args, kwargs))[1])
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    assert verify(model, capture(model, torch.randn(2, 8)), torch.randn(4, 8)).passed
    assert seen == ["linear", "relu", "linear", "relu"]  # the reference's forward, then the candidate's


class _HalvesSparseAdjacency(nn.Module):
    def forward(self, adj, x):
        adj.mul_(0.5)
        return torch.sparse.mm(adj, x)


class _HalvesACopy(nn.Module):
    def forward(self, adj, x):
        return torch.sparse.mm(adj * 0.5, x)


def test_a_candidate_that_leaves_a_sparse_input_the_model_writes_fails():
    """Sparse inputs were left out of the input-write check (torch.equal refuses them): a candidate that
    computes adj * 0.5 where the model halves the caller's adjacency in place passed (advB B14)."""
    adj, x = torch.eye(5).to_sparse(), torch.randn(5, 4)
    report = verify(_HalvesSparseAdjacency(), _HalvesACopy(), (adj, x))
    assert not report.passed
    assert report.message.startswith("input 0 is written in place by the reference, and the candidate leaves it "
                                     "otherwise: max_abs=0.5"), report.message
    assert verify(_HalvesSparseAdjacency(), _HalvesSparseAdjacency(), (adj, x)).passed


class _ReadsOneMapping(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, td):
        return self.fc(td["obs"])


def test_a_mapping_for_a_forward_that_takes_one_mapping_says_to_wrap_it():
    """A non-dict Mapping (tensordict's) is keyword inputs since d4bbdb7, and verify on a forward(td) failed
    with "unexpected keyword argument 'obs'" and no way out (advB B7)."""
    import collections

    td = collections.UserDict(obs=torch.randn(3, 4))
    model = _ReadsOneMapping().eval()
    with pytest.raises(ValueError, match=r"unexpected keyword argument 'obs'.*a UserDict is read as keyword inputs "
                                         r"\('obs'\); to pass it as forward's one input, wrap it in a tuple: \(\{\.\.\.\},\)"):
        verify(model, model, td)
    assert verify(model, model, (td,)).passed


class _InitsItsBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        nn.init.constant_(self.fc.bias, 0.5)  # reaches a torch function mode with the tensor as a keyword
        return self.fc(x)


def test_verify_leaves_a_weight_written_by_nn_init_as_it_was():
    """nn.init.constant_ passes its tensor as kwargs['tensor']; the watch read args[0] only, and the
    model came back with its bias at 0.5 (advB B8)."""
    model = _InitsItsBias().eval()
    before = model.fc.bias.detach().clone()
    verify(model, model, torch.randn(2, 4))
    assert torch.equal(model.fc.bias, before)


class _DoublesWhereGradSpelledOtherwise(nn.Module):
    """Reads the grad state as `is_grad_enabled` imported from torch, as torch._C's, or through `.grad_fn`."""

    def __init__(self, spelling: str):
        super().__init__()
        self.fc, self.spelling = nn.Linear(4, 4), spelling

    def forward(self, x):
        h = self.fc(x)
        reads = {"imported": lambda: is_grad_enabled(), "torch._C": lambda: torch._C.is_grad_enabled(),
                 "grad_fn": lambda: h.grad_fn is not None}[self.spelling]()
        return h * 2 if reads else h


@pytest.mark.parametrize("spelling, read", [("imported", "torch.is_grad_enabled()"),
                                            ("torch._C", "torch.is_grad_enabled()"),
                                            ("grad_fn", "a tensor's .grad_fn")])
def test_a_read_of_the_grad_state_in_another_spelling_is_found_too(spelling, read):
    """Only `torch.is_grad_enabled` looked up through torch at call time was seen: verify said PASS on a call
    with grad on that the graph computes wrong (advB F3)."""
    model, x = _DoublesWhereGradSpelledOtherwise(spelling).eval(), torch.randn(2, 4)
    with torch.no_grad(), pytest.warns(fxopt.CaptureWarning, match=re.escape(f"reads the grad state ({read}")):
        gm = fxopt.capture(model, x, mode="export")
    report = verify(model, gm, x)
    assert not report.passed and f"forward reads the grad state: {read}" in report.message


class _DoublesWithGrad(nn.Module):
    def __init__(self, on_requires_grad: bool = False):
        super().__init__()
        self.fc, self.on_requires_grad = nn.Linear(4, 4), on_requires_grad

    def forward(self, x):
        h = self.fc(x)
        reads = x.requires_grad if self.on_requires_grad else torch.is_grad_enabled()
        return h * 2 if reads else h


@pytest.mark.parametrize("on_requires_grad", [False, True])
def test_a_model_reading_the_grad_state_is_verified_as_the_call_is_made(on_requires_grad):
    """A graph captured under no_grad keeps the no-grad branch of `h * 2 if torch.is_grad_enabled() else h`;
    verify compared under no_grad only and said PASS for a call with grad on (or an input requiring grad),
    which the graph computes wrong (api F3). It compares that call too, where forward reads the grad state."""
    model, x = _DoublesWithGrad(on_requires_grad).eval(), torch.randn(2, 4)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", fxopt.CaptureWarning)
        gm = fxopt.capture(model, x, mode="export")
    call = x.clone().requires_grad_(True) if on_requires_grad else x
    report = verify(model, gm, call)
    assert not report.passed
    read = "a tensor's .requires_grad" if on_requires_grad else "torch.is_grad_enabled()"
    assert f"forward reads the grad state: {read}" in report.message and "is off by" in report.message
    assert report.max_abs_error > 0.1 and report.sqnr_db < 20  # that call's numbers, not the no-grad run's (advB F14)
    with torch.no_grad():
        assert verify(model, gm, x).passed  # as the graph was captured: no second comparison
    assert verify(model, model, call).passed



# a decorator from another module (its globals are not the model's), as Hugging Face's @can_return_tuple
_DECORATORS: dict = {}
exec("import functools\n\ndef logged(forward):\n    @functools.wraps(forward)\n"
     "    def logging_forward(self, *args, **kwargs):\n        return forward(self, *args, **kwargs)\n"
     "    return logging_forward\n", _DECORATORS)
_logged = _DECORATORS["logged"]


class _DecoratedGradRead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    @_logged
    def forward(self, x):
        h = self.fc(x)
        return h * 2 if is_grad_enabled() else h


def test_a_grad_state_read_in_a_decorated_forward_is_found():
    """The watch swapped the names in the decorator's module, not the forward's own (advB F3b)."""
    model, x = _DecoratedGradRead().eval(), torch.randn(2, 4)
    with torch.no_grad(), pytest.warns(fxopt.CaptureWarning, match=re.escape("reads the grad state")):
        gm = fxopt.capture(model, x, mode="export")
    assert not verify(model, gm, x).passed


def test_a_model_beside_the_library_directories_is_the_users(tmp_path, monkeypatch):
    """A file under site-packages/torchvision or a project's fxopt_models/ was taken for torch's or fxopt's
    own code, its grad-state reads dropped (advB F7): the library directories end with the separator."""
    import importlib.util

    from fxopt import tracing

    assert all(directory.endswith(os.sep) for directory in tracing._LIBRARY_DIRS)
    library, models = tmp_path / "lib", tmp_path / "lib_models"  # 'lib' is a prefix of 'lib_models'
    models.mkdir()
    (models / "reads_grad.py").write_text("import torch\n\ndef read():\n    return torch.is_grad_enabled()\n")
    spec = importlib.util.spec_from_file_location("reads_grad", models / "reads_grad.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(tracing, "_LIBRARY_DIRS", (str(library) + os.sep,))
    with tracing.GradStateReads() as reads:
        module.read()
    assert [where.split(": ")[0] for where in reads.found] == ["torch.is_grad_enabled()"]


def _sigmoid_head_int8(calibration_scale: float) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A small MLP ending in a sigmoid, and its int8 copy calibrated on inputs `calibration_scale`
    times the size of those it runs on (0.2: the activations clip, the logits come out at ~5 dB)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16), nn.Sigmoid()).eval()
    x = torch.randn(64, 32)
    calibration = [(torch.randn(64, 32) * calibration_scale,) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = fxopt.optimize(model, (x,), "quantize", calibration=calibration, verify=False).module
    return model, int8, x


def test_int8_sqnr_does_not_count_a_sigmoids_offset_as_signal():
    """A sigmoid output sits around 0.5: counted as signal, that offset passed logits quantized to
    5 dB as a 25 dB output (a YOLOv8-style detector's probability map read 26 dB where its logits
    were at 5). The SQNR judged is of the output's spread about its mean."""
    model, bad, x = _sigmoid_head_int8(0.2)
    report = verify(model, bad, (x,), localize=False)
    out = report.outputs[0]
    assert out.centered and abs(out.mean - 0.5) < 0.02
    assert out.power_sqnr_db > 24 and out.sqnr_db < 8  # the old figure, and the one judged now
    assert report.verdict == "FAIL" and report.tolerance.name == "int8"
    assert re.search(r"has SQNR \d\.\ddB \(2\d\.\ddB counting its mean 0\.\d+ as signal\), below the int8 "
                     r"floor 20 dB", report.message)
    # a well calibrated copy of the same model passes, well above the floor
    model, good, x = _sigmoid_head_int8(1.0)
    report = verify(model, good, (x,))
    assert report.verdict == "PASS" and report.sqnr_db > 30


def test_centered_sqnr_on_a_hand_example():
    """The signal is the spread about the mean: for 10 values 0.5 +- 0.1 with an error of 0.01 on
    each, 10*log10(0.01 / 1e-4) = 20 dB, where the power (mean included) reads 34.1 dB."""
    ref = torch.tensor([0.6, 0.4] * 5, dtype=torch.float64)
    c = compare_tensors(ref, ref + 0.01)
    assert c.centered and c.mean == pytest.approx(0.5)
    assert c.sqnr_db == pytest.approx(20.0, abs=1e-6)
    assert c.power_sqnr_db == pytest.approx(10 * math.log10(0.26 / 1e-4), abs=1e-6)
    assert "sqnr=20.0dB (34.1dB counting its mean 0.5 as signal)" in str(c)


@pytest.mark.parametrize("ref, why", [
    (torch.tensor([0.51, 0.49]), "has 2 values, too few to tell an offset"),  # a spread of 2 is incidental
    (torch.full((16,), 0.7), "is the same value everywhere in the reference (0.7)"),  # none at all
])
def test_sqnr_counts_the_mean_where_there_is_no_spread_to_judge(ref, why):
    """In fewer than 8 values (a batch-1 regression), or a constant output, the spread is no
    measure of the signal: a good int8 result of [0.51, 0.49] as [0.5, 0.5] would read 0 dB, any
    error on a constant -inf. Those are judged as before, counting the mean, and the report says so."""
    cand = ref + torch.tensor([0.002, -0.002]).repeat(ref.numel() // 2)
    report = verify(_Fn(lambda t: ref), _Fn(lambda t: cand), (torch.zeros(1),), tolerance="int8")
    out = report.outputs[0]
    assert not out.centered and out.sqnr_db == out.power_sqnr_db > 40
    assert report.verdict == "PASS" and why in report.summary()
    # under `float`, where no SQNR floor is judged, no such note
    assert why not in verify(_Fn(lambda t: ref), _Fn(lambda t: ref.clone()), (torch.zeros(1),),
                             tolerance="int8").summary()
