"""Basic slicing on int8 values: a TCN's causal chomp (`conv(x)[:, :, :-pad]`), `x[..., 1:]`,
`narrow` and `select` run on the int8 tensor, on its grid, in both the x86 and reference forms;
an activation after the slice is fused into the conv kernel. Indexing that gathers (a tensor
index) or takes an item of a tuple stays float, with its reason in `float_ops`."""
from __future__ import annotations

import copy
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")

SLICING_TARGETS = ("getitem", "aten.slice.Tensor", "aten.select.int", "aten.narrow.default", "narrow", "select")
DEQUANTIZE = ("aten.dequantize.self", "quantized_decomposed.dequantize_per_tensor.default")
QUANTIZE = ("aten.quantize_per_tensor.default", "quantized_decomposed.quantize_per_tensor.default")


def _name(node):
    return getattr(node.target, "__name__", None) if node.target is operator.getitem else str(node.target)


def _targets(gm):
    return [_name(n) for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def _count(gm, names):
    return sum(t in names for t in _targets(gm))


def _sqnr(ref, out):
    return (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())).item()


class Chomp(nn.Module):
    """The causal-conv trim of the usual TCN code: drop the last `pad` steps, made contiguous."""

    def __init__(self, pad):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return x[:, :, :-self.pad].contiguous()


class Block(nn.Module):
    """Two causal dilated Conv1d (padded, chomped, ReLU) and a residual add (+ a 1x1 conv when
    the channel count changes)."""

    def __init__(self, cin, cout, dilation, k=3):
        super().__init__()
        pad = (k - 1) * dilation
        self.c1 = nn.Conv1d(cin, cout, k, padding=pad, dilation=dilation)
        self.c2 = nn.Conv1d(cout, cout, k, padding=pad, dilation=dilation)
        self.chomp1, self.pad = Chomp(pad), pad
        self.down = nn.Conv1d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        y = F.relu(self.chomp1(self.c1(x)))
        y = torch.relu(self.c2(y)[:, :, :-self.pad])            # the slice spelled inline
        return F.relu(y + (x if self.down is None else self.down(x)))


class TCN(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(Block(4, 16, 1), Block(16, 16, 2), Block(16, 16, 4))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.blocks(x)[:, :, -1])                 # the last step: a select


def _tcn_data(n=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 4, 64, generator=g),) for _ in range(n)]


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_tcn_stays_int8_through_the_chomp_slices_on_x86(mode):
    torch.manual_seed(0)
    model, batches = TCN().eval(), _tcn_data()
    res = fxopt.optimize(model, batches[0], "quantize{backend=x86}", calibration=batches, mode=mode)
    gm, stats = res.module, res.passes[0].stats
    # one quantize at the input, one dequantize at the output: nothing converts around a slice
    assert _count(gm, QUANTIZE) == 1 and _count(gm, DEQUANTIZE) == 1, gm.code
    # conv -> chomp -> relu is one conv1d_relu kernel whose int8 output is sliced
    assert _count(gm, ("quantized.conv1d_relu.default",)) == 6 and stats["quantized"]["conv+act"] == 6
    assert _count(gm, ("quantized.add_relu.default",)) == 3  # and the head: an int8 linear with a float output
    assert _count(gm, ("quantized.linear_with_input_q_dq_qweight_dq_output_fp32.default",)) == 1
    slices = [n for n in gm.graph.nodes if _name(n) in SLICING_TARGETS]
    assert slices and all(str(n.args[0].target) not in DEQUANTIZE for n in slices)
    assert not any(v.split(":")[0] in ("getitem", "slice", "select") for v in stats["float_ops"].values()), \
        stats["float_ops"]
    assert res.verification.passed and res.verification.sqnr_db > 30, res.verification.summary()


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_tcn_reference_form_keeps_the_slices_between_one_q_dq_per_kernel(mode):
    torch.manual_seed(0)
    model, batches = TCN().eval(), _tcn_data(4)
    ref = fxopt.optimize(model, batches[0], "quantize{backend=reference,reduce_range=true}",
                         calibration=batches, mode=mode)
    x86 = fxopt.optimize(model, batches[0], "quantize{backend=x86,reduce_range=true}",
                         calibration=batches, mode=mode)
    gm = ref.module
    # the input, then one q/dq pair per int8 kernel output (7 convs, 3 adds; the head's linear
    # is read in float): none for the slices, which read the kernel's value on its grid and
    # stay on it (before the fix, 17 pairs in export: each slice was requantized)
    assert _count(gm, ("quantized_decomposed.quantize_per_tensor.default",)) == 1 + 10
    assert _count(gm, ("quantized_decomposed.dequantize_per_tensor.default",)) == 1 + 10
    with torch.no_grad():
        a, b = ref.module(*batches[1]), x86.module(*batches[1])
    assert (a - b).abs().max().item() < 0.05 * b.abs().max().item()     # the two forms agree
    assert ref.verification.passed and ref.verification.sqnr_db > 30, ref.verification.summary()


