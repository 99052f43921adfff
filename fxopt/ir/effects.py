"""Which nodes must run even when nobody reads their value.

Dead-code removal, constant folding and the passes that erase what their rewrites leave
behind all ask the same question; this module answers it once.

    >>> import torch, torch.fx
    >>> gm = torch.fx.symbolic_trace(lambda x: (x.add_(1), x.t())[0])
    >>> [(n.name, is_effectful(n)) for n in gm.graph.nodes]
    [('x', True), ('add_', True), ('t', False), ('output', True)]
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx

# Ops that must run even when their value is unused, beyond what fx already knows.
_RANDOM_OR_EFFECTFUL = {
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.rand_like, torch.randn_like,
    torch.bernoulli, torch.normal, torch.multinomial,
}


def is_effectful(node: torch.fx.Node) -> bool:
    """True for nodes DCE and folding must keep: side effects, in-place writes, randomness."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_module" and node.target.startswith("_guards"):
        return True
    if node.is_impure():
        return True
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema
        return schema.is_mutable or target.overloadpacket.__name__.startswith("_assert") \
            or target.overloadpacket in (torch.ops.aten.rand, torch.ops.aten.randn, torch.ops.aten.bernoulli,
                                         torch.ops.aten.dropout, torch.ops.aten.randint)
    if node.op == "call_method" and isinstance(target, str) and _in_place_name(target):
        return True  # Tensor.add_, Tensor.copy_, ... write in place
    if node.kwargs.get("inplace") is True:
        return True  # F.relu(h, inplace=True)
    if node.op == "call_module":
        # nn.ReLU(inplace=True): `self.act(h)` with its result unused still changes h
        owner = node.graph.owning_module
        return owner is not None and getattr(owner.get_submodule(node.target), "inplace", False) is True
    if node.op == "call_function" and _in_place_name(getattr(target, "__name__", "")):
        return True  # torch.relu_(h), operator.iadd
    return target in _RANDOM_OR_EFFECTFUL if callable(target) and _hashable(target) else False


def _in_place_name(name: str) -> bool:
    return (name.endswith("_") and not name.endswith("__")) or name in ("iadd", "isub", "imul", "itruediv")


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


__all__ = ["is_effectful"]
