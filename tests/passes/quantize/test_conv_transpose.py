"""Transposed convs in int8: one with stride == kernel, no padding and one group (a U-Net's
`ConvTranspose2d(c, c // 2, 2, stride=2)`) is a 1x1 int8 conv with one output channel per kernel
tap and output channel (per-channel weights) followed by `kernels.depth_to_space`; a batchnorm
after it is folded, a relu fused. Every other transposed conv stays float, saying why. torch's own
int8 transposed convs are not used: oneDNN's and fbgemm's direct path compute wrong values, the
rest of fbgemm's ran slower than float (docs/benchmarks.md)."""
from __future__ import annotations

import io
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.passes.quantize import load, save
from fxopt.passes.quantize.kernels import depth_to_space, subpixel_weight
from fxopt.passes.quantize.lower import cpu_has_vnni, lower_module
from fxopt.passes.quantize.observers import quantize_weight
from fxopt.passes.quantize.packing import prepack_conv

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")

CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
QCONV = {1: torch.ops.quantized.conv1d.default, 2: torch.ops.quantized.conv2d.new, 3: torch.ops.quantized.conv3d.new}
#: What fbgemm's dense kernels may read here: 8 bits with AVX512-VNNI, else 7 (reduce_range=auto).
QMAX = 255 if cpu_has_vnni() else 127


def _names(gm):
    return [getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes
            if n.op in ("call_function", "call_method", "call_module")]


def _sqnr(ref, out):
    return (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())).item()


def _quantize(model, batches, backend="x86", mode="symbolic"):
    res = fxopt.optimize(model, batches[0], f"quantize{{backend={backend}}}", calibration=batches, mode=mode)
    return res.module, res.passes[0].stats


# ----- the int8 form, op by op ---------------------------------------------------------------------

