"""`insert-observers`: put an observer on every activation int8 lowering may need to quantize.

Observed values: the output of every int8 group (conv[+bn][+act], linear[+act], add[+relu],
matmul, cat; see `plan.py`) and every float32 input of a group or of a pass-through op, so that
`lower-int8` can place the int8/float boundary anywhere the minimum cut (or mixed precision)
decides without observing again. Weights need no data; they are quantized at lowering.

Each observer is an identity `call_module` (`_fxq_obs_<value>`) its value flows through::

    before:  %conv = conv2d(%x, %w, %b); %relu = relu(%conv); %fc = linear(%relu, ...)
    after:   %x_obs = _fxq_obs_x(%x); %conv = conv2d(%x_obs, %w, %b); %relu = relu(%conv)
             %relu_obs = _fxq_obs_relu(%relu); %fc = linear(%relu_obs, ...)

Run data through it with `fxopt.calibrate(gm, batches)`, then `lower-int8`. Options:
`observer` (minmax | moving_average | histogram | percentile | mse) and `reduce_range`
(auto: 7-bit activations when the x86 int8 kernels run on a CPU without AVX512-VNNI, as
fbgemm needs there; true/false to force).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx

from fxopt import Pass, PassContext, PassResult
from fxopt.analysis import ShapeAnalysis
from fxopt.errors import node_location
from fxopt.ir import (COMPUTES, bind_arguments, functionalize_writes, metadata_read, op_view, origin, size_read,
                      spec_for, split_packed_parameters, splits_as_slices, weight_matmuls_as_linear,
                      written_in_place)

from ..cleanup import RemoveNoOps, constant_nodes, fold_constants

from .observers import Observer, ObserverKind, QuantizationError, quantized_node
from .plan import build_plan, is_float_value

ReduceRange = Literal["auto", "true", "false"]


def resolve_reduce_range(option: str, backend: str = "x86") -> bool:
    if option == "auto":
        from .lower import cpu_has_vnni

        return backend == "x86" and not cpu_has_vnni()
    return option == "true"


@dataclass
class InsertObservers(Pass):
    """Insert activation observers (see the module docstring)."""

    name = "insert-observers"
    tolerance = "exact"
    observer: ObserverKind = "histogram"
    reduce_range: ReduceRange = "auto"
    #: The backend the module will be lowered to (decides reduce_range=auto).
    backend: Literal["x86", "reference", "cuda"] = "x86"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        if (ctx.example_inputs or ctx.example_kwargs) and not _has_shapes(gm):
            ctx.analyses.get(ShapeAnalysis)
        done = quantized_node(gm)
        if done is not None:
            raise QuantizationError(f"the graph is already quantized ({node_location(done)}); "
                                    "observe and quantize the float model, once")
        reduce_range = resolve_reduce_range(self.reduce_range, self.backend)
        # ``y.relu_()`` then y read (a symbolic graph keeps such writes): out of place, as export
        # writes it, so y and its readers can run in int8 (`written_in_place` keeps the rest float)
        functionalize_writes(gm)
        # eval dropout and identities return their float input: left in, an int8 one (DistilBERT's
        # embedding dropout, read by q/k/v and by the residual add) made its float readers read
        # it rounded (39 vs PT2E's 67 dB, quantize tester); gone, they read the float value
        RemoveNoOps().run(gm, ctx)
        # a channel split's pieces (ShuffleNetV2, YOLOv8's C2f, a GLU) as slices, which pass
        # int8 values through on their grid; a tuple no int8 op reads kept them float
        splits_as_slices(gm)
        one_view_per_reader(gm)
        # cross-attention's q/k/v weights are pieces of one packed parameter: one each, to pack
        split_packed_parameters(gm)
        # ``x @ W`` / ``addmm(b, x, W)`` over a parameter [in, out] (GPT-2's Conv1D): linears
        weight_matmuls_as_linear(gm)
        fold_computed_weights(gm)
        plan = build_plan(gm)
        wanted: dict[str, torch.fx.Node] = {}
        by_name = {n.name: n for n in gm.graph.nodes}
        for out, group in plan.groups.items():
            wanted[out] = by_name[out]
            for i in group.inputs:
                wanted[i.name] = i
        for name in plan.pass_through:
            node = by_name[name]
            for i in node.all_input_nodes:
                if i.op != "get_attr":
                    wanted[i.name] = i
        count = 0
        for name, value in wanted.items():
            if not is_float_value(value) or value.op == "get_attr":
                continue
            target = f"_fxq_obs_{name}"
            kind = "minmax" if self.observer in _CLIPPING and _read_by_a_maximum(gm, value) else self.observer
            gm.add_submodule(target, Observer(name, kind, reduce_range, node_location(value)))
            with gm.graph.inserting_after(value):
                obs = gm.graph.call_module(target, (value,))
            obs.meta.update({k: v for k, v in value.meta.items() if k in ("tensor_meta", "val")})
            value.replace_all_uses_with(obs, delete_user_cb=lambda u, o=obs: u is not o)
            count += 1
        gm.meta.setdefault("fxopt.quantize", {})["observer"] = self.observer
        gm.recompile()
        return PassResult(gm, modified=count > 0, stats={
            "observers": count, "observer": self.observer, "reduce_range": reduce_range,
            "groups": len(plan.groups), "float_ops": dict(plan.unsupported)})


# observers that clip a range's tails to spend the grid on the bulk of the values
_CLIPPING = frozenset({"histogram", "percentile", "mse"})
_MAXIMA = frozenset({"max", "amax", "max_pool", "adaptive_max_pool"})


def _read_by_a_maximum(gm: torch.fx.GraphModule, value: torch.fx.Node) -> bool:
    """Whether a maximum over positions reads `value` (PointNet's ``max(h, 2)``, a global or
    windowed max pool): it returns exactly the tail a clipping observer cuts, so its outputs
    sit on the clip (21 vs 31 dB on a PointNet; 1-1.3 dB behind a 3x3 max pool); such a value
    gets a min/max range."""
    return any((view := op_view(gm, user)) is not None and view.kind in _MAXIMA for user in value.users)


#: Pass-through ops that move elements without computing: views, or a copy in another order.
_MOVES_ONLY = frozenset({"reshape", "flatten", "permute", "transpose", "contiguous"})
#: Readers that always read an int8 input when they are int8 layers (weights or attention).
_WEIGHTED_READERS = frozenset({"conv", "linear", "matmul", "bmm"})


def one_view_per_reader(gm: torch.fx.GraphModule) -> int:
    """Give the readers of a layout op on a float value that are not conv/linear/matmul layers
    their own copy of the op; returns how many copies were made. One op read by int8 layers
    and by a float op (a residual add) was one value: int8 for the layers, so the float op
    read it rounded where the float value was there for free (``x = ln(e).reshape(...)`` read
    by q/k/v and by the add: 39 dB vs PT2E's 77, quantize tester). Apart, the minimum cut
    decides the copy. The layers share the original (one quantize and dequantize for all, an
    adversary measured N of them 1.3-2.6x slower), and only a view is copied: never an op that
    copies its input's elements (a ``contiguous()`` or ``reshape`` of a value the example had in
    another order). Values written in place keep their one op: the write must reach every reader."""
    written = written_in_place(gm)
    made = 0
    for node in list(gm.graph.nodes):
        view = op_view(gm, node)
        if view is None or view.kind not in _MOVES_ONLY or node.name in written \
                or not is_float_value(node) or not _views_its_input(view):
            continue
        readers = [u for u in node.users if size_read(u) is None and metadata_read(u) is None]
        others = [u for u in readers if (v := op_view(gm, u)) is None or v.kind not in _WEIGHTED_READERS]
        if not others or len(others) == len(readers):
            continue
        with gm.graph.inserting_after(node):
            copy = gm.graph.node_copy(node)
        copy.meta[COMPUTES] = origin(node)
        for reader in others:
            reader.replace_input_with(node, copy)
        made += 1
    return made


def _views_its_input(view) -> bool:
    """Whether the layout op returns a view of its input (so a second one costs nothing):
    permute/transpose always; contiguous/reshape/flatten where the example's input was
    row-major (otherwise they copy)."""
    if view.kind in ("permute", "transpose"):
        return True
    meta = view.input.meta.get("tensor_meta") if isinstance(view.input, torch.fx.Node) else None
    return meta is not None and getattr(meta, "memory_format", None) == torch.contiguous_format


def _has_shapes(gm) -> bool:
    return all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op not in ("output", "get_attr"))


def fold_computed_weights(gm: torch.fx.GraphModule) -> int:
    """Fold each conv/linear weight the graph computes from parameters alone (NFNet's weight
    standardization, a weight_norm traced through) into a constant: an int8 kernel packs a
    fixed weight, and the int8 model is for inference, where that weight is fixed. Returns how
    many were folded; a weight that reads the input stays computed (and its layer float)."""
    constant = constant_nodes(gm)
    computed = []
    for node in gm.graph.nodes:
        view = op_view(gm, node) if node.op == "call_function" else None
        if view is None or view.kind not in ("conv", "linear") or view.param("weight") is not None:
            continue
        spec = spec_for(gm, node)
        weight = bind_arguments(node, spec).get("weight") if spec is not None else None
        if isinstance(weight, torch.fx.Node) and weight.op != "get_attr" and constant.get(weight) \
                and weight not in computed:
            computed.append(weight)
    return fold_constants(gm, computed, constant, max_growth=float("inf")) if computed else 0
