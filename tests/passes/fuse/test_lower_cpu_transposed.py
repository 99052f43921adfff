"""`lower-cpu` on transposed convs: a dense ConvTranspose2d [+ the batchnorm shift `fuse` adds
after it] [+ activation] becomes one oneDNN `_convolution_transpose_pointwise` call on
channels-last values with the shift as its bias (aten's ran row-major, 0.56-0.85x the time now:
tools/ab_lower_conv_transpose.py); what is not lowered says why."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.passes.fuse import lower_cpu
from fxopt.patterns import annotations

pytestmark = pytest.mark.skipif(not lower_cpu.mkldnn_available(), reason="needs oneDNN")
TRANSPOSED = torch.ops.mkldnn._convolution_transpose_pointwise.default


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.3, 3), bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    return bn


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.t1, self.b1 = nn.ConvTranspose2d(16, 16, 4, 2, 1, bias=False), _bn(16)
        self.t2, self.b2 = nn.ConvTranspose2d(16, 8, 3, 2, 1, output_padding=1), _bn(8)  # bias and shift
        self.t3 = nn.ConvTranspose2d(8, 8, 3, 1, 2, dilation=2)  # a bias of its own, no batchnorm
        self.t4 = nn.ConvTranspose2d(8, 8, 2, 2)

    def forward(self, x):
        h = F.relu(self.b1(self.t1(x)))
        h = F.hardswish(self.b2(self.t2(h)))
        h = self.t3(h) + h  # a residual, not a per-channel shift: added after the lowered conv
        return torch.sigmoid(self.t4(h))


def _lowered(gm):
    return sorted(annotations(n)["fused"] for n in gm.graph.nodes if n.target is TRANSPOSED)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_transposed_conv_decoder_is_lowered_and_equal_to_eager(mode):
    torch.manual_seed(0)
    model = Decoder().eval()
    res = fxopt.optimize(model, (torch.randn(2, 16, 16, 16),), "fuse,lower-cpu", mode=mode)
    assert res.verification.passed, res.summary()
    gm = res.module
    assert _lowered(gm) == ["conv_transpose", "conv_transpose+shift+hardswish", "conv_transpose+shift+relu",
                            "conv_transpose+sigmoid"]
    aten_calls = [n for n in gm.graph.nodes if n.op == "call_function" and "conv_transpose" in str(n.target)
                  or n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.modules.conv._ConvTransposeNd)]
    assert not aten_calls, gm.code  # no aten call left
    for batch in (1, 5):
        x = torch.randn(batch, 16, 16, 16)
        with torch.no_grad():
            got, want = gm(x), model(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert got.is_contiguous(), "a lowered model hands back row-major outputs, as eager does"


class Kept(nn.Module):
    def __init__(self):
        super().__init__()
        self.grouped = nn.ConvTranspose2d(8, 8, 3, 2, 1, groups=2)
        self.sized = nn.ConvTranspose2d(8, 8, 3, 2, 1)
        self.one_d = nn.ConvTranspose1d(8, 8, 3, 2, 1)

    def forward(self, x):
        y = self.sized(self.grouped(x), output_size=[22, 22])
        return y, self.one_d(y.flatten(2))


def test_transposed_convs_oneDNN_does_not_take_stay_on_aten_and_say_why():
    torch.manual_seed(0)
    model, x = Kept().eval(), torch.randn(2, 8, 6, 6)
    res = fxopt.optimize(model, (x,), "lower-cpu", mode="symbolic")
    assert res.verification.passed and _lowered(res.module) == []
    reasons = {r for r in map(str, [lower_cpu._conv_transpose_check(v) for v in _conv_views(res.module)])}
    assert reasons == {"a grouped transposed conv stays on aten",
                       "an output_size given at the call (its output padding is computed per call)",
                       "only a float32 CPU conv_transpose2d is lowered"}, reasons


def _conv_views(gm):
    from fxopt.ir import op_view
    return [v for n in gm.graph.nodes if (v := op_view(gm, n)) is not None and v.kind == "conv"]


def test_a_lowered_transposed_conv_packs_its_weight_once_per_shape():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(8, 8, 4, 2, 1), nn.ReLU()).eval()
    gm = fxopt.optimize(model, (torch.randn(2, 8, 5, 5),), "lower-cpu{min_macs=0}").module
    packs = [m for m in gm.modules() if isinstance(m, lower_cpu.WeightPacks)]
    assert [p.kind for p in packs] == ["conv_transpose"]
    with torch.no_grad():
        for shape in ((2, 8, 5, 5), (2, 8, 5, 5), (3, 8, 7, 7)):
            x = torch.randn(*shape)
            torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)
    assert len(packs[0].packs) == 2  # one per input shape, reused on the second call


class SizedUp(nn.Module):
    """A U-Net's up-sampler told its output size (odd skip sizes): the output padding is
    computed per call, from the size given."""

    def __init__(self):
        super().__init__()
        self.up, self.bn = nn.ConvTranspose2d(8, 8, 3, 2, 1, bias=False), _bn(8)

    def forward(self, x, skip):
        return torch.relu(self.bn(self.up(x, output_size=skip.shape[-2:]))) + skip


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_transposed_conv_called_with_an_output_size_keeps_it(mode):
    """`fuse` rebuilt the folded conv from the module's attributes and dropped the output size:
    "the replacement computes float32[2, 8, 11, 11] where the matched value is [2, 8, 12, 12]",
    a failed pipeline (and lower-cpu, the output one row short). A symbolic graph keeps the
    module call (the size is the skip's, per call); export records the output padding."""
    torch.manual_seed(0)
    model = SizedUp().eval()
    x, skip = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 12, 12)
    res = fxopt.optimize(model, (x, skip), "fuse,lower-cpu{min_macs=0}", mode=mode)
    assert res.verification.passed, res.summary()
    assert (_lowered(res.module) != []) == (mode == "export")
    if mode == "symbolic":
        x, skip = torch.randn(1, 8, 7, 7), torch.randn(1, 8, 13, 13)  # another output padding
        with torch.no_grad():
            torch.testing.assert_close(res.module(x, skip), model(x, skip), rtol=1e-4, atol=1e-5)


