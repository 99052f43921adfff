"""A conv whose value only float ops read writes float (passes/quantize/float_output.py).

Before, every int8 conv output went onto an 8-bit grid, also the graph's output: 1.1 dB below
PT2E on the three-conv net below, and held-out values beyond what calibration saw were clipped.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.passes.quantize import load, save
from fxopt.passes.quantize import float_output, lower, plan
from fxopt.passes.quantize.float_output import FloatOutputConv, int8_conv_float_output

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class ConvHead(nn.Module):
    """Two conv-bn-relu blocks and a conv `head` whose output is the graph's output."""

    def __init__(self, dim: int = 2, head: nn.Module | None = None, after=None):
        super().__init__()
        layers = []
        for cin, cout in ((3, 16), (16, 16)):
            layers += [CONV[dim](cin, cout, 3, padding=1), BN[dim](cout), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = head if head is not None else CONV[dim](16, 5, 3, padding=1)
        self.after = after
        for m in self.body:
            if isinstance(m, BN[dim]):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        y = self.head(self.body(x))
        return self.after(y) if self.after is not None else y


def _batches(dim=2, n=4, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = {1: 32, 2: 12, 3: 6}[dim]
    return [(torch.randn(batch, 3, *[size] * dim, generator=g),) for _ in range(n)]


def _quantize(model, batches, backend="x86", mode="symbolic"):
    res = fxopt.optimize(model, batches[0], f"quantize{{backend={backend}}}", calibration=batches, mode=mode)
    return res.module, res.passes[0].stats


def _float_output_convs(gm) -> int:
    return sum(n.target is int8_conv_float_output for n in gm.graph.nodes)


def _sqnr(ref, out):
    return (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())).item()


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_an_output_conv_writes_float_and_is_not_clipped_to_what_calibration_saw(mode, monkeypatch):
    torch.manual_seed(0)
    model = ConvHead().eval()
    batches = _batches()
    gm, stats = _quantize(model, batches, "x86", mode)
    assert _float_output_convs(gm) == 1 and stats["float_outputs"] == 1
    assert stats["dequantize_nodes"] == 0  # the output conv's float value is the graph's output
    assert stats["quantized"] == {"conv+bn+act": 2, "conv": 1}, stats["quantized"]
    held_out = torch.randn(64, 3, 12, 12) * 1.5  # wider than calibration: outputs beyond its range
    with torch.no_grad():
        ref, out = model(held_out), gm(held_out)
        seen = torch.cat([model(*b) for b in batches])
    assert out.dtype == torch.float32 and out.shape == ref.shape and out.is_contiguous()
    beyond = (ref > seen.max()) | (ref < seen.min())
    assert beyond.sum() > 50 and ((out > seen.max()) | (out < seen.min())).sum() >= beyond.sum() // 2
    ref_gm, _ = _quantize(model, batches, "reference", mode)
    with torch.no_grad():
        # the x86 kernel computes what the reference form computes, up to float rounding and the
        # int8 kernels' own rounding one step upstream
        assert _sqnr(ref_gm(held_out), out) > 45
    monkeypatch.setattr(lower, "writes_float", lambda *args: False)  # the lowering puts the output on its grid
    on_grid, _ = _quantize(model, batches, "x86", mode)
    x = torch.randn(64, 3, 12, 12)  # calibration's distribution: one rounding less
    with torch.no_grad():
        ref = model(x)
        assert _sqnr(ref, gm(x)) > _sqnr(ref, on_grid(x)) + 0.5


@pytest.mark.parametrize("onednn_from", [0, float_output.ONEDNN_FROM_MACS])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_output_convs_of_every_rank_and_kind_agree_with_the_reference_form(dim, onednn_from, monkeypatch):
    """Through oneDNN's kernel (every call, `onednn_from=0`) and through the batch switch."""
    monkeypatch.setattr(float_output, "ONEDNN_FROM_MACS", onednn_from)
    torch.manual_seed(dim)
    heads = [CONV[dim](16, 4, 1), CONV[dim](16, 16, 3, padding=1, groups=16),  # 1x1, depthwise
             CONV[dim](16, 8, 3, padding=2, dilation=2, groups=2), CONV[dim](16, 6, 3, stride=2, bias=False)]
    for head in heads:
        model = ConvHead(dim, head).eval()
        batches = _batches(dim)
        gm, stats = _quantize(model, batches)
        ref_gm, _ = _quantize(model, batches, "reference")
        assert _float_output_convs(gm) == 1, head
        x = _batches(dim, n=1, batch=3, seed=5)[0]  # another batch size than calibration's
        with torch.no_grad():
            out, ref = gm(*x), ref_gm(*x)
        assert out.shape == model(*x).shape and out.is_contiguous()
        assert _sqnr(ref, out) > 45, (head, _sqnr(ref, out))


@pytest.mark.parametrize("act, expected", [(nn.ReLU(), "relu fused"), (nn.ReLU6(), "hardtanh"),
                                           (nn.Hardtanh(-0.3, 0.4), "clamp")])
def test_an_output_conv_with_an_activation_applies_it_in_float(act, expected):
    torch.manual_seed(0)
    model = ConvHead(head=nn.Sequential(nn.Conv2d(16, 5, 3, padding=1), act)).eval()
    batches = _batches()
    gm, _ = _quantize(model, batches)
    assert _float_output_convs(gm) == 1
    fused = [n.args[2] for n in gm.graph.nodes if n.target is int8_conv_float_output]
    assert fused == [expected == "relu fused"]
    x = _batches(n=1, seed=3)[0]
    with torch.no_grad():
        ref, out = model(*x), gm(*x)
    bounds = {"relu fused": (0.0, None), "hardtanh": (0.0, 6.0), "clamp": (-0.3, 0.4)}[expected]
    assert out.min() >= bounds[0] and (bounds[1] is None or out.max() <= bounds[1])
    assert _sqnr(ref, out) > 28


def test_a_conv_read_by_a_float_op_inside_the_net_writes_float():
    """conv -> sigmoid -> conv: the sigmoid is float, so the first conv writes float; the
    second conv's input is quantized again from the sigmoid's value."""
    torch.manual_seed(0)
    model = ConvHead(after=nn.Sequential(nn.Sigmoid(), nn.Conv2d(5, 4, 1))).eval()
    batches = _batches()
    gm, stats = _quantize(model, batches)
    assert _float_output_convs(gm) == 2 and stats["float_outputs"] == 2
    x = _batches(n=1, seed=4)[0]
    with torch.no_grad():
        assert _sqnr(model(*x), gm(*x)) > 30


class _Tail(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, y):
        return {"slice": lambda: y[:, :3], "narrow": lambda: y.narrow(1, 0, 3), "select": lambda: y[:, 0],
                "last_columns": lambda: y[..., 1:], "max_pool": lambda: F.max_pool2d(y, 2)}[self.kind]()


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("kind", ["slice", "narrow", "select", "last_columns", "max_pool"])
def test_an_output_conv_read_through_a_slice_writes_float_and_one_read_by_a_pool_stays_int8(kind, mode):
    """Quantize tester: a head returning ``out[:, :classes]`` was rounded onto 8 bits, as the
    cut saved on dequantizing the smaller slice: 1.6-2.8 dB behind PT2E, and behind the same
    net without the slice. A slice of under half the output (one of 5 channels) and a pool keep
    reading the int8 value: writing float what no one reads (an LM head's last token) was
    5.5x slower at batch 16 (adversary)."""
    torch.manual_seed(0)
    model = ConvHead(after=_Tail(kind)).eval()
    batches = _batches()
    res = fxopt.optimize(model, batches[0], "quantize{backend=x86}", calibration=batches, mode=mode)
    stats = res.passes[0].stats
    assert stats.get("float_outputs") == (None if kind in ("max_pool", "select") else 1), stats
    if kind in ("max_pool", "select"):
        return
    # the slice of what the net without it computes: the head's float value, not its int8 one
    torch.manual_seed(0)
    whole = fxopt.optimize(ConvHead().eval(), batches[0], "quantize{backend=x86}", calibration=batches, mode=mode)
    x = _batches(n=1, seed=4)[0]
    with torch.no_grad():
        torch.testing.assert_close(res.module(*x), _Tail(kind)(whole.module(*x)))
        assert _sqnr(model(*x), res.module(*x)) > 39  # 39.3-41.1; on the int8 grid 37.7-38.5


def _held(gm) -> list[FloatOutputConv]:
    return [m.value for m in gm.modules() if isinstance(getattr(m, "value", None), FloatOutputConv)]


def test_a_float_output_conv_survives_save_load_deepcopy_and_pickle(tmp_path):
    torch.manual_seed(0)
    model = ConvHead().eval()
    gm, _ = _quantize(model, _batches())
    x = _batches(n=1, seed=7)[0]
    with torch.no_grad():
        expected = gm(*x)
    save(gm, tmp_path / "m.pt")
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    loaded, copied, unpickled = load(tmp_path / "m.pt"), copy.deepcopy(gm), torch.load(buffer, weights_only=False)
    assert _held(copied) == _held(gm)  # a deep copy shares the pack (nothing writes into it)
    # what came back from torch.load copies and saves again: torch re-traces the code on
    # unpickling, and spelled the held object out field by field (its oneDNN pack a plain
    # attribute, which neither deepcopy nor torch.save can read)
    buffer = io.BytesIO()
    torch.save(copy.deepcopy(unpickled), buffer)
    buffer.seek(0)
    save(unpickled, tmp_path / "again.pt")
    again = [torch.load(buffer, weights_only=False), load(tmp_path / "again.pt")]
    for restored in (loaded, copied, unpickled, *again):
        held = _held(restored)
        assert len(held) == 1 and held[0].packed is not None
        with torch.no_grad():
            assert torch.equal(restored(*x), expected)


def test_the_kernel_without_a_pack_computes_the_same_value_in_float(monkeypatch):
    monkeypatch.setattr(float_output, "ONEDNN_FROM_MACS", 0)  # the pack on every call
    torch.manual_seed(0)
    weight = torch.randint(-128, 128, (6, 4, 3, 3), dtype=torch.int8)
    scales, bias = torch.rand(6) * 0.01 + 0.001, torch.randn(6)
    conv = FloatOutputConv.pack(weight, scales, bias, [2, 1], [1, 0], [1, 1], 2)
    assert conv.packed is not None  # this build has oneDNN's int8 conv
    q = torch.quantize_per_tensor(torch.randn(3, 8, 9, 7), 0.04, 120, torch.quint8)
    packed = int8_conv_float_output(q, conv, True)
    unpacked = int8_conv_float_output(q, FloatOutputConv(weight, scales, bias, [2, 1], [1, 0], [1, 1], 2), True)
    expected = F.relu(F.conv2d(q.dequantize(), weight.float() * scales.view(-1, 1, 1, 1), bias, [2, 1], [1, 0],
                               [1, 1], 2))
    assert torch.allclose(packed, expected, atol=1e-5) and torch.allclose(unpacked, expected, atol=1e-5)
    # a float input (no int8 producer) takes the float path too
    assert torch.allclose(int8_conv_float_output(q.dequantize(), conv, True), expected, atol=1e-5)


def test_a_kernel_that_is_not_exact_is_not_packed_and_the_layer_stays_right(monkeypatch):
    """The pack is checked against the float conv: a kernel off by more than float rounding
    (as a wrong oneDNN kernel, or one that drops a weight bit without VNNI) is not used."""
    torch.manual_seed(0)
    run_packed = FloatOutputConv.run_packed
    monkeypatch.setattr(FloatOutputConv, "run_packed", lambda self, q, relu: run_packed(self, q, relu) * 1.001)
    weight = torch.randint(-128, 128, (6, 4, 3, 3), dtype=torch.int8)
    assert FloatOutputConv.pack(weight, torch.full((6,), 0.01), None, [1, 1], [1, 1], [1, 1], 1).packed is None
    model = ConvHead().eval()
    gm, _ = _quantize(model, _batches())
    held = _held(gm)
    assert len(held) == 1 and held[0].packed is None
    x = _batches(n=1, seed=2)[0]
    with torch.no_grad():
        assert _sqnr(model(*x), gm(*x)) > 30


def test_without_onednn_the_layer_runs_in_float(monkeypatch):
    monkeypatch.setattr(float_output.torch.backends.mkldnn, "is_available", lambda: False)
    weight = torch.randint(-128, 128, (6, 4, 3), dtype=torch.int8)
    conv = FloatOutputConv.pack(weight, torch.full((6,), 0.01), None, [1], [1], [1], 1)
    assert conv.packed is None
    q = torch.quantize_per_tensor(torch.randn(2, 4, 10), 0.04, 128, torch.quint8)
    assert torch.allclose(int8_conv_float_output(q, conv, False),
                          F.conv1d(q.dequantize(), weight.float() * 0.01, padding=1), atol=1e-5)


class TwoHeads(nn.Module):
    """Two heads added at the graph output (an outside tester's model)."""

    def __init__(self, conv: bool):
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, 3, padding=1)) if conv else nn.Linear
        self.a, self.b, self.o1, self.o2 = layer(16, 16), layer(16, 16), layer(16, 4), layer(16, 4)

    def forward(self, x):
        return self.o1(torch.relu(self.a(x))) + self.o2(self.b(x))


