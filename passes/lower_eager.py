"""`lower-eager` — call an export graph's ATen ops through the bindings eager code calls.

torch.export records every op as an ATen `OpOverload` (`torch.ops.aten.linear.default`).
Called from Python, an OpOverload goes through `OpOverload.__call__` and the boxed,
schema-driven operator call: 1.5-3 µs more per op than `torch.nn.functional.linear` or
`Tensor.view`, whose generated bindings parse their arguments straight into the same
kernel. On a small encoder at batch 1 that is most of the difference between the export
graph and the eager model (zoo BERT, 4 layers of 256, pruned to half: 3.93 ms as exported,
3.16 ms lowered, 3.12 ms for the same-size eager model; docs/benchmarks.md, "Pruning").

Each `aten` op is rewritten to the generated binding of the same name:

    %linear = aten.linear.default(%x, %w, %b)      ->   %linear = torch._C._nn.linear(%x, %w, %b)
    %view = aten.view.default(%linear, [2, 8, 64])  ->   %view = call_method view(%linear, [2, 8, 64])
    %n = aten.sym_size.int(%x, 0)                   ->   %n = call_method size(%x, 0)

— a function of `torch` (or `torch._C._nn`, `_special`, `_linalg`, `_fft`) when there is one,
else a Tensor method when the op's first argument is the Tensor `self` (`fxopt.ir.eager_call`).
The binding takes the schema's own argument names and picks the overload from the
arguments, which the export call already matches — except where a binding is written by
hand and takes other arguments (`Tensor.to` has no `layout`). So each rewrite is tried
first: binding and overload run on the node's recorded shapes as meta tensors (no data, no
compute), and the node is rewritten only if the binding accepts the arguments and gives the
same shapes, strides and dtypes. Kept as they are: ops without a binding
(`aten.slice.Tensor`), ops whose binding fails that trial or that cannot run on meta
tensors, ops that write into an input or draw random numbers (other passes recognise those
by their schema: `dce` must keep them), and every other namespace (`mkldnn`, `quantized`,
...). The stats say which and why.

Run it last: it changes how ops are called, not what they compute (tolerance "exact"). Each
lowered node records its overload (`fxopt.ir.ATEN_OP`), so `op_view`, and every pass built
on it, reads the node exactly as before; a pass that matches raw ATen targets would no
longer see it. Symbolic graphs have no OpOverloads: nothing to do.

    >>> import torch, fxopt
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
    >>> res = fxopt.optimize(model, torch.randn(2, 4), pipeline="lower-eager", mode="export")
    >>> res.passes[0].stats["lowered"]
    {'linear': 1, 'gelu': 1}
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from fxopt import Pass, PassContext, PassResult
from fxopt.analysis import ShapeAnalysis
from fxopt.ir import EagerCall, call_as, call_through_binding, eager_call, meta_value


def _same_result(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype and a.stride() == b.stride()
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same_result, a, b))
    return type(a) is type(b) and a == b


def try_on_meta(node: torch.fx.Node, call: EagerCall) -> bool | str:
    """Does `call` accept `node`'s arguments and give what the overload gives? Both run on
    meta tensors of the recorded shapes; True, or why the node keeps its overload."""
    try:
        args = torch.fx.node.map_arg(node.args, meta_value)
        kwargs = torch.fx.node.map_arg(node.kwargs, meta_value)
    except LookupError as missing:
        return f"no binding tried: argument {missing}"
    except Exception as exc:  # quantized dtypes have no meta tensors
        return f"its arguments cannot be made as meta tensors ({type(exc).__name__})"
    try:
        expected = node.target(*args, **kwargs)
    except Exception:  # data-dependent ops, device moves: no meta kernel to compare with
        return "cannot be tried on meta tensors"
    try:
        got = call_as(call.fx_op, call.target, args, kwargs)
    except Exception as exc:
        return f"its Python binding takes other arguments ({type(exc).__name__})"
    return True if _same_result(expected, got) else "its Python binding gives another result"


@dataclass
class LowerEager(Pass):
    """Rewrite ATen OpOverload calls to the torch functions and Tensor methods eager code calls."""

    name = "lower-eager"
    tolerance = "exact"
    preserves = frozenset({"shapes"})

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        lowered: dict[str, int] = {}
        kept: dict[str, str] = {}
        if ctx is not None and (ctx.example_inputs or ctx.example_kwargs):
            ctx.analyses.get(ShapeAnalysis)  # fresh shapes on every node for the trial
        for node in gm.graph.nodes:
            if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                continue
            call = eager_call(node.target)
            verdict = try_on_meta(node, call) if isinstance(call, EagerCall) else call
            if verdict is not True:
                kept[str(node.target)] = verdict
                continue
            name = node.target.overloadpacket.__name__
            call_through_binding(node, call)
            lowered[name] = lowered.get(name, 0) + 1
        return PassResult(gm, modified=bool(lowered), stats={"lowered": lowered, "kept": kept})
