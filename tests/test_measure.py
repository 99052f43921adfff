"""fxopt.measure: every count checked against a hand-computed number."""
from __future__ import annotations

import dataclasses
import os
import re
import time
import warnings

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.measure import (
    LatencyStats,
    compare_latency,
    count_macs,
    count_nodes,
    count_parameters,
    measure_latency,
    model_size_bytes,
)


def _graph_with_plain_attr(name: str, value: torch.Tensor) -> torch.fx.GraphModule:
    """x @ <get_attr name>, with the tensor stored as a plain attribute as folding passes do."""
    gm = torch.fx.GraphModule(nn.Module(), torch.fx.Graph())
    setattr(gm, name, value)
    x = gm.graph.placeholder("x")
    gm.graph.output(gm.graph.call_function(torch.matmul, (x, _get_attr(gm, name))))
    gm.recompile()
    return gm


def _add_get_attr(gm: torch.fx.GraphModule, name: str) -> None:
    """An (unused) get_attr node reaching gm.<name>, as a pass that stores a constant leaves it."""
    with gm.graph.inserting_before(next(iter(gm.graph.find_nodes(op="output")))):
        _get_attr(gm, name)
    gm.recompile()


def _get_attr(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    with warnings.catch_warnings():  # fx warns that a plain attribute is not registered: the point
        warnings.simplefilter("ignore", UserWarning)
        return gm.graph.get_attr(name)


def _dynamic_quantized(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated but still the eager API
        warnings.simplefilter("ignore")
        try:
            return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        except (AttributeError, RuntimeError) as err:
            pytest.skip(f"dynamic quantization unavailable: {err}")


# --- count_parameters -------------------------------------------------------------------------


def test_linear_parameter_count():
    assert count_parameters(nn.Linear(3, 4)) == 3 * 4 + 4


def test_conv_bn_counts_parameters_not_buffers():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    assert count_parameters(model) == (8 * 3 * 3 * 3 + 8) + (8 + 8)


def test_tied_weights_counted_once():
    shared = nn.Linear(3, 3)
    assert count_parameters(nn.Sequential(shared, nn.ReLU(), shared)) == 12


def test_plain_get_attr_tensor_is_counted():
    gm = _graph_with_plain_attr("folded_weight", torch.randn(3, 5))
    assert count_parameters(gm) == 15
    assert count_parameters(torch.fx.symbolic_trace(nn.Linear(3, 4))) == 16


def test_plain_attr_aliasing_a_parameter_is_counted_once():
    gm = torch.fx.symbolic_trace(nn.Linear(3, 4))
    gm.alias = gm.weight.detach()  # same storage as the registered weight
    _add_get_attr(gm, "alias")
    assert count_parameters(gm) == 16


def test_integer_constants_and_buffers_are_not_weights():
    gm = _graph_with_plain_attr("w", torch.randn(3, 2))
    gm.index = torch.arange(100)  # int64 constant: not a weight
    gm.register_buffer("stats", torch.zeros(50))  # registered buffer: not a parameter
    _add_get_attr(gm, "index")
    _add_get_attr(gm, "stats")
    assert count_parameters(gm) == 6


def test_quantized_packed_weights_are_counted_via_unpack():
    quantized = _dynamic_quantized(nn.Sequential(nn.Linear(3, 4)))
    assert list(quantized.parameters()) == []  # the weights now hide in a packed ScriptObject
    assert count_parameters(quantized) == 16


# --- model_size_bytes -------------------------------------------------------------------------


def test_size_grows_with_parameters_and_matches_float32_bytes():
    small, big = nn.Linear(10, 10), nn.Linear(300, 400)
    assert model_size_bytes(small) < model_size_bytes(big)
    payload = (300 * 400 + 400) * 4
    assert payload <= model_size_bytes(big) < payload + 4096  # plus torch.save's small header


def test_size_includes_plain_graph_attributes():
    gm = _graph_with_plain_attr("w", torch.randn(100, 100))
    assert model_size_bytes(gm) >= 100 * 100 * 4


def test_quantized_model_is_about_four_times_smaller():
    float_model = nn.Sequential(nn.Linear(300, 400))
    quantized = _dynamic_quantized(nn.Sequential(nn.Linear(300, 400)))
    assert model_size_bytes(quantized) < model_size_bytes(float_model) / 3


# --- count_nodes ------------------------------------------------------------------------------


def test_count_nodes():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(3, 4), nn.ReLU()))
    assert count_nodes(gm) == 4  # placeholder, linear, relu, output
    assert count_nodes(nn.Linear(3, 4)) is None


