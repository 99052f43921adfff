"""Measured layer costs for `prune{cost=latency}`: what a channel saves in time, not in MACs.

MACs are a poor proxy where a kernel's cost is a step function of the width: on a 2-core AVX2
box a 3x3 convolution from 32 channels at 64x64 to 1 output channel takes about as long as one
to 8 (0.61 vs 0.72 ms; to 32: 1.4 ms), so thinning a layer that far saves MACs and little time. This
module times each producer layer (conv, transposed conv, linear, ``addmm``, ``x @ W``) alone, on random tensors
of the graph's recorded shapes, on the device and in the dtype of its weight, at its full
width and with a fraction of its output or input channels removed (the HALP / NetAdapt
latency-table idea, reduced to the two slopes the selection can use):

    out slope = (T(cin, cout) − T(cin, k·cout)) / (cout − k·cout)     per output channel
    in slope  = (T(cin, cout) − T(k·cin, cout)) / (cin − k·cin)       per input channel

with ``k = 1 − ratio``, the secant to the expected width, or to the widths a selection chose
(`LayerTimer.costs(ratio, dead)`: the pass solves once more with those). Slopes are turned into MAC
equivalents with the measured layers' overall rate (their MACs over their time), so the rest of
the cost model (depthwise and attention MACs, adapters) stays in one unit. Grouped convolutions
(whose widths move in steps of their groups) and embeddings keep their MAC costs.

Timings wobble; each configuration is timed in interleaved rounds and the fastest round kept
(noise on a shared machine only ever adds time), and a slope below zero counts as zero.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from fxopt.ir import op_view, tensor_meta

from .channel_model import ChannelGraph, producer_weights

_CONV = (F.conv1d, F.conv2d, F.conv3d)
_CONV_TRANSPOSE = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


@dataclass(frozen=True)
class LayerCost:
    """A producer's measured cost: time at full width and per channel removed (seconds)."""

    full_s: float
    per_out_s: float
    per_in_s: float
    macs: int


#: A latency table: seconds of one producer layer (node name) at (input, output) channels.
LayerTime = Callable[[str, int, int], float]


class LayerTimer:
    """Times the producers of a channel graph at chosen widths, caching every configuration.

    `measure`, if given, replaces the stopwatch: ``measure(node_name, cin, cout) -> seconds``,
    e.g. a latency table recorded on the target device. Without it each layer runs here, on
    its weight's device (see the module docstring).

    Example::

        >>> import torch, fxopt
        >>> from fxopt.passes.prune.channel_graph import build_channel_graph
        >>> gm = fxopt.capture(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
        ...                                        torch.nn.Linear(64, 8)), torch.randn(4, 64))
        >>> timer = LayerTimer(gm, build_channel_graph(gm), measure=lambda name, cin, cout: cin * cout * 1e-9)
        >>> costs = timer.costs(ratio=0.5)
        >>> costs["_0"].per_out_s, costs["_0"].macs   # one output channel of 64 inputs: 64 ns
        (6.4e-08, 16384)
    """

    def __init__(self, gm: torch.fx.GraphModule, cg: ChannelGraph, measure: LayerTime | None = None,
                 rounds: int = 7, budget_s: float = 0.02):
        self.cg, self.measure, self.rounds, self.budget_s = cg, measure, rounds, budget_s
        nodes = {node.name: node for node in gm.graph.nodes}
        self.runners: dict[str, _Runner] = {}
        for name, rule in cg.rules.items():
            if rule.category == "producer" and name in nodes:
                runner = _runner(gm, nodes[name], rule)
                if runner is not None:
                    self.runners[name] = runner
        # keyed by what the layer computes, so the twelve identical query projections of an
        # encoder are timed once (a latency table is asked by layer name)
        self.seconds: dict[tuple, float] = {}

    def costs(self, ratio: float, dead: np.ndarray | None = None) -> dict[str, LayerCost]:
        """Slopes per timed producer: secants from full width to the widths `dead` leaves
        (to ``1 − ratio`` of the width where `dead` removes nothing, or when it is None)."""
        keep = max(0.0, 1.0 - ratio)
        todo = {}
        for name, run in self.runners.items():
            cin_k, cout_k = self.widths(name, dead)
            cout_k = cout_k if cout_k < run.cout else max(1, round(keep * run.cout))
            cin_k = cin_k if cin_k < run.cin else max(1, round(keep * run.cin))
            todo[name] = ((run.cin, run.cout), (run.cin, cout_k), (cin_k, run.cout))
        self._time(todo)
        out = {}
        for name, ((cin, cout), fewer_out, fewer_in) in todo.items():
            full = self.seconds[self._key(name, (cin, cout))]
            out[name] = LayerCost(full, _slope(full, self.seconds[self._key(name, fewer_out)], cout - fewer_out[1]),
                                  _slope(full, self.seconds[self._key(name, fewer_in)], cin - fewer_in[0]),
                                  self.runners[name].macs)
        return out

    def total_seconds(self, dead: np.ndarray) -> float:
        """Time of every timed producer at the widths `dead` leaves."""
        todo = {name: (self.widths(name, dead),) for name in self.runners}
        self._time(todo)
        return sum(self.seconds[self._key(name, w[0])] for name, w in todo.items())

    def widths(self, name: str, dead: np.ndarray | None) -> tuple[int, int]:
        """(input, output) channels producer `name` keeps under `dead` (at least one each)."""
        run, rule = self.runners[name], self.cg.rules[name]
        if dead is None:
            return run.cin, run.cout
        cout = self._kept(rule.outputs[0], dead, run.cout)
        cin = self._kept(rule.consumed[0][1], dead, run.cin) if rule.consumed else run.cin
        return max(1, cin), max(1, cout)

    def _key(self, name: str, widths: tuple[int, int]) -> tuple:
        return (name if self.measure is not None else self.runners[name].signature, *widths)

    def _kept(self, sid: int, dead: np.ndarray, width: int) -> int:
        positions = self.cg.positions(sid)  # the slot may span a flatten's spatial factor
        return round(width * float((~dead[positions]).sum()) / len(positions))

    def _time(self, todo: dict[str, tuple]) -> None:
        for name, widths in todo.items():
            missing = [w for w in dict.fromkeys(widths) if self._key(name, w) not in self.seconds]
            if not missing:
                continue
            if self.measure is not None:
                for cin, cout in missing:
                    seconds = float(self.measure(name, cin, cout))
                    if not math.isfinite(seconds) or seconds < 0:
                        raise ValueError(f"option 'cost': the latency table gave {seconds!r} seconds for layer "
                                         f"'{name}' at {cin} input / {cout} output channels; need a number >= 0")
                    self.seconds[self._key(name, (cin, cout))] = seconds
                continue
            run = self.runners[name]  # timed beside the full width, so a drift of the machine hits both
            missing = list(dict.fromkeys([(run.cin, run.cout), *missing]))
            times = _fastest_times([run.make(*w) for w in missing], self.rounds, self.budget_s, run.device)
            for w, t in zip(missing, times):
                self.seconds[self._key(name, w)] = t


