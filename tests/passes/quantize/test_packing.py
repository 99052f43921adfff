"""Per-layer packing engines: grouped convs fbgemm computes wrong are packed with oneDNN, and every
pack is checked against its layer in float before it is used."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxopt
from fxopt.passes.quantize import load, save
from fxopt.passes.quantize.packing import computes_right, conv_engine

needs_onednn = pytest.mark.skipif("onednn" not in torch.backends.quantized.supported_engines,
                                  reason="this torch build has no oneDNN quantized engine")


def _packs(module: nn.Module) -> list[torch.ScriptObject]:
    return [v for m in module.modules() for v in vars(m).values() if isinstance(v, torch.ScriptObject)]


def _weight(cout: int, cin_per_group: int, kernel=(3, 3)) -> torch.Tensor:
    return torch.quantize_per_tensor(torch.randn(cout, cin_per_group, *kernel), 0.02, 0, torch.qint8)


@needs_onednn
@pytest.mark.parametrize("cout, per_group, groups, kernel, engine", [
    (12, 4, 3, (3, 3), "onednn"),   # 4 channels per group, 3 groups: a partial block of 2
    (12, 2, 6, (3, 3), "onednn"),   # 2 per group: blocks of 8 on the widest SIMD
    (16, 2, 8, (3, 3), "x86"),      # whole blocks
    (12, 4, 3, (1, 1), "x86"),      # not the 3x3 fast path
    (24, 4, 3, (3, 3), "x86"),      # 8 out per group != 4 in: not the fast path
    (12, 12, 1, (3, 3), "x86"),     # dense
    (12, 4, 3, (3,), "x86"),        # conv1d runs as a 1 x 3 conv2d
    (12, 12, 1, (3, 3, 3), "onednn"),   # conv3d: fbgemm's runs at fp32 speed
    (256, 1, 256, (3, 3), "onednn"),    # depthwise: fbgemm's saturates at 8 bits
])
def test_conv_engine_picks_onednn_for_partial_group_blocks(cout, per_group, groups, kernel, engine):
    assert conv_engine(_weight(cout, per_group, kernel), groups) == engine


@needs_onednn
@pytest.mark.parametrize("groups", [3, 6])
def test_grouped_conv_fbgemm_gets_wrong_verifies_on_x86(groups):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, groups=groups), nn.ReLU(), nn.Conv2d(12, 8, 1)).eval()
    batches = [(torch.randn(4, 12, 16, 16),) for _ in range(4)]
    res = fxopt.optimize(model, batches[0], "quantize{backend=x86}", calibration=batches)
    assert res.verification.passed and res.verification.sqnr_db > 25, res.verification.summary()
    assert torch.backends.quantized.engine == "x86"   # packing under oneDNN did not leak
    y1, y2 = res.module(batches[1][0]), res.module(batches[1][0])
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)  # fbgemm's result changed from call to call


@needs_onednn
def test_a_loaded_model_packs_those_convs_with_onednn_again(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, groups=3), nn.ReLU()).eval()
    batches = [(torch.randn(4, 12, 16, 16),) for _ in range(4)]
    res = fxopt.optimize(model, batches[0], "quantize{backend=x86}", calibration=batches)
    save(res.module, tmp_path / "m.pt")
    loaded = load(tmp_path / "m.pt")
    x = batches[1][0]
    torch.testing.assert_close(loaded(x), res.module(x), rtol=0, atol=0)
    assert fxopt.verify(model, loaded, (x,), tolerance="int8").passed


@needs_onednn
def test_an_int8_model_optimized_again_under_another_global_engine_keeps_its_packs():
    """Copying a packed weight re-packs it under the global engine of the moment: an x86 model
    (its float-output linear runs x86 packs only) optimized again while the engine is onednn
    failed on its first call. The copy shares the packs lowering made."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, groups=3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(12 * 6 * 6, 10)).eval()
    batches = [(torch.randn(4, 12, 6, 6),) for _ in range(4)]
    int8 = fxopt.optimize(model, batches[0], "quantize{backend=x86}", calibration=batches).module
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "onednn"
    try:
        again = fxopt.optimize(int8, batches[0], "fuse")
        x = batches[1][0]
        torch.testing.assert_close(again.module(x), int8(x), rtol=0, atol=0)
        assert again.verification.passed
    finally:
        torch.backends.quantized.engine = previous