@pytest.mark.parametrize("conv", [False, True])
def test_an_add_of_two_heads_at_the_output_stays_float_and_its_heads_write_float(conv, monkeypatch):
    """The add went int8 (one dequantize after it against two before it in float), rounding both
    heads and the sum onto grids: 34.1 dB on the linear heads, PT2E (which leaves it float) 37.7.
    Heads that write float make the float add the cheaper side of the cut."""
    torch.manual_seed(0)
    model = TwoHeads(conv).eval()
    shape = (8, 16, 6, 6) if conv else (8, 16)
    batches = [(torch.randn(shape),) for _ in range(40)]
    gm, stats = _quantize(model, batches)
    assert stats["float_outputs"] == 2 and "add" in stats["float_ops"], stats
    x = torch.randn(64, *shape[1:])
    monkeypatch.setattr(plan, "_writes_float_when_read_in_float", lambda *args: False)  # the int8 add
    int8_add, before = _quantize(model, batches)
    assert "add" not in before["float_ops"]
    with torch.no_grad():
        ref = model(x)
        assert _sqnr(ref, gm(x)) > _sqnr(ref, int8_add(x)) + 1.5  # linear heads: 37.7 against 34.1 dB


def test_a_residual_add_between_int8_convs_stays_int8():
    """The float outputs are free only where float ops read them: an add that int8 convs read
    (a ResNet block's) keeps its int8 kernel."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.c1, self.c2 = (nn.Conv2d(c, 8, 3, padding=1) for c in (3, 8, 8))
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            return self.head(torch.relu(h + self.c2(torch.relu(self.c1(h)))))

    model = Block().eval()
    gm, stats = _quantize(model, _batches())
    assert "add" not in stats["float_ops"] and stats["quantized"].get("add+act") == 1, stats
    assert stats["float_outputs"] == 1  # the head


def test_an_empty_batch_keeps_a_conv1d_heads_shape():
    """An adversary: oneDNN's conv1d hands back its internal (N, C, 1, L) form at N == 0."""
    torch.manual_seed(0)
    model = ConvHead(dim=1).eval()
    gm, _ = _quantize(model, _batches(dim=1))
    with torch.no_grad():
        assert gm(torch.randn(0, 3, 20)).shape == model(torch.randn(0, 3, 20)).shape == (0, 5, 20)


