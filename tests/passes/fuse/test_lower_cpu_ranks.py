"""`lower-cpu` on conv1d (run as a conv2d of height 1) and conv3d (channels-last-3d): what is
lowered, numerics at other batch sizes and lengths, the layouts handed on and back."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.passes.fuse import lower_cpu
from fxopt.passes.fuse.lower_cpu import ConvByBatch
from fxopt.patterns import annotations

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
MODES = ("symbolic", "export")


def _with_stats(bn):
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.3, 3)
        bn.weight.uniform_(0.5, 2)
    return bn


class TCN(nn.Module):
    """Dilated residual conv1d blocks, a depthwise conv, a strided 1x1 and a head that views the
    features (which needs them row-major)."""

    def __init__(self, c=32):
        super().__init__()
        self.c0, self.b0 = nn.Conv1d(8, c, 5, padding=2), _with_stats(nn.BatchNorm1d(c))
        self.c1, self.b1 = nn.Conv1d(c, c, 3, padding=2, dilation=2), _with_stats(nn.BatchNorm1d(c))
        self.dw = nn.Conv1d(c, c, 3, padding=1, groups=c)
        self.down = nn.Conv1d(c, 2 * c, 1, stride=2)
        self.c2 = nn.Conv1d(2 * c, 2 * c, 3, padding=1)
        self.fc = nn.Linear(2 * c, 5)

    def forward(self, x):
        h = F.relu(self.b0(self.c0(x)))
        h = F.relu(self.b1(self.c1(h)) + h)
        h = F.gelu(self.dw(h))
        h = self.down(h)
        h = self.c2(h) + h
        n, c, t = h.shape
        return self.fc(h.view(n, c, t).mean(-1)), h


class Video(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0, self.b0 = nn.Conv3d(3, 8, 3, padding=1), _with_stats(nn.BatchNorm3d(8))
        self.dw = nn.Conv3d(8, 8, 3, padding=1, groups=8)
        self.c1 = nn.Conv3d(8, 16, 3, padding=1, stride=(1, 2, 2))
        self.pw = nn.Conv3d(16, 16, 1)

    def forward(self, x):
        h = F.relu(self.b0(self.c0(x)))
        h = F.hardswish(self.dw(h)) + h
        h = self.c1(h)
        h = F.relu(self.pw(h) + h)
        return h.view(h.shape[0], -1).mean(1), h


def _kernels(gm):
    """Fused label per oneDNN conv node of the graph (the kernels that run at every batch)."""
    return sorted(annotations(n).get("fused") for n in gm.graph.nodes if annotations(n).get("lowered") == "mkldnn")


def _check_outputs(gm, model, shapes):
    for shape in shapes:
        x = torch.randn(*shape)
        with torch.no_grad():
            got, want = gm(x), model(x)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
            assert g.is_contiguous(), "a lowered model hands back row-major outputs, as eager does"


@pytest.mark.parametrize("mode", MODES)
def test_conv1d_is_lowered_as_a_conv2d_of_height_1(mode):
    torch.manual_seed(0)
    model = TCN().eval()
    res = fxopt.optimize(model, (torch.randn(2, 8, 64),), "fuse,lower-cpu{min_macs=0}", mode=mode)
    assert res.verification.passed, res.summary()
    gm = res.module
    assert _kernels(gm) == ["conv", "conv+add", "conv+add+relu", "conv+gelu", "conv+relu"]
    # consecutive lowered convs hand each other the 4-D channels-last result: the only layout
    # copy is the model input's
    copies = [n for n in gm.graph.nodes if n.target == "contiguous" and n.kwargs.get("memory_format")]
    assert len(copies) == 1 and copies[0].args[0].args[0].op == "placeholder"
    other_lengths = [(3, 8, 50), (16, 8, 128)] if mode == "symbolic" else [(16, 8, 64)]  # export fixes them
    _check_outputs(gm, model, [(1, 8, 64), *other_lengths])


@pytest.mark.parametrize("mode", MODES)
def test_conv3d_is_lowered_channels_last_3d(mode):
    torch.manual_seed(0)
    model = Video().eval()
    res = fxopt.optimize(model, (torch.randn(2, 3, 4, 8, 8),), "fuse,lower-cpu{min_macs=0}", mode=mode)
    assert res.verification.passed, res.summary()
    assert _kernels(res.module) == ["conv", "conv+add+relu", "conv+hardswish", "conv+relu"]
    _check_outputs(res.module, model, [(1, 3, 4, 8, 8), (3, 3, 2, 12, 12) if mode == "symbolic" else (3, 3, 4, 8, 8)])


def _switches(gm):
    return sorted((annotations(n).get("fused"), annotations(n)["lowered"]) for n in gm.graph.nodes
                  if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ConvByBatch))


def test_the_cost_rule_holds_for_every_rank():
    """Small dense conv2d switch to oneDNN from batch 2 (aten is cheaper for one sample); a small
    dense conv1d stays on aten (in a network the layout copies cost more than the kernel saves);
    a grouped or dilated one, and a conv3d with a kernel over 1, are always lowered (aten runs
    them on slow generic loops); a small 1x1x1 is a GEMM on aten and switches like a 1x1 conv2d."""
    cases = [(nn.Conv1d(8, 8, 3, padding=1), (2, 8, 32), [], []),
             (nn.Conv2d(8, 8, 3, padding=1), (2, 8, 8, 8), [], [("conv+relu", "mkldnn from batch 2")]),
             (nn.Conv1d(8, 8, 3, padding=2, dilation=2), (2, 8, 32), ["conv+relu"], []),  # aten: a slow loop
             (nn.Conv2d(16, 16, 3, padding=1, groups=2), (2, 16, 8, 8), ["conv+relu"], []),  # loops over groups
             (nn.Conv3d(8, 8, 3, padding=1), (2, 8, 4, 8, 8), ["conv+relu"], []),
             (nn.Conv3d(8, 8, 1), (2, 8, 4, 8, 8), [], [("conv+relu", "mkldnn from batch 489")])]
    for conv, shape, always, switch in cases:
        model = nn.Sequential(conv, nn.ReLU()).eval()
        res = fxopt.optimize(model, (torch.randn(*shape),), "lower-cpu", mode="symbolic")
        assert res.verification.passed and (_kernels(res.module), _switches(res.module)) == (always, switch), conv
        for batch in (1, 3):
            x = torch.randn(batch, *shape[1:])
            torch.testing.assert_close(res.module(x), model(x), rtol=1e-4, atol=1e-4)


def test_a_small_dense_conv1d_stays_on_aten_and_min_macs_0_lowers_it():
    """Fuse tester: a TCN's small dense conv1d behind the batch switch ran 1.1-1.7x slower than
    `fuse` from batch 4 (the layout copies around each call)."""
    model = nn.Sequential(nn.Conv1d(8, 16, 3, padding=1, stride=2), nn.ReLU()).eval()
    res = fxopt.optimize(model, (torch.randn(2, 8, 32),), "lower-cpu", mode="symbolic")
    assert _kernels(res.module) == [] and _switches(res.module) == []
    lowered = fxopt.optimize(model, (torch.randn(2, 8, 32),), "lower-cpu{min_macs=0}", mode="symbolic").module
    assert _kernels(lowered) == ["conv+relu"]
    for batch in (1, 2, 5):
        x = torch.randn(batch, 8, 32)
        torch.testing.assert_close(lowered(x), model(x), rtol=1e-4, atol=1e-4)


class _DilatedBlocks(nn.Module):
    """A TCN: ``x + relu(conv(x))`` blocks of dilated conv1d, from the model input on."""

    def __init__(self, c=16):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(c, c, 3, padding=d, dilation=d) for d in (2, 4, 8))

    def forward(self, x):
        for conv in self.convs:
            x = x + torch.relu(conv(x))
        return x


@pytest.mark.parametrize("mode", MODES)
def test_a_residual_add_reads_the_conv1d_inputs_channels_last_copy(mode):
    """Fuse tester: the add read the row-major input next to the channels-last conv output, a
    strided add whose row-major result the next conv copied again, every block (1.14-1.40x
    `fuse` at batch 16). Now the one layout copy is the model input's."""
    torch.manual_seed(0)
    model = _DilatedBlocks().eval()
    res = fxopt.optimize(model, (torch.randn(2, 16, 64),), "fuse,lower-cpu", mode=mode)
    gm = res.module
    assert res.verification.passed and _kernels(gm) == ["conv+relu"] * 3
    copied = []

    class Run(torch.fx.Interpreter):  # which layout requests copy at run time (a no-op returns its input)
        def call_method(self, target, args, kwargs):
            out = super().call_method(target, args, kwargs)
            if target == "contiguous" and kwargs.get("memory_format") is not None:
                copied.append(out.data_ptr() != args[0].data_ptr())
            return out

    with torch.no_grad():
        Run(gm).run(torch.randn(4, 16, 64))
    assert copied == [True, False, False]  # the input's copy; each add after is channels-last already
    _check_outputs(gm, model, [(1, 16, 64), (5, 16, 64)])


