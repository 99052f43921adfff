"""Padding and clamps on int8: a pad with zeros (TF-style 'same', a TCN's causal left pad), and
reflect/replicate/circular pads, run on the int8 value, on its grid (x86: `kernels.int8_pad`
pads the bytes; reference: the float pad of grid values); a clamp(min=0[, max]) after a conv or
linear is fused like relu/relu6; what stays float says why in `float_ops`."""
from __future__ import annotations

import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.passes.quantize.kernels import int8_pad
from fxopt.passes.quantize.packing import conv_engine

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")

DEQUANTIZE = ("aten.dequantize.self", "quantized_decomposed.dequantize_per_tensor.default")
QUANTIZE = ("aten.quantize_per_tensor.default", "quantized_decomposed.quantize_per_tensor.default")


def _targets(gm):
    return [getattr(n.target, "__name__", None) if n.target is operator.getitem or callable(n.target)
            and not isinstance(n.target, torch._ops.OpOverload) else str(n.target)
            for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def _count(gm, names):
    return sum(t in names for t in _targets(gm))


def _sqnr(ref, out):
    return (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())).item()


def _quantize(model, batches, backend="x86", mode="symbolic"):
    res = fxopt.optimize(model, batches[0], f"quantize{{backend={backend}}}", calibration=batches, mode=mode)
    return res, res.passes[0].stats


class PadNet(nn.Module):
    """TF 'same' padding for a stride-2 stem (asymmetric) and a zero pad before each conv."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, 2)
        self.convs = nn.ModuleList([nn.Conv2d(c, c, 3) for _ in range(3)])

    def forward(self, x):
        x = F.relu(self.stem(F.pad(x, (0, 1, 0, 1))))
        for conv in self.convs:
            x = F.relu(conv(F.pad(x, (1, 1, 1, 1))))
        return x


class CausalTCN(nn.Module):
    """A TCN's causal convs: `F.pad(x, (2 * d, 0))` before each dilated Conv1d."""

    def __init__(self, c=8):
        super().__init__()
        self.inp = nn.Conv1d(4, c, 1)
        self.convs = nn.ModuleList([nn.Conv1d(c, c, 3, dilation=d) for d in (1, 2)])

    def forward(self, x):
        h = self.inp(x)
        for conv, d in zip(self.convs, (1, 2)):
            h = F.relu(h + F.relu(conv(F.pad(h, (2 * d, 0)))))
        return h


@pytest.mark.parametrize("backend", ["x86", "reference"])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_zero_pads_before_convs_run_on_int8_with_one_quantize_and_one_dequantize(backend, mode):
    torch.manual_seed(0)
    model = PadNet().eval()
    batches = [(torch.randn(2, 3, 17, 17),) for _ in range(4)]
    res, stats = _quantize(model, batches, backend, mode)
    assert stats["float_ops"] == {}, stats["float_ops"]
    assert stats["quantized"] == {"conv+act": 4}
    # was 4 and 4 (x86), 8 and 8 (reference): a pair around every float pad; the last conv, which
    # the graph output reads, writes float
    assert (stats["quantize_nodes"], stats["dequantize_nodes"]) == ((1, 0) if backend == "x86" else (4, 4))
    targets = _targets(res.module)
    if backend == "x86":
        assert targets.count("int8_pad") == 4 and targets.count("quantized.conv2d_relu.new") == 3
        assert targets.count("int8_conv_float_output") == 1
    x = torch.randn(2, 3, 17, 17)
    assert _sqnr(model(x), res.module(x)) > 25


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_tcn_with_causal_left_pads_is_one_int8_region(mode):
    torch.manual_seed(0)
    model = CausalTCN().eval()
    batches = [(torch.randn(2, 4, 32),) for _ in range(4)]
    res, stats = _quantize(model, batches, "x86", mode)
    assert stats["float_ops"] == {} and stats["quantize_nodes"] == 1 and stats["dequantize_nodes"] == 1, stats
    assert _targets(res.module).count("int8_pad") == 2
    x = torch.randn(2, 4, 32)
    assert _sqnr(model(x), res.module(x)) > 30