# --- count_macs -------------------------------------------------------------------------------


def test_linear_macs():
    assert count_macs(nn.Linear(3, 4), (torch.randn(2, 3),)) == 2 * 3 * 4


@pytest.mark.parametrize(
    ("conv", "shape", "macs"),
    [
        # output elements x (in_channels / groups) x kernel elements
        (nn.Conv2d(3, 8, 3), (1, 3, 10, 10), (8 * 8 * 8) * 3 * 9),
        (nn.Conv2d(4, 8, 3, padding=1, groups=2), (2, 4, 5, 5), (2 * 8 * 25) * 2 * 9),
        (nn.Conv1d(4, 8, 3), (1, 4, 5), (8 * 3) * 4 * 3),
        (nn.Conv3d(2, 3, 2), (1, 2, 3, 3, 3), (3 * 8) * 2 * 8),
        # transposed: every input element meets every kernel weight once
        (nn.ConvTranspose2d(4, 6, 3), (1, 4, 5, 5), (4 * 25) * 6 * 9),
    ],
)
def test_conv_macs(conv, shape, macs):
    assert count_macs(conv, (torch.randn(shape),)) == macs


@pytest.mark.parametrize("batch", [1, 2])
def test_a_bare_tensor_is_one_input_as_optimize_takes_it(batch):
    """count_macs(model, x) unpacked x along its batch: a TypeError at batch 2, and at batch 1 the
    model silently ran on one unbatched sample."""
    conv, x = nn.Conv2d(3, 8, 3), torch.randn(batch, 3, 8, 8)
    assert count_macs(conv, x) == count_macs(conv, (x,)) == batch * (8 * 6 * 6) * 3 * 9
    assert measure_latency(conv, x, repeats=2).median_ms > 0


def test_matmul_family_macs_with_kwargs_inputs():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    assert count_macs(lambda x, y: x @ y, {"x": a, "y": b}) == 2 * 3 * 4 * 5
    assert count_macs(torch.bmm, (a, b)) == 2 * 3 * 4 * 5
    assert count_macs(torch.baddbmm, (torch.randn(2, 3, 5), a, b)) == 2 * 3 * 4 * 5
    assert count_macs(torch.addmm, (torch.randn(5), a[0], b[0])) == 3 * 4 * 5


def test_attention_macs():
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 10, 8), torch.randn(2, 4, 10, 6)
    # Q @ K^T (16 x 10 x 8) plus weights @ V (16 x 10 x 6), per batch and head
    assert count_macs(F.scaled_dot_product_attention, (q, k, v)) == 2 * 4 * 16 * 10 * (8 + 6)


def test_eager_attention_module_counts_the_same_as_its_exported_graph():
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    # in-projection 3 x (10 x 16 x 16), attention 2 x (2 x 5 x 5 x 16), out-projection 10 x 16 x 16
    expected = 3 * 10 * 16 * 16 + 2 * 2 * 5 * 5 * 16 + 10 * 16 * 16
    assert count_macs(mha, (x, x, x)) == expected
    exported = torch.export.export(mha, (x, x, x), strict=False).module()
    assert count_macs(exported, (x, x, x)) == expected
    assert torch.backends.mha.get_fastpath_enabled()  # the fast path is switched back on


def test_count_macs_leaves_batchnorm_statistics_alone():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model, (torch.randn(2, 1, 6, 6),))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training


# --- measure_latency --------------------------------------------------------------------------


def test_latency_stats_are_positive_and_ordered():
    stats = measure_latency(nn.Linear(64, 64), (torch.randn(8, 64),), repeats=15)
    assert isinstance(stats, LatencyStats) and stats.runs == 15
    assert 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert "ms" in str(stats)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.runs = 3  # type: ignore[misc]