def test_unbatched_convs_are_left_alone():
    model = nn.Sequential(nn.Conv1d(4, 4, 3), nn.ReLU()).eval()
    res = fxopt.optimize(model, (torch.randn(4, 16),), "lower-cpu{min_macs=0}", mode="symbolic")
    assert _kernels(res.module) == [] and res.verification.passed


class _Net2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0, self.dw = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.c1 = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.c0(x))
        return self.c1(F.relu(self.dw(h))) + h


@pytest.mark.parametrize("model, shape", [(_Net2d(), (2, 3, 12, 12)), (TCN(), (2, 8, 32))],
                         ids=["conv2d", "conv1d"])
def test_a_lowered_graph_called_unbatched_names_the_input_and_the_fix(model, shape):
    """Eager's convs take an unbatched input; the lowered graph's layout copies and packs are
    built for the batched rank: torch's "required rank 4 tensor to use channels_last format"
    before, or (a conv2d's unbatched input taken for a lifted conv1d one) C read as the batch."""
    torch.manual_seed(0)
    model = model.eval()
    gm = fxopt.optimize(model, (torch.randn(*shape),), "fuse,lower-cpu{min_macs=0}", mode="symbolic").module
    checks = [n for n in gm.graph.nodes if n.target is lower_cpu.require_rank]
    assert [(n.args[0].op, n.args[1]) for n in checks] == [("placeholder", len(shape))]
    with pytest.raises(fxopt.InputMismatchError,
                       match=rf"input 'x' has {len(shape) - 1} dims where the graph lower-cpu made takes {len(shape)}"
                             r".*x\.unsqueeze\(0\)"):
        gm(torch.randn(*shape[1:]))
    _check_outputs(gm, model, [(1, *shape[1:])])  # batched calls run on


