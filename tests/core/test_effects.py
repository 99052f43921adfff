"""In-place writes: which values they reach (`written_in_place`) and which can be rewritten out
of place (`functionalize_writes`)."""
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxopt.ir import functionalize_writes, written_in_place


def _trace(fn) -> torch.fx.GraphModule:
    class Wrap(nn.Module):
        def forward(self, x):
            return fn(x)

    return torch.fx.symbolic_trace(Wrap())


def _check_same(fn, rewritten: int | None) -> torch.fx.GraphModule:
    gm = _trace(fn)
    x = torch.randn(3, 4)
    want = fn(x.clone())
    count = functionalize_writes(gm)
    assert rewritten is None or count == rewritten
    gm.graph.lint()
    torch.testing.assert_close(gm(x.clone()), want)
    return gm


def _relu_then_read(x):
    h = x * 2
    h.relu_()
    return h + 1


def _gate_then_read(x):
    h = x - 0.5
    F.relu(h, inplace=True)
    torch.sigmoid_(h)
    return h * x


def test_writes_into_an_intermediate_become_out_of_place_ops_read_after_them():
    gm = _check_same(_relu_then_read, 1)
    assert "relu" in [n.target for n in gm.graph.nodes] and not written_in_place(gm)
    gm = _check_same(_gate_then_read, 2)
    assert not written_in_place(gm)


def _write_seen_through_a_view(x):
    h = x * 2
    v = h[:, :2]
    h.add_(1)
    return v * 3


def _write_into_the_input(x):
    x.mul_(2)
    return x + 1


def _fill(x):
    h = x * 2
    h.fill_(0.5)
    return h + x


def test_writes_a_view_an_input_or_no_out_of_place_twin_would_miss_stay():
    for fn in (_write_seen_through_a_view, _write_into_the_input, _fill):
        gm = _check_same(fn, 0)
        assert written_in_place(gm), fn.__name__


class _NormalizesItsInput(nn.Module):
    """Writes its input in place, then reads it: a preprocessing step inside the model."""

    def forward(self, x):
        x.sub_(0.5).mul_(2.0)
        return x.relu() + 1


class _WritesOneOfTwo(nn.Module):
    def forward(self, x, y):
        x.mul_(2.0)
        return x + y


def test_a_write_into_a_captured_input_is_made_out_of_place_and_copied_back():
    """A write into a graph input kept every reader of it float in quantize (`x.mul_(2)` before
    the first conv); out of place, with the last value copied back, the caller's tensor still
    ends as eager left it."""
    import fxopt

    x = torch.randn(3, 4)
    gm = fxopt.capture(_NormalizesItsInput(), (x.clone(),))
    assert functionalize_writes(gm) == 2
    gm.graph.lint()
    targets = [n.target for n in gm.graph.nodes]
    assert "sub" in targets and "mul" in targets and targets.count("copy_") == 1
    assert set(written_in_place(gm)) == {"x", "sub_", "copy_"}  # only the copy back writes x now
    eager_input, graph_input = x.clone(), x.clone()
    torch.testing.assert_close(gm(graph_input), _NormalizesItsInput()(eager_input))
    torch.testing.assert_close(graph_input, eager_input)  # the write-back


def test_an_input_another_input_could_alias_keeps_its_write():
    """``m(x, x)``: made out of place, the write into x would not reach y."""
    import fxopt

    x = torch.randn(3)
    gm = fxopt.capture(_WritesOneOfTwo(), (x.clone(), x.clone()))
    assert functionalize_writes(gm) == 0
    shared_eager, shared_graph = x.clone(), x.clone()
    torch.testing.assert_close(gm(shared_graph, shared_graph), _WritesOneOfTwo()(shared_eager, shared_eager))
    # another dtype cannot be the same tensor: rewritten
    gm = fxopt.capture(_WritesOneOfTwo(), (x.clone(), torch.arange(3)))
    assert functionalize_writes(gm) == 1


class _ViewsThenWrites(nn.Module):
    """An einsum that only permutes returns a view of x: the write after it reaches what it read."""

    def forward(self, x):
        y = torch.einsum("nchw->nhwc", x)
        x.mul_(2.0)
        return y.permute(0, 3, 1, 2) + 1


def test_an_input_viewed_by_an_einsum_before_its_write_keeps_the_write():
    """Adversary: made out of place, the einsum's view read x before the doubling (1.65 off)."""
    import fxopt

    x = torch.randn(2, 3, 4, 5)
    gm = fxopt.capture(_ViewsThenWrites(), (x.clone(),))
    assert functionalize_writes(gm) == 0
    eager_input, graph_input = x.clone(), x.clone()
    torch.testing.assert_close(gm(graph_input), _ViewsThenWrites()(eager_input), rtol=0, atol=0)
    torch.testing.assert_close(graph_input, eager_input, rtol=0, atol=0)


def _chained_through_detach(x):
    h = x * 2
    h.detach().mul_(0.0).add_(1.0)  # the add writes what mul_ returned: h itself
    return h + x


def _chained_writes(x):
    h = x * 2
    h.mul_(0.5).add_(1.0)
    return h * x


def test_a_write_into_what_an_in_place_op_returned_writes_its_input():
    """``t.mul_(0)`` returns t: the add after it wrote a fresh value as far as the analysis
    knew, was made out of place and dropped (h kept 0, not 1: 0.96 off after `fuse`)."""
    _check_same(_chained_through_detach, 0)  # a write through a view stays
    _check_same(_chained_writes, None)  # both writes out of place, or neither: the same values


def test_buffer_state_writes_back_only_the_buffers_a_run_changed():
    """A write into an unchanged buffer (an int8 model's bias shared with the verification
    reference) is what the write guards refuse: restore leaves those alone."""
    from fxopt.ir import BufferState

    module = nn.Module()
    module.register_buffer("steps", torch.zeros(()))
    module.register_buffer("bias", torch.ones(3))
    state = BufferState(module)
    module.steps += 1
    version = module.bias._version
    state.restore()
    assert module.steps.item() == 0.0 and module.bias._version == version