class Pads(nn.Module):
    def __init__(self, mode, value=None, dim=2):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        self.a, self.b = conv(3, 6, 3), conv(6, 6, 3)
        self.mode, self.value, self.pad = mode, value, (1, 2) * dim

    def forward(self, x):
        y = F.relu(self.a(x))
        kwargs = {} if self.value is None else {"value": self.value}
        return self.b(F.pad(y, self.pad, mode=self.mode, **kwargs))


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("backend", ["x86", "reference"])
def test_pads_that_copy_elements_are_int8_pass_through(padding_mode, dim, backend):
    torch.manual_seed(0)
    model = Pads(padding_mode, dim=dim).eval()
    shape = (8, 3) + (8,) * dim
    batches = [(torch.randn(shape),) for _ in range(8)]
    res, stats = _quantize(model, batches, backend)
    assert stats["float_ops"] == {} and stats["int8_pass_through"] == 1, stats
    # reference: q/dq after each kernel but the last, which writes float (the graph output reads it)
    assert stats["quantize_nodes"] == (1 if backend == "x86" else 2)
    if backend == "x86":
        assert _targets(res.module).count("int8_pad") == 1
    x = torch.randn(shape)
    assert _sqnr(model(x), res.module(x)) > 25


PAD_MODULES = [nn.ReflectionPad2d((1, 2, 1, 0)), nn.ReplicationPad2d(1), nn.CircularPad2d(1), nn.ZeroPad2d((0, 1, 2, 0)),
               nn.ConstantPad2d(1, 0.0)]


