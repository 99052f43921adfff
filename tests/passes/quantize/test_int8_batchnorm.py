"""A batchnorm no conv or linear precedes (pre-activation ResNets, DenseNet's BN-ReLU-conv) is an
int8 group of its own: x86's `quantized.batch_norm{1,2,3}d(_relu)`, the reference backend's float
batchnorm rounded onto its grid. It was a dequantize, a float batchnorm and a quantize (1.3-2.5x
torch.ao's time on a pre-activation ResNet)."""
import pytest
import torch
from torch import nn

import fxopt

DIMS = {1: (nn.Conv1d, nn.BatchNorm1d, (2, 3, 16)), 2: (nn.Conv2d, nn.BatchNorm2d, (2, 3, 8, 8)),
        3: (nn.Conv3d, nn.BatchNorm3d, (2, 3, 4, 6, 6))}


class PreAct(nn.Module):
    """conv, then a residual block whose batchnorms read an add's value (nothing to fold into)."""

    def __init__(self, dim: int = 2, affine: bool = True, act: str = "relu") -> None:
        super().__init__()
        conv, norm, _ = DIMS[dim]
        self.stem = conv(3, 8, 3, padding=1)
        self.bn1, self.c1 = norm(8, affine=affine), conv(8, 8, 3, padding=1)
        self.bn2, self.c2 = norm(8, affine=affine), conv(8, 8, 3, padding=1)
        self.act = nn.ReLU() if act == "relu" else nn.ReLU6()
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            if affine:
                bn.weight.data.uniform_(0.5, 1.5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.c1(self.act(self.bn1(x)))
        return self.c2(self.act(self.bn2(x)))


def _sqnr(ref, out):
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


def _kernels(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)]


@pytest.mark.parametrize("backend", ["x86", "reference"])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_a_batchnorm_no_layer_precedes_runs_in_int8(dim, mode, backend):
    torch.manual_seed(0)
    model = PreAct(dim).eval()
    shape = DIMS[dim][2]
    batches = [(torch.randn(shape),) for _ in range(4)]
    res = fxopt.optimize(model, batches[0], f"quantize{{backend={backend}}}", calibration=batches, mode=mode)
    stats = res.passes[0].stats
    assert stats["quantized"].get("batch_norm+act") == 2, stats
    assert not any("batch_norm" in why for why in stats["float_ops"].values()), stats["float_ops"]
    if backend == "x86":
        assert _kernels(res.module) == [f"quantized.batch_norm{dim}d_relu.default"] * 2, _kernels(res.module)
    x = torch.randn(shape)
    with torch.no_grad():  # (the 3-D example is tiny: float batchnorms gave it 28 dB, int8 ones 24)
        assert _sqnr(model(x), res.module(x)) > (20 if dim == 3 else 30)


@pytest.mark.parametrize("act", ["relu", "relu6"])
def test_without_affine_and_with_relu6_the_int8_batchnorm_matches_its_float_self(act):
    torch.manual_seed(0)
    model = PreAct(affine=False, act=act).eval()
    batches = [(torch.randn(2, 3, 8, 8),) for _ in range(4)]
    x86 = fxopt.optimize(model, batches[0], "quantize", calibration=batches)
    reference = fxopt.optimize(model, batches[0], "quantize{backend=reference}", calibration=batches)
    assert x86.passes[0].stats["quantized"].get("batch_norm+act") == 2
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref, got = reference.module(x), x86.module(x)
        assert _sqnr(model(x), got) > 30
        # the same grids: the two backends agree to about a step of the output grid
        assert (ref - got).abs().max() < 0.1 * ref.abs().max()


def test_skip_keeps_a_batchnorm_float_by_its_module_path():
    torch.manual_seed(0)
    model = PreAct().eval()
    batches = [(torch.randn(2, 3, 8, 8),) for _ in range(4)]
    res = fxopt.optimize(model, batches[0], "quantize{skip=[bn*]}", calibration=batches)
    stats = res.passes[0].stats
    assert "batch_norm+act" not in stats["quantized"]
    assert sorted(k for k, why in stats["float_ops"].items() if "skip" in why) == ["bn1", "bn2"]
    assert not any(k.startswith("quantized.") for k in _kernels(res.module)), _kernels(res.module)


class RawFeatures(nn.Module):
    """A BatchNorm1d normalizing raw sensor channels in their own units (a graph input)."""

    def __init__(self, through: str = "") -> None:
        super().__init__()
        self.through = through
        self.norm = nn.BatchNorm1d(4)
        self.norm.running_mean.copy_(torch.tensor([1013.0, 20.0, 0.0, 0.5]))
        self.norm.running_var.copy_(torch.tensor([25.0, 9.0, 1.0, 0.0001]))
        self.c1, self.c2 = nn.Conv1d(4, 16, 3, padding=1), nn.Conv1d(16, 4, 1)

    def forward(self, x):
        if self.through == "pad":  # an op with an int8 form between the input and the batchnorm
            x = torch.nn.functional.pad(x, (1, 1), mode="replicate")
        return self.c2(torch.relu(self.c1(torch.relu(self.norm(x)))))


@pytest.mark.parametrize("through", ["", "pad"])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_batchnorm_of_a_float_value_stays_float(mode, through):
    """Adversary: the cut saw one quantize before the batchnorm or one after it as the same, so
    an int8 batchnorm read the raw input on one grid spanning [0, 1030]: the channels it
    rescales most were rounded away (49 -> 21 dB, still a PASS; behind a pad, 27 dB)."""
    torch.manual_seed(0)
    model = RawFeatures(through).eval()
    scale = torch.tensor([5.0, 3.0, 1.0, 0.01]).view(1, 4, 1)
    shift = torch.tensor([1013.0, 20.0, 0.0, 0.5]).view(1, 4, 1)
    batches = [(torch.randn(4, 4, 32) * scale + shift,) for _ in range(4)]
    res = fxopt.optimize(model, batches[0], "quantize", calibration=batches, mode=mode)
    stats = res.passes[0].stats
    assert "batch_norm+act" not in stats["quantized"], stats
    why = next(v for v in stats["float_ops"].values() if v.startswith("batch_norm"))
    assert "is a float value (an int8 batchnorm reads int8 ones)" in why, why
    x = torch.randn(4, 4, 32) * scale + shift
    with torch.no_grad():
        assert _sqnr(model(x), res.module(x)) > 40
