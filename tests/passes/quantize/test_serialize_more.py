"""save/load regressions: float leaf modules with None parameters or buffers, and call_function
targets without an importable qualified name (torch.nn.functional's boolean_dispatch wrappers)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.passes.quantize import QuantizationError, load, save

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")


def _round_trip(gm: torch.fx.GraphModule, tmp_path) -> torch.fx.GraphModule:
    """Save `gm`, check the file is plain data, and load it back."""
    path = tmp_path / "model.int8.pt"
    save(gm, path)
    torch.load(path, weights_only=True)
    return load(path)


def _assert_same_outputs(saved, restored, *inputs, seed=0):
    """Both modules give bit-identical outputs (same RNG state for random ops)."""
    with torch.no_grad():
        torch.manual_seed(seed)
        expected = saved(*inputs)
        torch.manual_seed(seed)
        actual = restored(*inputs)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def _quantize_symbolic(model: nn.Module, shape) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(*shape)
    cal = [(torch.randn(*shape),) for _ in range(2)]
    res = fxopt.optimize(model.eval(), (x,), "quantize{backend=x86}", calibration=cal, mode="symbolic")
    return res.module, x


# ----- None parameters and buffers of float leaf modules ------------------------------------------

NONE_PARAM_CASES = {
    "conv3d_no_bias": (lambda: nn.Conv3d(8, 8, 3, bias=False), (2, 8, 4, 8, 8)),
    "conv_transpose2d_no_bias": (lambda: nn.ConvTranspose2d(8, 8, 2, 2, bias=False), (2, 8, 8, 8)),
    "layer_norm_no_affine": (lambda: nn.LayerNorm(8, elementwise_affine=False), (2, 8, 8)),
    "group_norm_no_affine": (lambda: nn.GroupNorm(2, 8, affine=False), (2, 8, 4, 4)),
    # running_mean/running_var/num_batches_tracked are None *buffers*; weight/bias None parameters
    "batch_norm3d_no_stats": (lambda: nn.BatchNorm3d(8, affine=False, track_running_stats=False),
                              (2, 8, 4, 4, 4)),
    "conv3d_with_bias": (lambda: nn.Conv3d(8, 8, 3), (2, 8, 4, 8, 8)),  # control: nothing is None
}


@pytest.mark.parametrize("case", list(NONE_PARAM_CASES))
def test_none_parameters_and_buffers_round_trip_as_none(tmp_path, case):
    make, shape = NONE_PARAM_CASES[case]
    layer = make()
    gm, x = _quantize_symbolic(nn.Sequential(layer, nn.ReLU()), shape)
    restored = _round_trip(gm, tmp_path)
    _assert_same_outputs(gm, restored, x)
    # The same keys, registered as None where the original's are None, in every stored module.
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        before, after = gm.get_submodule(node.target), restored.get_submodule(node.target)
        for table in ("_parameters", "_buffers"):
            want = {k: v is None for k, v in getattr(before, table).items()}
            assert {k: v is None for k, v in getattr(after, table).items()} == want, (node.target, table)
            for key, is_none in want.items():
                assert is_none == (getattr(after, key) is None)


# ----- functions without an importable qualified name ----------------------------------------------

class PoolNet(nn.Module):
    """conv -> F.max_pool2d -> conv -> F.adaptive_max_pool2d -> linear, as in the stress repro."""

    def __init__(self):
        super().__init__()
        self.conv, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 2 * 2, 4)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.conv(x)), kernel_size=3, stride=2)
        x = F.adaptive_max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def test_quantized_model_with_functional_max_pool_round_trips(tmp_path):
    gm, x = _quantize_symbolic(PoolNet(), (2, 3, 32, 32))
    restored = _round_trip(gm, tmp_path)
    _assert_same_outputs(gm, restored, x)
    targets = [n.target for n in restored.graph.nodes if n.op == "call_function"]
    assert any(t is F.max_pool2d for t in targets) and any(t is F.adaptive_max_pool2d for t in targets)


class _Call(nn.Module):
    """Calls one torch.nn.functional function with fixed arguments (traced as call_function)."""

    def __init__(self, fn, *args, **kwargs):
        super().__init__()
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def forward(self, x):
        return self.fn(x, *self.args, **self.kwargs)


# Every boolean_dispatch wrapper in torch.nn.functional. With return_indices=True, tracing already
# resolves the wrapper to its public *_with_indices branch; that case checks it still round-trips.
BOOLEAN_DISPATCH_CASES = {
    "max_pool1d": (F.max_pool1d, (2,), {}, (2, 3, 8)),
    "max_pool2d": (F.max_pool2d, (2,), {}, (2, 3, 8, 8)),
    "max_pool2d_indices": (F.max_pool2d, (2,), {"return_indices": True}, (2, 3, 8, 8)),
    "max_pool3d": (F.max_pool3d, (2,), {}, (2, 3, 4, 4, 4)),
    "adaptive_max_pool1d": (F.adaptive_max_pool1d, (3,), {}, (2, 3, 8)),
    "adaptive_max_pool2d": (F.adaptive_max_pool2d, (3,), {}, (2, 3, 8, 8)),
    "adaptive_max_pool3d": (F.adaptive_max_pool3d, (2,), {}, (2, 3, 4, 4, 4)),
    "fractional_max_pool2d": (F.fractional_max_pool2d, (2,), {"output_size": 3}, (2, 3, 8, 8)),
    "fractional_max_pool3d": (F.fractional_max_pool3d, (2,), {"output_size": 2}, (2, 3, 5, 5, 5)),
}


@pytest.mark.parametrize("case", list(BOOLEAN_DISPATCH_CASES))
def test_boolean_dispatch_functions_are_saved_by_public_name(tmp_path, case):
    fn, args, kwargs, shape = BOOLEAN_DISPATCH_CASES[case]
    assert "<locals>" in fn.__qualname__  # the premise: its own name does not import
    gm = torch.fx.symbolic_trace(_Call(fn, *args, **kwargs))
    restored = _round_trip(gm, tmp_path)
    before, after = ([n.target for n in g.graph.nodes if n.op == "call_function"] for g in (gm, restored))
    assert len(after) == 1 and after[0] is before[0]
    assert before[0] is (F.max_pool2d_with_indices if kwargs.get("return_indices") else fn)
    _assert_same_outputs(gm, restored, torch.randn(*shape))


def _graph_calling(fn, name: str) -> torch.fx.GraphModule:
    """A GraphModule computing fn(x, x) in one call_function node called `name`."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.create_node("call_function", fn, (x, x), name=name))
    return torch.fx.GraphModule(nn.Module(), graph)


