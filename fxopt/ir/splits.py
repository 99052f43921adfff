"""A split's pieces as slices of its input: ``a, b = h.chunk(2, 1)`` read piece by piece becomes
``h.narrow(1, 0, n1)`` and ``h.narrow(1, n1, n2)``.

A tuple is no tensor: a pass that follows tensors (int8 lowering passes an int8 value through
a slice on its input's grid) stops at a split, and every piece read after it (ShuffleNetV2's
channel split, YOLOv8's C2f, a GLU) left the passes' reach. A piece is a narrow of the input,
the view the split returns, so the rewrite is exact.

Where a piece's bounds depend on the input's size (a symbolic graph runs at any size), they
are computed from ``h.size(dim)`` in the graph, as the split computes them; in an export graph
they are numbers, and a split along a size export kept symbolic (the batch) stays.

    >>> import torch, torch.fx
    >>> from torch.fx.passes.shape_prop import ShapeProp
    >>> gm = torch.fx.symbolic_trace(lambda x: (lambda t: t[0] * t[1])(x.chunk(2, 1)))
    >>> _ = ShapeProp(gm).propagate(torch.randn(2, 6))
    >>> splits_as_slices(gm), sum(n.target is torch.narrow for n in gm.graph.nodes)
    (1, 2)
    >>> gm(torch.arange(10.).view(1, 10))  # the pieces of any width, as the split made them
    tensor([[ 0.,  6., 14., 24., 36.]])
"""
from __future__ import annotations

import operator
import torch
import torch.fx

from .opview import op_view
from .rewrite import replace_uses, symbolic_sizes, tensor_meta, unpack_tuples

#: Split kinds whose pieces this rewrites: equal pieces of a size or a count, or listed sizes.
_SPLITS = ("chunk", "split")


def splits_as_slices(gm: torch.fx.GraphModule) -> int:
    """Rewrite each chunk/split of a computed value whose every reader takes one piece by a
    constant index into one `torch.narrow` per piece; returns how many splits were rewritten.
    A split whose tuple is read whole (passed to a function, returned) stays, and so does one
    of a stored tensor (`nn.MultiheadAttention`'s packed bias)."""
    unpack_tuples(gm)
    count = 0
    for node in list(gm.graph.nodes):
        view = op_view(gm, node)
        if view is None or view.kind not in _SPLITS or not isinstance(view.input, torch.fx.Node) \
                or view.input.op == "get_attr" or tensor_meta(view.input) is None or not node.users:
            continue  # (a packed parameter's pieces are parameters: `split_packed_parameters`)
        if not all(u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
                   and u.args[1] >= 0 for u in node.users):
            continue
        dim = view.attrs.get("dim", 0)
        rank = len(tensor_meta(view.input)[0])
        if not isinstance(dim, int) or not -rank <= dim < rank:
            continue
        dim %= rank
        bounds = _piece_bounds(gm, node, view, dim)
        if bounds is None:
            continue
        for item in list(node.users):
            with gm.graph.inserting_before(item):
                start, length = bounds(item.args[1])
                piece = gm.graph.call_function(torch.narrow, (view.input, dim, start, length))
            replace_uses(item, piece)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.recompile()
    return count


def _piece_bounds(gm: torch.fx.GraphModule, node: torch.fx.Node, view, dim: int):
    """A function of a piece's index giving its (start, length), numbers or graph nodes (the
    input's size read once, before the first piece); None for a split this does not take."""
    from ..capture import frontend_of  # (the core's capture imports ir: import late)

    source = view.input
    sizes = view.attrs.get("split_size", view.attrs.get("split_sizes"))
    if view.kind == "split" and isinstance(sizes, (list, tuple)):  # listed sizes: numbers
        if not all(isinstance(s, int) for s in sizes):
            return None
        return lambda k: (sum(sizes[:k]), sizes[k])
    step = sizes if view.kind == "split" else view.attrs.get("chunks")
    if not isinstance(step, int) or isinstance(step, bool) or step <= 0:
        return None
    # a symbolic graph runs at any size; export fixes every size it did not keep symbolic (a
    # split along one it kept, the batch, is left: its graph reads sizes by ATen ops)
    if frontend_of(gm) == "export":
        if dim in symbolic_sizes(source):
            return None
        n = int(tensor_meta(source)[0][dim])
        if view.kind == "chunk":
            step = -(-n // step)  # torch.chunk: pieces of ceil(n / chunks)
        return lambda k: (k * step, min(step, n - k * step))
    graph = gm.graph
    with graph.inserting_before(node.next):  # (the split goes; its readers all come after it)
        n = graph.call_method("size", (source, dim))
        if view.kind == "chunk":
            step = graph.call_function(operator.floordiv,
                                       (graph.call_function(operator.add, (n, step - 1)), step))

    def bounds(k: int):
        start = graph.call_function(operator.mul, (step, k)) if k else 0
        rest = graph.call_function(operator.sub, (n, start)) if k else n
        return start, graph.call_function(min, (step, rest))

    return bounds


__all__ = ["splits_as_slices"]
