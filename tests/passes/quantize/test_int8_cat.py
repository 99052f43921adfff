"""Int8 concatenation (`kernels.int8_cat`): the bytes of inputs already on the output grid are
copied, the others requantized, and the result is what quantizing the float cat of the
dequantized inputs onto the output grid gives. Lowering picks the output grid
(`_Lowering._cat_grid`): the cat observer's, or the grid of an input read elsewhere when that
costs less error, so that such an input needs no requantization either."""
from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.interpreter import Interpreter

import fxopt
from fxopt.passes.quantize import kernels
from fxopt.passes.quantize.kernels import int8_cat

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")


def _q(shape, scale, zp, channels_last=False, gen=None):
    x = torch.randn(*shape, generator=gen) * 100 * scale + (128 - zp) * scale * 0.5
    q = torch.quantize_per_tensor(x, scale, zp, torch.quint8)
    return q.contiguous(memory_format=torch.channels_last) if channels_last else q


def _definition(tensors, dim, scale, zp, qmin=0, qmax=255):
    """The float cat of the dequantized inputs, quantized onto the output grid."""
    x = torch.cat([t.dequantize() for t in tensors], dim)
    return torch.clamp(torch.round(x / scale) + zp, qmin, qmax).sub(zp).mul(scale)


def test_int8_cat_is_the_requantized_float_cat_any_axis_layout_and_count():
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        n_inputs = rng.randint(1, 5)
        rank = rng.choice([3, 4, 5])
        dim = rng.randrange(-rank, rank)
        shape = [rng.randint(1, 5) for _ in range(rank)]
        out_scale, out_zp = rng.uniform(0.005, 0.05), rng.randint(0, 255)
        channels_last = rank == 4 and rng.random() < 0.5
        narrow = rng.random() < 0.3
        qmin, qmax = (0, 127) if narrow else (0, 255)
        if narrow:
            out_zp = min(out_zp, 127)
        tensors = []
        for _ in range(n_inputs):
            sizes = list(shape)
            sizes[dim] = rng.randint(1, 4)
            on_grid = rng.random() < 0.5
            scale, zp = (out_scale, out_zp) if on_grid else (rng.uniform(0.005, 0.05), rng.randint(0, 255))
            t = _q(sizes, scale, zp, channels_last, gen)
            if on_grid:  # a value on the output grid holds its levels (a kernel wrote it there)
                t = torch._make_per_tensor_quantized_tensor(t.int_repr().clamp(qmin, qmax), scale, zp)
            tensors.append(t)
        y = int8_cat(tensors, dim, out_scale, out_zp, qmin, qmax)
        assert y.dtype == torch.quint8 and (y.q_scale(), y.q_zero_point()) == (out_scale, out_zp)
        assert y.int_repr().min() >= qmin and y.int_repr().max() <= qmax
        expected = _definition(tensors, dim, out_scale, out_zp, qmin, qmax)
        # exact to its definition: within half an output step (ties may round either way)
        assert (y.dequantize() - expected).abs().max() <= out_scale * 0.5 + 1e-6, trial
        # inputs already on the grid are their own bytes
        offset = 0
        for t in tensors:
            piece = y.int_repr().narrow(dim, offset, t.shape[dim])
            if (t.q_scale(), t.q_zero_point()) == (out_scale, out_zp):
                assert torch.equal(piece, t.int_repr())
            offset += t.shape[dim]
        if channels_last and dim in (1, -3):
            assert y.is_contiguous(memory_format=torch.channels_last)


def test_int8_cat_requantizes_only_the_inputs_off_the_output_grid(monkeypatch):
    scale, zp = 0.02, 100
    on = [_q((2, 8, 6, 6), scale, zp, channels_last=True) for _ in range(3)]
    off = _q((2, 8, 6, 6), 0.01, 0, channels_last=True)
    calls = []
    real = torch.quantize_per_tensor

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels.torch, "quantize_per_tensor", counting)
    y = int8_cat(on, 1, scale, zp)
    assert calls == [] and torch.equal(y.int_repr(), torch.cat([t.int_repr() for t in on], 1))
    assert y.is_contiguous(memory_format=torch.channels_last)   # what the next int8 conv reads
    y = int8_cat([on[0], off, on[1], on[2]], 1, scale, zp)
    assert calls == [off.shape]
    assert y.is_contiguous(memory_format=torch.channels_last)


class ThreeWay(nn.Module):
    """A cat of three convs (one behind a max pool, one read by another conv too) along `dim`."""

    def __init__(self, dim: int):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b, self.c = nn.Conv2d(8, 6, 1), nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(8, 6, 1)
        self.side = nn.Conv2d(6, 6, 1)
        self.head = nn.Conv2d(6 if dim != 1 else 18, 4, 1)
        self.dim = dim

    def forward(self, x):
        x = F.relu(self.stem(x))
        a = F.relu(self.a(x))
        b = self.b(x)
        c = F.max_pool2d(self.c(x), 3, stride=1, padding=1)
        y = self.head(torch.cat([a, b, c], dim=self.dim))
        return y, self.side(a)                      # `a` is read by another conv: its own grid


def _batches(n=6, shape=(4, 3, 10, 12)):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(*shape, generator=g),) for _ in range(n)]