def _case(rng: random.Random, dim: int):
    cin, cout, n = rng.randint(1, 40), rng.randint(1, 40), rng.randint(1, 3)
    kernel = [rng.choice([1, 2, 2, 3, 4]) for _ in range(dim)]
    size = [rng.randint(1, {1: 12, 2: 7, 3: 4}[dim]) for _ in range(dim)]
    return cin, cout, n, kernel, size


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_the_subpixel_form_is_the_transposed_conv_in_float(dim):
    rng = random.Random(dim)
    for _ in range(30):
        cin, cout, n, kernel, size = _case(rng, dim)
        w, b, x = torch.randn(cin, cout, *kernel), torch.randn(cout), torch.randn(n, cin, *size)
        w1, b1 = subpixel_weight(w, b)
        got = depth_to_space(CONV[dim](x, w1, b1), kernel)
        torch.testing.assert_close(got, CONV_T[dim](x, w, b, stride=kernel), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_the_int8_form_is_within_half_a_step_of_the_float_op_on_its_operands(dim):
    """Randomized: channels, kernel (== stride), batch, sizes, input zero points including 0
    and the top, inputs at the extremes of the grid and weights at +-127 (where a uint8 x int8
    pair sum in int16 would saturate), channels-last and contiguous inputs."""
    rng = random.Random(10 + dim)
    torch.manual_seed(dim)
    for i in range(40):
        cin, cout, n, kernel, size = _case(rng, dim)
        zp = rng.choice([0, 60, QMAX // 2 + 1, QMAX])
        x_int = (torch.randint(0, QMAX + 1, (n, cin, *size)) if i % 2
                 else torch.randint(0, 2, (n, cin, *size)) * QMAX).to(torch.uint8)
        qx = torch._make_per_tensor_quantized_tensor(x_int, 0.05, zp)
        if dim == 2 and i % 3 == 0:
            qx = qx.contiguous(memory_format=torch.channels_last)
        w = torch.randn(cin, cout, *kernel)
        if i % 4 == 0:
            w = torch.sign(w)  # every weight at +-127 after quantization
        bias = torch.randn(cout)
        w1, b1 = subpixel_weight(w, bias)
        qw = quantize_weight(w1)
        packed = prepack_conv(qw, b1, [1] * dim, [0] * dim, [1] * dim, 1)
        # the reference: the float transposed conv on the dequantized operands (the int8 1x1
        # weight laid back out as the transposed weight it stands for)
        taps = qw.dequantize().reshape(*kernel, cout, cin)
        w_deq = taps.permute(dim + 1, dim, *range(dim))
        ref = CONV_T[dim](qx.dequantize(), w_deq, bias, stride=kernel)
        lo, hi = min(ref.min().item(), 0.0), max(ref.max().item(), 0.0)
        scale = max(hi - lo, 1e-3) / 255
        out_zp = min(max(round(-lo / scale), 0), 255)
        y = depth_to_space(QCONV[dim](qx, packed, scale, out_zp), kernel)
        assert y.shape == ref.shape and y.q_scale() == scale and y.q_zero_point() == out_zp
        steps = ((y.int_repr().double() - out_zp) - ref.double() / scale).abs().max().item()
        assert steps <= 0.5 + 1e-3, (i, cin, cout, n, kernel, size, zp, steps)


def test_depth_to_space_moves_the_bytes_of_a_channels_last_tensor():
    x = torch.randn(2, 4 * 6, 5, 3)
    q = torch.quantize_per_tensor(x, 0.03, 7, torch.quint8).contiguous(memory_format=torch.channels_last)
    y = depth_to_space(q, [2, 2])
    assert y.is_quantized and (y.q_scale(), y.q_zero_point()) == (0.03, 7)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.dequantize(), depth_to_space(q.dequantize(), [2, 2]), rtol=0, atol=0)


# ----- lowering ------------------------------------------------------------------------------------

class UpNet(nn.Module):
    """A U-Net's decoder step in `dim` dimensions: transposed conv [+ batchnorm + relu], cat with
    the skip, conv."""

    def __init__(self, dim=2, c=8, bn=True, functional=False):
        super().__init__()
        conv, convt, norm = {1: (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d),
                             2: (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d),
                             3: (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d)}[dim]
        self.dim, self.functional = dim, functional
        self.enc = conv(3, c, 3, padding=1)
        self.down = conv(c, 2 * c, 3, stride=2, padding=1)
        self.up = convt(2 * c, c, 2, stride=2)
        nn.init.normal_(self.up.weight, 0.0, (2.0 / (2 * c)) ** 0.5)  # the up path matters
        self.bn = norm(c) if bn else nn.Identity()
        self.dec = conv(2 * c, c, 3, padding=1)
        if bn:
            with torch.no_grad():
                self.bn.running_mean.uniform_(-0.2, 0.2)
                self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        e = F.relu(self.enc(x))
        d = F.relu(self.down(e))
        if self.functional:
            u = CONV_T[self.dim](d, self.up.weight, self.up.bias, stride=2)
        else:
            u = self.up(d)
        u = F.relu(self.bn(u))
        return self.dec(torch.cat([u, e], 1))


def _batches(dim, n=4, size=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = size or {1: 32, 2: 16, 3: 8}[dim]
    return [(torch.randn(4, 3, *[size] * dim, generator=g),) for _ in range(n)]


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("functional", [False, True])
def test_a_unet_decoder_step_runs_its_transposed_conv_in_int8(mode, functional):
    torch.manual_seed(0)
    model = UpNet(functional=functional).eval()
    batches = _batches(2)
    gm, stats = _quantize(model, batches, "x86", mode)
    names = _names(gm)
    assert names.count("depth_to_space") == 1
    assert not any("conv_transpose" in n or n == "convolution.default" for n in names), names
    assert "batch_norm" not in " ".join(names)
    assert "up" not in stats["float_ops"] and "conv_transpose2d" not in stats["float_ops"], stats["float_ops"]
    # the whole model is one int8 region: one quantize (the input); the last conv writes float
    assert (stats["quantize_nodes"], stats["dequantize_nodes"]) == (1, 0)
    assert names.count("int8_conv_float_output") == 1
    assert stats["quantized"].get("conv+bn+act") == 1, stats["quantized"]
    x = _batches(2, n=1, seed=9)[0]
    with torch.no_grad():
        ref, out = model(*x), gm(*x)
    assert _sqnr(ref, out) > 33, _sqnr(ref, out)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_x86_agrees_with_the_reference_backend_within_a_step(mode, dim):
    """The x86 graph (1x1 int8 conv + byte depth-to-space) against the reference graph (float
    conv on dequantized operands, rounded): the same int8 values, up to one step where the
    float sums round the other way."""
    torch.manual_seed(dim)
    model = UpNet(dim=dim, bn=False).eval()
    batches = _batches(dim)
    observed = fxopt.optimize(model, batches[0], "insert-observers{reduce_range=true}", mode=mode, verify=False).module
    fxopt.calibrate(observed, batches, progress=False)
    x86, _ = lower_module(observed, "x86")
    reference, _ = lower_module(observed, "reference")
    assert "depth_to_space" in _names(x86) and "depth_to_space" in _names(reference)
    x = _batches(dim, n=1, seed=5)[0]
    with torch.no_grad():
        a, b = x86(*x), reference(*x)
    # the output conv's scale bounds one step of everything before it; allow one of its own
    step = (b.max() - b.min()).item() / 127
    assert (a - b).abs().max().item() <= 4 * step
    assert _sqnr(b, a) > 35


@pytest.mark.parametrize("dim", [1, 3])
def test_1d_and_3d_transposed_convs_are_int8_too(dim):
    torch.manual_seed(0)
    model = UpNet(dim=dim).eval()
    batches = _batches(dim)
    gm, stats = _quantize(model, batches)
    assert _names(gm).count("depth_to_space") == 1 and stats["quantized"].get("conv+bn+act") == 1
    x = _batches(dim, n=1, seed=3)[0]
    with torch.no_grad():
        assert _sqnr(model(*x), gm(*x)) > 30


def test_a_quantized_unet_step_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = UpNet().eval()
    batches = _batches(2)
    gm, _ = _quantize(model, batches)
    buffer = io.BytesIO()
    save(gm, buffer)
    buffer.seek(0)
    loaded = load(buffer)
    x = batches[1][0]
    torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)


# ----- what stays float ------------------------------------------------------------------------

class Other(nn.Module):
    def __init__(self, up: nn.Module, cin=8, bn=False):
        super().__init__()
        self.conv = nn.Conv2d(3, cin, 3, padding=1)
        self.up = up
        self.bn = nn.BatchNorm2d(up.out_channels) if bn else nn.Identity()
        self.head = nn.Conv2d(up.out_channels, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.up(F.relu(self.conv(x))))))