def test_latency_measures_wall_time():
    stats = measure_latency(lambda: time.sleep(0.002), (), warmup=1, repeats=5)
    assert stats.p10_ms >= 2.0


def test_min_time_adds_runs():
    stats = measure_latency(lambda: time.sleep(0.001), (), repeats=3, min_time_s=0.03)
    # more runs than `repeats`, and no more than 0.03 s of >= 1 ms calls need (whatever the load)
    assert 3 < stats.runs <= 30


def test_compare_latency_interleaves_rounds_and_reports_errors():
    calls = []

    def slow(x):
        calls.append("slow")
        time.sleep(0.002)

    def fast(x):
        calls.append("fast")

    def broken(x):
        calls.append("broken")
        raise TypeError("bad input\nsecond line")

    lat = compare_latency({"slow": slow, "fast": fast, "broken": broken}, {"a": (1,), "b": (2,)},
                          rounds=2, warmup=1, repeats=2)
    assert lat["slow"]["a"] >= 2.0 and lat["slow"]["b"] >= 2.0
    assert lat["fast"]["a"] < lat["slow"]["a"]
    assert lat["broken"] == {"a": "TypeError: bad input", "b": "TypeError: bad input"}
    broken_calls = calls.count("broken")
    compare_latency({"broken": broken}, {"a": (1,)}, rounds=3, warmup=1, repeats=2)
    assert calls.count("broken") == 2 * broken_calls  # a failed method is not timed in later rounds
    first_fast, last_slow = calls.index("fast"), len(calls) - 1 - calls[::-1].index("slow")
    assert first_fast < last_slow  # interleaved, not all of one method first
    with pytest.raises(ValueError, match="rounds"):
        compare_latency({"fast": fast}, {"a": (1,)}, rounds=0)


def test_kwargs_inputs_and_threads_are_restored():
    previous = torch.get_num_threads()
    seen_threads = []

    def fn(*, x):
        seen_threads.append(torch.get_num_threads())
        return x * 2

    measure_latency(fn, {"x": torch.ones(3)}, repeats=2, threads=1)
    assert set(seen_threads) == {1}
    assert torch.get_num_threads() == previous


def test_runs_under_inference_mode_and_falls_back_to_no_grad():
    modes = []

    def fn(x):
        modes.append(torch.is_inference_mode_enabled())
        assert not torch.is_grad_enabled()
        return x + 1

    measure_latency(fn, (torch.ones(2),), warmup=1, repeats=2)
    assert modes == [True, True, True]

    def refuses_inference_mode(x):
        if torch.is_inference_mode_enabled():
            raise RuntimeError("Inplace update to inference tensor outside InferenceMode")
        assert not torch.is_grad_enabled()
        return x + 1

    assert measure_latency(refuses_inference_mode, (torch.ones(2),), repeats=4).runs == 4


def test_latency_propagates_real_errors_and_rejects_bad_arguments():
    def broken(x):
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        measure_latency(broken, (torch.ones(1),))
    with pytest.raises(ValueError):
        measure_latency(nn.Identity(), (torch.ones(1),), repeats=0)
    with pytest.raises(ValueError):
        measure_latency(nn.Identity(), (torch.ones(1),), threads=0)


def test_latency_refuses_more_threads_than_cpus(monkeypatch):
    """threads=99999 made OpenMP fail to start its pool and the process die (a segmentation fault)."""
    from fxopt import measure

    monkeypatch.setattr(measure, "available_cpus", lambda: 2)
    before = torch.get_num_threads()
    with pytest.raises(ValueError, match=r"threads=3 is more than the 2 CPUs this process may use: give at most 2"):
        measure_latency(nn.Identity(), (torch.ones(1),), threads=3)
    assert torch.get_num_threads() == before
    assert measure_latency(nn.Identity(), (torch.ones(1),), threads=2, repeats=2).median_ms >= 0


def test_latency_leaves_batchnorm_statistics_alone():
    model = nn.BatchNorm1d(4).train()
    measure_latency(model, (torch.randn(8, 4),), repeats=3)
    assert torch.equal(model.running_mean, torch.zeros(4))
    assert model.num_batches_tracked.item() == 0


