"""Cleanup passes: dead code, no-op nodes, constant subgraphs.

`dce` — removes nodes whose values nobody uses (keeping side effects: in-place ops,
assertions, export guards) and the submodules and attributes left unreferenced.

`remove-noops` — removes ops that return their input unchanged: `nn.Identity`/`aten.alias`,
dropout in eval mode (a module not training, or `training=False`), and `contiguous()` on a
value that is row-major for every input (a linear's or matmul's result, another
`contiguous()`; not a value that merely was contiguous on the example)::

    before:  %d = call_module d(%relu)  ; nn.Dropout, eval      after:  %add = add(%relu, %relu)
             %add = add(%d, %relu)

`fold-constants` — evaluates once every subgraph whose inputs are only parameters and
constants (a transposed weight, a scaled embedding table) and stores the result as a new
attribute read by `get_attr`::

    before:  %w = get_attr w;  %wt = call_method t(%w);  %y = mm(%x, %wt)
    after:   %wt = get_attr wt_folded;  %y = mm(%x, %wt)

Preconditions: none; each runs on symbolic and export graphs. All are exact rewrites.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from fxopt import Pass, PassContext, PassResult
from fxopt.ir import (add_tensor_attr, call_as, delete_unused_attributes, get_attr_value, is_effectful, op_view,
                      replace_uses, written_base)


@dataclass
class DeadCodeElimination(Pass):
    """Remove unused nodes, then submodules and attributes nothing references."""

    name = "dce"
    preserves = frozenset({"shapes"})
    reads_shapes = False  # (no example inputs needed: PassManager does not warn without them)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        removed = 0
        for node in reversed(list(gm.graph.nodes)):
            if not node.users and not is_effectful(node):
                gm.graph.erase_node(node)
                removed += 1
        removed_attrs = delete_unused_attributes(gm)
        return PassResult(gm, modified=bool(removed or removed_attrs),
                          stats={"nodes_removed": removed, "attributes_removed": removed_attrs})


@dataclass
class RemoveNoOps(Pass):
    """Remove identity, eval-mode dropout and contiguous() of values always row-major."""

    name = "remove-noops"
    preserves = frozenset({"shapes"})
    reads_shapes = False  # (no example inputs needed: PassManager does not warn without them)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        counts: dict[str, int] = {}
        for node in list(gm.graph.nodes):
            view = op_view(gm, node)
            if view is None or view.input is None:
                continue
            if not _is_noop(gm, view):
                continue
            replace_uses(node, view.input)
            counts[view.kind] = counts.get(view.kind, 0) + 1
        return PassResult(gm, modified=bool(counts), stats={"removed": counts})


def _is_noop(gm: torch.fx.GraphModule, view) -> bool:
    if view.kind == "identity":
        return True
    if view.kind == "dropout":
        return not view.attrs.get("training", True) or view.attrs.get("p", 0.5) == 0
    if view.kind == "contiguous":
        return _row_major(view) and _always_row_major(op_view(gm, view.input))
    return False


# ops whose result is row-major whatever the layout of their inputs. Contiguity is no property
# of a value in general: the example input was contiguous, the caller's next one may not be,
# and `lower-cpu` makes conv outputs channels-last (a `contiguous()` dropped because the example
# was contiguous made `.view` fail on a transposed input).
_ROW_MAJOR_RESULTS = frozenset({"linear", "addmm", "mm", "bmm", "matmul"})


def _row_major(view) -> bool:
    return view.attrs.get("memory_format", torch.contiguous_format) in (None, torch.contiguous_format)


def _always_row_major(producer) -> bool:
    return producer is not None and (producer.kind in _ROW_MAJOR_RESULTS
                                     or producer.kind == "contiguous" and _row_major(producer))


@dataclass
class FoldConstants(Pass):
    """Precompute subgraphs that depend only on parameters and constants.

    A result computed from a parameter that requires grad is stored as a parameter that
    requires grad (fine-tuning after the pass trains it, as one tensor: `w * 0.5` trains as
    itself, not through `w`); any other result is a buffer. `max_growth` bounds how much larger a folded result may be than the tensors it reads
    (folding `expand` of a bias to a full activation size would trade memory for nothing).
    """

    name = "fold-constants"
    preserves = frozenset({"shapes"})
    reads_shapes = False  # (no example inputs needed: PassManager does not warn without them)
    max_growth: float = 4.0

    def __post_init__(self) -> None:
        if not self.max_growth > 0:
            raise ValueError(f"option 'max_growth' must be > 0 (how many times larger a folded result may be "
                             f"than what it reads), got {self.max_growth}")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        constant = constant_nodes(gm)
        # Fold only the frontier: a constant node some non-constant node consumes.
        frontier = [node for node in gm.graph.nodes if constant[node] and node.op != "get_attr"
                    and not (node.users and all(constant.get(u, False) for u in node.users))]
        folded = fold_constants(gm, frontier, constant, self.max_growth)
        return PassResult(gm, modified=bool(folded), stats={"folded": folded})


def constant_nodes(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, bool]:
    """Node -> whether its value depends only on parameters, buffers and constants."""
    # an attribute the forward writes in place (``state[:, :2].clamp_(...)``) is state, not a
    # constant: a folded view of it would be a copy the write misses
    written = {base for node in gm.graph.nodes if (base := written_base(gm, node)) is not None}
    constant: dict[torch.fx.Node, bool] = {}
    for node in gm.graph.nodes:
        constant[node] = node not in written and _is_foldable(node, constant)
    return constant


def fold_constants(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], constant: dict[torch.fx.Node, bool],
                   max_growth: float = FoldConstants.max_growth) -> int:
    """Evaluate each of `nodes` (constant per `constant_nodes`) once and read the result from a
    new attribute instead; the constant nodes left unused are erased. A result more than
    `max_growth` times the size of what it reads stays computed. Returns how many were folded.

        >>> import torch, torch.fx
        >>> class M(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = torch.nn.Parameter(torch.randn(3, 4))
        ...     def forward(self, x):
        ...         return x @ self.w.t()
        >>> gm = torch.fx.symbolic_trace(M())
        >>> constant = constant_nodes(gm)
        >>> fold_constants(gm, [n for n in gm.graph.nodes if n.name == "t"], constant)
        1
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'get_attr', 'call_function', 'output']
    """
    folded = 0
    for node in nodes:
        value = evaluate_constant(gm, node)
        if not isinstance(value, torch.Tensor) or not _small_enough(node, value, gm, max_growth):
            continue
        trains = reads_trainable(gm, node)  # (a weight made from a parameter: one to fine-tune)
        name = add_tensor_attr(gm, f"{node.name}_folded", value, parameter=trains, requires_grad=trains)
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
        replace_uses(node, attr)
        folded += 1
    if folded:
        for node in reversed(list(gm.graph.nodes)):
            if not node.users and constant.get(node) and not is_effectful(node):
                gm.graph.erase_node(node)
    return folded


def reads_trainable(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether the constant `node` is computed from a parameter that requires grad."""
    return any(isinstance(value := get_attr_value(gm, leaf.target), torch.nn.Parameter) and value.requires_grad
               for leaf in attribute_leaves(node))


