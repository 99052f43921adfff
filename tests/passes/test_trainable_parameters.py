"""Parameters a pass makes from trainable ones stay trainable (prune tester): pruned weights came
back with requires_grad=False next to untouched ones with True, so a user's own fine-tuning
loop after `prune` failed ("element 0 of tensors does not require grad") or silently trained a
few layers only (12 of 32 parameters of a ViT); `fuse`'s folded weights and `distill`'s result
were frozen too. Frozen parameters stay frozen."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxopt


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 64), nn.Linear(64, 16)
        self.ln, self.fc = nn.LayerNorm(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.ln(x + self.b(torch.relu(self.a(x)))))


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


@pytest.mark.parametrize("pipeline, model, x", [
    ("prune{ratio=0.5}", Net, torch.randn(8, 16)),
    ("fuse", ConvBN, torch.randn(2, 3, 8, 8)),
    ("prune{ratio=0.5},fuse", ConvBN, torch.randn(2, 3, 8, 8)),
])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_trainable_model_comes_back_trainable(pipeline, model, x, mode):
    torch.manual_seed(0)
    model = model().eval()
    if isinstance(model, ConvBN):  # statistics that make the fold do something
        model.bn.running_mean.uniform_(-1, 1), model.bn.running_var.uniform_(0.5, 2)
    out = fxopt.optimize(model, (x,), pipeline, mode=mode).module
    assert all(p.requires_grad for p in out.parameters()), \
        [name for name, p in out.named_parameters() if not p.requires_grad]
    out.train()
    out(x).pow(2).mean().backward()  # every parameter takes part in a training step
    assert all(p.grad is not None for p in out.parameters())


@pytest.mark.parametrize("pipeline", ["prune{ratio=0.5}", "fuse"])
def test_a_frozen_model_comes_back_frozen(pipeline):
    torch.manual_seed(0)
    model = ConvBN().eval().requires_grad_(False)
    out = fxopt.optimize(model, (torch.randn(2, 3, 8, 8),), pipeline).module
    assert not any(p.requires_grad for p in out.parameters())


class DerivedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.w * 0.5, self.b)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_folded_weight_made_from_a_trainable_parameter_trains(mode):
    """Adversary: the default pipeline's fold-constants stored `w * 0.5` as a buffer, so a
    fine-tuning loop after optimize never trained the weight (no error: the bias still did)."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    out = fxopt.optimize(DerivedWeight(), (x,), mode=mode).module
    out(x).pow(2).sum().backward()
    trained = {name for name, p in out.named_parameters() if p.grad is not None}
    assert len(trained) == 2 and sum(p.numel() for p in out.parameters()) == 72, trained
    frozen = fxopt.optimize(DerivedWeight().requires_grad_(False), (x,), mode=mode).module
    assert not any(p.requires_grad for p in frozen.parameters())