@pytest.mark.parametrize("up, why", [
    (nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1), "kernel (4, 4), stride (2, 2), padding (1, 1); runs"),
    (nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1),
     "kernel (3, 3), stride (2, 2), padding (1, 1), output_padding (1, 1); runs"),
    (nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2), "kernel (2, 2), groups 2; runs"),
    (nn.ConvTranspose2d(8, 8, 2, stride=1), "kernel (2, 2), stride (1, 1); runs"),
    # the rule's values all met but the dilation: it used to list the others and not name it
    (nn.ConvTranspose2d(8, 8, 2, stride=2, dilation=2), "kernel (2, 2), dilation (2, 2); runs"),
])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_other_transposed_convs_stay_float_and_say_why(up, why, mode):
    torch.manual_seed(0)
    model = Other(up, bn=True).eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)
    batches = [(torch.randn(2, 3, 8, 8),) for _ in range(3)]
    gm, stats = _quantize(model, batches, mode=mode)
    reasons = {k: v for k, v in stats["float_ops"].items() if v.startswith("conv:")}
    assert len(reasons) == 1, stats["float_ops"]
    (name, reason), = reasons.items()
    assert reason.startswith("conv: transposed conv: only stride == kernel, padding 0, output_padding 0, groups 1, "
                             "dilation 1")
    assert why in reason and reason.endswith("runs in float")
    bn_reason = next(v for v in stats["float_ops"].values() if v.startswith("batch_norm"))
    assert "which has no int8 kernel here: folded into nothing (run fuse before quantize: it folds the " \
           "batchnorm into the float conv); kept float: its input '" in bn_reason, bn_reason
    assert bn_reason.endswith("is a float value (an int8 batchnorm reads int8 ones)"), bn_reason
    assert "depth_to_space" not in _names(gm)
    x = batches[1][0]
    with torch.no_grad():
        assert _sqnr(model(x), gm(x)) > 30


def test_a_transposed_conv_called_with_output_size_stays_float():
    class Sized(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.up = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ConvTranspose2d(8, 4, 2, stride=2)

        def forward(self, x):
            return self.up(F.relu(self.conv(x)), output_size=[x.shape[2] + 1, x.shape[3] + 1])

    torch.manual_seed(0)
    model = Sized().eval()
    batches = [(torch.randn(2, 3, 9, 9),) for _ in range(3)]
    res = fxopt.optimize(model, batches[0], "quantize", calibration=batches, mode="symbolic")
    assert res.passes[0].stats["float_ops"]["up"] == ("conv: transposed conv called with output_size: no int8 kernel; "
                                                        "runs in float")
    with torch.no_grad():
        torch.testing.assert_close(res.module(batches[1][0]).shape, model(batches[1][0]).shape)