def test_small_calls_take_the_float_conv_large_ones_onednn(monkeypatch):
    """oneDNN builds its primitive on every call (~45 us): a float conv is faster on a tiny head
    at batch 1, oneDNN from about 2 M MACs per call (or 100 k input elements to dequantize)."""
    calls = []
    run_packed = FloatOutputConv.run_packed
    monkeypatch.setattr(FloatOutputConv, "run_packed", lambda self, q, relu: calls.append(q.shape[0])
                        or run_packed(self, q, relu))
    weight = torch.randint(-128, 128, (10, 32, 1, 1), dtype=torch.int8)
    conv = FloatOutputConv.pack(weight, torch.full((10,), 0.01), None, [1, 1], [0, 0], [1, 1], 1)
    calls.clear()  # (the pack's own check)
    for batch in (1, 8):  # 82 k and 655 k MACs on 8 k and 66 k elements: float; 5.2 M MACs: oneDNN
        int8_conv_float_output(torch.quantize_per_tensor(torch.randn(batch, 32, 16, 16), 0.05, 128, torch.quint8),
                               conv, False)
    assert calls == []
    q = torch.quantize_per_tensor(torch.randn(64, 32, 16, 16), 0.05, 128, torch.quint8)
    y = int8_conv_float_output(q, conv, False)
    assert calls == [64]
    torch.testing.assert_close(y, F.conv2d(q.dequantize(), weight.float() * 0.01), rtol=1e-4, atol=1e-4)