def test_size_counts_prepacked_int8_weights_held_as_graph_attributes():
    """Quantized graphs hold prepacked weights as attributes outside the state dict."""
    import fxopt

    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU())
    x = torch.randn(4, 256)
    res = fxopt.optimize(model, (x,), "quantize{backend=x86}", calibration=[(x,)])
    fp32, int8 = model_size_bytes(model), model_size_bytes(res.module)
    assert 256 * 256 <= int8 < fp32 / 2  # int8 weights counted, about a quarter of fp32


def test_count_parameters_sees_a_reference_graphs_int8_weights():
    import fxopt
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()
    x = torch.randn(4, 64)
    q = fxopt.optimize(model, (x,), "quantize{backend=reference}", calibration=[(x,)] * 2).module
    # the int8 weights, and the float biases the graph keeps as buffers beside them (they were
    # left out: the int8 model counted fewer parameters than the float one)
    assert count_parameters(q) == count_parameters(model) == 64 * 64 + 64 + 10 * 64 + 10
    norm = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()  # float buffers that are no bias
    assert count_parameters(fxopt.capture(norm, torch.randn(2, 3, 6, 6), mode="export")) == count_parameters(norm)


def test_macs_of_a_model_that_feeds_a_parameter_view_to_a_layer():
    """Perceiver latents / DETR queries: FlopCounterMode's module tracker raised on a view of a
    parameter made under no_grad; the count works and the parameters still require grad."""
    class Latents(nn.Module):
        def __init__(self):
            super().__init__()
            self.latents, self.ln, self.fc = nn.Parameter(torch.randn(4, 8)), nn.LayerNorm(8), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(self.ln(self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)) + x)

    model, x = Latents().eval(), torch.randn(2, 4, 8)
    assert count_macs(model, (x,)) == 2 * 4 * 8 * 2
    assert count_macs(fxopt.capture(model, (x,), mode="symbolic"), (x,)) == 2 * 4 * 8 * 2
    assert all(p.requires_grad for p in model.parameters())


@torch.library.custom_op("fxopt_test::opaque_mm", mutates_args=())
def _opaque_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b


@_opaque_mm.register_fake
def _(a, b):
    return a.new_empty(a.shape[0], b.shape[1])


def test_an_op_without_a_formula_is_counted_as_zero_with_a_warning_naming_it():
    """Mixtral's experts run through an op of transformers' own (grouped_mm_fallback): 0 MACs,
    silently, so the "MACs kept" of a pruned Mixtral read 0.52 where it was ~0.88."""
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with pytest.warns(UserWarning, match=r"count_macs: no formula for fxopt_test::opaque_mm \(2 calls\): "
                                         r"counted as 0 MACs"):
        assert count_macs(lambda x, y: _opaque_mm(x, y) + _opaque_mm(x, y), (a, b)) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's own ops, and ones with a formula, say nothing
        assert count_macs(lambda x, y: x @ y, (a, b)) == 4 * 8 * 3


def test_a_grouped_matmul_of_experts_counts_one_matmul_per_row():
    """Hugging Face's mixtures of experts run their experts with ``torch._grouped_mm``, which
    FlopCounterMode had no formula for: Mixtral's experts counted as 0 MACs."""
    tokens, experts = torch.randn(12, 8), torch.randn(3, 8, 4)
    offsets = torch.tensor([4, 8, 12], dtype=torch.int32)  # rows 0-3 to expert 0, 4-7 to 1, 8-11 to 2
    assert count_macs(lambda a, b: torch._grouped_mm(a, b, offs=offsets), (tokens, experts)) == 12 * 8 * 4


