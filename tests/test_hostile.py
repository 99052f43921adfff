"""Hostile inputs: each is optimized and verified, or refused with an error that says why —
never a silently wrong model, never a mutated input."""
import dataclasses
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt

PIPELINES = ["fuse", "quantize{backend=x86}", "prune{ratio=0.3}", "remove-noops,fold-constants,dce"]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}, model.training


def assert_untouched(model, snap):
    state, training = snap
    now = model.state_dict(keep_vars=True)
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v) or (now[k].isnan() == v.isnan()).all(), f"{k} was mutated"
    assert model.training == training


def run_or_refuse(model, inputs, pipeline, mode="auto", calibration=None):
    """optimize + verify; a refusal must be an fxopt error. Returns the result or the error."""
    snap = snapshot(model)
    if calibration is None and "quantize" in pipeline:
        calibration = [inputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            res = fxopt.optimize(model, inputs, pipeline, calibration=calibration, mode=mode)
        except fxopt.FxoptError as exc:
            assert_untouched(model, snap)
            assert str(exc)
            return exc
    assert_untouched(model, snap)
    report = res.verification
    assert report is not None
    if not report.passed:
        # not silent: the result is flagged, and the report names the node that diverges
        assert report.divergence is not None or report.message, report.summary()
        return FLAGGED
    return res


FLAGGED = "flagged"  # optimize returned a result whose verification failed and says where


def conv_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


# ----- dynamic control flow --------------------------------------------------------------------

class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent branch: symbolic tracing cannot, export specializes or refuses
            return self.a(x)
        return self.b(x)


def test_dynamic_control_flow_is_refused_or_correct_on_both_branches():
    model = DataDependent().eval()
    pos, neg = torch.ones(2, 8), -torch.ones(2, 8)
    with pytest.raises(fxopt.CaptureError, match="symbolic"):
        fxopt.capture(model, (pos,), mode="symbolic")
    out = run_or_refuse(model, (pos,), "remove-noops,fold-constants,dce")
    if isinstance(out, fxopt.OptimizeResult):
        # a graph that baked one branch in must not be used silently for the other
        try:
            got = out.module(neg)
        except Exception:
            return  # a guard refused the other branch: fine
        torch.testing.assert_close(got, model(neg))


# ----- in-place ops and aliasing ---------------------------------------------------------------

class ViewThenInplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        v = y[:, :2]          # a view ...
        v.mul_(2.0)           # ... written in place: y changes too
        y.relu_()
        return y + 1


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_view_then_inplace_write(pipeline):
    x = torch.randn(2, 3, 8, 8)
    model = ViewThenInplace().eval()
    out = run_or_refuse(model, (x,), pipeline)
    if isinstance(out, fxopt.OptimizeResult) and "prune" not in pipeline:
        torch.testing.assert_close(out.module(x), model(x), rtol=0.2, atol=0.2)


class InplaceOnInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x.add_(1.0)  # writes into the caller's tensor
        return self.fc(x)


def test_inplace_write_to_the_input_never_corrupts_the_callers_inputs():
    x = torch.randn(2, 4)
    keep = x.clone()
    out = run_or_refuse(InplaceOnInput().eval(), (x,), "remove-noops,fold-constants,dce")
    assert isinstance(out, (fxopt.OptimizeResult, fxopt.FxoptError))
    assert torch.equal(x, keep)                              # capture and verify ran on copies


# ----- tied and unused parameters, buffers ----------------------------------------------------

class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(8, 8)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 8)
        self.head.weight = self.emb.weight  # tied weight
        self.unused = nn.Linear(100, 100)   # never called
        self.register_buffer("offset", torch.full((1, 8, 1, 1), 0.5))

    def forward(self, x):
        y = self.bn(self.stem(x))
        y = self.shared(F.relu(self.shared(y))) + self.offset  # one module called twice
        y = y.mean((2, 3))
        return self.head(F.relu(self.emb(y)))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("pipeline", PIPELINES)
def test_tied_shared_unused_and_buffers(pipeline, mode):
    torch.manual_seed(0)
    model = Tied().eval()
    x = torch.randn(2, 3, 8, 8)
    out = run_or_refuse(model, (x,), pipeline, mode=mode)
    if isinstance(out, fxopt.OptimizeResult):
        assert out.module(torch.randn(3, 3, 8, 8)).shape == (3, 8)
    assert model.head.weight is model.emb.weight  # still tied in the user's model


# ----- non-tensor and nested outputs ------------------------------------------------------------

@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    extra: dict