def test_tensor_method_as_call_function_round_trips(tmp_path):
    gm = _graph_calling(torch.Tensor.add, "plus")
    restored = _round_trip(gm, tmp_path)
    assert [n.target for n in restored.graph.nodes if n.op == "call_function"] == [torch.Tensor.add]
    _assert_same_outputs(gm, restored, torch.randn(3, 4))


def test_unnameable_function_is_still_a_clear_error(tmp_path):
    gm = _graph_calling(lambda a, b: a + b, "local_add")
    with pytest.raises(QuantizationError, match=r"cannot name the function called by node 'local_add'.*<lambda>"):
        save(gm, tmp_path / "model.int8.pt")


class RecurrentHead(nn.Module):
    def __init__(self, cell=nn.LSTM):
        super().__init__()
        self.fc0, self.rnn, self.fc = nn.Linear(8, 16), cell(16, 12, batch_first=True), nn.Linear(12, 3)

    def forward(self, x):
        out, _ = self.rnn(torch.relu(self.fc0(x)))
        return self.fc(out[:, -1])


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_a_recurrent_layer_kept_float_round_trips(tmp_path, cell):
    """An RNN module keeps weak references to its weights (not state): they are rebuilt on load
    (the loaded model failed on its first call: no '_flat_weight_refs')."""
    torch.manual_seed(0)
    cal = [torch.randn(4, 6, 8) for _ in range(4)]
    res = fxopt.optimize(RecurrentHead(cell).eval(), cal[0], "quantize{backend=x86}", calibration=cal,
                         mode="symbolic")
    loaded = _round_trip(res.module, tmp_path)
    torch.testing.assert_close(loaded(cal[1]), res.module(cal[1]), rtol=0, atol=0)


@pytest.mark.parametrize("engine", [e for e in ("onednn", "qnnpack") if e in torch.backends.quantized.supported_engines])
def test_a_model_loaded_under_another_global_engine_runs_as_saved(engine, tmp_path):
    """load re-packed under `torch.backends.quantized.engine`: under onednn or qnnpack the
    float-output linear (x86/fbgemm packs only) failed inside torch on the first call. Packs are
    made as lowering makes them, whatever the global engine."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    cal = [torch.randn(8, 16) for _ in range(4)]
    res = fxopt.optimize(model, cal[0], "quantize{backend=x86}", calibration=cal)
    before = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = engine
        restored = _round_trip(res.module, tmp_path)
        _assert_same_outputs(res.module, restored, cal[1])
    finally:
        torch.backends.quantized.engine = before


def test_quantize_leaves_the_global_engine_as_the_user_set_it():
    """lower-int8 set `torch.backends.quantized.engine = "x86"` and never put it back."""
    if "qnnpack" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch build has no qnnpack engine")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    cal = [torch.randn(8, 16) for _ in range(2)]
    before = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "qnnpack"
        res = fxopt.optimize(model, cal[0], "quantize{backend=x86}", calibration=cal)
        assert torch.backends.quantized.engine == "qnnpack"
        assert res.verification.passed
    finally:
        torch.backends.quantized.engine = before