def test_an_input_reshaped_to_the_lowered_rank_takes_what_eager_takes():
    """A clip of frames folded into the batch before a lowered conv2d: the input's rank is not
    what the kernels are specialized to, so it is not checked (``x.flatten(0, 1)`` of a 6-D input
    runs, as in eager)."""
    class Frames(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 8, 3, padding=1, groups=1, dilation=2)

        def forward(self, x):
            return F.relu(self.c(x.flatten(0, -4)))

    model = Frames().eval()
    gm = fxopt.optimize(model, (torch.randn(2, 4, 3, 10, 10),), "lower-cpu", mode="symbolic").module
    assert _kernels(gm) == ["conv+relu"]
    assert not [n for n in gm.graph.nodes if n.target is lower_cpu.require_rank]
    x = torch.randn(2, 2, 3, 3, 10, 10)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)


def test_a_lowered_conv1d_model_survives_torch_save_and_load():
    torch.manual_seed(0)
    model = TCN().eval()
    gm = fxopt.optimize(model, (torch.randn(2, 8, 64),), "fuse,lower-cpu", mode="symbolic").module
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for x in (torch.randn(1, 8, 64), torch.randn(4, 8, 64)):
        for a, b in zip(loaded(x), gm(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dim", [1, 2, 3, -1])
def test_a_users_unsqueeze_of_a_lowered_conv1d_is_not_taken_for_the_lift(dim):
    """An audio front end: Conv1d features, then a Conv2d over (feature, time) through
    ``h.unsqueeze(1)``. The lowering's own lift of a conv1d input is an unsqueeze(2) it marks;
    a user's unsqueeze(3) was swapped for the lifted conv result (wrong shape), unsqueeze(1)
    made every call fail inside oneDNN."""
    class FrontEnd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1d = nn.Conv1d(4, 8, 3, padding=1)
            channels = 1 if dim == 1 else 8
            self.conv2d = nn.Conv2d(channels, 4, 3, padding=1)

        def forward(self, x):
            return self.conv2d(self.conv1d(x).unsqueeze(dim))

    torch.manual_seed(0)
    model, x = FrontEnd().eval(), torch.randn(2, 4, 20)
    res = fxopt.optimize(model, (x,), "fuse,lower-cpu{min_macs=0}", mode="symbolic")
    assert res.verification.passed, res.summary()
    assert len(_kernels(res.module)) == 2
    for batch in (1, 3):
        xb = torch.randn(batch, 4, 20)
        torch.testing.assert_close(res.module(xb), model(xb), rtol=1e-4, atol=1e-4)


def test_an_output_of_any_rank_computed_from_a_lowered_layout_is_row_major():
    """``conv1d(x)[0, 0]`` is a strided view of the channels-last result (stride (C,) where
    eager's is (1,), row-major): every output the lowering's layouts reach is made contiguous."""
    class Picks(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 16, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return y[0, 0], y[:, 1]

    model, x = Picks().eval(), torch.randn(2, 4, 20)
    res = fxopt.optimize(model, (x,), "lower-cpu{min_macs=0}", mode="symbolic")
    assert _kernels(res.module) == ["conv"]
    for got, want in zip(res.module(x), model(x)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert got.is_contiguous() or not want.is_contiguous()


def test_the_rank_check_survives_torch_save_and_load():
    """Adversary: torch.load traces the code again, and a plain function call was not recorded:
    the loaded graph took an unbatched call and read C as the batch (1.87 off)."""
    torch.manual_seed(0)
    model = _Net2d().eval()
    gm = fxopt.optimize(model, (torch.randn(2, 3, 12, 12),), "fuse,lower-cpu{min_macs=0}", mode="symbolic").module
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with pytest.raises(fxopt.InputMismatchError, match="has 3 dims"):
        loaded(torch.randn(3, 12, 12))


class _FromDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _Net2d()

    def forward(self, batch):
        return self.net(batch["image"])


def test_an_image_inside_a_dict_input_is_checked_by_its_key():
    """Adversary: a container input has no tensor metadata, so its items were never checked (an
    unbatched image ran, 1.87 off)."""
    torch.manual_seed(0)
    model = _FromDict().eval()
    gm = fxopt.optimize(model, ({"image": torch.randn(2, 3, 12, 12)},), "fuse,lower-cpu{min_macs=0}",
                        mode="symbolic").module
    with pytest.raises(fxopt.InputMismatchError, match=r"input \"batch\['image'\]\" has 3 dims"):
        gm({"image": torch.randn(3, 12, 12)})
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(gm({"image": x}), model({"image": x}), rtol=1e-4, atol=1e-4)


def test_an_input_viewed_to_the_captured_rank_is_not_checked():
    """Adversary: MNIST's ``x.view(-1, 1, 28, 28)`` keeps the rank of a 4-D example, so the walk
    went through it and refused (N, 784) and (1, 28, 28) calls eager takes."""
    class Mnist(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, padding=1, dilation=1, groups=1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)

        def forward(self, x):
            return F.relu(self.dw(F.relu(self.conv(x.view(-1, 1, 28, 28))))).mean((2, 3))

    torch.manual_seed(0)
    model = Mnist().eval()
    gm = fxopt.optimize(model, (torch.randn(2, 1, 28, 28),), "fuse,lower-cpu{min_macs=0}", mode="symbolic").module
    assert not [n for n in gm.graph.nodes if n.target is lower_cpu.require_rank]
    for shape in ((4, 784), (1, 28, 28)):
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


def test_an_image_in_a_dataclass_input_is_checked_by_its_field():
    """Adversary: a dataclass or namedtuple field is a `getattr` of the input, which the walk
    did not follow: an unbatched `Batch(x=...)` gave a (8, 64) result where eager gives (64, 8)."""
    import dataclasses

    @dataclasses.dataclass
    class Batch:
        x: torch.Tensor

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _Net2d()

        def forward(self, b):
            return self.net(b.x)

    torch.manual_seed(0)
    model = Model().eval()
    gm = fxopt.optimize(model, (Batch(torch.randn(2, 3, 12, 12)),), "fuse,lower-cpu{min_macs=0}",
                        mode="symbolic").module
    with pytest.raises(fxopt.InputMismatchError, match=r"input 'b\.x' has 3 dims"):
        gm(Batch(torch.randn(3, 12, 12)))
