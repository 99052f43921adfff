"""Run a GraphModule node by node, on the same inputs its forward takes.

Graphs from torch.export take flattened (pytree) inputs and rebuild structured outputs; graphs
from symbolic tracing take the forward's own arguments. `flatten_inputs` hides the difference,
so analyses (shapes, calibration) and verification (per-node values) work on both.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx
from torch.fx.graph import _PyTreeCodeGen


def flatten_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict | None = None) -> list:
    """The values the graph's placeholders receive for `gm(*args, **kwargs)`."""
    kwargs = kwargs or {}
    codegen = gm.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen):
        return list(codegen.process_inputs(*args, **kwargs)) if kwargs else list(
            codegen.process_inputs(*args)
        )
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = list(args)
    for node in placeholders[len(values):]:
        name = node.target.lstrip("*")
        if name in kwargs:
            values.append(kwargs[name])
        elif node.args:
            values.append(node.args[0])  # the default value fx recorded
        else:
            raise TypeError(f"missing input '{name}' for {type(gm).__name__}")
    return values


class _ObservingInterpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, observe: Callable[[torch.fx.Node, Any], Any]):
        super().__init__(gm, garbage_collect_values=False)
        self._observe = observe

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        replaced = self._observe(n, value)
        return value if replaced is None else replaced


def run_graph(
    gm: torch.fx.GraphModule,
    args: tuple,
    kwargs: dict | None = None,
    observe: Callable[[torch.fx.Node, Any], Any] | None = None,
) -> Any:
    """Run `gm` like `gm(*args, **kwargs)`, calling `observe(node, value)` after every node.

    `observe` may return a replacement value for the node (used by calibration and
    fault-injection tests); returning None keeps the computed value. The structured output
    (dict, dataclass, tuple) is rebuilt exactly as the module's own forward would.
    """
    flat = flatten_inputs(gm, args, kwargs)
    if observe is None:
        interp = torch.fx.Interpreter(gm)
    else:
        interp = _ObservingInterpreter(gm, observe)
    out = interp.run(*flat, enable_io_processing=False)
    return gm.graph._codegen.process_outputs(out)


def node_values(gm: torch.fx.GraphModule, args: tuple, kwargs: dict | None = None) -> dict[str, Any]:
    """Every node's value (by node name) for one run; memory grows with the graph."""
    values: dict[str, Any] = {}

    def keep(node: torch.fx.Node, value: Any) -> None:
        values[node.name] = value

    run_graph(gm, args, kwargs, keep)
    return values