class Nested(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        f = self.net(x)
        logits = self.fc(f.mean((2, 3)))
        if self.kind == "dict":
            return {"logits": logits, "features": (f, [f.sum()]), "n": 3}
        if self.kind == "tuple":
            return logits, (f, f.amax())
        return Out(logits, {"f": f})


@pytest.mark.parametrize("kind", ["dict", "tuple", "dataclass"])
@pytest.mark.parametrize("pipeline", ["fuse", "remove-noops,fold-constants,dce", "quantize{backend=x86}"])
def test_nested_outputs(kind, pipeline):
    x = torch.randn(2, 3, 8, 8)
    out = run_or_refuse(Nested(kind).eval(), (x,), pipeline)
    if isinstance(out, fxopt.OptimizeResult):
        got = out.module(x)
        assert type(got).__name__ == {"dict": "dict", "tuple": "tuple", "dataclass": "Out"}[kind]


# ----- batch size 1 and zero-size tensors ---------------------------------------------------------

@pytest.mark.parametrize("pipeline", PIPELINES)
def test_batch_size_one(pipeline):
    torch.manual_seed(0)
    model = conv_net().eval()
    out = run_or_refuse(model, (torch.randn(1, 3, 8, 8),), pipeline)
    if isinstance(out, fxopt.OptimizeResult):
        assert out.module(torch.randn(4, 3, 8, 8)).shape == (4, 4)


@pytest.mark.parametrize("pipeline", ["fuse", "remove-noops,fold-constants,dce"])
def test_zero_size_batch(pipeline):
    model = conv_net().eval()
    out = run_or_refuse(model, (torch.randn(0, 3, 8, 8),), pipeline)
    if isinstance(out, fxopt.OptimizeResult):
        assert out.module(torch.randn(0, 3, 8, 8)).shape == (0, 4)


def test_zero_size_batch_after_optimizing_on_a_real_batch():
    model = conv_net().eval()
    res = run_or_refuse(model, (torch.randn(2, 3, 8, 8),), "fuse")
    assert res.module(torch.randn(0, 3, 8, 8)).shape == (0, 4)


# ----- fp16 / bf16 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pipeline", PIPELINES)
def test_half_precision_models(dtype, pipeline):
    torch.manual_seed(0)
    model = conv_net().eval().to(dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    calib = [(x,)] if "quantize" in pipeline else None
    out = run_or_refuse(model, (x,), pipeline, calibration=calib)
    if isinstance(out, fxopt.OptimizeResult):
        assert out.module(x).dtype == dtype
        assert model[0].weight.dtype == dtype


# ----- meta device ----------------------------------------------------------------------------------

def test_meta_device_model_is_refused_clearly():
    with torch.device("meta"):
        model = conv_net()
    x = torch.randn(2, 3, 8, 8, device="meta")
    with pytest.raises(fxopt.FxoptError) as info:
        fxopt.optimize(model, (x,), "fuse")
    assert "meta" in str(info.value)


# ----- NaN / Inf weights ----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("pipeline", PIPELINES)
def test_nan_and_inf_weights(bad, pipeline):
    torch.manual_seed(0)
    model = conv_net().eval()
    with torch.no_grad():
        model[3].weight[0, 0, 0, 0] = bad
    x = torch.randn(2, 3, 8, 8)
    snap = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            res = fxopt.optimize(model, (x,), pipeline, calibration=[(x,)] if "quantize" in pipeline else None)
        except fxopt.FxoptError as exc:
            assert_untouched(model, snap)
            assert str(exc)
            return
    assert_untouched(model, snap)
    ref = model(x)
    got = res.module(x)
    if "prune" in pipeline:
        return  # lossy: may prune the poisoned channel away
    # a verified result agrees with the reference on where the values are not finite
    if res.verification.passed:
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
    else:
        assert res.verification.message or res.verification.outputs


# ----- saved artifacts ------------------------------------------------------------------------------

def _quantized(tmp_path):
    from fxopt.passes.quantize import save

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    res = fxopt.optimize(conv_net().eval(), (x,), "quantize{backend=x86}", calibration=[(x,)])
    path = tmp_path / "m.int8.pt"
    save(res.module, path)
    return res, path, x


def test_saved_artifact_loads_with_weights_only(tmp_path):
    from fxopt.passes.quantize import load

    res, path, x = _quantized(tmp_path)
    torch.load(path, weights_only=True)
    torch.testing.assert_close(load(path)(x), res.module(x))


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_foreign_pickle_is_refused(tmp_path):
    from fxopt.passes.quantize import QuantizationError, load

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "fxopt.quantized-graph/1", "x": Evil()}, f)
    with pytest.raises(QuantizationError, match="not an fxopt saved graph|weights-only|refus"):
        load(path)
    torch.save(conv_net().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(QuantizationError, match="not an fxopt saved graph"):
        load(tmp_path / "sd.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(QuantizationError):
        load(tmp_path / "junk.pt")


@pytest.mark.parametrize("target", [["builtins", "eval"], ["builtins", "exec"], ["torch", "os.system"],
                                    ["torch", "load"], ["torch", "save"], ["operator", "attrgetter"]])
def test_tampered_file_naming_a_dangerous_function_is_refused(tmp_path, target):
    from fxopt.passes.quantize import QuantizationError, load

    _, path, _ = _quantized(tmp_path)
    data = torch.load(path, weights_only=True)
    node = next(n for n in data["nodes"] if n["op"] == "call_function")
    node["target"] = {"py": target}
    # matching checksums, so it is the allow-list that refuses the file, not the checksum
    data["checksums"] = fxopt.serialize.checksums(data)
    torch.save(data, path)
    with pytest.raises(QuantizationError, match="refus") as info:
        load(path)
    assert "checksum" not in str(info.value), info.value


def test_tampered_structure_is_refused_clearly(tmp_path):
    from fxopt.passes.quantize import QuantizationError, load

    _, path, _ = _quantized(tmp_path)
    data = torch.load(path, weights_only=True)
    del data["nodes"]
    data["checksums"] = fxopt.serialize.checksums(data)
    torch.save(data, path)
    with pytest.raises(QuantizationError) as info:
        load(path)
    assert "checksum" not in str(info.value), info.value
    data["nodes"] = [{"name": "x", "op": "call_method", "target": "__class__", "args": [], "kwargs": {}}]
    data["checksums"] = fxopt.serialize.checksums(data)
    torch.save(data, path)
    with pytest.raises(QuantizationError) as info:
        load(path)
    assert "checksum" not in str(info.value), info.value


def test_calibration_leaves_the_callers_batches_as_they_were():
    """A model that normalizes its input in place rewrote every calibration batch; a second
    quantize over the same list then calibrated on shifted data."""
    class NormalizesInPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            x.sub_(1.0)
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    batches = [(torch.randn(2, 8),) for _ in range(3)]
    before = [b[0].clone() for b in batches]
    for backend in ("x86", "reference"):
        fxopt.optimize(NormalizesInPlace().eval(), (torch.randn(2, 8),), f"quantize{{backend={backend}}}",
                       calibration=batches, verify=False)
        assert all(torch.equal(b[0], kept) for b, kept in zip(batches, before)), backend


def test_one_tensor_given_as_calibration_is_refused_before_capture():
    """Iterated, a tensor yields its rows: each was taken for a batch (a linear accepts a 1-D
    row), so int8 ranges came from single samples without a word (11-21 dB on an MLP)."""
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(4, 16)
    want = r"calibration: got one Tensor of shape \(4, 16\), which would be read as 4 batches of its rows; " \
           r"pass a sequence of batches, e\.g\. \[\(x,\)\]"
    with pytest.raises(fxopt.FxoptError, match=want):
        fxopt.optimize(model, (x,), "quantize{backend=x86}", calibration=x)
    observed = fxopt.optimize(model, (x,), "insert-observers", verify=False).module
    with pytest.raises(fxopt.FxoptError, match=r"calibrate: got one Tensor of shape \(4, 16\)"):
        fxopt.calibrate(observed, x, progress=False)
    assert fxopt.calibrate(observed, [(x,)], progress=False) == 1


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_model_that_writes_its_own_weight_when_run_can_be_pruned(mode):
    """nn.Embedding(max_norm=...) renormalizes the rows it looks up in its weight: running the
    graph to analyze it wrote into the pass's input, and prune failed as if it had."""
    class Renormed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc1, self.fc2 = nn.Embedding(20, 8, max_norm=1.0), nn.Linear(8, 32), nn.Linear(32, 3)

        def forward(self, ids):
            return self.fc2(F.relu(self.fc1(self.emb(ids))))

    torch.manual_seed(0)
    model, ids = Renormed().eval(), torch.randint(0, 20, (2, 5))
    before = model.emb.weight.detach().clone()
    res = fxopt.optimize(model, (ids,), "prune{ratio=0.5}", mode=mode)
    assert res.passes[0].modified and res.verification.passed
    assert torch.equal(model.emb.weight, before)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_forward_that_clips_a_weight_in_place_can_be_pruned(mode):
    """A WGAN critic clips its weight in forward (``self.c1.weight.clamp_`` under no_grad): a
    call_method on the parameter in a symbolic graph, a write inside the wrapped no_grad region
    in an export graph. The analysis runs on a copy of that weight, so prune does not fail; the
    clipped layer keeps its channels (its weight is read whole), the next one is pruned."""
    class Critic(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.c3 = (nn.Conv2d(a, b, 3, padding=1) for a, b in ((3, 16), (16, 16), (16, 4)))

        def forward(self, x):
            with torch.no_grad():
                self.c1.weight.clamp_(-0.1, 0.1)
            return self.c3(F.relu(self.c2(F.relu(self.c1(x)))))

    torch.manual_seed(0)
    res = fxopt.optimize(Critic().eval(), (torch.randn(2, 3, 8, 8),), "prune{ratio=0.5}", mode=mode)
    assert res.passes[0].modified and res.verification.passed
    assert res.module.get_parameter("c2.weight").shape[0] < 16