def _is_foldable(node: torch.fx.Node, constant: dict) -> bool:
    if node.op == "get_attr":
        return True
    if node.op not in ("call_function", "call_method") or is_effectful(node):
        return False
    inputs = node.all_input_nodes
    return bool(inputs) and all(constant.get(i, False) for i in inputs)


def evaluate_constant(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Any:
    """Value of a constant node, computed by running its constant cone."""
    cache: dict[torch.fx.Node, Any] = {}

    def value_of(n: torch.fx.Node) -> Any:
        if n in cache:
            return cache[n]
        if n.op == "get_attr":
            out = get_attr_value(gm, n.target)
        else:
            out = call_as(n.op, n.target, torch.fx.node.map_arg(n.args, value_of),
                          torch.fx.node.map_arg(n.kwargs, value_of))
        cache[n] = out
        return out

    with torch.no_grad():
        return value_of(node)


def _small_enough(node: torch.fx.Node, value: torch.Tensor, gm: torch.fx.GraphModule, growth: float) -> bool:
    read = sum(t.numel() for n in attribute_leaves(node)
               if isinstance(t := get_attr_value(gm, n.target), torch.Tensor))
    return value.numel() <= growth * max(read, 1)


def attribute_leaves(value: torch.fx.Node) -> list[torch.fx.Node]:
    """The `get_attr` nodes `value` is computed from, in graph order."""
    seen, stack, leaves = set(), [value], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            leaves.append(n)
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(value.graph.nodes)}
    return sorted(leaves, key=order.__getitem__)


__all__ = ["DeadCodeElimination", "FoldConstants", "RemoveNoOps", "attribute_leaves", "constant_nodes",
           "evaluate_constant", "fold_constants", "is_effectful"]
