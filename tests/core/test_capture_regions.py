"""A ``torch.no_grad()`` block of forward: capture inlines export's region for it into the graph
(each value leaving the block detached), so the passes see its ops, and detaches the values
leaving it in a symbolic graph (fx records no block); the gradients a loss gets, and which
outputs require grad, stay those of eager."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.fx
from torch import nn

import fxopt

SET_GRAD = torch.ops.higher_order.wrap_with_set_grad_enabled


class NoGrad(nn.Module):
    """A no_grad block between two layers, two values leaving it (one an output)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x)
        with torch.no_grad():
            z = self.b(h)
            s = z.sigmoid()
        return self.c(h + z.relu()), s


class SetGradFalse(NoGrad):
    def forward(self, x):
        h = self.a(x)
        with torch.set_grad_enabled(False):
            z = self.b(h)
        return self.c(h * z)


class Nested(NoGrad):
    """no_grad, an enable_grad block inside it, and no_grad again inside that: export cuts it
    into a run of regions (one of them empty)."""

    def forward(self, x):
        h = self.a(x)
        with torch.no_grad():
            z = self.b(h)
            with torch.enable_grad():
                w = z * 2
                with torch.no_grad():
                    v = w + 1
        return self.c(h + v)


class FeedsAConv(nn.Module):
    """The block's output feeds a conv + batchnorm outside it."""

    def __init__(self):
        super().__init__()
        self.pre, self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x):
        with torch.no_grad():
            h = self.pre(x)
        return self.bn(self.conv(h + x))


class ReadsAParameter(nn.Module):
    """A parameter read both inside the block and after it."""

    def __init__(self):
        super().__init__()
        self.w, self.fc = nn.Parameter(torch.randn(4)), nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():
            z = x * self.w
        return self.fc(z) + self.w


class FrozenConvBN(nn.Module):
    """A frozen conv + batchnorm backbone under no_grad, a trained head."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        with torch.no_grad():
            f = self.bn(self.conv(x)).relu()
        return self.head(f)


class WritesAndReads(NoGrad):
    """A block that sums into a buffer in place (kept as a region) and one that only reads."""

    def __init__(self):
        super().__init__()
        self.register_buffer("avg", torch.zeros(4))

    def forward(self, x):
        h = self.a(x)
        with torch.no_grad():
            self.avg.add_(h.mean(0))
        with torch.no_grad():
            z = self.b(h)
        return self.c(h + z)


class AutocastInside(NoGrad):
    """An autocast block inside a no_grad block (a region in the region: kept), and a plain one."""

    def forward(self, x):
        h = self.a(x)
        with torch.no_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                z = self.b(h)
            z = z.float()
        with torch.no_grad():
            g = h.sigmoid()
        return self.c(h * g + z)


def _warm(model: nn.Module) -> nn.Module:
    """`model` in eval mode with batchnorm statistics that are not the identity."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _capture(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a static batch, a grad-state read: not these tests' news)
        return fxopt.capture(model, (x,), mode="export")


def _regions(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target is SET_GRAD]


def _run_with_grads(run, params: dict[str, nn.Parameter], x: torch.Tensor):
    """`run(x)`'s outputs, whether each requires grad, and the gradients a loss on every output
    gives the parameters (None for one it does not reach) and the input."""
    x = x.clone().requires_grad_(True)
    for p in params.values():
        p.grad = None
    out = run(x)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o * torch.linspace(0.5, 2.0, o.numel()).view_as(o)).sum() for o in outs if o.requires_grad)
    loss.backward()
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in params.items()}
    return [o.detach() for o in outs], [o.requires_grad for o in outs], grads, x.grad


def _compare_with_eager(model: nn.Module, gm: torch.fx.GraphModule, x: torch.Tensor, state: dict) -> dict:
    """Assert that `gm` computes and differentiates as `model` (from `state`); returns the
    buffers eager's call left."""
    model.load_state_dict(state)  # (WritesAndReads' checked runs leave its average as it was; make sure)
    want = _run_with_grads(model, dict(model.named_parameters()), x)
    written = {name: b.clone() for name, b in model.named_buffers()}
    model.load_state_dict(state)
    got = _run_with_grads(gm, dict(gm.named_parameters()), x)
    for w, g in zip(want[0], got[0]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert got[1] == want[1]
    assert got[2].keys() == want[2].keys()
    for name, w in want[2].items():
        g = got[2][name]
        assert (g is None) == (w is None), f"{name}: eager grad {w is not None}, graph grad {g is not None}"
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=1e-6)
    return written


def _example(model: nn.Module) -> torch.Tensor:
    return torch.randn(2, 3, 8, 8) if isinstance(model, (FeedsAConv, FrozenConvBN)) else torch.randn(2, 4)


PLAIN = [NoGrad(), SetGradFalse(), Nested(), FeedsAConv(), ReadsAParameter(), FrozenConvBN()]


@pytest.mark.parametrize("model", [*PLAIN, WritesAndReads(), AutocastInside()], ids=lambda m: type(m).__name__)
def test_a_graph_with_no_grad_blocks_computes_and_differentiates_as_eager(model):
    """The graph's outputs, their requires_grad and the gradients of a loss w.r.t. the input and
    every parameter, inside the block and out, are eager's; plain blocks leave no region behind
    (export kept each as a `wrap_with_set_grad_enabled` call the passes did not enter)."""
    model, x = _warm(model), _example(model)
    state = copy.deepcopy(model.state_dict())
    gm = _capture(model, x)
    written = _compare_with_eager(model, gm, x, state)
    kept = {"WritesAndReads": 1, "AutocastInside": 1}.get(type(model).__name__, 0)
    assert len(_regions(gm)) == kept
    bodies = [m for m in gm.children() if isinstance(m, torch.fx.GraphModule)]
    assert len(bodies) == kept  # no body left behind
    if kept:  # the writing block, or the one holding an autocast block, stays; the other is inlined
        assert sum(n.target is torch.ops.aten.detach.default for n in gm.graph.nodes) == 1
    if isinstance(model, WritesAndReads):
        torch.testing.assert_close(gm.get_buffer("avg"), written["avg"])  # written as eager writes it


@pytest.mark.parametrize("model", PLAIN, ids=lambda m: type(m).__name__)
def test_a_symbolic_graph_detaches_the_values_leaving_a_no_grad_block(model):
    """fx records no block: the symbolic graph (auto's first choice) ran the block's ops as plain
    ones, so with grad on the block's layers got gradients and the loss's gradients flowed
    through it (b.weight: a gradient where eager has none)."""
    model, x = _warm(model), _example(model)
    state = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = fxopt.capture(model, (x,), mode="symbolic")
    _compare_with_eager(model, gm, x, state)
    assert any(n.target is torch.detach for n in gm.graph.nodes)


def test_fuse_folds_a_batchnorm_inside_a_no_grad_block_and_leaves_the_model_as_it_was():
    model, x = _warm(FrozenConvBN()), torch.randn(2, 3, 8, 8)
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxopt.optimize(model, x, "fuse", mode="export")
    gm = result.module
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in t for t in targets), targets
    assert not _regions(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    # the user's model: its batchnorm still there, its weights as they were
    assert isinstance(model.bn, nn.BatchNorm2d)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)


def test_an_exported_graph_module_given_to_capture_is_inlined_in_the_copy_only():
    model, x = _warm(NoGrad()), torch.randn(2, 4)
    mine = torch.export.export(model, (x,), strict=False).module()
    gm = fxopt.capture(mine, (x,))
    assert not _regions(gm) and len(_regions(mine)) == 1
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