def test_capturing_an_int8_model_never_runs_its_own_packs():
    """The capture of a GraphModule holds packs of its own: shape propagation at the example's
    batch would otherwise leave the user's oneDNN packs tuned to that batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    batches = [(torch.randn(2, 3, 8, 8),) for _ in range(3)]
    int8 = fxopt.optimize(model, batches[0], "quantize{backend=x86}", calibration=batches).module
    theirs = {id(v) for v in _packs(int8)}
    captured = fxopt.capture(int8, (torch.randn(32, 3, 8, 8),))
    ours = {id(v) for v in _packs(captured)}
    assert len(theirs) == 2 and len(ours) == 2 and not theirs & ours
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(captured(x), int8(x), rtol=0, atol=0)


@needs_onednn
@pytest.mark.parametrize("input_zero_point", [0, 60, 128])
def test_the_onednn_conv3d_kernel_computes_the_float_conv_of_its_operands(input_zero_point):
    """The kernel conv3d is packed for, checked directly: within half an output step of the
    float conv on the dequantized operands, at any zero point (torch's int8 conv_transpose2d
    fails this check: transposed convs are lowered as a 1x1 conv instead, test_conv_transpose)."""
    from fxopt.passes.quantize.packing import prepack_conv

    torch.manual_seed(0)
    w = torch.randn(4, 8, 3, 3, 3) * 0.1
    qw = torch.quantize_per_channel(w, w.abs().amax(dim=(1, 2, 3, 4)) / 127, torch.zeros(4, dtype=torch.long), 0,
                                    torch.qint8)
    bias = torch.randn(4)
    packed = prepack_conv(qw, bias, [1, 1, 1], [1, 1, 1], [1, 1, 1], 1)
    qx = torch.quantize_per_tensor(torch.randn(2, 8, 4, 6, 6), 0.05, input_zero_point, torch.quint8)
    reference = nn.functional.conv3d(qx.dequantize(), qw.dequantize(), bias, 1, 1)
    for out_zero_point in (0, 128):
        y = torch.ops.quantized.conv3d.new(qx, packed, 0.02, out_zero_point)
        expected = reference.clamp(-0.02 * out_zero_point, 0.02 * (255 - out_zero_point))
        assert (y.dequantize() - expected).abs().max() <= 0.01 + 1e-6


@needs_onednn
def test_a_wide_depthwise_conv_on_full_range_activations_keeps_the_reference_accuracy():
    """fbgemm's depthwise kernel adds uint8 x int8 pairs in int16: with 8-bit activations (the
    VNNI default) a 256-channel depthwise conv saturated, 12.7 dB against 36 dB on the
    reference backend. Packed with oneDNN, x86 matches the reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1, groups=256)).eval()
    batches = [(torch.randn(2, 256, 8, 8).abs() * 3,) for _ in range(4)]
    held_out = torch.randn(2, 256, 8, 8).abs() * 3
    sqnr = {}
    for backend in ("x86", "reference"):
        res = fxopt.optimize(model, batches[0], f"quantize{{backend={backend},reduce_range=false}}",
                             calibration=batches, verify=False)
        sqnr[backend] = fxopt.verify(model, res.module, (held_out,), tolerance="int8").sqnr_db
    assert sqnr["x86"] > sqnr["reference"] - 1.0, sqnr


def _sqnr(ref, out):
    return (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())).item()


@pytest.mark.parametrize("conv", [
    lambda: nn.Conv1d(16, 16, 8, padding=4),            # oneDNN's int8 kernel: -9 dB on AVX512-VNNI
    lambda: nn.Conv2d(32, 32, 8, padding=4, groups=2),  # (under both the x86 and the onednn engine)
    lambda: nn.Conv1d(96, 96, 16, padding=8, groups=8),
])
def test_every_packed_conv_is_checked_and_repacked_where_its_kernel_is_wrong(conv):
    """A kernel nobody listed as wrong is caught by the check run at packing time and the layer
    packed with an engine that computes it right: as close as the reference q/dq form."""
    torch.manual_seed(0)
    model = nn.Sequential(conv()).eval()
    shape = (8, model[0].in_channels, 64) if isinstance(model[0], nn.Conv1d) else (4, 32, 20, 20)
    batches = [(torch.randn(*shape),) for _ in range(4)]
    x86 = fxopt.optimize(model, batches[0], "quantize{backend=x86}", calibration=batches).module
    reference = fxopt.optimize(model, batches[0], "quantize{backend=reference}", calibration=batches,
                               verify=False).module
    x = torch.randn(*shape)
    with torch.no_grad():
        y = model(x)
        assert _sqnr(y, x86(x)) > _sqnr(y, reference(x)) - 1.0 > 30


