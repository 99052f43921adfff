"""Run a GraphModule node by node, on the same inputs its forward takes.

Graphs from torch.export take flattened (pytree) inputs and rebuild structured outputs; graphs
from symbolic tracing take the forward's own arguments. `flatten_inputs` hides the difference,
so analyses (shapes, calibration) and verification (per-node values) work on both.
"""
from __future__ import annotations

import copy

from typing import Any, Callable

import torch
import torch.fx
from torch.fx.graph import _PyTreeCodeGen


def flatten_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict | None = None) -> list:
    """The values the graph's placeholders receive for `gm(*args, **kwargs)`."""
    kwargs = kwargs or {}
    codegen = gm.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen) and codegen.pytree_info is not None:
        return _flatten_pytree_inputs(gm, codegen.pytree_info, args, kwargs)
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


def _flatten_pytree_inputs(gm: torch.fx.GraphModule, info: Any, args: tuple, kwargs: dict) -> list:
    """Bind (args, kwargs) to the forward's names and flatten them as its generated code does.

    A torch.export module's forward takes the original argument names and flattens them with
    `tree_flatten_spec(([positional...], {keyword: ...}), in_spec)`; calling
    `process_inputs(*args)` instead would drop keyword arguments (or reject them).
    """
    from torch.fx import _pytree as fx_pytree

    names = list(info.orig_args)
    if names and names[0] == "self":
        names = names[1:]
    if len(args) > len(names):
        raise TypeError(f"{type(gm).__name__} takes {len(names)} inputs ({', '.join(names)}), got {len(args)}")
    bound = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in names:
            raise TypeError(f"unexpected input '{key}'; the graph takes: {', '.join(names)}")
        if key in bound:
            raise TypeError(f"input '{key}' given twice")
        bound[key] = value
    missing = [n for n in names if n not in bound]
    if missing:
        raise TypeError(f"missing input(s) {', '.join(missing)} for {type(gm).__name__}")
    spec = info.in_spec
    if (spec.type is tuple and spec.num_children == 2 and spec.child(0).type is tuple
            and spec.child(1).type is dict):
        count = spec.child(0).num_children
        tree: Any = (
            [bound[n] for n in names[:count]],
            {k: bound[v] for k, v in zip(spec.child(1).context, names[count:])},
        )
    else:
        tree = [bound[n] for n in names]
    return list(fx_pytree.tree_flatten_spec(tree, spec))


class _ObservingInterpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, observe: Callable[[torch.fx.Node, Any], Any] | None,
                 private_buffers: bool = False):
        super().__init__(gm, garbage_collect_values=observe is None)
        self._observe = observe
        self._private: dict[str, torch.Tensor] | None = {} if private_buffers else None
        self._private_modules: dict[str, torch.nn.Module] = {}

    def fetch_attr(self, target: str) -> Any:
        value = super().fetch_attr(target)
        if self._private is not None and isinstance(value, torch.Tensor) \
                and not isinstance(value, torch.nn.Parameter):
            # a stateful graph (export's `copy_` into a buffer) writes into its own copy
            if target not in self._private:
                self._private[target] = value.clone()
            return self._private[target]
        return value

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        if self._private is None:
            return super().call_module(target, args, kwargs)
        # Modules that update their buffers when run (observers, training-mode batchnorm)
        # run as private copies, so observing the graph leaves its state untouched.
        module = self._private_modules.get(target)
        if module is None:
            module = self.fetch_attr(target)
            if any(True for _ in module.buffers()):
                module = copy.deepcopy(module)
            self._private_modules[target] = module
        return module(*args, **kwargs)

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        if self._observe is None:
            return value
        replaced = self._observe(n, value)
        return value if replaced is None else replaced


def fresh_inputs(args: tuple, kwargs: dict | None = None) -> tuple[tuple, dict]:
    """Copies of the tensors in `args` / `kwargs` (structure kept), for one run of a model.

    A model that writes into its inputs (`x.add_(1)`) then changes neither the caller's
    tensors nor what the next run (the other side of a comparison) sees.

    >>> x = torch.zeros(2)
    >>> (y,), _ = fresh_inputs((x,))
    >>> _ = y.add_(1); x.tolist()
    [0.0, 0.0]
    """
    clone = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
    new_args, new_kwargs = torch.utils._pytree.tree_map(clone, (tuple(args), dict(kwargs or {})))
    return new_args, new_kwargs


def run_graph(
    gm: torch.fx.GraphModule,
    args: tuple,
    kwargs: dict | None = None,
    observe: Callable[[torch.fx.Node, Any], Any] | None = None,
    *,
    private_buffers: bool = False,
) -> Any:
    """Run `gm` like `gm(*args, **kwargs)`, calling `observe(node, value)` after every node.

    `observe` may return a replacement value for the node (used by calibration and
    fault-injection tests); returning None keeps the computed value. The structured output
    (dict, dataclass, tuple) is rebuilt exactly as the module's own forward would.
    With `private_buffers`, buffers read through `get_attr` are cloned first, so a graph that
    writes into its buffers (export's `copy_` for mutated state) leaves the module untouched —
    analyses and verification use this to observe without changing anything.
    """
    flat = flatten_inputs(gm, args, kwargs)
    if observe is None and not private_buffers:
        interp = torch.fx.Interpreter(gm)
    else:
        interp = _ObservingInterpreter(gm, observe, private_buffers)
    out = interp.run(*flat, enable_io_processing=False)
    return gm.graph._codegen.process_outputs(out)


def node_values(gm: torch.fx.GraphModule, args: tuple, kwargs: dict | None = None) -> dict[str, Any]:
    """Every node's value (by node name) for one run; memory grows with the graph."""
    values: dict[str, Any] = {}

    def keep(node: torch.fx.Node, value: Any) -> None:
        values[node.name] = value

    run_graph(gm, args, kwargs, keep, private_buffers=True)
    return values
