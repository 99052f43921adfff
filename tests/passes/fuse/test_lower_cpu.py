"""`lower-cpu`: oneDNN prepacked conv/linear with fused post-ops; numerics and graph shape."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fxopt
from fxopt.examples import zoo
from fxopt.passes.fuse.lower_cpu import MIN_MACS, ConvByBatch, WeightPacks
from fxopt.patterns import annotations

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
MODES = ("symbolic", "export")


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.3, 3)
        bn.weight.uniform_(0.5, 2)
    return bn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), _bn(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, groups=2), _bn(8)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        z = F.relu(self.b2(self.c2(y)) + y)
        z = F.hardswish(self.c3(z))
        return self.fc(z.view(z.shape[0], -1))  # view needs a contiguous input


def _lowered(gm):
    return [annotations(n).get("fused") for n in gm.graph.nodes if annotations(n).get("lowered") == "mkldnn"]


@pytest.mark.parametrize("mode", MODES)
def test_lowering_matches_and_runs_other_batches(mode):
    torch.manual_seed(0)
    model = Block().eval()
    res = fxopt.optimize(model, (torch.randn(2, 3, 6, 6),), pipeline="fuse,lower-cpu{linear=true,min_macs=0}",
                         mode=mode)
    assert res.verification.passed, res.summary()
    assert sorted(_lowered(res.module)) == ["conv+add+relu", "conv+hardswish", "conv+relu", "linear"]
    for batch in (1, 5):
        x = torch.randn(batch, 3, 6, 6)
        torch.testing.assert_close(res.module(x), model(x), rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_string_padding_is_lowered_as_the_integers_it_stands_for(mode):
    # Hugging Face's EfficientNet writes every conv with padding="same"; an even kernel's
    # "same" pads one side more, which no integer padding says: that conv stays on aten
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding="same"), nn.ReLU(), nn.Conv2d(8, 8, 3, padding="valid"),
                          nn.ReLU(), nn.Conv2d(8, 8, 2, padding="same")).eval()
    res = fxopt.optimize(model, (torch.randn(2, 3, 8, 8),), pipeline="fuse,lower-cpu{min_macs=0}", mode=mode)
    assert res.verification.passed, res.summary()
    assert sorted(_lowered(res.module)) == ["conv+relu", "conv+relu"]


def test_grouped_transposed_convs_are_left_alone():
    """(dense ones are lowered: tests/passes/fuse/test_lower_cpu_transposed.py)"""
    model = nn.Sequential(nn.ConvTranspose2d(4, 4, 2, groups=2), nn.ReLU()).eval()
    res = fxopt.optimize(model, (torch.randn(1, 4, 4, 4),), pipeline="fuse,lower-cpu{min_macs=0}", mode="symbolic")
    assert res.verification.passed
    assert _lowered(res.module) == []


def test_linear_is_lowered_only_on_request():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    res = fxopt.optimize(model, (torch.randn(3, 4),), pipeline="lower-cpu", mode="export")
    assert _lowered(res.module) == []
    res = fxopt.optimize(model, (torch.randn(3, 4),), pipeline="lower-cpu{linear=true}", mode="export")
    assert _lowered(res.module) == ["linear+relu"] and res.verification.passed


def test_shared_conv_is_lowered_per_site_without_touching_the_model():
    conv = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv).eval()
    before = conv.weight.clone()
    res = fxopt.optimize(model, (torch.randn(1, 3, 5, 5),), pipeline="fuse,lower-cpu{min_macs=0}",
                         mode="symbolic")
    assert res.verification.passed
    assert sorted(_lowered(res.module)) == ["conv", "conv+relu"]
    assert torch.equal(conv.weight, before)


def _packs(gm):
    return [m for m in gm.modules() if isinstance(m, WeightPacks)]


def _reorders_in_one_call(gm, x, capfd) -> int:
    """oneDNN primitives of kind `reorder` that one steady-state call executes (ONEDNN_VERBOSE)."""
    with torch.inference_mode():
        gm(x)
        gm(x)  # first calls with a new (threads, shape) build the packs: not steady state
        capfd.readouterr()
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            gm(x)
    lines = capfd.readouterr().out.splitlines()
    execs = [line for line in lines if ",exec," in line]
    assert any(",convolution," in line for line in execs), "oneDNN verbose printed nothing; cannot check"
    return sum(1 for line in execs if ",reorder," in line)


@pytest.mark.parametrize("mode", MODES)
def test_weights_are_not_reordered_per_call_when_threads_or_batch_change(mode, capfd):
    """The bench_quantize anomaly: lowered under 2 threads, timed under 1 -> a reorder per conv per call."""
    model, _ = zoo.get("mobilenet_v2", batch=1, image_size=32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        res = fxopt.optimize(model, (torch.randn(2, 3, 32, 32),), "fuse,lower-cpu{min_macs=0}", mode=mode,
                             verify=False)
        for run_threads, batch in ((1, 1), (1, 3), (2, 1)):
            torch.set_num_threads(run_threads)
            assert _reorders_in_one_call(res.module, torch.randn(batch, 3, 32, 32), capfd) == 0
    finally:
        torch.set_num_threads(threads)
    packs = _packs(res.module)
    assert packs and all({key[0] for key in p.packs} >= {1, 2} for p in packs)  # a pack per thread count
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-3, atol=1e-4)


def test_packs_follow_in_place_weight_updates_and_are_bounded():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU()).eval()
    res = fxopt.optimize(model, (torch.randn(1, 3, 6, 6),), "lower-cpu{min_macs=0}", mode="symbolic")
    gm, x = res.module, torch.randn(1, 3, 6, 6)
    gm(x)
    weight = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target.endswith("_packs")).args[0]
    with torch.no_grad():  # e.g. load_state_dict: an in-place update of the dense weight
        gm.get_parameter(weight.target).mul_(-1)
        conv.weight.mul_(-1)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)
    for batch in range(1, 2 * WeightPacks.max_packs):
        gm(torch.randn(batch, 3, 6, 6))
    assert len(_packs(gm)[0].packs) == WeightPacks.max_packs


@pytest.mark.parametrize("how", ["new parameter", "data assigned", "vector_to_parameters"])
def test_packs_follow_weights_assigned_anew(how):
    """Fuse tester: a Parameter assigned anew, ``p.data = w`` and `vector_to_parameters` leave
    the version counter where it was; the old pack kept computing the old weights (2.2 off)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU()).eval()
    other = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU()).eval()
    gm = fxopt.optimize(model, (torch.randn(2, 8, 12, 12),), "lower-cpu", mode="symbolic").module
    x = torch.randn(2, 8, 12, 12)
    gm(x)  # packs the first weights
    assert _packs(gm), gm.code
    params, new = dict(gm.named_parameters()), dict(other.named_parameters())
    assert len(params) == len(new) == 2
    for (name, p), w in zip(params.items(), new.values()):
        if how == "new parameter":
            module, _, attr = name.rpartition(".")
            setattr(gm.get_submodule(module), attr, nn.Parameter(w.detach().clone()))
        elif how == "data assigned":
            p.data = w.detach().clone()
    if how == "vector_to_parameters":
        nn.utils.vector_to_parameters(nn.utils.parameters_to_vector(new.values()), params.values())
    torch.testing.assert_close(gm(x), other(x), rtol=1e-4, atol=1e-5)
    assert len(_packs(gm)[0].packs) == 1  # the stale pack is dropped