def _check_cats(gm, example):
    """Run `gm`; every cat's output against the float cat of its dequantized inputs requantized
    onto its own grid: within half a step. Returns the (inputs' grids, output grid) per cat."""
    seen = []

    class Check(Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node.target is int8_cat:
                inputs = [self.env[i] for i in node.args[0]]
                _, dim, scale, zp, qmin, qmax = node.args
                expected = _definition(inputs, dim, scale, zp, qmin, qmax)
                assert (out.dequantize() - expected).abs().max() <= scale / 2 + 1e-6
                seen.append(([(t.q_scale(), t.q_zero_point()) for t in inputs], (scale, zp)))
            return out

    with torch.no_grad():
        Check(gm).run(*example)
    return seen


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("dim", [1, 2, 3, -1])
def test_cat_of_three_on_any_axis_both_front_ends(mode, dim):
    torch.manual_seed(0)
    model, batches = ThreeWay(dim).eval(), _batches()
    res = fxopt.optimize(model, batches[0], "quantize{backend=x86}", calibration=batches, mode=mode)
    assert res.verification.passed and res.verification.sqnr_db > 30, res.verification.summary()
    stats = res.passes[0].stats
    assert stats["shared_qparams"] == 2               # b and c's conv write on the cat's grid
    (cat,) = _check_cats(res.module, batches[1])
    in_grids, out_grid = cat
    # requantized: exactly the inputs whose grid differs from the output's (here `a`, a relu
    # on [0, x] cannot hold b's negative values: the cat keeps its observer's grid)
    assert stats["cat_requantized"] == sum(g != out_grid for g in in_grids) == 1
    assert in_grids[1] == in_grids[2] == out_grid
    assert not any(str(n.target) == "quantized.cat.default" for n in res.module.graph.nodes)


class Dense(nn.Module):
    """DenseNet-style: relu features, the first (widest) also read by a later conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)
        self.later = nn.Conv2d(8, 4, 1)
        self.head = nn.Conv2d(16, 4, 1)
        with torch.no_grad():
            self.a.weight.mul_(0.2)
            self.b.weight.mul_(0.2)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.cat([x, F.relu(self.a(x)), F.relu(self.b(x))], 1)
        return self.head(y) + self.later(x)


@pytest.mark.parametrize("backend", ["x86", "reference"])
def test_an_input_covering_the_others_gives_its_grid_and_nothing_is_requantized(backend):
    torch.manual_seed(0)
    model, batches = Dense().eval(), _batches()
    res = fxopt.optimize(model, batches[0], f"quantize{{backend={backend}}}", calibration=batches)
    assert res.verification.passed and res.verification.sqnr_db > 30, res.verification.summary()
    stats = res.passes[0].stats
    assert stats["shared_qparams"] == 2 and stats["cat_requantized"] == 0
    if backend == "x86":
        ((in_grids, out_grid),) = _check_cats(res.module, batches[1])
        assert in_grids == [out_grid] * 3
        stem = next(n for n in res.module.graph.nodes if str(n.target) == "quantized.conv2d_relu.new")
        assert tuple(stem.args[2:4]) == out_grid      # the stem's own grid is the cat's


class _Up(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
        self.conv = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    def forward(self, x1, x2):
        x1 = self.up(x1)
        dy, dx = x2.size()[2] - x1.size()[2], x2.size()[3] - x1.size()[3]   # reads sizes only
        x1 = F.pad(x1, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([x2, x1], dim=1))


class SmallUNet(nn.Module):
    """milesial/Pytorch-UNet's structure (bilinear=False), two levels, widths 8-32."""

    def __init__(self):
        super().__init__()
        block = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())  # noqa: E731
        self.inc, self.d1, self.d2 = block(3, 8), block(8, 16), block(16, 32)
        self.u1, self.u2 = _Up(32, 16), _Up(16, 8)
        self.outc = nn.Conv2d(8, 2, 1)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.ConvTranspose2d):
                    m.weight.normal_(0.0, (2.0 / m.in_channels) ** 0.5)

    def forward(self, x):
        s1 = self.inc(x)
        s2 = self.d1(F.max_pool2d(s1, 2))
        x = self.d2(F.max_pool2d(s2, 2))
        return self.outc(self.u2(self.u1(x, s2), s1))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_unet_cats_copy_the_up_path_and_requantize_the_skip_alone(mode):
    torch.manual_seed(0)
    model, batches = SmallUNet().eval(), _batches(shape=(4, 3, 16, 16))
    res = fxopt.optimize(model, batches[0], "quantize{backend=x86}", calibration=batches, mode=mode)
    assert res.verification.passed and res.verification.sqnr_db > 35, res.verification.summary()
    stats = res.passes[0].stats
    # the up-sampled path (whose size the pad reads) is written on the cat's grid; the skip,
    # which the max pool reads too, is requantized, once per cat
    assert stats["shared_qparams"] == 2 and stats["cat_requantized"] == 2
    assert stats["quantize_nodes"] == 1 and stats["dequantize_nodes"] == 0  # outc writes float
    cats = _check_cats(res.module, batches[1])
    assert [ins[1] == out for ins, out in cats] == [True, True]
    layouts = []

    class Layout(Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node.target is int8_cat:
                layouts.append(out.is_contiguous(memory_format=torch.channels_last))
            return out

    with torch.no_grad():
        Layout(res.module).run(*batches[1])
    assert layouts == [True, True]                   # what the next int8 conv reads as it is