def test_a_transposed_conv_whose_output_is_no_multiple_of_its_stride_stays_on_aten():
    """k=3, stride 2, padding 1 and no output padding gives 2n - 1 rows: oneDNN's kernel for it
    ran 5-16x aten's time (a U-Net 0.6-0.8x eager's speed, decoder tester); with output_padding=1
    (2n rows) it is lowered."""
    torch.manual_seed(0)
    odd, even = nn.ConvTranspose2d(16, 8, 3, 2, 1), nn.ConvTranspose2d(16, 8, 3, 2, 1, output_padding=1)
    model = nn.Sequential(odd, nn.ReLU(), nn.Conv2d(8, 16, 1), even, nn.ReLU()).eval()
    res = fxopt.optimize(model, (torch.randn(2, 16, 8, 8),), "lower-cpu{min_macs=0}", mode="symbolic")
    assert res.verification.passed and _lowered(res.module) == ["conv_transpose+relu"]
    [kept] = [v for v in _conv_views(res.module) if v.attrs.get("transposed")]
    assert kept.attrs["output_padding"] in (0, (0, 0), [0, 0])  # the odd one
    assert lower_cpu._conv_transpose_check(kept) == \
        "its output size is no multiple of its stride (oneDNN's kernel for it is slower than aten's)"


def test_an_output_padding_export_computes_per_call_is_left_to_aten():
    """export with a dynamic image size records the output padding of ``up(h, output_size=...)`` as
    values computed per call: oneDNN's weight reorder refused them ("Expected a value of type
    'List[int]' for argument 'output_padding'"), a failed pipeline (decoder tester)."""
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.down, self.up = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ConvTranspose2d(8, 3, 3, 2, 1)

        def forward(self, x):
            return self.up(self.down(x), output_size=x.shape[-2:])

    torch.manual_seed(0)
    model = Up().eval()
    dims = {"x": {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}}
    res = fxopt.optimize(model, torch.randn(2, 3, 33, 33), "fuse,lower-cpu", mode="export", dynamic_shapes=dims)
    assert res.verification.passed, res.summary()
    for size in (30, 33):
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(res.module(x), model(x), rtol=1e-4, atol=1e-5)