def test_tcn_int8_is_at_least_as_accurate_as_torch_ao_fx():
    """torch.ao FX keeps each getitem float (a dequantize/quantize pair around every chomp) and
    cannot fuse the relu behind it; fxopt slices the int8 conv+relu output."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    model, batches = TCN().eval(), _tcn_data()
    seen = torch.cat([b[0] for b in batches])    # both calibrated on it: no range left unseen
    res = fxopt.optimize(model, batches[0], "quantize{backend=x86,observer=histogram}", calibration=batches)
    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), batches[0])
    with torch.no_grad():
        for b in batches:
            prepared(*b)
        ao = convert_fx(prepared)
        ref = model(seen)
        ours, theirs = _sqnr(ref, res.module(seen)), _sqnr(ref, ao(seen))
    ao_dequantize = sum(n.op == "call_method" and n.target == "dequantize" for n in ao.graph.nodes)
    assert ao_dequantize > 6                                      # torch.ao converts around the slices
    assert ours > 33 and ours > theirs + 3, (ours, theirs)       # 36.1 vs 29.3 dB when written


class Spellings(nn.Module):
    """`x[..., 1:]`, `narrow`, `select` and a slice whose end is computed from a size."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3)
        self.c = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.a(x)[..., 1:]                                     # (N, 8, 8, 7)
        y = F.max_pool2d(self.b(y), 2)                             # (N, 8, 3, 2)
        z = self.c(y.flatten(2).narrow(2, 1, 4))                   # (N, 8, 4)
        z = z[:, :, : z.size(2) - 1]                               # end computed from a size
        return self.fc(z.select(2, 0))


@pytest.mark.parametrize("backend", ["x86", "reference"])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_ellipsis_narrow_select_and_computed_ends_run_on_int8(mode, backend):
    torch.manual_seed(0)
    model = Spellings().eval()
    batches = [(torch.randn(4, 3, 8, 8),) for _ in range(6)]
    res = fxopt.optimize(model, batches[0], f"quantize{{backend={backend}}}", calibration=batches, mode=mode)
    gm, stats = res.module, res.passes[0].stats
    assert stats["float_ops"] == {}, stats["float_ops"]
    if backend == "x86":
        assert _count(gm, QUANTIZE) == 1 and _count(gm, DEQUANTIZE) == 1, gm.code
    else:  # the input and the three convs' outputs, nothing more (the head's linear writes float)
        assert _count(gm, QUANTIZE) == 1 + 3 and _count(gm, DEQUANTIZE) == 1 + 3, gm.code
    assert res.verification.passed and res.verification.sqnr_db > 25, res.verification.summary()
    with torch.no_grad():                                          # another batch size
        assert gm(torch.randn(3, 3, 8, 8)).shape == (3, 4)