def test_an_int8_conv_with_a_float_output_keeps_its_weights_in_the_counts():
    # quantize's float-output conv is a layer object a CodedValue holds: counted neither as a
    # parameter nor in the size, the CLI showed 37,188 -> 260 parameters and a 100x smaller model
    import fxopt
    from fxopt.serialize import CodedValue

    class ConvMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(64, 64, 3, padding=1)
            self.fc = nn.Linear(64, 4)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    torch.manual_seed(0)
    model, x = ConvMean().eval(), torch.randn(2, 64, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = fxopt.optimize(model, (x,), "quantize{backend=x86}", calibration=[(x,)]).module
    held = [m.value for m in q.modules() if isinstance(m, CodedValue)]
    assert any(dataclasses.is_dataclass(v) for v in held), "the conv no longer takes the float-output path"
    assert count_parameters(q) == count_parameters(model) == 64 * 64 * 9 + 64 + 64 * 4 + 4
    weights = 64 * 64 * 9  # int8: a byte each
    assert weights < model_size_bytes(q) < model_size_bytes(model) / 3


class _ShapeBoundPack:
    """Stands in for an int8 prepacked weight: it records the shapes it is called at (a oneDNN
    pack keeps the primitive of its first call's shape; others take a slower path)."""

    calls: list[tuple["_ShapeBoundPack", tuple]] = []  # (which pack, kept alive: ids stay apart; its shape)

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self, tuple(x.shape)))
        return x @ self.weight


fxopt.serialize.register_codec(fxopt.serialize.AttributeCodec(
    "test-shape-bound-pack", lambda v: isinstance(v, _ShapeBoundPack), lambda v: {"weight": v.weight},
    lambda d: _ShapeBoundPack(d["weight"]), "fxopt.serialize"))


class _Packed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pack = _ShapeBoundPack(torch.randn(4, 4))

    def forward(self, x):
        return self.pack(x)


def test_compare_latency_times_each_input_size_on_fresh_packs():
    """One int8 module timed at batch 1 then 16 ran the second size on the first's primitive:
    2-3.5x slower than a fresh module at that size."""
    model = _Packed()
    _ShapeBoundPack.calls.clear()
    compare_latency({"int8": model}, {"b1": (torch.randn(1, 4),), "b16": (torch.randn(16, 4),)},
                    rounds=2, warmup=1, repeats=2)
    shapes_by_pack: dict[int, set] = {}
    for pack, shape in _ShapeBoundPack.calls:
        shapes_by_pack.setdefault(id(pack), set()).add(shape)
    assert id(model.pack) not in shapes_by_pack  # the caller's packs keep the shape they had
    assert all(len(shapes) == 1 for shapes in shapes_by_pack.values())
    assert set.union(*shapes_by_pack.values()) == {(1, 4), (16, 4)}


class _PackedWithALock(_Packed):
    def __init__(self) -> None:
        super().__init__()
        self.lock = __import__("threading").Lock()


def test_compare_latency_reports_a_module_it_cannot_copy_and_times_the_others():
    """The copy for fresh packs failed on a lock and aborted the whole comparison."""
    lat = compare_latency({"locked": _PackedWithALock(), "relu": torch.relu}, {"b2": (torch.randn(2, 4),)},
                          rounds=1, warmup=1, repeats=2)
    assert lat["locked"]["b2"].startswith("TypeError: cannot pickle") and isinstance(lat["relu"]["b2"], float)


class _CountsCallsAndWritesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        x += 1
        return self.fc(x)


@pytest.mark.parametrize("measure", [
    lambda m, x: measure_latency(m, (x,), repeats=5),
    lambda m, x: count_macs(m, (x,)),
    lambda m, x: compare_latency({"m": m}, {"b2": (x,)}, rounds=2, repeats=3),
])
def test_a_measurement_leaves_an_eval_model_buffers_and_the_inputs_as_they_were(measure):
    """Buffers were put back for a model in training mode only: an eval model that counts its calls
    came back at calls=8 after measure_latency, and the caller's input, which it writes, at 8 too."""
    model, x = _CountsCallsAndWritesItsInput().eval(), torch.zeros(2, 4)
    measure(model, x)
    assert model.calls.item() == 0 and torch.equal(x, torch.zeros(2, 4))


def test_a_model_with_a_lazy_buffer_is_measured():
    """The buffers snapshot since 4b38717 detached an uninitialized LazyBatchNorm buffer and crashed with
    torch's 'Attempted to use an uninitialized parameter' (advB B10)."""
    model = nn.Sequential(nn.LazyLinear(8), nn.LazyBatchNorm1d()).eval()
    assert measure_latency(model, (torch.randn(4, 16),), repeats=3, warmup=1).median_ms > 0
    assert isinstance(model[0], nn.LazyLinear)  # timed on a copy: the caller's stays lazy


