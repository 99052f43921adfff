"""`quantize`: insert-observers, calibrate on the calibration data, lower-int8 — in one pass.

    quantize{backend=x86,observer=histogram}
    quantize{backend=reference,target_sqnr=30}

Preconditions: `fxopt.optimize(..., calibration=[...])` (or PassManager.run(calibration=...))
gave at least one batch; there is no silent fallback to the example inputs.

A model with nothing to quantize (no int8 pattern, or only float16/bfloat16 values) comes back
as it is, with the stats lower-int8 gives when it lowers nothing and `float_ops` saying why.
"""
from __future__ import annotations

import warnings

from dataclasses import dataclass

import torch.fx

from fxopt import Pass, PassContext, PassResult
from fxopt.calibration import calibrate
from fxopt.distillation import inference_kernels
from fxopt.errors import PassWarning, user_stacklevel
from fxopt.ir import get_attr_value, op_name, op_view

from .insert import InsertObservers, ReduceRange
from .lower import AverageGrid, Backend, LowerInt8, check_target_sqnr, lowering_stats
from .observers import ObserverKind, QuantizationError, observers_in


@dataclass
class Quantize(Pass):
    """Post-training int8 quantization; options as for insert-observers and lower-int8."""

    name = "quantize"
    tolerance = "int8"
    backend: Backend = "x86"
    observer: ObserverKind = "histogram"
    reduce_range: ReduceRange = "auto"
    target_sqnr: float | None = None
    skip: tuple[str, ...] = ()
    average_grid: AverageGrid = "input"
    progress: bool = False

    def __post_init__(self) -> None:
        check_target_sqnr(self.target_sqnr)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        if ctx.calibration is None or len(ctx.calibration) == 0:
            raise QuantizationError(
                "quantize needs calibration data: pass calibration=[batch, ...] to fxopt.optimize "
                "(or to PassManager.run) "
                f"(got {'none' if ctx.calibration is None else 'an empty list'})")
        existing = observers_in(gm)
        if existing:
            raise QuantizationError(
                f"quantize: the graph already has {len(existing)} observers (from insert-observers, e.g. "
                f"'{next(iter(existing))}'); either calibrate it (fxopt.calibrate) and run lower-int8, "
                "or run quantize on a graph without observers")
        _warn_lowered_float_kernels(gm)
        inserted = InsertObservers(self.observer, self.reduce_range, self.backend).run(gm, ctx)
        if inserted.stats["observers"] == 0:
            # No value lowering could quantize: nothing to calibrate, the module is the answer.
            stats = lowering_stats(self.backend, inserted.stats["float_ops"], inserted.stats["reduce_range"])
            _warn_nothing_quantized(inserted.stats["float_ops"])
            return PassResult(inserted.module, modified=False,
                              stats={**stats, "observers": 0, "calibration_batches": len(ctx.calibration)})
        lower = LowerInt8(self.backend, self.target_sqnr, self.skip, self.average_grid)
        if self.skip:  # a typo in skip= is named before calibration runs (55 s of it, quantize tester)
            lower.skipped_layers(inserted.module)
        calibrate(inserted.module, ctx.calibration, progress=self.progress)
        _warn_constant_inputs(inserted.module, len(ctx.calibration))
        lowered = lower.run(inserted.module, ctx)
        stats = dict(lowered.stats)
        if not stats.get("quantized"):  # observed, yet no layer became int8
            _warn_nothing_quantized(stats.get("float_ops", {}))
        else:
            _warn_float_weight_ops(lowered.module, stats.get("float_ops", {}))
        stats["observers"] = inserted.stats["observers"]
        stats["calibration_batches"] = len(ctx.calibration)
        return PassResult(lowered.module, modified=True, stats=stats)