def test_lowered_module_copies_and_saves_without_onednn_tensors():
    model = Block().eval()
    x = torch.randn(2, 3, 6, 6)
    gm = fxopt.optimize(model, (x,), "fuse,lower-cpu{linear=true,min_macs=0}", mode="symbolic").module
    gm(x)  # fills the packs
    state = gm.state_dict()
    assert not any(t.is_mkldnn for t in state.values())
    torch.save(state, io.BytesIO())
    clone = copy.deepcopy(gm)
    assert all(not p.packs for p in _packs(clone))
    torch.testing.assert_close(clone(x), model(x), rtol=2e-3, atol=1e-4)


class _OpLog(TorchDispatchMode):
    """Names of the aten/mkldnn kernels a call dispatches (what actually ran)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _ran(fn, x):
    with torch.no_grad(), _OpLog() as log:
        out = fn(x)
    return out, log.ops


def _switches(gm):
    """[(fused label, "mkldnn from batch N")] of every ConvByBatch call."""
    return [(annotations(n).get("fused"), annotations(n)["lowered"]) for n in gm.graph.nodes
            if str(annotations(n).get("lowered", "")).startswith("mkldnn from batch")]


def test_small_dense_convs_switch_to_onednn_by_batch():
    small = nn.Conv2d(8, 8, 3, padding=1)              # 8*8*9*16*16 = 147 k MACs per sample
    pointwise = nn.Conv2d(8, 64, 1)                    # 8*64*16*16 = 131 k MACs per sample
    depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    big = nn.Conv2d(8, 64, 3, padding=1)               # 64*8*9*32*32 = 4.7 M MACs per sample
    min_1x1 = -(-2 * MIN_MACS // (8 * 64 * 16 * 16))  # a 1x1 switches at 2 x min_macs per call
    for conv, size, always, switch in ((small, 16, [], [("conv+relu", "mkldnn from batch 2")]),
                                       (pointwise, 16, [], [("conv+relu", f"mkldnn from batch {min_1x1}")]),
                                       (depthwise, 16, ["conv+relu"], []), (big, 32, ["conv+relu"], [])):
        model = nn.Sequential(conv, nn.ReLU()).eval()
        fused = fxopt.optimize(model, (torch.randn(2, 8, size, size),), "fuse", mode="symbolic").module
        res = fxopt.optimize(model, (torch.randn(2, 8, size, size),), "lower-cpu", mode="symbolic")
        assert (_lowered(res.module), _switches(res.module)) == (always, switch), conv
        assert res.verification.passed
        if not switch:
            continue
        x1 = torch.randn(1, 8, size, size)
        out, ops = _ran(res.module, x1)
        assert not any("mkldnn" in op for op in ops), "batch 1 stays on aten's kernels"
        assert ops.count("aten.convolution") == 1, ops
        torch.testing.assert_close(out, fused(x1), rtol=1e-5, atol=1e-6)  # (on channels-last values)
        first = int(switch[0][1].rsplit(" ", 1)[1])
        xs = torch.randn(first, 8, size, size)
        out, ops = _ran(res.module, xs)
        assert "mkldnn._convolution_pointwise" in ops
        torch.testing.assert_close(out, model(xs), rtol=1e-4, atol=1e-4)


def test_cost_rule_says_why_in_the_pattern_report():
    from fxopt.passes.fuse.lower_cpu import _Lowering, lowering_patterns
    from fxopt.patterns import apply_patterns

    gm = fxopt.capture(nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU()).eval(), (torch.randn(1, 8, 8, 8),),
                       mode="symbolic")
    conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    relu = next(iter(conv.users))
    report = apply_patterns(gm, lowering_patterns(_Lowering(by_batch=False)), debug=relu.name)
    assert report.total == 0
    assert f"< min_macs={MIN_MACS}" in str(report.why_not)


def test_digits_runs_the_fuse_kernels_at_batch_1_and_onednn_from_batch_2():
    """Every digits conv is below `min_macs` per sample: batch 1 must not get slower than `fuse`
    (aten's kernels run, on channels-last values), a batch of 16 gets oneDNN (1.5x faster
    measured, docs/benchmarks.md)."""
    model, example = zoo.get("digits", batch=16)
    fused = fxopt.optimize(model, example, "fuse", mode="export", verify=False).module
    lowered = fxopt.optimize(model, example, "fuse,lower-cpu", mode="export", verify=False).module
    assert _lowered(lowered) == [] and {when for _, when in _switches(lowered)} == {"mkldnn from batch 2"}
    x1 = example[0][:1]
    (ref, fused_ops), (out, lowered_ops) = _ran(fused, x1), _ran(lowered, x1)
    assert not any("mkldnn" in op for op in lowered_ops)
    assert lowered_ops.count("aten.convolution") == fused_ops.count("aten.convolution") == len(_switches(lowered))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out, ops = _ran(lowered, example[0])
    assert ops.count("mkldnn._convolution_pointwise") == len(_switches(lowered))
    torch.testing.assert_close(out, fused(example[0]), rtol=1e-4, atol=1e-4)


def test_by_batch_false_leaves_small_convs_on_the_fuse_path():
    model, example = zoo.get("digits", batch=16)
    fused = fxopt.optimize(model, example, "fuse", mode="export", verify=False).module
    lowered = fxopt.optimize(model, example, "fuse,lower-cpu{by_batch=false}", mode="export", verify=False).module
    # the same graph, but for the pool's channels-last copy (`_faster_channels_last`) and the
    # contiguous output
    assert [n.target for n in lowered.graph.nodes if n.target != "contiguous"] \
        == [n.target for n in fused.graph.nodes]


def test_bad_min_macs_is_refused_naming_the_option():
    with pytest.raises(fxopt.PipelineError, match="min_macs"):
        fxopt.parse_pipeline("lower-cpu{min_macs=-1}")


def test_lowered_graph_survives_torch_save_and_load():
    """torch.load re-traces a GraphModule's code: the packs and the batch switch are module calls,
    so they stay leaves (a plain function that branches on the batch would break the re-trace).
    digits annotates `forward(self, x: "Tensor")`-style (postponed annotations), which torch.save
    also used to trip on."""
    model, example = zoo.get("digits", batch=4)
    for pipeline in ("fuse,lower-cpu", "fuse,lower-cpu{min_macs=0}"):
        gm = fxopt.optimize(model, example, pipeline, mode="symbolic", verify=False).module
        buf = io.BytesIO()
        torch.save(gm, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        for x in (example[0][:1], example[0]):
            torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)


class NormalizeInPlace(nn.Module):
    """Input normalization written in place before the stem, as torchvision-style wrappers do."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1))
        self.stem = nn.Conv2d(3, 32, 3, padding=1)

    def forward(self, x):
        x = x.clone()
        x.sub_(self.mean).div_(self.std)
        return F.relu(self.stem(x))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_the_channels_last_copy_is_taken_after_in_place_writes(mode):
    """The copy of a conv input written in place after it was made (``x.sub_(mean)``) must be
    taken where the conv reads it, or the conv sees the values from before the write."""
    torch.manual_seed(0)
    model, x = NormalizeInPlace().eval(), torch.rand(2, 3, 32, 32)
    res = fxopt.optimize(model, (x,), "fuse,lower-cpu{min_macs=0}", mode=mode)
    assert _lowered(res.module)
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-4, atol=1e-5)