def test_the_check_tells_a_wrong_kernel_from_a_right_one():
    w = _weight(8, 4)
    packed = torch.ops.quantized.conv2d_prepack(w, None, [1, 1], [1, 1], [1, 1], 1)
    assert computes_right(packed, w, None) and computes_right(packed, w, None, narrow=True)
    other = torch.quantize_per_tensor(torch.randn(8, 4, 3, 3), 0.02, 0, torch.qint8)
    assert not computes_right(packed, other, None)   # the kernel does not compute `other`'s layer
    lin = torch.quantize_per_tensor(torch.randn(6, 5), 0.02, 0, torch.qint8)
    assert computes_right(torch.ops.quantized.linear_prepack(lin, torch.randn(6)), lin, None) is False
    bias = torch.randn(6)
    assert computes_right(torch.ops.quantized.linear_prepack(lin, bias), lin, bias)


class ConvAndLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv1d(4, 8, 3, padding=1), nn.Linear(8, 6)

    def forward(self, x):  # the max pool reads the conv in int8 (a mean would read it in float)
        return self.fc(torch.nn.functional.max_pool1d(torch.relu(self.conv(x)), 16).flatten(1))


def _checks_answer(monkeypatch, answer) -> None:
    """Make `computes_right` answer `answer(packed, weight, bias)` in every loaded copy of the
    packing module (a doctest run over ./passes imports the passes a second time, and the last
    copy to load registers the save/load codec)."""
    import sys

    for name, module in list(sys.modules.items()):
        if name.endswith("quantize.packing") and hasattr(module, "computes_right"):
            monkeypatch.setattr(module, "computes_right", answer)


def test_a_layer_no_engine_computes_right_runs_in_float_between_int8(monkeypatch, tmp_path):
    """When every engine's kernel fails the check, the layer keeps its int8 neighbours and runs
    in float between them, with a warning naming it; a saved model of it loads and runs."""
    torch.manual_seed(0)
    model = ConvAndLinear().eval()
    batches = [(torch.randn(4, 4, 16),) for _ in range(4)]
    _checks_answer(monkeypatch, lambda packed, weight, bias, narrow=False: weight.dim() != 3)
    with pytest.warns(fxopt.PassWarning, match="no int8 kernel on this CPU computes conv '.*conv.*' right"):
        res = fxopt.optimize(model, batches[0], "quantize{backend=x86}", calibration=batches)
    assert res.verification.passed, res.verification.summary()
    assert list(res.passes[-1].stats["float_kernels"]) == ["conv"]
    targets = {getattr(n.target, "__name__", str(n.target)) for n in res.module.graph.nodes}
    assert "float_between_int8" in targets and "linear" in str(targets)
    x = torch.randn(4, 4, 16)
    with torch.no_grad():
        assert _sqnr(model(x), res.module(x)) > 30
    save(res.module, tmp_path / "m.pt")
    torch.testing.assert_close(load(tmp_path / "m.pt")(x), res.module(x), rtol=0, atol=0)


def test_loading_a_pack_no_engine_computes_right_says_so(monkeypatch, tmp_path):
    from fxopt.passes.quantize import QuantizationError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()  # the first is packed
    batches = [(torch.randn(2, 3, 8, 8),) for _ in range(2)]
    res = fxopt.optimize(model, batches[0], "quantize{backend=x86}", calibration=batches)
    save(res.module, tmp_path / "m.pt")
    _checks_answer(monkeypatch, lambda packed, weight, bias, narrow=False: False)
    with pytest.raises(QuantizationError, match=r"no int8 kernel on this machine computes a conv2d with weight "
                                                r"\(8, 3, 3, 3\) right .*quantize the model again here"):
        load(tmp_path / "m.pt")


@needs_onednn
def test_copies_and_pickles_of_an_int8_model_keep_each_layers_engine(tmp_path):
    """A depthwise conv is packed with oneDNN (fbgemm's saturates at 8 bits). Deep-copying or
    pickling a packed weight re-packs it under the global engine: copy.deepcopy(model) and
    torch.save/torch.load of the model ran fbgemm there (35 -> 15 dB). Held by a CodedValue,
    every copy computes what the model computes, also after fxopt.load and a new optimize."""
    import io
    import pickle

    from fxopt.serialize import CodedValue

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 256, 1), nn.Conv2d(256, 256, 3, padding=1, groups=256)).eval()
    batches = [(torch.randn(8, 3, 16, 16),) for _ in range(4)]
    int8 = fxopt.optimize(model, batches[0], "quantize{backend=x86}", calibration=batches).module
    assert all(isinstance(m, CodedValue) for name, m in int8.named_children() if name.endswith("_packed"))
    buffer = io.BytesIO()
    torch.save(int8, buffer)
    buffer.seek(0)
    path = tmp_path / "int8.fxopt.pt"
    save(int8, path)
    loaded = load(path)
    again = fxopt.optimize(int8, batches[0], "dce").module
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        want = int8(x)
        assert _sqnr(model(x), want) > 30
        for copied in (copy.deepcopy(int8), pickle.loads(pickle.dumps(int8)), torch.load(buffer, weights_only=False),
                       loaded, copy.deepcopy(loaded), again, copy.deepcopy(again)):
            torch.testing.assert_close(copied(x), want, rtol=0, atol=0)