@pytest.mark.parametrize("options", [{}, {"batch_first": True}, {"num_layers": 2, "bidirectional": True}])
@pytest.mark.parametrize("capture", [False, True])
def test_count_macs_counts_the_matmuls_of_an_lstm(options, capture):
    """A CPU LSTM runs each layer as one oneDNN kernel (aten.mkldnn_rnn_layer) FlopCounterMode has no formula
    for: it counted 0, silently (GRU and RNN, run as matmuls, counted right; api F1). Each layer and
    direction: steps x 4 gates x hidden x (inputs + hidden)."""
    model = nn.LSTM(8, 16, **options).eval()
    x = torch.randn(2, 5, 8)  # 10 steps, whichever dim is the batch
    layers, directions = options.get("num_layers", 1), 2 if options.get("bidirectional") else 1
    expected = sum(directions * 10 * 4 * 16 * ((8 if layer == 0 else directions * 16) + 16) for layer in range(layers))
    measured = fxopt.capture(model, (x,), mode="export") if capture else model
    assert count_macs(measured, (x,)) == expected


def test_count_macs_counts_a_lazy_model_on_a_copy_its_first_call_initializes():
    """count_macs on an nn.LazyLinear / LazyConv2d that never ran crashed with torch's 'Attempted to use
    an uninitialized parameter'; it counts the model as its first call makes it, and leaves the caller's
    model lazy and torch's generator where it was."""
    model = nn.Sequential(nn.LazyConv2d(8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    x, state = torch.randn(1, 3, 10, 10), torch.get_rng_state()
    assert count_macs(model, (x,)) == 8 * 8 * 8 * 3 * 3 * 3 + 8 * 8 * 8 * 5
    assert isinstance(model[0], nn.LazyConv2d) and isinstance(model[3], nn.LazyLinear)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("measure", [count_parameters, model_size_bytes])
def test_a_size_of_a_lazy_model_names_the_tensor_not_initialized(measure):
    """Without inputs there is no first call to size a lazy module by: the error names it (torch's
    error named neither the tensor nor the fix)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.LazyLinear(8))
    expected = rf"{measure.__name__}: '1.weight' of LazyLinear '1' is not initialized.*model\(x\)"
    with pytest.raises(ValueError, match=expected):
        measure(model)


class _ReadsALargeCache(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(32 * 2**20))  # 128 MiB, never written

    def forward(self, x):
        return x + self.cache[:4]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads Linux's peak resident memory")
def test_a_buffer_no_call_writes_is_not_copied():
    """Every buffer of an eval model was cloned up front (+905 MiB for a 512 MiB cache; advB B4); only
    those a call writes are copied now, at the first write."""
    model, x = _ReadsALargeCache().eval(), torch.randn(4)

    def peak_mib() -> float:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024

    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak restarts from what is resident now
    before = peak_mib()
    measure_latency(model, (x,), repeats=2, warmup=1)
    count_macs(model, (x,))
    assert peak_mib() - before < 64


class _Calls(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


@pytest.mark.parametrize("model, inputs, expected", [
    (nn.Bilinear(4, 5, 3), (torch.randn(2, 7, 4), torch.randn(2, 7, 5)), 14 * 3 * 4 * 5),
    (_Calls(torch.mv), (torch.randn(8, 16), torch.randn(16)), 8 * 16),
    (_Calls(lambda a, v: torch.addmv(torch.zeros(8), a, v)), (torch.randn(8, 16), torch.randn(16)), 8 * 16),
    (_Calls(torch.dot), (torch.randn(16), torch.randn(16)), 16),
    (_Calls(torch.cdist), (torch.randn(5, 16), torch.randn(7, 16)), 5 * 7 * 16),
    (_Calls(torch.cdist), (torch.randn(2, 30, 16), torch.randn(2, 40, 16)), 2 * 30 * 40 * 16),
    (_Calls(torch.cdist), (torch.randn(1, 10, 8), torch.randn(3, 12, 8)), 3 * 10 * 12 * 8),  # broadcast batch (advB F1)
    (_Calls(lambda x, w, b: torch.conv_tbc(x, w, b, 1)), (torch.randn(10, 2, 4), torch.randn(3, 4, 6), torch.randn(6)),
     10 * 2 * 6 * 4 * 3),
])
def test_count_macs_counts_the_products_flop_counter_has_no_formula_for(model, inputs, expected):
    """nn.Bilinear (aten._trilinear), matrix-vector products, cdist and conv_tbc counted 0 MACs, silently:
    FlopCounterMode has no formula for them, and an aten op is not warned about."""
    assert count_macs(model.eval(), inputs) == expected


@pytest.mark.parametrize("options, says", [
    (dict(min_time_s=float("nan")), "min_time_s must be a finite number of seconds >= 0, got nan"),
    (dict(warmup=1.5), "need an int repeats >= 1 and an int warmup >= 0, got repeats=20, warmup=1.5"),
    (dict(repeats=True), "need an int repeats >= 1"),
])
def test_measure_latency_refuses_options_it_cannot_time_with(options, says):
    """min_time_s=inf timed forever (not run here: it would hang without the check, which NaN shares); NaN was
    taken as 0; warmup=1.5 failed in range() inside the loop."""
    with pytest.raises(ValueError, match=re.escape(says)):
        measure_latency(nn.Linear(2, 2), (torch.randn(1, 2),), **options)


@pytest.mark.parametrize("count", [np.int64(2), torch.tensor(2)])
def test_measure_latency_takes_a_numpy_or_tensor_integer_count(count):
    """The int check of 97a1da0 refused np.int64(3), which ran before (advB F2)."""
    assert measure_latency(nn.Linear(2, 2), (torch.randn(1, 2),), repeats=count, warmup=count).runs == 2


@pytest.mark.parametrize("measure", [count_parameters, model_size_bytes])
def test_a_size_of_a_function_is_refused_by_name(measure):
    with pytest.raises(TypeError, match=f"{measure.__name__} takes an nn.Module, got function"):
        measure(lambda x: x)


@pytest.mark.parametrize("pipeline", ["quantize{backend=x86}", "quantize{backend=reference}", "fuse,lower-cpu",
                                      "quantize{backend=x86},lower-cpu"])
def test_count_macs_counts_int8_and_onednn_kernels_as_the_layers_they_compute(pipeline):
    """quantized::conv2d / linear and oneDNN's kernels counted 0: an int8 model read as a 24x cut in MACs and
    lower-cpu lost a layer (mix F4). Grouped and transposed convs too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
                          nn.ConvTranspose2d(8, 4, 2, stride=2), nn.Flatten(), nn.Linear(4 * 12 * 12, 10)).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = 2 * (8 * 8 * 8 * 27 + 8 * 6 * 6 * 4 * 9 + 8 * 6 * 6 * 4 * 4 + 10 * 576)
    assert count_macs(model, (x,)) == expected
    result = fxopt.optimize(model, (x,), pipeline, calibration=[(torch.randn(4, 3, 8, 8),)], verify=False)
    assert count_macs(result.module, (x,)) == expected


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        h = self.c2(torch.relu(self.c1(x))) + x
        y = h.mean((2, 3))
        return torch.relu(self.fc(y) + y)


@pytest.mark.parametrize("pipeline", ["fuse,lower-cpu", "quantize{backend=x86},lower-cpu"])
def test_count_macs_reads_a_fused_residual_add_as_no_weight(pipeline):
    """lower-cpu's conv + add, _convolution_pointwise.binary(X, other, W, ...), passes the residual before the
    weight, and 088ab72 read it as the weight: 11x the float model's MACs (advB F8)."""
    torch.manual_seed(0)
    model, x = _Residual().eval(), torch.randn(2, 16, 14, 14)
    result = fxopt.optimize(model, (x,), pipeline, calibration=[(torch.randn(2, 16, 14, 14),)], verify=False)
    assert count_macs(result.module, (x,)) == count_macs(model, (x,)) == 2 * (2 * 14 * 14 * 16 * 144) + 2 * 256
