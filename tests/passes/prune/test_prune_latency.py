"""`prune{cost=latency}`: producers timed at reduced widths, and a selection driven by time.

The mechanism is tested with latency tables (`cost=` a function), so the assertions do not
depend on this machine's timings; one test runs the real stopwatch and checks only what it
must guarantee (a valid, smaller model and the measured slopes in the plan).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.errors import PipelineError
from fxopt.ir import tensor_meta
from fxopt.passes.prune.channel_graph import build_channel_graph
from fxopt.passes.prune.latency import LayerTimer
from fxopt.passes.prune.prune_pass import Prune, analyze


class Chain(nn.Module):
    """Three 16-channel convs; the selection (scope=global) may take channels from any."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        y = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        return self.fc(y.mean((2, 3)))


X = torch.randn(2, 3, 8, 8)


def _widths(gm):
    return {name: tuple(p.shape[:2]) for name, p in gm.named_parameters() if name.endswith("weight")}


def test_selection_follows_the_latency_table_not_the_macs():
    torch.manual_seed(0)
    # c2 costs the same at any width (its kernel is flat), c3 is bilinear. By MACs a channel
    # of c1 saves its row and a column of c2, more than one of c3 (a row, a column of fc); by
    # this table it saves nothing
    table = {"c1": lambda cin, cout: 1e-6, "c2": lambda cin, cout: 1e-4,
             "c3": lambda cin, cout: cin * cout * 1e-6, "fc": lambda cin, cout: 1e-6}
    calls = []

    def measure(name, cin, cout):
        calls.append((name, cin, cout))
        return table[name](cin, cout)

    by_macs = analyze(Chain(), X, ratio=0.4, scope="global").apply()
    by_time = analyze(Chain(), X, ratio=0.4, scope="global", cost=measure)
    pruned = by_time.apply()
    assert _widths(by_macs)["c1.weight"][0] < 16, "by MACs, c1 loses channels"
    assert _widths(pruned)["c1.weight"][0] == 16, "by time, c1's channels save nothing"
    assert by_time.selection.removed >= by_time.selection.target
    assert {name for name, _, _ in calls} == {"c1", "c2", "c3", "fc"}
    # the plan shows the slopes its selection used: c3 saves 16 µs per input or output channel
    assert by_time.costs["timed"]["c3"].per_out_s == pytest.approx(16e-6)
    assert by_time.costs["timed"]["c3"].per_in_s == pytest.approx(16e-6)
    assert by_time.costs["timed"]["c2"].per_out_s == 0.0
    assert pruned(X).shape == (2, 4)


def test_refinement_relinearizes_at_the_chosen_widths():
    # a step kernel: time grows with ceil(cout / 8); the first secant (16 -> 8 channels) sees a
    # slope, the one at the chosen width sees none below the block
    def measure(name, cin, cout):
        return (-(-cout // 8)) * cin * 1e-6 if name == "c2" else 1e-6

    plan = analyze(Chain(), X, ratio=0.5, cost=measure)
    timer = LayerTimer(plan.gm, plan.channel_graph, measure=measure)
    first = timer.costs(0.5)["c2"]
    assert first.per_out_s == pytest.approx(16e-6 / 8)  # 2 blocks -> 1 block over 8 channels
    assert timer.widths("c2", None) == (16, 16)
    kept = timer.widths("c2", plan.selection.dead)
    assert kept[1] < 16 and plan.apply()(X).shape == (2, 4)


def test_runners_rebuild_each_producer_at_any_width():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1d = nn.Conv1d(4, 6, 3, stride=2)
            self.up = nn.ConvTranspose1d(6, 6, 2, stride=2)
            self.c3d = nn.Conv3d(6, 5, 1)
            self.lin = nn.Linear(5, 7)
            self.w = nn.Parameter(torch.randn(7, 3))  # x @ W, W stored [in, out]

        def forward(self, x):
            y = self.c3d(self.up(F.relu(self.c1d(x)))[..., None, None])
            return self.lin(y.flatten(2).transpose(1, 2)) @ self.w

    x = torch.randn(2, 4, 9)
    for mode in ("symbolic", "export"):
        gm = fxopt.capture(Mixed(), (x,), mode=mode)
        outputs = {n.name: tensor_meta(n)[0] for n in gm.graph.nodes if tensor_meta(n) is not None}
        timer = LayerTimer(gm, build_channel_graph(gm))
        assert len(timer.runners) == 5, (mode, sorted(timer.runners))
        for name, run in timer.runners.items():
            axis = 1 if timer.cg.rules[name].kind.startswith("conv") else -1  # conv: [N, C, ...]
            full = run.make(run.cin, run.cout)()
            assert full.shape == outputs[name], (mode, name)  # the layer as the graph runs it
            fewer = run.make(run.cin - 1, run.cout - 2)()
            assert fewer.shape[axis] == run.cout - 2, (mode, name)


def test_stopwatch_gives_a_valid_smaller_model():
    model = Chain()
    plan = analyze(model, X, ratio=0.5, cost="latency")
    timed = plan.costs["timed"]
    assert set(timed) == {"c1", "c2", "c3", "fc"}
    assert all(c.full_s > 0 and c.per_out_s >= 0 and c.per_in_s >= 0 for c in timed.values())
    pruned = plan.apply()
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert pruned(X).shape == (2, 4)
    result = fxopt.optimize(Chain(), (X,), "prune{ratio=0.5,cost=latency}")
    assert result.module(X).shape == (2, 4)


def test_a_latency_table_without_an_answer_is_named():
    with pytest.raises(ValueError, match=r"layer 'c2' at 16 input / 16 output channels"):
        analyze(Chain(), X, ratio=0.5, cost=lambda name, cin, cout: float("nan") if name == "c2" else 1e-6)


def test_unknown_cost():
    with pytest.raises(ValueError, match="option 'cost'"):
        Prune(cost="flops")
    with pytest.raises(PipelineError, match="cost"):
        fxopt.optimize(Chain(), (X,), "prune{cost=flops}")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stopwatch_times_on_the_weights_device():
    model = Chain().cuda()
    x = X.cuda()
    plan = analyze(model, x, ratio=0.5, cost="latency")
    assert all(run.device.type == "cuda" for run in LayerTimer(plan.gm, plan.channel_graph).runners.values())
    pruned = plan.apply()
    assert next(pruned.parameters()).is_cuda and pruned(x).shape == (2, 4)


def test_layers_that_compute_alike_are_timed_once():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    gm = fxopt.capture(model, (torch.randn(2, 16),))
    timer = LayerTimer(gm, build_channel_graph(gm), rounds=2)
    assert timer.runners["_0"].signature == timer.runners["_2"].signature != timer.runners["_4"].signature
    costs = timer.costs(0.5)
    assert len(timer.seconds) == 6  # full, fewer outputs, fewer inputs: for two signatures, not three layers
    assert costs["_0"] == costs["_2"]