class SelectThenView(nn.Module):
    """A 3-D select of a conv's output, then ``view``: channels-last strides survive the select."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.c(x))[..., 0]
        return y.view(y.shape[0], -1)


@pytest.mark.parametrize("min_macs", [None, 0])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_view_of_a_lower_rank_value_of_a_lowered_conv_runs_at_every_batch(mode, min_macs):
    """The default rule lowers this conv from batch 2 (a batch switch): the module verified at
    batch 1 and failed at batch 4 ("view size is not compatible")."""
    torch.manual_seed(0)
    model = SelectThenView().eval()
    option = "" if min_macs is None else f"{{min_macs={min_macs}}}"
    res = fxopt.optimize(model, torch.randn(1, 8, 10, 10), f"fuse,lower-cpu{option}", mode=mode)
    for batch in (1, 4):
        x = torch.randn(batch, 8, 10, 10)
        torch.testing.assert_close(res.module(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pipeline", ["fuse,lower-cpu{min_macs=0}", "quantize{backend=x86}"])
def test_a_module_with_forward_hooks_is_called_not_rewritten(pipeline):
    """A hook that changes a layer's output runs only through the module call: passes leave
    such a module alone (fuse, lower-cpu and quantize all see it as an unknown op)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    model[2].register_forward_hook(lambda module, args, out: out * 2 + 1)
    x = torch.randn(2, 3, 16, 16)
    res = fxopt.optimize(model, (x,), pipeline, calibration=[(torch.randn(2, 3, 16, 16),) for _ in range(4)],
                         mode="symbolic")
    assert any(n.op == "call_module" and n.target == "2" for n in res.module.graph.nodes)
    torch.testing.assert_close(res.module(x), model(x), rtol=0.05, atol=0.05 * model(x).abs().max().item())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("act,label", [(nn.LeakyReLU(0.2), "conv+leaky_relu"), (nn.Sigmoid(), "conv+sigmoid"),
                                       (nn.Tanh(), "conv+tanh"), (nn.Hardsigmoid(), "conv+hardsigmoid")])