class Gathers(nn.Module):
    """A tensor index (advanced indexing: a gathered copy) and an item of a split's tuple."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.register_buffer("order", torch.tensor([3, 1, 0, 2]))

    def forward(self, x):
        y = self.a(x)
        g = y[:, self.order]
        first, _ = torch.split(y, 4, dim=1)
        return self.b(g) + self.b(first)


def test_gathers_stay_float_with_their_reason_and_a_splits_piece_is_a_slice():
    torch.manual_seed(0)
    batches = [(torch.randn(2, 3, 6, 6),) for _ in range(4)]
    res = fxopt.optimize(Gathers().eval(), batches[0], "quantize{backend=x86}", calibration=batches)
    float_ops = res.passes[0].stats["float_ops"]
    assert float_ops["getitem"] == ("getitem: advanced indexing (index 'order') gathers a copy: "
                                    "no int8 pass-through; runs in float"), float_ops
    assert not any("item of" in reason for reason in float_ops.values()), float_ops
    assert "narrow" in str(_targets(res.module)), _targets(res.module)  # the split's piece: a slice
    assert res.verification.passed, res.verification.summary()


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: a channel split, one half through pointwise/depthwise convs, the two
    halves concatenated and shuffled."""

    def __init__(self, channels=16):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(nn.Conv2d(half, half, 1), nn.BatchNorm2d(half), nn.ReLU(),
                                    nn.Conv2d(half, half, 3, padding=1, groups=half), nn.BatchNorm2d(half),
                                    nn.Conv2d(half, half, 1), nn.BatchNorm2d(half), nn.ReLU())

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        y = torch.cat((a, self.branch(b)), 1)
        n, c, h, w = y.shape
        return y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.units = nn.Sequential(ShuffleUnit(), ShuffleUnit())
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.units(self.stem(x)))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_channel_split_passes_int8_values_through(mode):
    """Quantize tester: ShuffleNetV2's `x.chunk(2, 1)` kept every piece float (a tuple is no
    tensor), so every unit's cat ran float, between a quantize and 14 float-output convs
    (slower than fp32 at batch 16, 1.4x torch.ao)."""
    torch.manual_seed(0)
    model = ShuffleNet().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    batches = [(torch.randn(4, 3, 8, 8),) for _ in range(4)]
    res = fxopt.optimize(model, batches[0], "quantize{backend=x86}", calibration=batches, mode=mode)
    assert res.verification.passed, res.verification.summary()
    stats = res.passes[0].stats
    assert not any("chunk" in k or "item of" in v for k, v in stats["float_ops"].items()), stats["float_ops"]
    # int8 from the input's quantize on, cats too (4 quantizes before); in the symbolic graph
    # the sizes the split and the shuffle read counted as float readers of the int8 values
    assert _count(res.module, QUANTIZE) == 1 and _count(res.module, DEQUANTIZE) == 0, _targets(res.module)
    assert stats["quantized"].get("cat") == 2, stats["quantized"]
    x = torch.randn(2, 3, 10, 6) if mode == "symbolic" else torch.randn(2, 3, 8, 8)  # the bounds follow the size
    torch.testing.assert_close(res.module(x), model(x), rtol=0.05, atol=0.03)


def test_an_int8_conv1d_read_by_an_add_is_made_contiguous_and_one_read_by_a_conv_is_not():
    """A quantized conv1d returns a squeezed channels-last tensor, which quantized add and relu
    read on a strided path 10-20x slower: lowering copies it contiguous before such readers only
    (an int8 conv lays its input out channels-last itself)."""
    torch.manual_seed(0)
    model, batches = TCN().eval(), _tcn_data(4)
    gm = fxopt.optimize(model, batches[0], "quantize{backend=x86}", calibration=batches).module
    copied = {}
    for kernel in gm.graph.nodes:
        if not str(kernel.target).startswith("quantized.conv1d"):
            continue
        node, copies = kernel, 0
        while len(node.users) == 1 and (_name(node) in SLICING_TARGETS or "contiguous" in str(node.target)
                                        or node is kernel):
            copies += node.target is torch.ops.aten.contiguous.default
            node = next(iter(node.users))
        copies += node.target is torch.ops.aten.contiguous.default
        reader = next(iter(node.users)) if node.target is torch.ops.aten.contiguous.default else node
        copied.setdefault(str(reader.target), []).append(copies)
    # c1 of each block feeds c2 directly; c2 (chomped) and block one's 1x1 conv feed the adds
    assert copied == {"quantized.conv1d_relu.default": [0, 0, 0],
                      "quantized.add_relu.default": [1, 1, 1, 1]}, copied