def _warn_float_weight_ops(gm: torch.fx.GraphModule, float_ops: dict[str, str]) -> None:
    """Ops that read a weight tensor but have no int8 kernel (a library's own op, such as the
    grouped matmul Mixtral runs its experts with, a weight_norm layer a symbolic graph calls as
    a module) keep their fp32 cost, often most of the model's: a PassWarning names them, where
    `float_ops` alone is easy to miss (quantize tester: weight-normed layers beside plain ones
    stayed float silently)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    heavy = [name for name, why in float_ops.items() if "no int8 kernel" in why and name in nodes
             and _contracts_weights(gm, nodes[name])]
    if heavy:
        shown = ", ".join(f"'{n}' ({float_ops[n].split(':')[0]})" for n in heavy[:3]) + (" ..." if len(heavy) > 3 else "")
        ops = ("1 op that reads weights has no int8 kernel and stays" if len(heavy) == 1
               else f"{len(heavy)} ops that read weights have no int8 kernel and stay")
        warnings.warn(f"quantize: {ops} float: {shown}",
                      PassWarning, stacklevel=user_stacklevel())


#: Ops that multiply by what they read: a weight among their inputs is compute, not a lookup.
_CONTRACTIONS = frozenset({"matmul", "bmm", "baddbmm", "einsum"})
#: export's recurrent layers (aten ops with no int8 form here)
_RECURRENT = frozenset({"lstm", "gru", "rnn_tanh", "rnn_relu"})
#: Ops that only move or re-type a tensor: a weight read through them is still the weight.
_LAYOUT = frozenset({"transpose", "permute", "reshape", "view", "contiguous", "to", "getitem", "select", "slice",
                     "expand", "unsqueeze", "squeeze", "t", "clone", "_to_copy", "alias"})


def _contracts_weights(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """A contraction, a recurrent layer, a layer with parametrized weights (weight_norm), or an
    op of another library (its own kernel), that reads a floating parameter of two or more
    dims, directly or through layout ops."""
    if node.op == "call_module":  # a symbolic graph's nn.LSTM / nn.GRU / nn.RNN, a weight-normed conv
        module = gm.get_submodule(node.target)
        return isinstance(module, torch.nn.RNNBase) or torch.nn.utils.parametrize.is_parametrized(module)
    if node.op != "call_function":
        return False
    if op_name(node) in _RECURRENT:  # export's aten.lstm: its weights come in a list
        return True
    view = op_view(gm, node)
    namespace = getattr(node.target, "namespace", None)
    if not (view is not None and view.kind in _CONTRACTIONS
            or view is None and namespace not in (None, "aten", "prims", "mkldnn", "quantized", "quantized_decomposed")):
        return False
    return any(_is_weight(gm, a) for a in node.all_input_nodes)


def _is_weight(gm: torch.fx.GraphModule, node: torch.fx.Node, depth: int = 4) -> bool:
    if node.op == "get_attr":
        value = get_attr_value(gm, node.target)
        return isinstance(value, torch.nn.Parameter) and value.is_floating_point() and value.dim() >= 2
    source = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    return depth > 0 and source is not None and op_name(node) in _LAYOUT and _is_weight(gm, source, depth - 1)


def _warn_lowered_float_kernels(gm: torch.fx.GraphModule) -> None:
    """`lower-cpu` before `quantize` leaves its convs as oneDNN fp32 kernels, which have no int8
    form: say so, with the order that works, rather than list them among the float ops."""
    lowered = sorted(((not target.startswith("mkldnn."), name) for name, target in inference_kernels(gm)
                      if "quantize" not in target))  # a kernel op first, its weight packs after
    if lowered:
        warnings.warn(f"quantize: the graph holds float kernels a lowering pass wrote (e.g. '{lowered[0][1]}'), "
                      "which have no int8 form and stay float: run quantize before lower-cpu (it then lowers "
                      "what stays float)", PassWarning, stacklevel=user_stacklevel())


def _warn_constant_inputs(gm: torch.fx.GraphModule, batches: int) -> None:
    """A model input that held one value in every calibration batch (an all-zero mask or
    feature) has an int8 grid of one point: any other value it meets later is clipped to it,
    silently (3.5-6 dB on held-out data). Internal values may legitimately be constant; an
    input is the calibration data itself."""
    placeholders = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
    for observer in observers_in(gm).values():
        core = observer.core
        if observer.node_name in placeholders and observer.batches and not observer.nonfinite \
                and float(core.min_val) == float(core.max_val):
            warnings.warn(f"quantize: input '{observer.node_name}' was {float(core.min_val):g} everywhere in "
                          f"all {batches} calibration batches, so its int8 grid holds that one value and "
                          "clips every other; calibrate with batches that vary it as real data does",
                          PassWarning, stacklevel=user_stacklevel())


def _warn_nothing_quantized(float_ops: dict[str, str]) -> None:
    """A pipeline that asked for int8 and got float says so, with the first reasons (a float64
    model, layers with computed weights)."""
    reasons = sorted(set(float_ops.values()))
    warnings.warn("quantize: nothing was quantized; the module stays float"
                  + (f" ({'; '.join(reasons[:3])})" if reasons else ""), PassWarning, stacklevel=user_stacklevel())
