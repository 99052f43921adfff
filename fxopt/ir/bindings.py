"""The eager Python binding of an ATen op, and the ATen op behind a node that calls one.

torch.export spells every op as an ATen `OpOverload` (`torch.ops.aten.linear.default`); eager
code calls the generated binding of the same name (`torch.nn.functional.linear`,
`Tensor.view`), which takes the schema's own arguments and is cheaper to call. A pass may
rewrite one spelling into the other (`lower-eager`); it records the overload on the node
(`node.meta[ATEN_OP]`) so that `aten_op_of`, and through it `op_view`, still reads the node
under the overload's schema. (Argument order is the schema's, which is not always the
Python API's: `torch.embedding(weight, indices)` vs `F.embedding(input, weight)`.)

    >>> import torch
    >>> eager_call(torch.ops.aten.linear.default)
    EagerCall(fx_op='call_function', target=<built-in function linear>)
    >>> eager_call(torch.ops.aten.view.default), eager_call(torch.ops.aten.add_.Tensor)
    (EagerCall(fx_op='call_method', target='view'), 'writes into an input')
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx

#: node.meta key holding the ATen overload a node was lowered from.
ATEN_OP = "fxopt_aten_op"

# Where the generated Python bindings of ATen functions live, in the order torch exposes them.
_FUNCTION_NAMESPACES = (torch._C._VariableFunctions, torch._C._nn, torch._C._special, torch._C._linalg,
                        torch._C._fft)

# Ops that exist for export's symbolic shapes and have a plain Tensor method with the same meaning.
_METHOD_ALIASES = {"sym_size": "size", "sym_stride": "stride", "sym_numel": "numel",
                   "sym_storage_offset": "storage_offset"}


@dataclass(frozen=True)
class EagerCall:
    """How to call one ATen op from Python: `fx_op` is 'call_function' or 'call_method'."""

    fx_op: str
    target: Callable[..., Any] | str


@functools.cache  # op_view asks again for every view of a lowered node
def eager_call(op: torch._ops.OpOverload) -> EagerCall | str:
    """The eager binding for `op`, or why it gets none: other namespaces, ops that write into
    an input or draw random numbers (passes recognise those by their schema), assertions, and
    ops without a binding.
    """
    if op.namespace != "aten":
        return f"namespace '{op.namespace}'"
    if op._schema.is_mutable:
        return "writes into an input"
    if torch.Tag.nondeterministic_seeded in op.tags:
        return "draws random numbers"
    name = op.overloadpacket.__name__
    if name.startswith("_assert"):
        return "an assertion"
    for namespace in _FUNCTION_NAMESPACES:
        fn = getattr(namespace, name, None)
        if fn is not None and _printable(fn):
            return EagerCall("call_function", fn)
    method = _METHOD_ALIASES.get(name, name)
    first = op._schema.arguments[0] if op._schema.arguments else None
    takes_self = first is not None and first.name == "self" and isinstance(first.type, torch.TensorType)
    if takes_self and callable(getattr(torch.Tensor, method, None)):
        return EagerCall("call_method", method)
    return "no Python binding"


def _printable(fn: Callable[..., Any]) -> bool:
    """Can fx's code generator name `fn`, and does the name it prints call `fn`? It cannot for
    the dunder bindings (`torch.__and__`), which then go through their Tensor method
    (`x.__and__(y)`); and it prints `torch.block_diag` for `_VariableFunctions.block_diag`,
    a name that calls the Python wrapper in torch/functional.py, which takes other arguments
    (`stft`, `tensordot`, `cdist`, `cartesian_prod` alike)."""
    try:
        name = torch.fx.node._get_qualified_name(fn)
    except RuntimeError:
        return False
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr) is fn
    except (ImportError, AttributeError):
        return False


def call_through_binding(node: torch.fx.Node, call: EagerCall) -> None:
    """Make `node` call `call` instead of its overload, remembering the overload."""
    node.meta[ATEN_OP] = node.target
    node.op, node.target = call.fx_op, call.target


def op_name(node: torch.fx.Node) -> str:
    """The bare name of the op `node` calls, one spelling for every front end: `transpose` for
    ``x.transpose``, ``torch.transpose`` and ``aten.transpose.int``; "" for a module call, an
    input or an attribute.

        >>> import torch, torch.fx
        >>> gm = torch.fx.symbolic_trace(lambda x: torch.transpose(x, 0, 1).transpose(0, 1))
        >>> [op_name(n) for n in gm.graph.nodes]
        ['', 'transpose', 'transpose', '']
    """
    if node.op == "call_method":
        return node.target
    if node.op != "call_function":
        return ""
    target = node.target
    return (getattr(target, "_opname", None) or getattr(target, "__name__", "")).split(".")[0]


def aten_op_of(node: torch.fx.Node) -> torch._ops.OpOverload | None:
    """The ATen overload `node` calls: its target, or the one it was lowered from (trusted only
    while the node still calls that overload's binding: a pass that retargets a node or copies
    its meta onto another leaves a stale record behind)."""
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target
    op = node.meta.get(ATEN_OP)
    if op is None or node.op not in ("call_function", "call_method"):
        return None
    call = eager_call(op)
    return op if call == EagerCall(node.op, node.target) else None
