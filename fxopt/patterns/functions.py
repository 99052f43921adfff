"""Patterns written as plain Python functions.

`pattern_from_function(fn)` traces `fn` with torch.fx and turns its ops into an `Op` tree by
their op-view kinds, so the function matches every spelling of the same ops:

- parameters without a default are tensors (`Var`);
- parameters with a numeric default are scalar operands (`Const`), e.g. an attention scale;
- a parameter passed as an op's weight or bias (`F.linear(x, w, b)`) binds that op's
  parameter, whether the graph holds it in a module (`nn.Linear`) or as a `get_attr`;
- literal non-tensor arguments written in the call (`softmax(s, dim=-1)`, `x / 8.0`) must
  be equal in the graph; arguments left out are not constrained, except those that change
  what the op computes (`OpSpec.modifiers`: add's `alpha`, div's `rounding_mode`), which must
  then be neutral, and a weight or bias left out, which the graph's op must not have either
  (`F.linear(x, w)` does not match a linear with a bias: the replacement could not take it);
- a scalar operand keeps its side: `1.0 - x` does not match `x - 1.0`.

    >>> import torch, torch.nn.functional as F
    >>> from fxopt.patterns import pattern_from_function
    >>> def linear_relu(x, w, b):
    ...     return F.relu(F.linear(x, w, b))
    >>> pattern_from_function(linear_relu)
    relu(linear(x))
"""
from __future__ import annotations

import inspect
import numbers
from typing import Any, Callable

import torch
import torch.fx

from ..ir import bind_arguments, op_view, spec_for
from .core import Const, Op, PatternNode, Var


def pattern_from_function(fn: Callable[..., Any]) -> PatternNode:
    """An `Op` tree equivalent to `fn`; see the module docstring for the conventions."""
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)):
        raise TypeError(f"pattern_from_function takes a Python function (a def or a lambda) written with "
                        f"the ops to match, got {type(fn).__name__}")
    sig = inspect.signature(fn)
    consts = {name for name, p in sig.parameters.items()
              if p.default is not inspect.Parameter.empty and isinstance(p.default, numbers.Number)}
    gm = torch.fx.symbolic_trace(fn)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    root = output.args[0]
    if not isinstance(root, torch.fx.Node):
        raise ValueError(f"pattern function {fn.__name__} must return one tensor")
    counter = [0]
    return _convert(gm, root, consts, counter, fn.__name__)


def _convert(gm, node: torch.fx.Node, consts: set, counter: list, fname: str) -> PatternNode:
    if node.op == "placeholder":
        if node.target in consts:
            raise ValueError(f"pattern function {fname}: scalar parameter '{node.target}' can only be "
                             "an operand of an elementwise op")
        return Var(node.target)
    view = op_view(gm, node)
    if view is None:
        raise ValueError(f"pattern function {fname}: '{node.format_node()}' is not an op fxopt's op "
                         "view knows; patterns match op kinds (see fxopt.ir.SPECS)")
    spec = spec_for(gm, node)
    written = dict(zip(spec.arg_names, node.args))
    written.update(node.kwargs)
    inputs: list[PatternNode] = []
    scalar = None
    params: dict[str, str] = {}
    attrs: dict[str, Any] = {}
    scalar_first = False
    for key, value in written.items():
        if key in spec.param_args and isinstance(value, torch.fx.Node) and value.op == "placeholder":
            params[key] = value.target
        elif key in spec.tensor_args:
            if isinstance(value, torch.fx.Node) and value.op == "placeholder" and value.target in consts:
                scalar = Const(value.target)
            elif isinstance(value, torch.fx.Node):
                inputs.append(_convert(gm, value, consts, counter, fname))
            elif isinstance(value, numbers.Number):
                scalar = Const(f"_literal{counter[0]}", check=_equals(value), literal=value)
                counter[0] += 1
            scalar_first = scalar_first or (scalar is not None and not inputs and key == spec.tensor_args[0])
        elif not isinstance(value, torch.fx.Node) and key not in _IGNORED:
            attrs[key] = value
    # What the function itself fixes, no argument of it can change (relu6's bounds, conv2d's
    # `transposed`, zeros_like's fill value): the ops of its kind that differ there compute
    # other things (hardtanh(-2, 2), conv_transpose2d, ones_like).
    attrs.update({key: value for key, value in spec.defaults.items()
                  if key not in spec.arg_names and key not in written and key not in attrs})
    counter[0] += 1
    name = f"{view.kind}_{counter[0]}" if params else None
    commutative = view.kind in ("add", "mul") and len(inputs) == 2
    left_out = [key for key in spec.param_args if key not in written]
    return Op(view.kind, *inputs, name=name, scalar=scalar, attrs=attrs, params=params,
              commutative=commutative, scalar_first=scalar_first, check=_without(left_out) if left_out else None)


def _without(names: list[str]) -> Callable[[Any], bool | str]:
    """An op check: the graph's op has none of the weights/biases the pattern function left out
    (a replacement written without them would drop them)."""
    def check(view) -> bool | str:
        bound = bind_arguments(view.node, spec_for(view.node.graph.owning_module, view.node)) \
            if view.node.op != "call_module" else {}
        for key in names:
            if view.param(key) is not None or isinstance(bound.get(key), torch.fx.Node):
                return f"it has a {key} the pattern function leaves out (take it as a parameter to bind it)"
        return True

    return check


# Arguments that do not change the value an op computes.
_IGNORED = {"inplace"}


def _equals(value: Any) -> Callable[[Any], bool]:
    def check(got: Any) -> bool:
        return isinstance(got, numbers.Number) and abs(float(got) - float(value)) <= 1e-6 * max(1.0, abs(value))

    check.__name__ = f"equals_{value}"
    return check