def test_more_activations_ride_in_the_conv_kernel(mode, act, label):
    """oneDNN fuses these too; they ran as a separate op after the lowered conv. A small conv
    switches by batch: its fuse-path branch applies the same activation eagerly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), _bn(16), act).eval()
    res = fxopt.optimize(model, (torch.randn(2, 8, 12, 12),), "fuse,lower-cpu", mode=mode)
    assert res.verification.passed, res.summary()
    assert _switches(res.module) == [(label, "mkldnn from batch 2")]
    for batch in (1, 3):  # the eager branch, then oneDNN
        x = torch.randn(batch, 8, 12, 12)
        torch.testing.assert_close(res.module(x), model(x), rtol=1e-4, atol=1e-5)
    lowered = fxopt.optimize(model, (torch.randn(2, 8, 12, 12),), "fuse,lower-cpu{min_macs=0,by_batch=false}",
                             mode=mode).module
    assert _lowered(lowered) == [label]


class WriteIntoAClone(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.c(x)
        x2 = x.clone()
        x2.add_(y)  # the add's result is x2: its reader reads x2
        return F.relu(x2)


class WriteThroughAViewBetweenConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        h = torch.tanh(x)
        a = self.c1(h)
        h[:, :2].mul_(2.0)  # c2 must see it; a channels-last copy taken before it would not
        return a, self.c2(h)


class WriteBetweenConvAndAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        h = torch.tanh(x)
        a = self.c1(h)
        h.mul_(2.0)  # c1 read h before: a conv+add placed at the add would read it written
        return a + self.c2(h)


@pytest.mark.parametrize("model", [WriteIntoAClone, WriteThroughAViewBetweenConvs, WriteBetweenConvAndAdd],
                         ids=["clone-add_", "view-write", "write-before-add"])
@pytest.mark.parametrize("min_macs", [None, 0])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_in_place_writes_reach_the_lowered_convs_as_in_eager(mode, min_macs, model):
    """Each was a wrong result (0.5-2.0 off): a conv+add whose result nobody read, a stale
    channels-last copy, a fused conv moved after a write to its input."""
    torch.manual_seed(0)
    m, x = model().eval(), torch.randn(2, 8, 6, 6)
    option = "" if min_macs is None else f"{{min_macs={min_macs}}}"
    res = fxopt.optimize(m, x, f"fuse,lower-cpu{option}", mode=mode)
    assert res.verification.passed, res.verification.summary()
    torch.testing.assert_close(res.module(x), m(x), rtol=1e-4, atol=1e-5)


class _ReadsMemoryOrder(nn.Module):
    """Readers of a lowered conv's memory order: as_strided with row-major strides, and
    ``rand_like`` (drawn in memory order) — on the channels-last output they read other elements."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.c2(F.relu(self.c1(x))))
        first = torch.as_strided(y, (y.shape[0], 40), (y.stride(0), 1))
        return first, y * torch.rand_like(y)


def test_readers_of_memory_order_get_a_row_major_input():
    torch.manual_seed(0)
    model, x = _ReadsMemoryOrder().eval(), torch.randn(2, 16, 12, 12)
    res = fxopt.optimize(model, (x,), pipeline="fuse,lower-cpu", mode="symbolic")
    assert res.passes[-1].modified and res.module.code.count(".contiguous()") >= 3, res.module.code
    with torch.no_grad():
        want = model(x)
        torch.manual_seed(3)
        got = res.module(x)
        torch.manual_seed(3)
        want_again = model(x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], want_again[1], rtol=1e-4, atol=1e-5)


def test_a_training_mode_dropout_draws_in_the_original_order():
    torch.manual_seed(0)
    graph = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Dropout(0.5)).train())
    x = torch.randn(4, 4, 8, 8)
    res = fxopt.optimize(graph, (x,), "fuse,lower-cpu")
    torch.manual_seed(1)
    got = res.module(x)
    torch.manual_seed(1)
    torch.testing.assert_close(got, graph(x), rtol=1e-4, atol=1e-5)


class _AsksForALayout(nn.Module):
    """A user's own layout request after a lowered conv (eager has it too), then readers of
    memory order: ``stride()``/``as_strided`` on it, and ``resize_`` of a clone."""

    def __init__(self, resize: bool):
        super().__init__()
        self.c, self.resize = nn.Conv2d(8, 8, 3, padding=1), resize

    def forward(self, x):
        y = self.c(x).clone(memory_format=torch.channels_last)
        z = self.c(x).clone()
        if self.resize:  # (export refuses resize_)
            z.resize_(40)
        return torch.as_strided(y, (y.shape[0], 16), (y.stride(0), y.stride(1))), z


@pytest.mark.parametrize("mode, resize", [("symbolic", True), ("export", False)])
def test_a_layout_the_user_asked_for_is_kept(mode, resize):
    torch.manual_seed(0)
    model, x = _AsksForALayout(resize).eval(), torch.randn(2, 8, 10, 10)
    res = fxopt.optimize(model, (x,), pipeline="fuse,lower-cpu", mode=mode)
    with torch.no_grad():
        for got, want in zip(res.module(x), model(x)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_conv_added_to_itself_runs_once():
    """relu(z + z) with z = conv(x): fusing the add into the conv kernel would compute the conv
    a second time to get the residual (1.6x slower than eager)."""
    class Doubled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x):
            z = self.conv(x)
            return F.relu(z + z)

    model, x = Doubled().eval(), torch.randn(1, 16, 32, 32)
    res = fxopt.optimize(model, (x,), "fuse,lower-cpu{min_macs=0}", mode="symbolic")
    convs = [n for n in res.module.graph.nodes if "convolution" in str(n.target)]
    assert len(convs) == 1 and _lowered(res.module) == ["conv"]
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-4, atol=1e-4)


