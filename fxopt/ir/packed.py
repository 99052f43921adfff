"""Parameters packed along one axis and read only in pieces, given one parameter per piece.

torch.nn's `MultiheadAttention` keeps its q, k and v projections in one `in_proj_weight`;
cross-attention (and torch.export, for any attention) slices it into pieces in the graph. A
pass that resizes layers needs each piece as a weight of its own: pruning the q rows must
not touch the k rows, and int8 lowering packs one weight per linear. Splitting the parameter
computes exactly what the slices computed.

    >>> import torch, torch.fx
    >>> class QK(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = torch.nn.Parameter(torch.randn(6, 4))
    ...     def forward(self, a, b):
    ...         wq, wk = self.w.chunk(2)
    ...         return torch.nn.functional.linear(a, wq) @ torch.nn.functional.linear(b, wk).T
    >>> gm = torch.fx.symbolic_trace(QK())
    >>> x, y = torch.randn(2, 4), torch.randn(5, 4)
    >>> before = gm(x, y)
    >>> split_packed_parameters(gm), sorted(name for name, _ in gm.named_parameters())
    (1, ['w_0', 'w_1'])
    >>> torch.equal(gm(x, y), before)
    True
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from .params import attribute_use_counts, resolve_attr


@dataclass(frozen=True)
class _Piece:
    """The graph value that reads rows ``start:stop`` of the packed tensor along `dim`."""

    node: torch.fx.Node
    dim: int
    start: int
    stop: int


def split_packed_parameters(gm: torch.fx.GraphModule) -> int:
    """Replace each parameter or buffer that the graph reads only as disjoint blocks along one
    axis (`chunk`, `split`, `split_with_sizes`, a slice, `narrow`; any op whose results are
    such views) by one tensor per block, on the same module, named ``<attr>_<k>`` in row order.

    Left alone: a tensor a module call also reads, one read whole or as overlapping or strided
    blocks, and blocks along different axes. Rows no piece reads are dropped. Returns how many
    tensors were split. Exact: each new tensor holds the values its block held.
    """
    counts = attribute_use_counts(gm)
    split = 0
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or counts[node.target] != len(node.users):
            continue  # a module call or another get_attr reads it too
        owner, attr = resolve_attr(gm, node.target)
        value = getattr(owner, attr, None)
        if attr not in owner._parameters and attr not in owner._buffers or not isinstance(value, torch.Tensor) \
                or value.dim() == 0:
            continue
        pieces = _pieces(node, value)
        if pieces is None:
            continue
        _replace_by_pieces(gm, node, owner, attr, value, pieces)
        split += 1
    if split:
        gm.graph.lint()
        gm.recompile()
    return split


def _pieces(node: torch.fx.Node, value: torch.Tensor) -> list[_Piece] | None:
    """The blocks every reader of `node` takes, or None when they are not disjoint blocks along
    one axis. Each reader runs on a meta tensor shaped like `value` (no data read, none can be
    written): its results (or the `getitem`s of a tuple result) must be views onto one
    contiguous range of one axis."""
    probe = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    pieces: list[_Piece] = []
    for user in node.users:
        result = _evaluate(user, node, probe)
        if result is None:
            return None
        if isinstance(result, torch.Tensor):
            readers = [(user, result)]
        elif isinstance(result, (tuple, list)) and user.users and all(_tuple_index(u) is not None for u in user.users):
            readers = [(u, result[_tuple_index(u)]) for u in user.users]
        else:
            return None
        for reader, view in readers:
            piece = _block(reader, view, probe)
            if piece is None:
                return None
            pieces.append(piece)
    if not pieces or len({p.dim for p in pieces}) != 1:
        return None
    ordered = sorted(pieces, key=lambda p: p.start)
    if any(a.stop > b.start for a, b in zip(ordered, ordered[1:])):
        return None  # overlapping reads share rows: one parameter each would untie them
    if len(ordered) == 1 and (ordered[0].start, ordered[0].stop) == (0, value.shape[ordered[0].dim]):
        return None  # read whole
    return ordered


def _evaluate(user: torch.fx.Node, node: torch.fx.Node, value: torch.Tensor) -> Any:
    """What `user` returns for `value` in place of `node`, when its other arguments are
    constants; None when they are not, or it fails (`value` is a meta tensor: an op that
    needs data fails)."""
    def constant(arg: Any) -> Any:
        if isinstance(arg, torch.fx.Node):
            if arg is not node:
                raise LookupError(arg.name)
            return value
        return arg

    try:
        args = torch.fx.node.map_aggregate(user.args, constant)
        kwargs = torch.fx.node.map_aggregate(user.kwargs, constant)
        with torch.no_grad():
            if user.op == "call_function":
                return user.target(*args, **kwargs)
            if user.op == "call_method":
                return getattr(args[0], user.target)(*args[1:], **kwargs)
    except Exception:  # not a slicing op of constants: leave the tensor as it is
        return None
    return None


def _tuple_index(node: torch.fx.Node) -> int | None:
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int):
        return node.args[1]
    return None


def _block(reader: torch.fx.Node, view: Any, value: torch.Tensor) -> _Piece | None:
    """`view` as rows ``start:stop`` of one axis of `value`, if it is exactly such a view."""
    if not isinstance(view, torch.Tensor) or not (view is value or view._base is value) \
            or view.dim() != value.dim() or view.numel() == 0:
        return None
    differs = [d for d in range(value.dim()) if view.shape[d] != value.shape[d]]
    dim = differs[0] if len(differs) == 1 else 0 if not differs else None
    if dim is None or any(view.stride(d) != value.stride(d) for d in range(value.dim()) if value.shape[d] > 1):
        return None
    if view.shape[dim] > value.shape[dim] or any(view.stride(d) == 0 and view.shape[d] > 1 for d in range(view.dim())):
        return None  # an expand repeats entries (``w.expand(4, 16)`` of a [1, 16] w): no rows of it
    offset = view.storage_offset() - value.storage_offset()
    step = value.stride(dim)
    if offset % step:
        return None
    start = offset // step
    return _Piece(reader, dim, start, start + view.shape[dim])


def _replace_by_pieces(gm: torch.fx.GraphModule, node: torch.fx.Node, owner: nn.Module, attr: str,
                       value: torch.Tensor, pieces: list[_Piece]) -> None:
    """Store each piece on `owner`, point its readers at a `get_attr` of it, drop the packed
    tensor and the slicing nodes left unused."""
    prefix = node.target.rsplit(".", 1)[0] + "." if "." in node.target else ""
    is_parameter = attr in owner._parameters
    for k, piece in enumerate(pieces):
        name = _fresh(owner, f"{attr}_{k}")
        block = value.detach().narrow(piece.dim, piece.start, piece.stop - piece.start).clone()
        if is_parameter:
            owner.register_parameter(name, nn.Parameter(block, requires_grad=value.requires_grad))
        else:
            owner.register_buffer(name, block)
        with gm.graph.inserting_before(piece.node):
            fresh = gm.graph.get_attr(prefix + name)
        fresh.meta.update(piece.node.meta)
        piece.node.replace_all_uses_with(fresh)
    for piece in pieces:
        gm.graph.erase_node(piece.node)
    for slicer in list(node.users):  # a split whose getitems were the pieces
        if not slicer.users:
            gm.graph.erase_node(slicer)
    gm.graph.erase_node(node)
    (owner._parameters if is_parameter else owner._buffers).pop(attr)


def _fresh(owner: nn.Module, name: str) -> str:
    fresh, i = name, 0
    while hasattr(owner, fresh):
        i += 1
        fresh = f"{name}_{i}"
    return fresh
