"""`quantize` alone folds an eval BatchNorm1d behind a linear into the int8 linear's weights, as
it folds a conv's batchnorm: Linear -> BatchNorm1d -> ReLU is one `quantized.linear_relu`.
A BatchNorm1d that normalizes another axis than the linear's features stays float."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxopt

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")

BATCH_NORMS = ("batch_norm", "_native_batch_norm_legit_no_training")


def _bn(n):
    bn = nn.BatchNorm1d(n)
    bn.running_mean = torch.randn(n) * 0.3
    bn.running_var = torch.rand(n) + 0.5
    bn.weight.data = torch.rand(n) + 0.5
    bn.bias.data = torch.randn(n) * 0.1
    return bn


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), _bn(32), nn.ReLU(),
                         nn.Linear(32, 32, bias=False), _bn(32),
                         nn.Linear(32, 4)).eval()


def _has_batch_norm(gm):
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
            return True
        if node.op == "call_function" and any(name in str(node.target) for name in BATCH_NORMS):
            return True
    return False


def _targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("backend", ["x86", "reference"])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_linear_batchnorm1d_relu_is_one_int8_linear(mode, backend):
    model = _mlp()
    batches = [(torch.randn(16, 16),) for _ in range(8)]
    res = fxopt.optimize(model, batches[0], f"quantize{{backend={backend}}}", calibration=batches, mode=mode)
    gm, stats = res.module, res.passes[0].stats
    assert not _has_batch_norm(gm), gm.code
    assert stats["quantized"] == {"linear+bn+act": 1, "linear+bn": 1, "linear": 1}
    assert stats["float_ops"] == {}
    targets = _targets(gm)
    if backend == "x86":
        # the last linear writes float (read by the graph output only)
        assert targets.count("quantized.linear_relu.default") == 1 and targets.count("quantized.linear.default") == 1
        assert targets.count("quantized.linear_with_input_q_dq_qweight_dq_output_fp32.default") == 1
        # the batchnorms no longer split the int8 region: one quantize, one dequantize
        assert targets.count("aten.quantize_per_tensor.default") == 1 and targets.count("aten.dequantize.self") == 1
    else:
        assert targets.count("quantized_decomposed.dequantize_per_channel.default") == 3
    assert res.verification.passed and res.verification.sqnr_db > 35, res.verification.summary()
    with torch.no_grad():                            # close to float on data it did not calibrate on
        x = torch.randn(64, 16)
        ref, out = model(x), gm(x)
    assert (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())).item() > 25


def test_the_folded_int8_linear_matches_the_folded_float_linear():
    """The fold itself is exact in float: the int8 result stays within a few steps of the float
    linear whose weights carry the batchnorm (y = (Wx + b - mean) * g / sqrt(var + eps) + beta)."""
    model = nn.Sequential(nn.Linear(8, 6), _bn(6)).eval()
    batches = [(torch.randn(32, 8),) for _ in range(6)]
    res = fxopt.optimize(model, batches[0], "quantize{backend=x86}", calibration=batches)
    lin, bn = model[0], model[1]
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w, b = lin.weight * factor[:, None], (lin.bias - bn.running_mean) * factor + bn.bias
    assert res.passes[0].stats["quantized"] == {"linear+bn": 1} and not _has_batch_norm(res.module)
    # a float output (the graph's): the error is the int8 input's and weight's rounding alone
    (kernel,) = [n for n in res.module.graph.nodes
                 if str(n.target) == "quantized.linear_with_input_q_dq_qweight_dq_output_fp32.default"]
    x_scale = kernel.args[1]
    with torch.no_grad():
        x = batches[2][0]
        folded = torch.nn.functional.linear(x, w, b)
        assert torch.allclose(model(x), folded, atol=1e-5)
        # each of the 8 products off by at most half an input step times |w| plus |x| times half a weight step
        bound = 0.5 * x_scale * w.abs().sum(1).max() + 0.5 * x.abs().max() * (w.abs().amax(1) / 127).sum()
        assert (res.module(x) - folded).abs().max().item() < bound


def test_batchnorm1d_over_another_axis_than_the_features_stays_float():
    """On a (N, L, features) linear output BatchNorm1d normalizes L: no weight fold says that."""

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(16, 8), _bn(8)          # L == 8 == features, by design

        def forward(self, x):
            return torch.relu(self.bn(self.fc(x)))

    torch.manual_seed(0)
    model = Seq().eval()
    batches = [(torch.randn(4, 8, 16),) for _ in range(6)]
    res = fxopt.optimize(model, batches[0], "quantize{backend=x86}", calibration=batches)
    stats = res.passes[0].stats
    assert _has_batch_norm(res.module)
    assert stats["quantized"] == {"linear": 1}
    assert list(stats["float_ops"].values()) == [
        "batch_norm: normalizes dim 1 of the linear's (N, L, features) output, which no weight fold "
        "expresses; kept float: int8 would cost more conversions than it saves"], stats["float_ops"]
    assert res.verification.passed and res.verification.sqnr_db > 30, res.verification.summary()


class _FiLM(nn.Module):
    """A conv whose batchnorm's weight is computed from a second input (FiLM conditioning)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc, self.head = nn.Conv2d(3, 4, 3), nn.Linear(5, 4), nn.Conv2d(4, 4, 1)
        self.register_buffer("rm", torch.randn(4))
        self.register_buffer("rv", torch.rand(4) + 0.5)

    def forward(self, x, z):
        weight = 1 + self.fc(z).mean(0)
        return self.head(torch.relu(torch.nn.functional.batch_norm(self.conv(x), self.rm, self.rv, weight)))


@pytest.mark.parametrize("backend", ["x86", "reference"])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_batchnorm_whose_weight_is_computed_stays_float(mode, backend):
    """Its weight is no stored tensor: a fold read it as 1 (the fuse tester's case, which
    `quantize`'s own grouping shared)."""
    torch.manual_seed(0)
    model = _FiLM().eval()
    calibration = [(torch.randn(2, 3, 8, 8), torch.randn(2, 5)) for _ in range(4)]
    res = fxopt.optimize(model, calibration[0], pipeline=f"quantize{{backend={backend}}}",
                         calibration=calibration, mode=mode)
    stats = res.passes[-1].stats
    assert res.verification.passed and res.verification.sqnr_db > 30, res.summary()
    reason = next(r for name, r in stats["float_ops"].items() if "batch_norm" in name)
    assert "weight is computed in the graph" in reason, stats["float_ops"]
    assert _has_batch_norm(res.module)


def test_a_rank_guard_reads_the_int8_value_without_a_dequantize():
    """`fuse` folds BatchNorm1d into the linears and asserts the rank (`hold_rank`); on x86 the
    guard's `.dim()` reads the quantized tensor (adversary: each guard dequantized a whole
    activation to read its rank)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), _bn(32), nn.ReLU(), _bn(32), nn.Linear(32, 4)).eval()
    batches = [(torch.randn(8, 16),) for _ in range(3)]
    res = fxopt.optimize(model, batches[0], "fuse,quantize{backend=x86}", calibration=batches, mode="symbolic")
    gm = res.module
    dims = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "dim"]
    assert len(dims) == 2, gm.code
    assert all("dequantize" not in str(d.args[0].target) for d in dims), gm.code
    assert res.passes[-1].stats["dequantize_nodes"] == 1, gm.code  # the float-output head's input only
    with pytest.raises(AssertionError, match="for 2 dims"):
        gm(torch.randn(8, 3, 16))