def _slope(full: float, fewer: float, removed: int) -> float:
    return max(0.0, full - fewer) / removed if removed > 0 else 0.0


def _fastest_times(calls: list[Callable[[], object]], rounds: int, budget_s: float,
                  device: torch.device) -> list[float]:
    """Seconds per call of each callable: the fastest of interleaved rounds."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for call in calls:  # warm up: kernel selection, allocator, caches
            call()
        sync()
        start = time.perf_counter()
        calls[0]()
        sync()
        once = max(time.perf_counter() - start, 1e-7)
        inner = max(1, min(100, int(budget_s / rounds / once)))  # short calls: several per sample
        samples: list[list[float]] = [[] for _ in calls]
        for _ in range(rounds):
            for call, out in zip(calls, samples):
                start = time.perf_counter()
                for _ in range(inner):
                    call()
                sync()
                out.append((time.perf_counter() - start) / inner)
    return [min(s) for s in samples]


class _Runner(NamedTuple):
    """How to time one producer: `make(cin, cout)` returns a call of the op at those widths."""

    make: Callable[[int, int], Callable[[], object]]
    cin: int
    cout: int
    macs: int
    device: torch.device
    signature: tuple  # op, shapes, arguments, dtype, device: equal signatures time alike


def _runner(gm: torch.fx.GraphModule, node: torch.fx.Node, rule) -> _Runner | None:
    """A `_Runner` for a producer node, or None if it is not timed (see the module docstring)."""
    view = op_view(gm, node)
    if view is None or view.input is None or rule.kind == "embedding":
        return None
    x_meta, out_meta = tensor_meta(view.input), tensor_meta(node)
    weight = producer_weights(gm, node, rule).weight.get()
    if x_meta is None or out_meta is None or weight is None:
        return None
    x_shape, dtype, device = tuple(x_meta[0]), weight.dtype, weight.device
    out_shape = tuple(out_meta[0])
    signature = (rule.kind, x_shape, tuple(weight.shape), tuple(sorted((k, repr(v)) for k, v in view.attrs.items())),
                 view.param("bias") is not None, dtype, device)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, device=device)

    if rule.kind in ("conv", "conv_transpose"):
        attrs, transposed = view.attrs, rule.kind == "conv_transpose"
        if attrs.get("groups", 1) != 1 or not attrs.get("dim"):
            return None
        conv = (_CONV_TRANSPOSE if transposed else _CONV)[attrs["dim"] - 1]
        kw = dict(stride=attrs["stride"], padding=attrs["padding"], dilation=attrs["dilation"])
        if transposed:
            kw["output_padding"] = attrs["output_padding"]
        cin, cout = x_shape[1], weight.shape[1 if transposed else 0]
        has_bias = view.param("bias") is not None

        def make(ci: int, co: int):
            x = rand(x_shape[0], ci, *x_shape[2:])
            w = rand(ci, co, *weight.shape[2:]) if transposed else rand(co, ci, *weight.shape[2:])
            b = rand(co) if has_bias else None
            return lambda: conv(x, w, b, **kw)

        # a transposed conv does its kernel once per input position, a conv once per output one
        positions = math.prod(x_shape if transposed else out_shape) // (cin if transposed else cout)
        macs = positions * cin * cout * math.prod(weight.shape[2:])
        return _Runner(make, cin, cout, macs, device, signature)
    if rule.kind in ("linear", "addmm", "matmul"):
        if len(x_shape) < 2 and rule.kind != "linear":
            return None
        cin = x_shape[-1]
        cout = weight.shape[0] if rule.kind == "linear" else weight.shape[-1]
        has_bias = rule.kind == "addmm" or (rule.kind == "linear" and view.param("bias") is not None)

        def make(ci: int, co: int):
            x = rand(*x_shape[:-1], ci)
            b = rand(co) if has_bias else None
            if rule.kind == "linear":
                w = rand(co, ci)
                return lambda: F.linear(x, w, b)
            w = rand(ci, co)
            return (lambda: torch.addmm(b, x, w)) if rule.kind == "addmm" else (lambda: x @ w)

        return _Runner(make, cin, cout, math.prod(out_shape) * cin, device, signature)
    return None
