"""Layers whose weight the forward computes from parameters alone (weight standardization, a
causal mask, equalized learning rate's scale, a weight norm written out or exported): they
prune like any layer — the computation runs on the full parameters and the layer reads the kept
rows and columns of its result — and match the zeroed model. A weight computed from the input,
or from a parameter another op also reads, keeps its layer whole, saying why."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxopt.measure import count_macs, count_parameters
from prune_masking import prune_and_mask

MODES = ("symbolic", "export")


class StdConv(nn.Conv2d):
    """BiT/NFNet weight standardization: every entry of a row depends on the whole row."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / torch.sqrt(w.var((1, 2, 3), keepdim=True, unbiased=False) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class MaskedConv(nn.Conv2d):
    """PixelCNN's causal mask type B: a buffer multiplied into the weight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mask = torch.ones_like(self.weight)
        k = self.kernel_size[0]
        mask[:, :, k // 2, k // 2 + 1:] = 0
        mask[:, :, k // 2 + 1:] = 0
        self.register_buffer("mask", mask)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding)


class EqualConv(nn.Conv2d):
    """StyleGAN's equalized learning rate: the weight scaled by a constant in forward."""

    def forward(self, x):
        scale = 1 / (self.in_channels * self.kernel_size[0] ** 2) ** 0.5
        return F.conv2d(x, self.weight * scale, self.bias, padding=self.padding)


def _cnn(layer):
    return nn.Sequential(layer(3, 16, 3, padding=1), nn.ReLU(), layer(16, 32, 3, padding=1), nn.ReLU(),
                         layer(32, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10))


class WeightNormMLP(nn.Module):
    """A weight norm written out: w = g * v / ||v|| over each row."""

    def __init__(self):
        super().__init__()
        self.v1, self.g1, self.b1 = nn.Parameter(torch.randn(32, 12)), nn.Parameter(torch.rand(32, 1)), \
            nn.Parameter(torch.randn(32))
        self.v2, self.g2 = nn.Parameter(torch.randn(5, 32)), nn.Parameter(torch.rand(5, 1))

    def forward(self, x):
        w1 = self.g1 * self.v1 / self.v1.norm(dim=1, keepdim=True)
        w2 = self.g2 * self.v2 / self.v2.norm(dim=1, keepdim=True)
        return F.linear(F.relu(F.linear(x, w1, self.b1)), w2)


def _exact(model, x, mode, **options):
    torch.manual_seed(0)
    model = model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    r = prune_and_mask(model, x, mode, **options)
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        r.pruned(torch.cat([x, x[:1]]))  # another batch size
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} of the user's model changed"
    return r


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layer", [StdConv, MaskedConv, EqualConv], ids=["standardized", "masked", "scaled"])
def test_a_conv_with_a_computed_weight_prunes_exactly(layer, mode):
    torch.manual_seed(0)
    model, x = _cnn(layer), torch.randn(2, 3, 12, 12)
    r = _exact(model, x, mode)
    assert not r.plan.channel_graph.pinned_nodes
    assert count_macs(r.pruned, x) < 0.5 * count_macs(model, x)
    # the computation runs on the full parameters; the layers read the kept part of its result
    assert r.pruned.get_parameter("2.weight").shape == (32, 16, 3, 3)
    assert "index_select" in r.pruned.code