def test_a_pack_on_the_root_is_moved_into_a_holder():
    """Files saved before the holders, and graphs a GraphModule rebuilt, read a pack off the
    root or a plain module: hold_coded_attributes puts each in a CodedValue, once per target."""
    from fxopt.serialize import CodedValue, hold_coded_attributes

    torch.manual_seed(0)
    # (the max pool reads the conv in int8: a conv only float ops read writes float, unpacked)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2)).eval()
    batches = [(torch.randn(2, 3, 8, 8),) for _ in range(3)]
    int8 = fxopt.optimize(model, batches[0], "quantize{backend=x86}", calibration=batches).module
    read = next(n for n in int8.graph.nodes if n.op == "get_attr" and n.target.endswith(".value"))
    holder = read.target.rsplit(".", 1)[0]
    setattr(int8, "old_pack", getattr(int8, holder).value)  # as a file from before the holders has it
    delattr(int8, holder)
    read.target = "old_pack"
    int8.recompile()
    x = torch.randn(2, 3, 8, 8)
    want = int8(x)
    assert hold_coded_attributes(int8) == 1
    assert isinstance(int8.old_pack_held, CodedValue) and not hasattr(int8, "old_pack")
    rebuilt = torch.fx.GraphModule(int8, copy.deepcopy(int8.graph))   # makes the holder a plain module
    assert type(rebuilt.old_pack_held) is nn.Module
    assert hold_coded_attributes(rebuilt) == 1 and isinstance(rebuilt.old_pack_held, CodedValue)
    for gm in (int8, rebuilt):
        torch.testing.assert_close(gm(x), want, rtol=0, atol=0)


def test_int8_models_whose_graph_calls_fxopt_kernels_pickle():
    """torch.save(model) pickles a GraphModule by re-tracing its code: int8_cat and int8_pad,
    which branch on their inputs, failed that trace (TraceError) until they became leaf
    functions."""
    import io
    import pickle

    import torch.nn.functional as F

    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
            self.c = nn.Conv2d(16, 8, 3)

        def forward(self, x):
            h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x)) * 100], 1)
            return self.c(F.pad(h, [1, 1, 1, 1]))

    torch.manual_seed(0)
    model = Branches().eval()
    batches = [(torch.randn(4, 3, 8, 8),) for _ in range(3)]
    int8 = fxopt.optimize(model, batches[0], "quantize{backend=x86}", calibration=batches).module
    called = {getattr(n.target, "__name__", "") for n in int8.graph.nodes if n.op == "call_function"}
    assert {"int8_cat", "int8_pad"} <= called
    buffer = io.BytesIO()
    torch.save(int8, buffer)
    buffer.seek(0)
    x = torch.randn(2, 3, 8, 8)
    for copied in (torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(int8)),
                   torch.fx.symbolic_trace(int8)):
        torch.testing.assert_close(copied(x), int8(x), rtol=0, atol=0)


def test_the_pack_codec_records_the_input_width_it_is_right_on(monkeypatch):
    """A pack lowered for 8-bit inputs (`reduce_range=false`) on a CPU without VNNI was re-made
    by the codec (save/load, optimize's fresh copies) with the 7-bit check "auto" means there,
    then fed 8 bits (an adversary, simulating the CPU: 18.1 dB instead of 36.8)."""
    from fxopt.passes.quantize import serialize as codec

    w = torch.quantize_per_channel(torch.randn(8, 4, 3, 3), torch.full((8,), 0.01, dtype=torch.double),
                                   torch.zeros(8, dtype=torch.long), 0, torch.qint8)
    packed = torch.ops.quantized.conv2d_prepack(w, None, [1, 1], [1, 1], [1, 1], 1)
    record = codec._encode(packed)
    assert record["narrow"] is False  # right on 8-bit inputs here
    seen = []
    monkeypatch.setattr(codec, "prepack_conv", lambda *args, narrow: seen.append(narrow) or packed)
    codec._decode(record)
    monkeypatch.setattr(codec, "computes_right", lambda *args, narrow: False)  # as without VNNI at 8 bits
    codec._decode(codec._encode(packed))
    assert seen == [False, True]
