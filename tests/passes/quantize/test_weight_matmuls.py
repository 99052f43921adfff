"""Linears spelled as matmuls over a parameter stored [in, out] — Hugging Face GPT-2's Conv1D
(``addmm(b, x, W)``) and ``x @ W + b`` — are quantized as linears (they stayed float, with no
warning: a tiny GPT-2 came back with no int8 layer); recurrent layers that stay float are named
in `float_ops` and a warning; an in-place write whose earlier reader is a clone is rewritten out
of place (a symbolic graph kept both convs float); a value a max pool reads gets a min/max range."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxopt
from fxopt.ir import weight_matmuls_as_linear

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D: weight [in, out], ``addmm`` over the flattened rows."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(nx, nf) * 0.1), nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class MatmulWeight(Conv1D):
    def forward(self, x):
        return x @ self.weight + self.bias


def _sqnr(ref, out):
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("layer", [Conv1D, MatmulWeight])
@pytest.mark.parametrize("backend", ["x86", "reference"])
def test_a_weight_matmul_is_an_int8_linear(mode, layer, backend):
    torch.manual_seed(0)
    model = nn.Sequential(layer(32, 64), nn.ReLU(), layer(64, 16)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, calibration = torch.randn(4, 6, 32), [(torch.randn(4, 6, 32),) for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxopt.PassWarning)
        res = fxopt.optimize(model, (x,), f"quantize{{backend={backend}}}", calibration=calibration, mode=mode)
    quantized = res.passes[-1].stats["quantized"]
    assert sum(quantized.values()) == 2 and set(quantized) <= {"linear", "linear+act"}, quantized
    assert not res.passes[-1].stats["float_ops"]
    with torch.no_grad():
        assert _sqnr(model(x), res.module(x)) > 25
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_rewrite_computes_the_same_and_keeps_other_matmuls():
    """A bias of another size, a matmul of two activations and a weight read elsewhere too."""
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(4))
            self.wide = nn.Parameter(torch.randn(1, 4))  # broadcast over rows: not a bias

        def forward(self, x):
            h = x @ self.w + self.b
            g = x @ self.w + self.wide
            return h @ g.t(), self.w.sum()

    torch.manual_seed(0)
    x = torch.randn(3, 8)
    gm = fxopt.capture(Mixed(), (x,), mode="symbolic")
    want = gm(x)
    assert weight_matmuls_as_linear(gm) == 2
    names = [getattr(n.target, "__name__", n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert names.count("linear") == 2 and names.count("matmul") == 1, names  # h @ g.t() stays
    got = gm(x)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_a_recurrent_layer_that_stays_float_is_named(mode, rnn):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = rnn(8, 16, batch_first=True), nn.Linear(16, 4)

        def forward(self, x):
            return self.fc(self.rnn(x)[0])

    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    with pytest.warns(fxopt.PassWarning, match=r"1 op that reads weights has no int8 kernel and stays float: "
                                               r"'(rnn|lstm|gru)'"):
        res = fxopt.optimize(Net().eval(), (x,), "quantize", calibration=[(x,)], mode=mode)
    float_ops = res.passes[-1].stats["float_ops"]
    assert any(why.startswith(("LSTM:", "GRU:", "lstm", "gru")) and "no int8 kernel" in why
               for why in float_ops.values()), float_ops


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_an_in_place_relu_after_a_clone_is_quantized(mode):
    class WithClone(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            y = self.c1(x)
            z = y.clone()
            y.relu_()
            return self.c2(y) + z

    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    res = fxopt.optimize(WithClone().eval(), (x,), "quantize", calibration=[(torch.randn(2, 4, 8, 8),)], mode=mode)
    assert sum(res.passes[-1].stats["quantized"].get(k, 0) for k in ("conv", "conv+act")) == 2


def test_a_value_a_max_pool_reads_gets_a_min_max_range():
    from fxopt.passes.quantize.observers import Observer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 12, 12)
    res = fxopt.optimize(model, (x,), "insert-observers", verify=False)
    gm = res.module
    kinds = {n.args[0].name: gm.get_submodule(n.target).kind for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Observer)}
    pool = next(n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.MaxPool2d))
    pooled = pool.args[0].args[0].name  # the pool reads the observer of its input
    assert kinds[pooled] == "minmax", kinds
    assert "histogram" in kinds.values(), kinds  # the others keep the default


def test_a_bias_of_another_dtype_stays_an_add():
    """``x @ W + b`` with b float64: the add promotes, a linear would not (the rewritten graph
    raised 'self and mat2 must have the same dtype')."""
    class Promoting(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 4))
            self.register_buffer("b", torch.randn(4, dtype=torch.float64))

        def forward(self, x):
            return x @ self.w + self.b

    torch.manual_seed(0)
    model, x = Promoting(), torch.randn(3, 8)
    gm = fxopt.capture(model, (x,), mode="symbolic")
    assert weight_matmuls_as_linear(gm) == 1  # the matmul, without the bias
    with torch.no_grad():
        out = gm(x)
        assert out.dtype == torch.float64
        # the product is float32 either way, summed in another order by a linear (4.8e-7 off
        # on an AMD EPYC): float32's tolerance, not float64's
        torch.testing.assert_close(out, model(x), rtol=1.3e-6, atol=1e-5)


class _ExpertMatmul(nn.Module):
    """A mixture-of-experts over flattened tokens: ``h @ w[e]`` and a view of a flat parameter."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 16, 24) * 0.3)
        self.flat = nn.Parameter(torch.randn(16 * 24) * 0.3)
        self.fc = nn.Linear(16, 16)

    def forward(self, h):
        h = torch.relu(self.fc(h))
        return h @ self.w[0] + h @ self.w[1] + h @ self.flat.view(16, 24)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_matmul_over_a_view_of_a_parameter_quantizes(mode):
    """The view of the parameter (`w[0]`, `flat.view(16, 24)`) went into the int8 region with no
    observed grid for the parameter: the whole pass failed with "no observer on node 'w' ...
    re-run insert-observers", though the composite pass had just run it."""
    torch.manual_seed(0)
    model = _ExpertMatmul().eval()
    batches = [(torch.randn(16, 16),) for _ in range(6)]
    res = fxopt.optimize(model, batches[0], "quantize{backend=x86}", calibration=batches, mode=mode)
    assert res.passes[0].stats["quantized"] == {"linear+act": 1, "matmul": 3, "add": 2}, res.passes[0].stats
    x = torch.randn(64, 16)
    with torch.no_grad():
        ref, out = model(x), res.module(x)
    assert (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())) > 20
