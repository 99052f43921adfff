"""LeakyReLU (YOLOv3 / CSPDarknet's activation) runs in int8 (`quantized.leaky_relu` onto a
grid of its own), so conv -> leaky_relu -> conv chains stay int8 from end to end: one quantize.
It ran in float, each one a dequantize, a float op and a quantize (an outside tester's
CSPDarknet: 18 quantize nodes, 1.4-1.9x torch.ao's time)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt

#: the negative slope of each leaky_relu in `_Leaky`, in graph order
SLOPES = [0.1, 0.01, 0.2, 0.2, 0.2]


class _Leaky(nn.Module):
    """Every spelling: the module (inplace too), the function with its default slope, positional
    and keyword slopes, in place, after a conv (+ batchnorm) and after a linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.LeakyReLU(0.1))
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.c3 = nn.Conv2d(16, 16, 1)
        self.c4 = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.LeakyReLU(0.2, inplace=True))
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        x = F.leaky_relu(self.c2(self.c1(x)))                 # default slope 0.01
        x = F.leaky_relu(self.c3(x), 0.2, True)               # positional slope, in place
        x = F.adaptive_avg_pool2d(self.c4(x), 1).flatten(1)
        return self.fc2(F.leaky_relu(self.fc1(x), negative_slope=0.2))


def _model():
    torch.manual_seed(0)
    model = _Leaky()
    model.train()
    with torch.no_grad():  # non-trivial batchnorm statistics
        model(torch.randn(16, 3, 16, 16) * 2 + 0.5)
    return model.eval()


def _calls(gm, text):
    return [n for n in gm.graph.nodes if n.op == "call_function" and text in str(n.target)]


def _float_leaky(gm):
    """leaky_relu nodes that compute in float: a module call, F.leaky_relu or aten.leaky_relu(_)."""
    found = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.LeakyReLU)]
    return found + [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")
                    and "leaky_relu" in str(getattr(n.target, "__name__", n.target))
                    and "quantized" not in str(n.target)]


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_leaky_relu_chain_stays_int8_and_matches_the_reference_backend(mode):
    model = _model()
    x = torch.randn(4, 3, 16, 16)
    calibration = [torch.randn(8, 3, 16, 16) for _ in range(4)]
    x86 = fxopt.optimize(model, x, "quantize{backend=x86}", mode=mode, calibration=calibration)
    gm = x86.module
    leaky = _calls(gm, "quantized.leaky_relu")
    assert [round(n.args[1], 6) for n in leaky] == SLOPES  # each with its own slope, none in float
    assert not _float_leaky(gm)
    assert "leaky_relu" not in " ".join(x86.passes[-1].stats.get("float_ops", {}).values())
    assert len(_calls(gm, "quantize_per_tensor")) == 1  # the input only (it was one per leaky_relu)
    assert x86.verification.sqnr_db > 35
    with torch.no_grad():
        assert torch.equal(model(x), model(x)), "the user's model (in-place leaky_relu) is untouched"
    reference = fxopt.optimize(model, x, "quantize{backend=reference}", mode=mode, calibration=calibration)
    assert len(_calls(reference.module, "aten.leaky_relu")) == len(SLOPES)
    y = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out, ref_out = x86.module(y), reference.module(y)
    step = float(ref_out.abs().max()) / 127
    assert float((out - ref_out).abs().max()) < step, "x86 and reference agree within about one output step"


def test_a_leaky_relu_at_the_output_stays_float_where_int8_would_only_add_conversions():
    """The minimum cut decides a leaky_relu like an add or a hardswish: after the last conv,
    read by the graph output, int8 would cost its conv a rounding and a dequantize, so the conv
    writes float and the leaky_relu runs in float, named as kept float by the cut."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv2d(8, 8, 3, padding=1),
                          nn.LeakyReLU(0.1)).eval()
    x = torch.randn(2, 3, 16, 16)
    res = fxopt.optimize(model, x, "quantize{backend=x86}", calibration=[torch.randn(4, 3, 16, 16) for _ in range(2)])
    assert len(_calls(res.module, "quantized.leaky_relu")) == 1
    reasons = list(res.passes[-1].stats["float_ops"].values())
    assert reasons == ["leaky_relu: kept float: int8 would cost more conversions than it saves"]
    assert res.verification.sqnr_db > 35


class _FloatBeforeConv(nn.Module):
    """A leaky_relu of a value no int8 layer wrote (the graph input, a float sigmoid's), read by
    a conv: a quantize either before it or after it, the same conversion either way."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.c, self.d = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8 if how == "sigmoid" else 3, 8, 3, padding=1)

    def forward(self, x):
        h = torch.sigmoid(self.c(x)) * 4 - 2 if self.how == "sigmoid" else x
        return self.d(F.leaky_relu(h, 0.1))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("how", ["input", "sigmoid"])
def test_a_leaky_relu_that_saves_no_conversion_stays_float(mode, how):
    """In int8 it rounds once more for nothing (adversary: 41.1 -> 37.5 dB on a graph input, 37.9
    -> 36.8 dB and up to 1.1x the time after a sigmoid): on a tie the cut keeps it float."""
    torch.manual_seed(0)
    model, x = _FloatBeforeConv(how).eval(), torch.randn(2, 3, 12, 12)
    res = fxopt.optimize(model, x, "quantize{backend=x86}", calibration=[torch.randn(4, 3, 12, 12) for _ in range(3)],
                         mode=mode)
    assert not _calls(res.module, "quantized.leaky_relu") and len(_float_leaky(res.module)) == 1
    assert res.verification.passed