class Shifted(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.t = nn.ConvTranspose2d(8, 8, 4, 2, 1)
        self.shift = nn.Parameter(torch.randn(shape))

    def forward(self, x):
        return torch.relu(self.t(x) + self.shift)


@pytest.mark.parametrize("shape", [(8,), (1, 8), (8, 1), (8, 1, 1), (1, 8, 1, 1)])
def test_only_a_per_channel_shift_becomes_the_bias(shape):
    """Adversary: a (C,), (1, C) or (C, 1) tensor adds along the width or height (here W = C = 8),
    and was folded as the conv's bias: max error 7.0."""
    torch.manual_seed(0)
    model = Shifted(shape).eval()
    res = fxopt.optimize(model, (torch.randn(2, 8, 4, 4),), "lower-cpu{min_macs=0}", mode="symbolic")
    per_channel = len(shape) >= 3
    assert _lowered(res.module) == (["conv_transpose+shift+relu"] if per_channel else ["conv_transpose"])
    x = torch.randn(3, 8, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), model(x), rtol=1e-4, atol=1e-5)


def test_the_lowered_graph_keeps_the_bias_and_shift_tensors_it_reads():
    """Adversary: the bias and shift were summed into a new buffer, so the graph's state_dict
    lost `t.bias` and `shift`, and loading another checkpoint kept the old ones (0.59 off)."""
    torch.manual_seed(0)
    model, other = Shifted((1, 8, 1, 1)).eval(), Shifted((1, 8, 1, 1)).eval()
    gm = fxopt.optimize(model, (torch.randn(2, 8, 4, 4),), "lower-cpu{min_macs=0}", mode="symbolic").module
    assert _lowered(gm) == ["conv_transpose+shift+relu"]
    assert set(gm.state_dict()) == set(model.state_dict())
    gm.load_state_dict(other.state_dict())
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), other(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("geometry", [dict(stride=1, dilation=2, output_padding=1),
                                      dict(stride=2, dilation=3, output_padding=2)])
def test_an_output_padding_of_the_stride_or_more_stays_on_aten(geometry):
    """torch takes an output padding below the dilation; oneDNN's deconvolution refused one of
    the stride or more ("could not create a primitive descriptor"): a failed pipeline."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 4, 3, padding=1, **geometry), nn.ReLU()).eval()
    res = fxopt.optimize(model, (torch.randn(2, 4, 6, 6),), "lower-cpu{min_macs=0}", mode="symbolic")
    assert res.verification.passed and _lowered(res.module) == []
    [view] = [v for v in _conv_views(res.module)]
    assert lower_cpu._conv_transpose_check(view, 0).startswith("an output padding of its stride or more")


def test_a_small_transposed_conv_stays_on_aten_unless_min_macs_0():
    """oneDNN's fixed cost per call outweighs a small layer at batch 1 (adversary: 8-32 channels
    at 4x4, 1.5-3.2x `fuse`'s time)."""
    model = nn.Sequential(nn.ConvTranspose2d(16, 16, 2, 2), nn.ReLU()).eval()
    x = torch.randn(2, 16, 4, 4)
    assert _lowered(fxopt.optimize(model, (x,), "lower-cpu", mode="symbolic").module) == []
    assert _lowered(fxopt.optimize(model, (x,), "lower-cpu{min_macs=0}", mode="symbolic").module) == \
        ["conv_transpose+relu"]


def test_a_transposed_conv_to_few_channels_stays_on_aten():
    """An RGB output layer (DCGAN's 64 -> 3, k=4, stride 2): oneDNN's kernel for fewer than 8
    output channels ran 1.16-1.69x aten's time at batch 16 (adversary)."""
    model = nn.Sequential(nn.ConvTranspose2d(64, 3, 4, 2, 1), nn.Tanh()).eval()
    res = fxopt.optimize(model, (torch.randn(2, 64, 32, 32),), "lower-cpu", mode="symbolic")
    assert res.verification.passed and _lowered(res.module) == []
    [view] = _conv_views(res.module)
    assert lower_cpu._conv_transpose_check(view).startswith("3 output channels")