@pytest.mark.parametrize("pad", PAD_MODULES, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("backend", ["x86", "reference"])
def test_pad_modules_are_int8_pass_through_like_f_pad(pad, backend):
    """A symbolic graph keeps `nn.ReflectionPad2d` and its kin as module calls, which no op view
    knew: each ran in float with a quantize after it (a CycleGAN generator: 7 float pads,
    0.65 vs 0.45 ms at batch 1; quantize tester)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), pad, nn.Conv2d(6, 6, 3)).eval()
    batches = [(torch.randn(8, 3, 10, 10),) for _ in range(8)]
    res, stats = _quantize(model, batches, backend)
    assert stats["float_ops"] == {} and stats["int8_pass_through"] == 1, stats
    if backend == "x86":
        assert _targets(res.module).count("int8_pad") == 1
    x = torch.randn(8, 3, 10, 10)
    assert _sqnr(model(x), res.module(x)) > 25


def test_a_pad_with_a_nonzero_constant_stays_float_and_says_why():
    torch.manual_seed(0)
    model = Pads("constant", value=0.5).eval()
    batches = [(torch.randn(2, 3, 8, 8),) for _ in range(3)]
    res, stats = _quantize(model, batches)
    assert stats["float_ops"] == {"pad": "pad: pads with 0.5, which need not be on its input's int8 grid "
                                         "(only 0, the zero point, always is); runs in float"}
    assert stats["quantize_nodes"] == 2 and "pad" in _targets(res.module)


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("backend", ["x86", "reference"])
def test_a_conv_with_a_padding_mode_is_int8_with_its_batchnorm_folded(padding_mode, backend):
    """Conv2d(padding_mode='reflect') stayed float, and so did its batchnorm (a U-Net's stem)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode=padding_mode), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding=(1, 2), padding_mode=padding_mode)).eval()
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    batches = [(torch.randn(8, 3, 10, 12),) for _ in range(8)]
    res, stats = _quantize(model, batches, backend)
    assert stats["float_ops"] == {} and stats["quantized"] == {"conv+bn+act": 1, "conv": 1}, stats
    assert stats["quantize_nodes"] == (1 if backend == "x86" else 2)  # the last conv writes float
    assert not any("batch_norm" in str(t) for t in _targets(res.module))
    if backend == "x86":
        assert _targets(res.module).count("int8_pad") == 2
    x = torch.randn(8, 3, 10, 12)
    assert _sqnr(model(x), res.module(x)) > 25


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate", "circular"])
def test_int8_pad_matches_the_float_pad_of_the_dequantized_values(mode):
    q = torch.quantize_per_tensor(torch.randn(2, 5, 6, 7), 0.05, 12, torch.quint8)
    for x in (q, q.contiguous(memory_format=torch.channels_last), q[:, 1:4, 1:, :-1]):
        out = int8_pad(x, [1, 2, 0, 1], mode)
        assert out.dtype == torch.quint8 and out.q_scale() == 0.05 and out.q_zero_point() == 12
        assert torch.equal(out.dequantize(), F.pad(x.dequantize(), [1, 2, 0, 1], mode=mode))
    cl = q.contiguous(memory_format=torch.channels_last)
    assert int8_pad(cl, [0, 1, 0, 1]).is_contiguous(memory_format=torch.channels_last)


def test_a_depthwise_conv_is_packed_with_onednn_a_dense_one_with_fbgemm():
    """fbgemm's depthwise kernel wants 'same' padding (at padding 0 it ran 100x slower) and
    saturates on full-range activations (see test_packing); a dense conv stays on fbgemm."""
    w = torch.quantize_per_channel(torch.randn(16, 1, 3, 3), torch.full((16,), 0.01),
                                   torch.zeros(16, dtype=torch.long), 0, torch.qint8)
    if "onednn" not in torch.backends.quantized.supported_engines:
        pytest.skip("no oneDNN quantized engine")
    assert conv_engine(w, 16) == "onednn"
    dense = torch.quantize_per_channel(torch.randn(16, 16, 3, 3), torch.full((16,), 0.01),
                                       torch.zeros(16, dtype=torch.long), 0, torch.qint8)
    assert conv_engine(dense, 1) == "x86"


def test_a_padded_int8_model_saves_and_loads(tmp_path):
    from fxopt.passes.quantize import load, save

    torch.manual_seed(0)
    model = PadNet().eval()
    batches = [(torch.randn(2, 3, 17, 17),) for _ in range(3)]
    res, _ = _quantize(model, batches)
    save(res.module, tmp_path / "m.pt")
    x = torch.randn(2, 3, 17, 17)
    assert torch.equal(load(tmp_path / "m.pt")(x), res.module(x))


# ----- clamps fused like relu / relu6 ------------------------------------------------------------

class Clamped(nn.Module):
    def __init__(self, spelling):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)
        self.act = {"clamp06": lambda x: torch.clamp(x, 0, 6), "clamp_min0": lambda x: torch.clamp(x, min=0),
                    "clamp_min": lambda x: torch.clamp_min(x, 0.0), "method": lambda x: x.clamp(min=0.0, max=0.5)}[spelling]

    def forward(self, x):
        y = self.act(self.b(self.act(self.a(x))))
        return self.act(self.fc(y.mean((2, 3))))


@pytest.mark.parametrize("spelling", ["clamp06", "clamp_min0", "clamp_min", "method"])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("backend", ["x86", "reference"])
def test_a_clamp_from_zero_after_a_conv_or_linear_is_fused(spelling, mode, backend):
    torch.manual_seed(0)
    model = Clamped(spelling).eval()
    batches = [(torch.randn(2, 3, 8, 8),) for _ in range(4)]
    res, stats = _quantize(model, batches, backend, mode)
    assert stats["quantized"] == {"conv+act": 2, "linear+act": 1}, stats
    if backend == "x86":
        targets = _targets(res.module)
        # b writes float (the mean reads it in float): its activation after oneDNN's float output
        assert targets.count("quantized.conv2d_relu.new") == 1 and targets.count("int8_conv_float_output") == 1
        # the head writes float (the graph output reads it): its activation is one float relu/hardtanh
        assert targets.count("quantized.linear_with_input_q_dq_qweight_dq_output_fp32.default") == 1
        assert not any("clamp" in t for t in targets if t)
    x = torch.randn(2, 3, 8, 8)
    assert _sqnr(model(x), res.module(x)) > 30


# ----- float_ops reasons -------------------------------------------------------------------------

def test_float_ops_say_why_each_op_stays_float():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.up = nn.ConvTranspose2d(8, 8, 3, 2)  # stride != kernel: no int8 form
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.a(torch.clamp(x, min=0.1))  # on the input: after a conv it would be fused
            y = F.silu(self.b(y)) * 2.0
            return self.bn(self.up(y))

    torch.manual_seed(0)
    batches = [(torch.randn(2, 3, 8, 8),) for _ in range(3)]
    _, stats = _quantize(Odd().eval(), batches)
    assert stats["float_ops"] == {
        "clamp": "clamp: bounds (0.1, none): fused only right after a conv/linear, or from 0 (relu6); runs in float",
        "silu": "silu: no int8 kernel in fxopt's lowering; runs in float",
        "mul": "mul: no int8 kernel in fxopt's lowering; runs in float (only add has an int8 elementwise kernel)",
        "up": "conv: transposed conv: only stride == kernel, padding 0, output_padding 0, groups 1, dilation 1 "
              "has an int8 kernel (a 1x1 conv and a depth-to-space); here kernel (3, 3), stride (2, 2); runs in "
              "float",
        "bn": "batch_norm: after the transposed conv 'up', which has no int8 kernel here: folded into nothing "
              "(run fuse before quantize: it folds the batchnorm into the float conv); kept float: its input 'up' is a float value (an int8 batchnorm reads int8 ones)",
    }, stats["float_ops"]


def test_an_add_the_cut_keeps_float_is_listed():
    """A LoRA adapter's add of a float product: int8 would convert more than it saves."""
    class LoRA(nn.Module):
        def __init__(self):
            super().__init__()
            self.base, self.A, self.B = nn.Linear(16, 16), nn.Linear(16, 4, bias=False), nn.Linear(4, 16, bias=False)

        def forward(self, x):
            return self.base(x) + self.B(self.A(x)) * 2.0

    torch.manual_seed(0)
    batches = [(torch.randn(4, 16),) for _ in range(3)]
    res, stats = _quantize(LoRA().eval(), batches)
    assert "add" in _targets(res.module)
    assert stats["float_ops"]["add"] == "add: kept float: int8 would cost more conversions than it saves", \
        stats["float_ops"]


def test_int8_pad_of_a_signed_tensor_takes_torchs_own_pad():
    """The byte-level pad reads quint8 storage; a qint8 tensor (not what fxopt's lowering
    makes, but the kernel is public) is padded by torch's quantized pad instead."""
    q = torch.quantize_per_tensor(torch.randn(2, 3, 4, 4), 0.05, 0, torch.qint8)
    out = int8_pad(q, [1, 1, 2, 0])
    assert out.dtype == torch.qint8 and out.shape == (2, 3, 6, 6)
    torch.testing.assert_close(out.dequantize(), F.pad(q.dequantize(), [1, 1, 2, 0]))


class _FrozenStem(nn.Module):
    """A frozen conv stem under torch.no_grad(): capture detaches the values leaving the block."""

    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        with torch.no_grad():
            f = F.relu(self.stem(x))
        return self.head(f)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("backend", ["x86", "reference"])
def test_the_detach_at_a_no_grad_blocks_edge_is_an_int8_pass_through(mode, backend):
    """A detach ran in float: a dequantize and a quantize at every no_grad block's edge (helper)."""
    torch.manual_seed(0)
    model = _FrozenStem().eval()
    batches = [(torch.randn(4, 3, 8, 8),) for _ in range(4)]
    res, stats = _quantize(model, batches, backend, mode)
    assert "detach" not in stats["float_ops"], stats["float_ops"]
    assert stats["quantize_nodes"] == (1 if backend == "x86" else 2), stats
    x = torch.randn(4, 3, 8, 8)
    assert _sqnr(model(x), res.module(x)) > 25
