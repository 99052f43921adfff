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