@pytest.mark.parametrize("mode", MODES)
def test_the_mask_still_holds_in_the_pruned_model(mode):
    """Fine-tuning a pruned PixelCNN must keep it causal: the mask is still applied in forward,
    so a change of a masked weight entry changes nothing."""
    torch.manual_seed(0)
    model, x = _cnn(MaskedConv), torch.randn(2, 3, 12, 12)
    pruned = _exact(model, x, mode).pruned
    with torch.no_grad():
        before = pruned(x)
        pruned.get_parameter("2.weight")[:, :, 2, :] += 1.0  # every entry of the masked row
        torch.testing.assert_close(pruned(x), before, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_a_weight_norm_written_out_prunes_exactly(mode):
    torch.manual_seed(0)
    r = _exact(WeightNormMLP(), torch.randn(4, 12), mode)
    assert count_macs(r.pruned, torch.randn(4, 12)) < 0.6 * count_macs(WeightNormMLP(), torch.randn(4, 12))


def test_an_exported_weight_norm_parametrization_prunes_exactly():
    wn = torch.nn.utils.parametrizations.weight_norm
    model = nn.Sequential(wn(nn.Conv1d(3, 16, 3, padding=1)), nn.ReLU(), wn(nn.Conv1d(16, 16, 1)), nn.ReLU(),
                          nn.Conv1d(16, 4, 1))
    r = _exact(model, torch.randn(2, 3, 20), "export")
    assert not r.plan.channel_graph.pinned_nodes


class SharedComputedWeight(nn.Module):
    """One standardized weight read by two convs (a shared block run at two scales): each
    reads its own kept rows."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.shared = nn.Parameter(torch.randn(16, 16, 3, 3))
        self.head_a, self.head_b = nn.Conv2d(16, 4, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        w = self.shared - self.shared.mean((1, 2, 3), keepdim=True)
        h = torch.relu(self.stem(x))
        a = torch.relu(F.conv2d(h, w, padding=1))
        b = torch.relu(F.conv2d(F.avg_pool2d(h, 2), w, padding=1))
        return self.head_a(a).mean((2, 3)) + self.head_b(b).mean((2, 3))


@pytest.mark.parametrize("mode", MODES)
def test_a_computed_weight_two_layers_read_prunes_for_each(mode):
    torch.manual_seed(0)
    r = _exact(SharedComputedWeight(), torch.randn(2, 3, 8, 8), mode)
    assert r.plan.dead.any()


class WeightFromTheInput(nn.Module):
    """A dynamic conv: the weight depends on the input, so it is no layer of fixed rows."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        w = self.b.weight * h.mean().sigmoid()
        return F.conv2d(h, w, self.b.bias)


class ParameterAlsoALayersWeight(nn.Module):
    """The parameter of a computed weight is also a plain layer's weight (one tensor, tied):
    both keep it whole, so the pruned model stores no second, pruned copy of it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 16)
        self.c, self.out = nn.Linear(16, 32), nn.Linear(32, 3)  # what prunes

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.relu(self.b(h)) + torch.relu(F.linear(h, self.b.weight * 2.0))
        return self.out(torch.relu(self.c(h)))


@pytest.mark.parametrize("mode", MODES)
def test_a_parameter_a_layer_also_reads_keeps_both_whole(mode):
    torch.manual_seed(0)
    model = ParameterAlsoALayersWeight()
    r = _exact(model, torch.randn(4, 6), mode)
    pinned = r.plan.channel_graph.pinned_nodes.values()
    assert any("weight is not a parameter" in why for why in pinned)
    assert any(why.startswith("shares its weights with a node that reads them whole") for why in pinned)
    assert count_parameters(r.pruned) <= count_parameters(model)
    assert r.pruned.get_parameter("b.weight").shape == (16, 16)


class ParameterReadElsewhere(nn.Module):
    """The parameter of a computed weight is also read by an op that is no layer: slicing it
    for the layer would change that op's result."""

    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(6, 16), nn.Linear(16, 3)
        self.w = nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.out(torch.relu(F.linear(h, self.w * 2.0)) + self.w.sum(0))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model", [WeightFromTheInput, ParameterReadElsewhere], ids=["input", "read-elsewhere"])
def test_a_weight_that_is_not_a_fixed_computation_keeps_its_layer_whole(model, mode):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6) if model is WeightFromTheInput else torch.randn(4, 6)
    r = _exact(model(), x, mode)
    assert any("weight is not a parameter" in why for why in r.plan.channel_graph.pinned_nodes.values())


class SincConv(nn.Module):
    """SincNet: band-pass filters computed from two parameters per channel, the sinc spelled
    with ``where`` (export adds a dtype guard on the ``arg == 0`` mask, which must not cut
    the computation in two: half of it was analysed as channels and sliced)."""

    def __init__(self, n=16, k=9):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.rand(n, 1) + 0.5), nn.Parameter(torch.rand(n, 1))
        self.register_buffer("t", torch.linspace(-1, 1, k).view(1, -1))
        self.c2, self.head = nn.Conv1d(n, 16, 3, padding=1), nn.Linear(16, 5)

    def forward(self, x):
        hi = self.a.abs() + self.b.abs()
        arg = hi * self.t
        filt = hi * torch.where(arg == 0, torch.ones_like(arg), torch.sin(arg) / (arg + (arg == 0).float()))
        h = F.relu(F.conv1d(x, filt.unsqueeze(1), padding=4))
        return self.head(F.relu(self.c2(h)).mean(-1))


@pytest.mark.parametrize("mode", MODES)
def test_sinc_filters_computed_per_channel_prune_exactly(mode):
    torch.manual_seed(0)
    r = _exact(SincConv(), torch.randn(2, 1, 64), mode)
    assert not r.plan.channel_graph.pinned_nodes
    assert r.pruned.get_parameter("a").shape == (16, 1)  # the computation keeps its parameters


class DepthwiseMasked(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.w = nn.Parameter(torch.randn(8, 1, 3, 3))
        self.register_buffer("mask", torch.ones(8, 1, 3, 3))

    def forward(self, x):
        h = F.relu(self.stem(x))
        return self.head(F.relu(F.conv2d(h, self.w * self.mask, padding=1, groups=8)))


@pytest.mark.parametrize("mode", MODES)
def test_a_depthwise_conv_with_a_computed_weight_is_pinned_by_name(mode):
    """It crashed in importance (the depthwise rule reads its weight as a parameter)."""
    torch.manual_seed(0)
    r = _exact(DepthwiseMasked(), torch.randn(2, 3, 8, 8), mode)
    assert "depthwise conv with a weight computed in the graph (no rule yet)" in \
        r.plan.channel_graph.pinned_nodes.values()


class MaskedConvNoBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.blk, self.head = nn.Conv2d(3, 16, 1), MaskedConv(16, 16, 3, padding=1, bias=False), \
            nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.blk(F.relu(self.stem(x)))))


@pytest.mark.parametrize("mode", MODES)
def test_ignore_names_a_layer_with_a_computed_weight(mode):
    """Without a bias it had no parameter of its own: `ignore=['blk']` said it matched nothing."""
    torch.manual_seed(0)
    r = _exact(MaskedConvNoBias(), torch.randn(2, 3, 8, 8), mode, ignore=["blk"])
    blk = next(n for n, m in r.plan.channel_graph.module_names.items() if m == "blk")
    assert blk in r.plan.ignored