def test_an_int8_conv1d_read_by_a_pool_is_not_copied():
    """An audio CNN's conv1d -> max_pool1d: the pool reads the conv's own layout 15x faster than
    a contiguous copy (the copy made int8 2.7x slower than torch.ao's at batch 16)."""
    def block(cin, cout, k):
        return nn.Sequential(nn.Conv1d(cin, cout, k, padding=k // 2), nn.BatchNorm1d(cout), nn.ReLU())

    torch.manual_seed(0)
    model = nn.Sequential(block(1, 8, 9), nn.MaxPool1d(4), block(8, 16, 3), nn.AvgPool1d(2), block(16, 16, 3),
                          nn.MaxPool1d(2), nn.Flatten(), nn.Linear(16 * 16, 4)).eval()
    batches = [(torch.randn(2, 1, 256),) for _ in range(4)]
    res = fxopt.optimize(model, batches[0], "quantize{backend=x86}", calibration=batches)
    gm = res.module
    pools = [n for n in gm.graph.nodes if n.op == "call_module"
             and isinstance(gm.get_submodule(n.target), (nn.MaxPool1d, nn.AvgPool1d))]
    read = [str(n.args[0].target) for n in pools]
    # the last pool feeds a flatten (a reshape would copy the odd strides anyway): copied before it
    assert read == ["quantized.conv1d_relu.default"] * 2 + ["aten.contiguous.default"], read
    assert res.verification.passed, res.verification.summary()


class InplaceChomp(nn.Module):
    """`nn.ReLU(inplace=True)` after the chomp writes into a view of the conv output: private
    when the conv output and each view are read by the next alone, as here."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(4, 8, 3, padding=2), nn.Conv1d(8, 8, 3, padding=2)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.relu(self.c1(x)[:, :, :-2])
        return self.relu(self.c2(y)[:, :, :-2]) + y


class SeenWrite(nn.Module):
    """The same write where a view of the written value is read after it (`v`): it must see
    the relu, so the value stays float; `w` reads the other chomp before its write, harmlessly."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(4, 8, 3, padding=2), nn.Conv1d(4, 8, 3, padding=2)

    def forward(self, x):
        y = self.c1(x)[:, :, :-2]
        v = y[:, :4]
        y.relu_()
        return torch.cat([v, y[:, 4:]], 1) * 2 + self.c2(x)[:, :, :-2]


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_an_inplace_relu_behind_the_chomp_is_fused_when_nobody_else_sees_the_write(mode):
    torch.manual_seed(0)
    batches = [(torch.randn(4, 4, 32),) for _ in range(4)]
    res = fxopt.optimize(InplaceChomp().eval(), batches[0], "quantize{backend=x86}", calibration=batches, mode=mode)
    stats = res.passes[0].stats
    assert stats["quantized"] == {"conv+act": 2, "add": 1} and stats["float_ops"] == {}, stats
    assert _count(res.module, ("quantized.conv1d_relu.default",)) == 2
    assert res.verification.passed and res.verification.sqnr_db > 30, res.verification.summary()

    res = fxopt.optimize(SeenWrite().eval(), batches[0], "quantize{backend=x86}", calibration=batches, mode=mode)
    stats = res.passes[0].stats
    first_conv = "c1" if mode == "symbolic" else "conv1d"
    assert stats["float_ops"][first_conv] == "written in place by 'relu_' (directly or through a view)"
    assert stats["quantized"] == {"conv": 1}                          # c2, whose chomp nobody writes
    assert res.verification.passed and res.verification.sqnr_db > 30, res.verification.summary()


class _Unsqueezed(nn.Module):
    """A conv2d's map as one frame of a conv3d (`unsqueeze(2)`), and a conv2d over a height of
    one read by a conv1d (`squeeze(2)`)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv3d(8, 8, 1)
        self.c, self.d = nn.Conv2d(8, 8, (1, 3), padding=(0, 1)), nn.Conv1d(8, 4, 3, padding=1)

    def forward(self, x):
        y = self.b(F.relu(self.a(x)).unsqueeze(2))  # (N, 8, 1, H, W)
        row = F.relu(self.c(y[:, :, 0, :1]))  # (N, 8, 1, W)
        return self.d(torch.squeeze(row, 2))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("backend", ["x86", "reference"])
def test_unsqueeze_and_squeeze_run_on_int8_like_indexing_with_none(mode, backend):
    """Quantize tester: ``x.unsqueeze(2)`` ran in float, a quantize after it, where its
    spelling ``x[:, :, None]`` was an int8 pass-through."""
    torch.manual_seed(0)
    model = _Unsqueezed().eval()
    batches = [(torch.randn(4, 8, 6, 6),) for _ in range(3)]
    res = fxopt.optimize(model, batches[0], f"quantize{{backend={backend}}}", calibration=batches, mode=mode)
    stats = res.passes[0].stats
    assert not any(k in why for why in stats["float_ops"].values() for k in ("unsqueeze", "squeeze")), stats
    if backend == "x86":  # (the reference form rounds each kernel's output with a q/dq pair of its own)
        assert stats["quantize_nodes"] == 1, res.module.code  # the input's
    test = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        assert _sqnr(model(test), res.module(test)) > 30
