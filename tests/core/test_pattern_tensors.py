"""Tensors a rewrite stores (`Rewriter.tensor`): any strides, layout or quantization."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fxopt
from fxopt.patterns import Op, Pattern, Var, apply_patterns
from fxopt.patterns.rewrite import _digest


def test_fuse_folds_a_batchnorm_into_a_channels_last_1x1_conv():
    """A (4, 8, 1, 1) weight in channels-last has strides (8, 1, 8, 8) and is_contiguous() is True (its
    size-1 dims), so `.contiguous()` copied nothing and `.view(torch.uint8)` for the digest of the folded
    weight raised 'self.stride(-1) must be 1 to view Float as Byte': fuse failed on every model converted
    with model.to(memory_format=torch.channels_last) that holds a 1x1 conv + batchnorm (api item 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)).eval().to(memory_format=torch.channels_last)
    model[1].running_mean.uniform_(-1, 1)
    x = torch.randn(2, 8, 5, 5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = fxopt.optimize(model, (x,), pipeline="fuse")
    assert res.verification.verdict == "PASS"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in res.module.modules())
    torch.testing.assert_close(res.module(x), model(x))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _SameConvTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.conv(self.conv(x))


def _double_weight(r):
    view = r.view("conv")
    weight = (view.param("weight") * 2).to(memory_format=torch.channels_last)  # strides (8, 1, 8, 8)
    return r.call(F.conv2d, r["x"], r.tensor("doubled", weight, shared=True), r.param("conv", "bias"))


def test_a_shared_tensor_of_any_strides_is_stored_once():
    """A user rewrite storing a channels-last tensor with shared=True raised in the digest; at the two
    calls of one module it is stored once, as the model held one weight."""
    gm = fxopt.capture(_SameConvTwice().eval(), torch.randn(1, 8, 3, 3), mode="symbolic")
    pattern = Pattern("double", Op("conv", Var("x"), name="conv"), rewrite=_double_weight,
                      check=lambda m: m.root.op == "call_module")  # (not the conv2d it writes)
    report = apply_patterns(gm, pattern)
    gm.recompile()
    assert report.counts == {"double": 2}
    stored = [n.target for n in gm.graph.nodes if n.op == "get_attr" and "doubled" in n.target]
    assert len(stored) == 2 and len(set(stored)) == 1


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_the_digest_reads_values_not_strides_layout_or_storage():
    w = torch.randn(4, 8, 1, 1)
    channels_last = w.to(memory_format=torch.channels_last)
    assert _digest(channels_last) == _digest(w)
    m = torch.randn(3, 5)
    assert _digest(m.t()) == _digest(m.t().contiguous())
    assert _digest(m.to_sparse()) == _digest(m) != _digest(m + 1)
    z = torch.randn(3, dtype=torch.complex64)
    assert _digest(z.conj()) == _digest(z.conj().resolve_conj())
    q1 = torch.quantize_per_tensor(m, 0.1, 0, torch.qint8)
    q2 = torch.quantize_per_tensor(m, 0.2, 0, torch.qint8)
    assert _digest(q1) != _digest(q2) and _digest(q1) == _digest(torch.quantize_per_tensor(m, 0.1, 0, torch.qint8))