class _AliasedOutputs(nn.Module):
    """Outputs that share memory in eager: a value, its views, its in-place write, the input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        z = F.relu(y, inplace=True)
        return x, z, y, z.transpose(1, 3), z[:, :2], x[:, :2]


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_lowered_outputs_keep_eagers_aliasing_and_strides(mode):
    """Every output got its own `.contiguous()`: a view of another output became a copy (a
    caller's write into one no longer showed in the other), a value returned twice was copied
    twice per call, and an input returned as it was came back row-major."""
    torch.manual_seed(0)
    model = _AliasedOutputs().eval()
    x = torch.randn(2, 16, 8, 8)
    gm = fxopt.optimize(model, (x,), "fuse,lower-cpu{min_macs=0}", mode=mode).module
    assert any("_convolution_pointwise" in str(n.target) for n in gm.graph.nodes)
    with torch.no_grad():
        expected, out = model(x), gm(x)
    for e, o in zip(expected, out):
        torch.testing.assert_close(o, e)
        assert o.stride() == e.stride()
    assert out[0] is x and out[5].data_ptr() == x.data_ptr()  # the input's layout is the caller's
    assert out[1] is out[2]  # one copy for the value returned twice
    out[1].zero_()
    assert out[3].abs().sum() == 0 and out[4].abs().sum() == 0  # the views see the caller's write
    row_major = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "contiguous" and not n.kwargs]
    assert len(row_major) == 1  # (the other one lays the conv's input out channels-last)


class _ConvThen(nn.Module):
    """A lowered conv (relu'd) and `body` on its output: what the outputs make of it."""

    def __init__(self, body):
        super().__init__()
        self.conv, self.body = nn.Conv2d(8, 8, 3, padding=1), body

    def forward(self, x):
        return self.body(F.relu(self.conv(x)))


def _reshapes(h):
    return h, h.view(h.shape[0], -1), h.flatten(1), h.reshape(2, -1), h.transpose(1, 2).reshape(2, -1)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_reshapes_of_a_row_major_output_still_view_it(mode):
    """Fuse tester: `h.view(n, -1)`, `h.flatten(1)` and `h.reshape(2, -1)` view h in eager (h is
    row-major there), but each lowered output was a copy of its own (lower-cpu's `contiguous`
    before the view, then one per output): a caller's write into h no longer showed in them. A
    reshape of the transposed h copies in eager, and still does."""
    torch.manual_seed(0)
    model = _ConvThen(_reshapes).eval()
    x = torch.randn(2, 8, 6, 6)
    gm = fxopt.optimize(model, (x,), "fuse,lower-cpu{min_macs=0}", mode=mode).module
    assert any("_convolution_pointwise" in str(n.target) for n in gm.graph.nodes)
    with torch.no_grad():
        expected, out = model(x), gm(x)
    for e, o in zip(expected, out):
        torch.testing.assert_close(o, e)
        assert (o.data_ptr() == out[0].data_ptr()) == (e.data_ptr() == expected[0].data_ptr())
    out[0].zero_()
    assert all(o.abs().sum() == 0 for o in out[1:4]) and out[4].abs().sum() > 0


def _reshape_then(write):
    def body(h):
        y = h.reshape(h.shape[0], -1)  # a view of h in eager: it sees the write after it
        write(h, y)
        return h, y

    return body


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("write", [lambda h, y: h[:, :2].mul_(2), lambda h, y: h.add_(1), lambda h, y: y.mul_(3)])
def test_a_write_after_a_reshape_reaches_both_outputs(mode, write):
    """Adversary: the layout guard's row-major copy of a lowered conv took the write, and both
    outputs were then read from the conv's own result, without it (1.3-3.6 off)."""
    torch.manual_seed(0)
    model = _ConvThen(_reshape_then(write)).eval()
    x = torch.randn(2, 8, 6, 6)
    gm = fxopt.optimize(model, (x,), "fuse,lower-cpu{min_macs=0}", mode=mode, verify=False).module
    with torch.no_grad():
        expected, out = model(x), gm(x)
    for e, o in zip(expected, out):
        torch.testing.assert_close(o, e)
    assert out[1].data_ptr() == out[0].data_ptr()


def _take_then_add(take):
    def body(h):
        y = take(h)  # a view of h in eager: it sees the write after it
        h.add_(1)
        return y

    return body


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("take", [lambda h: h[:, :4].flatten(1), lambda h: h[:, 1].flatten(1),
                                  lambda h: h.narrow(1, 0, 4).flatten(1), lambda h: h.unsqueeze(0).flatten(0, 1)])
def test_a_flatten_of_a_slice_sees_a_later_write(mode, take):
    """Adversary: the layout guard copied the slice (not the written conv output under it)
    before the write, so the flattened output missed it (1.0 off)."""
    torch.manual_seed(0)
    model = _ConvThen(_take_then_add(take)).eval()
    x = torch.randn(2, 8, 6, 6)
    gm = fxopt.optimize(model, (x,), "fuse,lower-cpu{min_macs=0}", mode=mode, verify=False).module
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


class _GatherThenWrite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        g = h[:, [0, 1]]  # advanced indexing copies: it keeps h's values from before the write
        h[:, :2].add_(5)
        return g, h[:, 2:4]


def test_an_output_gathered_before_a_write_keeps_the_values_it_gathered():
    """An adversary: `h[:, [0, 1]]` was taken for a view of h and read from h's end-of-graph
    copy, after the write (5.0 off)."""
    torch.manual_seed(0)
    model = _GatherThenWrite().eval()
    x = torch.randn(2, 8, 8, 8)
    gm = fxopt.optimize(model, (x,), "fuse,lower-cpu{min_macs=0}", mode="symbolic").module
    with torch.no_grad():
        for e, o in zip(model(x), gm(x)):
            torch.testing.assert_close(o, e)


class _FlattenThenWrite(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.conv, self.how = nn.Conv2d(8, 8, 3, padding=1), how

    def forward(self, x):
        h = self.conv(x)
        f = h.flatten(1) if self.how == "flatten" else h.contiguous()  # a view of h in eager
        h.add_(1)
        return f


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("how", ["flatten", "contiguous"])
def test_a_flatten_taken_before_a_write_still_sees_it(how, mode):
    """An adversary: lowered, h is channels-last, so `h.flatten(1)` copied it before the write
    eager's view showed (1.0 off)."""
    torch.manual_seed(0)
    model = _FlattenThenWrite(how).eval()
    x = torch.randn(2, 8, 8, 8)
    gm = fxopt.optimize(model, (x,), "fuse,lower-cpu{min_macs=0}", mode=mode).module
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


class _TupleAndRestride(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        top = torch.max(h, 1, keepdim=True)[0]  # a piece of a tuple: no tensor to copy
        v = h[:, :2]
        h.transpose_(2, 3)  # v keeps its strides; h's change
        return top, v, h


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_outputs_from_tuples_and_values_restrided_in_place_stay_right(mode):
    """Adversaries: `torch.max(h, 1)[0]` became `tuple.contiguous()[0]` (AttributeError on every
    call), and a view taken before `h.transpose_(2, 3)` was replayed on the transposed h."""
    torch.manual_seed(0)
    model = _TupleAndRestride().eval()
    x = torch.randn(2, 8, 6, 7)
    gm = fxopt.optimize(model, (x,), "fuse,lower-cpu{min_macs=0}", mode=mode).module
    with torch.no_grad():
        for e, o in zip(model(x), gm(x)):
            torch.testing.assert_close(o, e)


class _ResidualFromInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x, r):
        return torch.relu(self.conv(x) + r)


@pytest.mark.parametrize("min_macs", [0, MIN_MACS])  # oneDNN at every batch; by batch
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_residual_read_from_an_input_is_added_as_eager_adds_it_at_other_dtypes_and_shapes(mode, min_macs):
    # oneDNN's fused add takes the conv's dtype and shape: a float64 residual crashed it, and a
    # residual larger than the conv output (eager broadcasts to it) gave the conv's shape, wrong
    model, x, r = _ResidualFromInput().eval(), torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    res = fxopt.optimize(model, (x, r), f"fuse,lower-cpu{{min_macs={min_macs}}}", mode=mode)
    assert res.passes[-1].stats["lowered"] == {"conv+add+relu": 1}
    calls = [(x, r.double()), (x, r.half())]
    if mode == "symbolic":  # (export graphs refuse other ranks and batch pairings by name)
        calls += [(x, r[0]), (x[:1], r)]
    with torch.no_grad():
        for args in calls:
            want = model(*args)
            got = res.module(*args)
            assert got.dtype == want.dtype and got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _ResidualFromAnotherInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x, z):
        return torch.relu(self.c1(x) + self.c2(z))


def test_a_residual_computed_from_another_input_is_added_as_eager_adds_it():
    """Adversary: the check stopped at the first conv, so ``c1(x) + c2(z)`` called with x of batch
    1 and z of 4 (eager broadcasts to 4) gave a batch-1 result from the fused oneDNN add."""
    torch.manual_seed(0)
    model, x, z = _ResidualFromAnotherInput().eval(), torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    res = fxopt.optimize(model, (x, z), "fuse,lower-cpu{min_macs=0}", mode="symbolic")
    assert res.passes[-1].stats["lowered"].get("conv+add+relu") == 1
    with torch.no_grad():
        for args in ((x[:1], torch.randn(4, 8, 6, 6)), (torch.randn(2, 8, 1, 1), z), (x, z)):
            want, got = model(*args), res.module(*args)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _shuffle_view(x, groups):  # torchvision's spelling
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class _Shuffles(nn.Module):
    """Two spelled-out channel shuffles between lowered convs, and two look-alikes that are not
    (the second reshape keeps the groups apart; the swap is of two spatial axes)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 1)

    def forward(self, x):
        y = _shuffle_view(torch.relu(self.a(x)), 2)
        n, c, h, w = y.shape
        z = self.b(y.reshape(n, 4, c // 4, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w))
        grouped = z.reshape(n, 2, c // 2, h, w).transpose(3, 4).reshape(n, c, w, h)  # no shuffle
        return self.c(grouped.transpose(2, 3))


@pytest.mark.parametrize("mode", MODES)
def test_a_spelled_out_channel_shuffle_is_one_layout_keeping_call(mode):
    """Fuse tester: ShuffleNetV2 on lower-cpu copied each shuffle's channels-last value to row-major
    and back around the reshapes (31 layout copies per call, torch.compile 1.2-1.5x ahead at
    batch 16); torch.channel_shuffle keeps the layout and copies once (0.34 vs 12 ms at
    16x116x28x28)."""
    torch.manual_seed(0)
    model = _Shuffles().eval()
    res = fxopt.optimize(model, (torch.randn(2, 8, 6, 6),), "fuse,lower-cpu{min_macs=0}", mode=mode)
    assert res.verification.passed, res.verification.summary()
    lowered = res.passes[1].stats["lowered"]
    assert lowered.get("channel-shuffle", 0) + lowered.get("channel-shuffle/contiguous", 0) == 2, lowered
    targets = [n.target for n in res.module.graph.nodes]
    assert targets.count(torch.channel_shuffle) == 2
    sizes = [(3, 8, 6, 6)] + ([(1, 8, 5, 7), (2, 8, 9, 4)] if mode == "symbolic" else [])
    for size in sizes:  # a symbolic graph at other sizes: the reshapes read them
        x = torch.randn(*size)
        torch.testing.assert_close(res.module(x), model(x), rtol=1e-4, atol=1e-5)


class _ShuffleEdges(nn.Module):
    """A shuffle merged back with ``.view(y.size())`` (taken), one with hard-coded spatial sizes
    (not: a symbolic graph runs at other sizes, where eager's view reads the pixels otherwise)
    and one of one channel per group (not: eager's reshapes return views a write then reaches)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        b, c, h, w = y.size()
        y = self.b(y.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(y.size()))
        fixed = y.view(b, 2, 8, 6, 6).transpose(1, 2).contiguous().view(b, 16, 6, 6)
        single = fixed.view(b, 16, 1, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)
        single.add_(1)  # a view of `fixed` in eager
        return self.c(fixed)


def test_channel_shuffle_edges_an_adversary_found():
    """Adversary: `.view(y.size())` crashed the pattern's check; a hard-coded 6x6 was taken as
    the value's size (at 4x9 eager's view gave (1, 16, 6, 6), the rewrite (1, 16, 4, 9)); one
    channel per group turned a view eager writes through into a copy (1.29 off)."""
    torch.manual_seed(0)
    model = _ShuffleEdges().eval()
    res = fxopt.optimize(model, (torch.randn(2, 8, 6, 6),), "fuse,lower-cpu{min_macs=0}", mode="symbolic")
    assert res.verification.passed, res.verification.summary()
    lowered = res.passes[1].stats["lowered"]
    assert lowered.get("channel-shuffle/contiguous") == 1 and "channel-shuffle" not in lowered, lowered
    x = torch.randn(1, 8, 4, 9)  # 36 pixels: the hard-coded view takes them as 6x6, as eager does
    torch.testing.assert_close(res.module(x), model(x), rtol=1e-4, atol=1e-5)


class _ExtremaOfFeatures(nn.Module):
    def __init__(self, dim, keepdim, largest):
        super().__init__()
        self.conv, self.dim, self.keepdim, self.largest = nn.Conv2d(3, 16, 3, padding=1), dim, keepdim, largest

    def forward(self, x):
        h = torch.relu(self.conv(x))
        reduce = torch.max if self.largest else torch.min
        return reduce(h, self.dim, keepdim=self.keepdim)[0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dim, keepdim, largest", [(3, False, True), (2, True, True), (-1, True, False), (1, False, True)])
def test_an_extremum_over_a_spatial_axis_of_a_lowered_value_reads_it_row_major(mode, dim, keepdim, largest):
    """Adversary: the amax `fuse` makes of ``torch.max(h, 3)[0]`` ran 1.2-2.9x slower than the
    max on the channels-last values lowered convs write (torch's reduction on those strides);
    over their row-major permutation it runs 10-30x faster. Over the channels it stays amax."""
    torch.manual_seed(0)
    model = _ExtremaOfFeatures(dim, keepdim, largest).eval()
    res = fxopt.optimize(model, (torch.randn(2, 3, 8, 8),), "fuse,lower-cpu{min_macs=0}", mode=mode)
    assert res.verification.passed, res.verification.summary()
    rewritten = res.passes[1].stats["lowered"].get("extremum-any-layout", 0)
    assert rewritten == (0 if dim == 1 else 1), res.passes[1].stats["lowered"]
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(res.module(x), model(x), rtol=0, atol=1e-5)


class PoolsAndResizes(nn.Module):
    """Pools and resizes of a row-major value (a graph input of 8 channels) and of a 3-channel
    one, in the modes `_faster_channels_last` takes and in those it leaves."""

    def __init__(self):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)

    def forward(self, x, rgb):
        return (self.pool(x), F.avg_pool2d(x, 3, 1, 1), F.interpolate(x, scale_factor=2), self.up(x),
                F.interpolate(x, size=(5, 5), mode="bicubic"), F.adaptive_avg_pool2d(x, 3), F.max_pool2d(rgb, 2),
                F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_pools_and_resizes_read_a_channels_last_copy(mode):
    """torch's row-major max/avg pool and nearest/bilinear kernels run 10-40x slower than its
    channels-last ones (docs/benchmarks.md, "Pools and upsamples on channels-last values"):
    those ops of 8 channels or more read a channels-last copy; bicubic, antialiased and adaptive
    ones and a 3-channel image stay, and every output is eager's, row-major."""
    torch.manual_seed(0)
    model = PoolsAndResizes().eval()
    inputs = (torch.randn(2, 8, 12, 12), torch.randn(2, 3, 12, 12))
    res = fxopt.optimize(model, inputs, "lower-cpu", mode=mode)
    assert res.passes[0].stats["lowered"] == {"spatial-channels-last": 4}, res.passes[0].stats
    copies = [n for n in res.module.graph.nodes if n.target == "contiguous" and n.kwargs.get("memory_format")]
    assert len(copies) == 1, "one copy of x serves the four ops"
    other = (torch.randn(3, 8, 12, 12), torch.randn(3, 3, 12, 12))
    for got, want in zip(res.module(*other), model(*other)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert got.is_contiguous()


def _switch_output_layouts(gm, x) -> dict[str, str]:
    """Target -> "channels_last" / "row_major" of each `ConvByBatch` call's result on `x`."""
    layouts = {}

    class Layouts(torch.fx.Interpreter):
        def call_module(self, target, args, kwargs):
            out = super().call_module(target, args, kwargs)
            if isinstance(self.module.get_submodule(target), ConvByBatch):
                layouts[target] = "row_major" if out.is_contiguous() else \
                    "channels_last" if out.is_contiguous(memory_format=torch.channels_last) else "other"
            return out

    Layouts(gm).run(x)
    return layouts


def test_a_small_convs_batch_switch_runs_aten_in_the_layout_fastest_for_it():
    """Below its batch the switch runs aten's conv channels-last for a k x k conv reading and
    writing 32 channels or more (0.54-0.77x the row-major time), so the max pool after it runs
    its channels-last kernel too; row-major for fewer channels (up to 4x slower channels-last);
    a 1x1 in the layout it gets. With grad enabled on trainable weights nothing is converted."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(32, 16, 1), nn.Conv2d(16, 16, 3, padding=1)).eval()
    res = fxopt.optimize(model, (torch.randn(2, 32, 8, 8),), "fuse,lower-cpu", mode="symbolic")
    x1 = torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        outputs = _switch_output_layouts(res.module, x1)
        # (the 1x1 reads the pool's channels-last result and keeps it)
        expected = {"channels_last": "channels_last", "any": "channels_last", "row_major": "row_major"}
        got = {res.module.get_submodule(t).input_layout: layout for t, layout in outputs.items()}
        assert got == expected, got
        torch.testing.assert_close(res.module(x1), model(x1), rtol=1e-5, atol=1e-6)
    outputs = _switch_output_layouts(res.module, x1)  # grad mode: no copies made per call
    got = {res.module.get_submodule(t).input_layout: layout for t, layout in outputs.items()}
    assert got["channels_last"] == "row_major", got
    torch.testing.assert_close(res.module(x1), model(x1), rtol=1e-5, atol=1e-6)


def test_a_batch_switchs_channels_last_weight_follows_the_weights_values():
    """The aten branch keeps a channels-last copy of its weight (aten copies a row-major one in
    every call on channels-last input); new values, in place or a new tensor, are read."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()).eval()
    gm = fxopt.optimize(model, (torch.randn(2, 8, 8, 8),), "lower-cpu", mode="symbolic").module
    assert len(_switches(gm)) == 1
    x1 = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(x1), model(x1), rtol=1e-4, atol=1e-5)
        weight = next(p for p in gm.parameters() if p.dim() == 4)
        weight.mul_(-1)  # in place: the version counter moves
        model[0].weight.mul_(-1)
        torch.testing.assert_close(gm(x1), model(x1), rtol=1e-4, atol=1e-5)
    state = {k: torch.randn_like(v) for k, v in gm.state_dict().items()}
    gm.load_state_dict(state)
    model[0].load_state_dict({"weight": state[next(k for k in state if state[k].dim() == 4)],
                              "bias": state[next(k for k in state if state[k].dim() == 1)]})
    with torch.no_grad():
        torch.testing.assert_close(gm(x1), model(x1), rtol=1e-4, atol=1e-5)


def test_a_pool_after_a_row_major_batch_switch_reads_a_channels_last_copy():
    """A switch whose conv reads 3 channels keeps them row-major at batch 1, so the pool after
    it reads a channels-last copy (SqueezeNet's first pool; a no-op copy at batch 2 and up)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2)).eval()
    res = fxopt.optimize(model, (torch.randn(2, 3, 16, 16),), "fuse,lower-cpu", mode="symbolic")
    assert [m.input_layout for m in res.module.modules() if isinstance(m, ConvByBatch)] == ["row_major"]
    assert res.passes[1].stats["lowered"].get("spatial-channels-last") == 1, res.passes[1].stats
    for batch in (1, 4):
        x = torch.randn(batch, 3, 16, 16)
        torch.testing.assert_close(res.module(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_an_instance_norm_picks_torchs_faster_kernel_for_its_layout(mode, monkeypatch):
    """fuse's group norm of one channel per group reads lowered convs' channels-last values:
    there torch's group_norm runs 2-2.3x its instance_norm's time below 32x32 pixels (1.25-1.6x
    the model's time before the rewrite; adversary), 5-15x faster above; on row-major values it
    is faster at every size. The lowered graph asks per call."""
    from fxopt.passes.fuse import lower_cpu

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.InstanceNorm2d(64, affine=True), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.InstanceNorm2d(64)).eval()
    res = fxopt.optimize(model, (torch.randn(2, 3, 16, 16),), "fuse,lower-cpu", mode=mode)
    assert res.passes[1].stats["lowered"].get("instance-norm-any-layout") == 2, res.passes[1].stats
    x, wide, y = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 32, 32), torch.randn(2, 64, 8, 8)
    expected = {"x": model(x), "wide": model(wide), "y": F.instance_norm(y)}
    calls = []
    for name in ("group_norm", "instance_norm"):  # (eager's norms call them too: its results are in)
        monkeypatch.setattr(lower_cpu.F, name, lambda *a, _f=getattr(F, name), _n=name, **k: calls.append(_n) or _f(*a, **k))
    torch.testing.assert_close(res.module(x), expected["x"], rtol=1e-4, atol=1e-5)
    assert calls == ["instance_norm", "instance_norm"], calls  # channels-last, 256 pixels
    calls.clear()
    if mode == "symbolic":  # (export fixed the image size)
        torch.testing.assert_close(res.module(wide), expected["wide"], rtol=1e-4, atol=1e-5)
        assert calls == ["group_norm", "group_norm"], calls
    assert torch.allclose(lower_cpu.instance_norm_any_layout(y, None, None, 1e-5), expected["y"], atol=1e-5)
    assert calls[-1] == "group_norm", calls  # row-major
    few = torch.randn(2, 4, 32, 32).contiguous(memory_format=torch.channels_last)
    lower_cpu.instance_norm_any_layout(few, None, None, 1e-5)
    assert calls[-1] == "instance_norm", calls  # channels-last, 4 channels (group_norm 1.2-5x slower)


def test_a_channel_layer_norm_runs_layer_norm_on_the_channels_last_view(monkeypatch):
    """fuse's `channel_layer_norm` of a lowered conv's channels-last value: torch's layer_norm
    over the (N, H, W, C) view; of a row-major value, the spelled-out ops."""
    from fxopt.passes.fuse import rules

    calls = []
    real = F.layer_norm
    monkeypatch.setattr(rules.F, "layer_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 16, 8, 8)
    w, b = torch.rand(16) + 0.5, torch.randn(16)
    u = x.mean(1, keepdim=True)
    expected = (x - u) / torch.sqrt((x - u).pow(2).mean(1, keepdim=True) + 1e-6) * w[:, None, None] + b[:, None, None]
    torch.testing.assert_close(rules.channel_layer_norm(x, w, b, 1e-6), expected, rtol=1e-5, atol=1e-5)
    assert not calls  # row-major
    cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(rules.channel_layer_norm(cl, w, b, 1e-6), expected, rtol=1e-5, atol=1e-5)
    assert calls == [1]
