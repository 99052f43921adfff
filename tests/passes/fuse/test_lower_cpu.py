"""`lower-cpu`: oneDNN prepacked conv/linear with fused post-ops; numerics and graph shape."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.patterns import annotations

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
MODES = ("symbolic", "export")


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.3, 3)
        bn.weight.uniform_(0.5, 2)
    return bn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), _bn(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, groups=2), _bn(8)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        z = F.relu(self.b2(self.c2(y)) + y)
        z = F.hardswish(self.c3(z))
        return self.fc(z.view(z.shape[0], -1))  # view needs a contiguous input


def _lowered(gm):
    return [annotations(n).get("fused") for n in gm.graph.nodes if annotations(n).get("lowered") == "mkldnn"]


@pytest.mark.parametrize("mode", MODES)
def test_lowering_matches_and_runs_other_batches(mode):
    torch.manual_seed(0)
    model = Block().eval()
    res = fxopt.optimize(model, (torch.randn(2, 3, 6, 6),), pipeline="fuse,lower-cpu{linear=true}", mode=mode)
    assert res.verification.passed, res.summary()
    assert sorted(_lowered(res.module)) == ["conv+add+relu", "conv+hardswish", "conv+relu", "linear"]
    for batch in (1, 5):
        x = torch.randn(batch, 3, 6, 6)
        torch.testing.assert_close(res.module(x), model(x), rtol=2e-3, atol=1e-4)


def test_transposed_convs_are_left_alone():
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 2), nn.ReLU()).eval()
    res = fxopt.optimize(model, (torch.randn(1, 3, 4, 4),), pipeline="fuse,lower-cpu", mode="symbolic")
    assert res.verification.passed
    assert _lowered(res.module) == []


def test_linear_is_lowered_only_on_request():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    res = fxopt.optimize(model, (torch.randn(3, 4),), pipeline="lower-cpu", mode="export")
    assert _lowered(res.module) == []
    res = fxopt.optimize(model, (torch.randn(3, 4),), pipeline="lower-cpu{linear=true}", mode="export")
    assert _lowered(res.module) == ["linear+relu"] and res.verification.passed


def test_shared_conv_is_lowered_per_site_without_touching_the_model():
    conv = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv).eval()
    before = conv.weight.clone()
    res = fxopt.optimize(model, (torch.randn(1, 3, 5, 5),), pipeline="fuse,lower-cpu", mode="symbolic")
    assert res.verification.passed
    assert sorted(_lowered(res.module)) == ["conv", "conv+relu"]
    assert torch.equal(conv.weight, before)