class ReturnedFeatures(nn.Module):
    """Each stage's feature map is returned and read on through a relu (an FPN backbone)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 16, 3, 2, 1), nn.Conv2d(16, 8, 3, 1, 1)

    def forward(self, x):
        f1 = self.c1(x)
        f2 = self.c2(F.relu(f1))
        return f1, f2, self.c3(F.relu(f2))


@pytest.mark.parametrize("backend", ["x86", "reference"])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_conv_read_by_float_and_int8_ops_writes_float_and_its_relu_takes_its_own_grid(mode, backend):
    """Quantize tester: a returned feature map that the next conv also reads (through a relu)
    was rounded for the caller, and the relu ran on its signed grid: 2.3-3.2 dB behind PT2E on
    every output. The conv writes float now, and its relu is quantized after, on [0, max]."""
    torch.manual_seed(0)
    model = ReturnedFeatures().eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 32, 32, generator=g),) for _ in range(4)]
    gm, stats = _quantize(model, batches, backend, mode)
    assert stats["float_outputs"] == 3 and stats["quantized"] == {"conv": 3}, stats
    for relu in (n for n in gm.graph.nodes if "relu" in str(n.target)):
        assert "quantize" not in str(relu.args[0].target), gm.code  # the conv's float value
        assert any("quantize_per_tensor" in str(u.target) for u in relu.users), gm.code
    test = torch.randn(8, 3, 32, 32, generator=g)
    with torch.no_grad():
        for want, got in zip(model(test), gm(test)):
            assert _sqnr(want, got) > 36.5, [_sqnr(a, b) for a, b in zip(model(test), gm(test))]


def test_the_weight_is_packed_for_each_call_shape_and_not_reordered_per_call(capfd):
    """Quantize tester: a PointNet's 128->512 conv writing float ran 4-9x torch.ao's time; its
    weight, packed without the input's shape and zero point, was reordered on every call
    (3.8-9 ms for a 0.4 ms conv). Packed per (threads, shape, zero point), a steady-state call
    runs the conv alone."""
    weight = torch.randint(-128, 128, (64, 32, 1, 1), dtype=torch.int8)
    conv = FloatOutputConv.pack(weight, torch.full((64,), 0.01), torch.zeros(64), [1, 1], [0, 0], [1, 1], 1)
    threads = torch.get_num_threads()
    try:
        for run_threads, batch in ((1, 1), (1, 3), (2, 1)):
            torch.set_num_threads(run_threads)
            q = torch.quantize_per_tensor(torch.rand(batch, 32, 32, 32), 0.01, 77, torch.quint8)
            q = q.contiguous(memory_format=torch.channels_last)
            assert conv.macs(q) >= float_output.ONEDNN_FROM_MACS  # (oneDNN's path, not the float conv)
            int8_conv_float_output(q, conv, False)  # the first call at a new shape packs
            capfd.readouterr()
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                y = int8_conv_float_output(q, conv, False)
            execs = [line for line in capfd.readouterr().out.splitlines() if ",exec," in line]
            assert any(",convolution," in line for line in execs), "oneDNN verbose printed nothing; cannot check"
            assert not [line for line in execs if ",reorder," in line], execs
            torch.testing.assert_close(y, F.conv2d(q.dequantize(), weight.float() * 0.01), rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(threads)
    assert {key[:2] for key in conv._shaped} >= {(1, (1, 32, 32, 32)), (1, (3, 32, 32, 32)), (2, (1, 32, 32, 32))}


def test_a_layer_called_at_ever_new_sizes_keeps_a_bounded_number_of_packs():
    """Adversary: one pack per input shape, kept for ever, grew a server's memory by a weight
    copy per layer and size (300 image sizes: 407 MB). The latest `MAX_PACKS` stay."""
    weight = torch.randint(-128, 128, (64, 32, 1, 1), dtype=torch.int8)
    conv = FloatOutputConv.pack(weight, torch.full((64,), 0.01), None, [1, 1], [0, 0], [1, 1], 1)
    for side in range(32, 32 + 3 * float_output.MAX_PACKS):
        q = torch.quantize_per_tensor(torch.rand(1, 32, side, side), 0.01, 3, torch.quint8)
        y = conv.run_packed(q, False)
        assert len(conv._shaped) <= float_output.MAX_PACKS
    torch.testing.assert_close(y, F.conv2d(q.dequantize(), weight.float() * 0.01), rtol=1e-4, atol=1e-4)
    assert (torch.get_num_threads(), tuple(q.shape), 3) in conv._shaped  # the latest is kept
