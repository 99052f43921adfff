"""Small graph-editing helpers every pass uses, so rewrites look the same everywhere.

Provenance: when a pass makes node `new` compute what `old` computed (a conv that absorbed
its batchnorm now yields the batchnorm's value), `replace_uses(old, new)` records it in
`new.meta["fxopt.computes"]`. Verification uses that to compare each node of an optimized
graph with the node of the original graph that it stands for.
"""
from __future__ import annotations

import copy
import operator
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
import torch.fx
from torch import nn

from .bindings import aten_op_of, op_name
from .opview import bind_arguments, op_view, spec_for, transposed_parameter
from .params import ParamRef, add_tensor_attr, attribute_use_counts, get_attr_value, resolve_attr

COMPUTES = "fxopt.computes"
#: axis -> the size's symbol where torch.export kept a size symbolic (``{0: "s77"}``): what the
#: recorded example shapes no longer say, that two sizes are one whatever the batch.
SYMBOLIC_SIZES = "fxopt.symbolic_sizes"


def origin(node: torch.fx.Node) -> str:
    """Name of the original-graph node whose value `node` reproduces."""
    return node.meta.get(COMPUTES, node.name)


def replace_uses(old: torch.fx.Node, new: torch.fx.Node, *, erase: bool = True) -> None:
    """Route every use of `old` to `new`, mark `new` as computing `old`'s value, drop `old`."""
    new.meta[COMPUTES] = origin(old)
    for key in ("tensor_meta", "val", SYMBOLIC_SIZES):
        if key in old.meta:
            new.meta[key] = old.meta[key]
    old.replace_all_uses_with(new)
    if erase and not old.users:
        old.graph.erase_node(old)


def tensor_meta(node: Any) -> tuple[torch.Size, torch.dtype] | None:
    """(shape, dtype) that capture or the shapes analysis recorded for `node`, if any."""
    if not isinstance(node, torch.fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.shape, val.dtype
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tm.shape, tm.dtype
    return None


def symbolic_sizes(node: Any) -> dict[int, str]:
    """The sizes of `node`'s value that torch.export kept symbolic, as axis -> symbol
    (``{0: "s77"}``, the dynamic batch), recorded at capture; {} for any other graph or node.
    Two values whose sizes have one symbol are equal at every input size, which the example's
    numbers cannot tell (a static 2 and a batch of 2).

        >>> import torch, fxopt
        >>> gm = fxopt.capture(torch.nn.Linear(3, 4), (torch.randn(2, 3),), mode="export")
        >>> linear = next(n for n in gm.graph.nodes if n.name == "linear")
        >>> list(symbolic_sizes(linear))  # dim 0, the batch capture keeps dynamic
        [0]
    """
    return dict(node.meta.get(SYMBOLIC_SIZES) or {}) if isinstance(node, torch.fx.Node) else {}


def call_as(op: str, target: Any, args: tuple, kwargs: dict) -> Any:
    """Run one fx call (`op` "call_function" or "call_method") on the given values: what the
    generated code does for a node, for passes that evaluate or try nodes themselves.

        >>> call_as("call_method", "add", (torch.ones(2), 1.0), {})
        tensor([2., 2.])
    """
    if op == "call_method":
        return getattr(args[0], target)(*args[1:], **kwargs)
    return target(*args, **kwargs)


def drop_empty_cat_inputs(gm: torch.fx.GraphModule) -> int:
    """Remove from every concatenation the stored tensors that add nothing to it: empty ones
    (Hugging Face's first KV-cache step, ``cat([torch.tensor([]), k], dim=-2)``, which export
    lifts as a constant), where the other inputs have the result's dtype (an empty input still
    takes part in type promotion). Stored only: a computed value empty at the example may not
    be at other sizes. Returns how many inputs were removed.

        >>> import torch, torch.fx
        >>> class Cache(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.register_buffer("past", torch.tensor([]))
        ...     def forward(self, k):
        ...         return torch.cat([self.past, k], dim=-2)
        >>> gm = torch.fx.symbolic_trace(Cache())
        >>> from fxopt.analysis import propagate_shapes
        >>> _ = propagate_shapes(gm, (torch.randn(2, 3, 4),))
        >>> drop_empty_cat_inputs(gm), [n.args[0] for n in gm.graph.nodes if n.target is torch.cat]
        (1, [[k]])
    """
    removed = 0
    for node in list(gm.graph.nodes):
        spec = spec_for(gm, node) if node.op in ("call_function", "call_method") else None
        out = tensor_meta(node)
        if spec is None or spec.kind != "cat" or out is None:
            continue
        tensors = bind_arguments(node, spec).get("tensors")
        if not isinstance(tensors, (list, tuple)):
            continue
        kept = [t for t in tensors if not _stored_empty(gm, t)]
        if len(kept) == len(tensors) or not kept:
            continue
        if any((meta := tensor_meta(t)) is None or meta[1] != out[1] for t in kept):
            continue  # the result's dtype may come from an empty input (promotion)
        if "tensors" in node.kwargs:
            node.update_kwarg("tensors", kept)
        else:
            node.update_arg(0, kept)
        removed += len(tensors) - len(kept)
    if removed:
        gm.recompile()
    return removed


def _stored_empty(gm: torch.fx.GraphModule, value: Any) -> bool:
    """Whether `value` reads a stored tensor with no elements."""
    if not isinstance(value, torch.fx.Node) or value.op != "get_attr":
        return False
    stored = get_attr_value(gm, value.target)
    return isinstance(stored, torch.Tensor) and stored.numel() == 0


def unpack_tuples(gm: torch.fx.GraphModule) -> int:
    """Spell every tuple of tensors a symbolic graph computes as a tuple of its pieces: a slice
    (``h.chunk(4, 1)[1:]``), a concatenation (``t[1:] + (h,)``) or a repetition (``t * 2``) of a
    split's tuple, and a split's tuple passed whole (``torch.cat(h.tensor_split(...), 1)``)
    become ``(t[1], t[2], ...)``, so every reader of a piece reads it by index and a rule that
    follows a split's pieces can follow these. Returns how many were rewritten.

        >>> import operator, torch, torch.fx
        >>> from torch.fx.passes.shape_prop import ShapeProp
        >>> gm = torch.fx.symbolic_trace(lambda x: torch.cat(x.chunk(4, 1)[1:] + (x,), 1))
        >>> ShapeProp(gm).propagate(torch.randn(2, 8))
        ... # doctest: +ELLIPSIS
        tensor(...)
        >>> unpack_tuples(gm), [n.args[1] for n in gm.graph.nodes if n.target is operator.getitem]
        (2, [1, 2, 3])
    """
    pieces: dict[torch.fx.Node, list] = {}
    made: list[torch.fx.Node] = []

    def of(value: Any) -> list | None:
        """The piece nodes of a tuple-valued `value`, or None for anything else."""
        if isinstance(value, (tuple, list)):
            return list(value) if all(isinstance(v, torch.fx.Node) for v in value) else None
        if not isinstance(value, torch.fx.Node):
            return None
        if value not in pieces:
            meta = value.meta.get("tensor_meta")
            view = op_view(gm, value) if value.op in ("call_function", "call_method") else None
            if view is None or view.kind not in _PLAIN_TUPLES or hasattr(meta, "shape") \
                    or not isinstance(meta, tuple) or not meta or not all(hasattr(m, "shape") for m in meta):
                return None  # (max/min give a named tuple, read by field: not a plain tuple)
            taken = {u.args[1]: u for u in value.users if _int_getitem(u)}
            with gm.graph.inserting_after(value):
                for i in reversed(range(len(meta))):
                    if i not in taken:
                        taken[i] = gm.graph.call_function(operator.getitem, (value, i))
                        taken[i].meta["tensor_meta"] = meta[i]
                        made.append(taken[i])
            pieces[value] = [taken[i] for i in range(len(meta))]
        return pieces[value]

    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        args = node.args
        spelled = None
        if node.target is operator.getitem and isinstance(args[1], slice) and (p := of(args[0])) is not None:
            spelled = p[args[1]]
        elif node.target is operator.add and len(args) == 2 and (a := of(args[0])) is not None \
                and (b := of(args[1])) is not None:
            spelled = a + b
        elif node.target is operator.mul and len(args) == 2 and type(args[1]) is int \
                and (p := of(args[0])) is not None:
            spelled = p * args[1]
        if spelled is not None:
            for user in list(node.users):
                if _int_getitem(user):
                    user.replace_all_uses_with(spelled[user.args[1]])
                    gm.graph.erase_node(user)
            for user in list(node.users):
                user.args, user.kwargs = torch.fx.node.map_arg(
                    (user.args, user.kwargs), lambda a: tuple(spelled) if a is node else a)
            gm.graph.erase_node(node)
            count += 1
            continue
        # a split's tuple passed whole to another op: the tuple of its pieces
        for arg in node.all_input_nodes:
            if node.target is not operator.getitem and (p := of(arg)) is not None:
                node.args, node.kwargs = torch.fx.node.map_arg(
                    (node.args, node.kwargs), lambda a, arg=arg, p=p: tuple(p) if a is arg else a)
                count += 1
    for piece in made:  # pieces no reader took
        if not piece.users:
            gm.graph.erase_node(piece)
    if count:
        gm.recompile()
    return count


#: Ops whose result is a plain tuple of tensors (not a named one, such as max's).
_PLAIN_TUPLES = frozenset({"split", "chunk", "tensor_split", "unbind"})


def _int_getitem(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem and type(node.args[1]) is int


def weight_matmuls_as_linear(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``x @ W`` and ``addmm(b, x, W)`` with W a 2-D floating parameter stored
    [in, out] (GPT-2's Conv1D, hand-written layers) as ``linear(x, Wᵀ, b)``, Wᵀ a new
    parameter [out, in]: the layout int8 and packed linear kernels take. A bias added right
    after (``x @ W + b``, b of W's output size) joins the linear. The graph computes the same;
    W stays for any other reader. Returns how many were rewritten.

        >>> import torch, fxopt
        >>> class Conv1D(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w, self.b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))
        ...     def forward(self, x):
        ...         return x @ self.w + self.b
        >>> gm = fxopt.capture(Conv1D(), torch.randn(2, 4), mode="symbolic")
        >>> weight_matmuls_as_linear(gm), [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
        (1, ['linear'])
    """
    count = 0
    for node in list(gm.graph.nodes):
        form = _weight_matmul(gm, node)
        if form is None:
            continue
        x, weight, bias, replaced = form
        stored = get_attr_value(gm, weight.target)
        transposed = stored.detach().t().contiguous()
        aten_graph = isinstance(node.target, torch._ops.OpOverload)
        with gm.graph.inserting_before(replaced):  # after the bias, which may come after node
            w_t = gm.graph.get_attr(add_tensor_attr(gm, f"{weight.target}_t", transposed,
                                                    requires_grad=stored.requires_grad))
            linear = gm.graph.call_function(torch.ops.aten.linear.default if aten_graph else nn.functional.linear,
                                            (x, w_t, bias))
        w_t.meta["tensor_meta"] = torch.fx.passes.shape_prop._extract_tensor_metadata(transposed)
        if "val" in weight.meta:
            w_t.meta["val"] = transposed.to("meta")
        linear.meta.update(replaced.meta)
        replace_uses(replaced, linear)  # erases it
        if replaced is not node:
            gm.graph.erase_node(node)
        count += 1
    if count:
        gm.recompile()
    return count


def _weight_matmul(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple | None:
    """``(x, W, bias, node to replace)`` when `node` is ``x @ W`` / ``addmm(b, x, W)`` over a
    2-D floating parameter W (see `weight_matmuls_as_linear`), else None."""
    if node.op not in ("call_function", "call_method"):
        return None
    view = op_view(gm, node)
    if view is None or view.kind not in ("matmul", "addmm") or view.attrs.get("beta", 1) != 1 \
            or view.attrs.get("alpha", 1) != 1:
        return None
    args = bind_arguments(node, spec_for(gm, node))
    x, weight = (args.get("input"), args.get("other")) if view.kind == "matmul" else (args.get("mat1"), args.get("mat2"))
    bias = args.get("input") if view.kind == "addmm" else None
    if not (_is_matrix_parameter(gm, weight) and isinstance(x, torch.fx.Node) and x.op != "get_attr"):
        return None
    w = get_attr_value(gm, weight.target)
    out_features = w.shape[1]
    if bias is not None and not _is_bias(gm, bias, out_features, w.dtype):
        return None
    replaced = node
    if bias is None and len(node.users) == 1:  # ``x @ W + b``: the bias joins the linear
        add = next(iter(node.users))
        add_view = op_view(gm, add) if add.op in ("call_function", "call_method") else None
        if add_view is not None and add_view.kind == "add" and add_view.attrs.get("alpha", 1) == 1:
            add_args = bind_arguments(add, spec_for(gm, add))
            other = add_args.get("other") if add_args.get("input") is node else add_args.get("input")
            if other is not node and _is_bias(gm, other, out_features, w.dtype):
                bias, replaced = other, add
    return x, weight, bias, replaced


def _is_matrix_parameter(gm: torch.fx.GraphModule, node: Any) -> bool:
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return False
    value = get_attr_value(gm, node.target)
    return isinstance(value, nn.Parameter) and value.is_floating_point() and value.dim() == 2


def _is_bias(gm: torch.fx.GraphModule, node: Any, size: int, dtype: torch.dtype) -> bool:
    """A constant [size] of the weight's dtype (an add of another dtype promotes; linear would not)."""
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return False
    value = get_attr_value(gm, node.target)
    return isinstance(value, torch.Tensor) and value.dtype == dtype and tuple(value.shape) == (size,)


def meta_value(node: torch.fx.Node) -> Any:
    """What `node` produced, as a meta tensor (its recorded shape, stride and dtype; no data),
    or the recorded scalar: the input of a trial run that computes no data. An attribute is
    its tensor moved to meta. LookupError when nothing is recorded.

        >>> import torch, fxopt
        >>> gm = fxopt.capture(torch.nn.Linear(4, 3), torch.randn(2, 4))
        >>> [tuple(meta_value(n).shape) for n in gm.graph.nodes if n.op != "output"]
        [(2, 4), (3, 4), (3,), (2, 3)]
    """
    if node.op == "get_attr":
        from .params import get_attr_value

        value = get_attr_value(node.graph.owning_module, node.target)
        return value.to("meta") if isinstance(value, torch.Tensor) else value
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and val.device.type == "meta":
        return val
    tm = node.meta.get("tensor_meta")
    if hasattr(tm, "shape"):
        return torch.empty_strided(tm.shape, tm.stride, dtype=tm.dtype, device="meta")
    if isinstance(tm, (int, float, bool)):
        return tm
    raise LookupError(f"'{node.name}' has no recorded shape or value")


def value_nbytes(node: Any) -> int:
    """Bytes of the tensor `node` produces, from its recorded shape; 0 when unknown."""
    meta = tensor_meta(node)
    if meta is None:
        return 0
    numel = 1
    for d in meta[0]:
        numel *= int(d)
    return numel * meta[1].itemsize


def is_shared(gm: torch.fx.GraphModule, node: torch.fx.Node, params: dict[str, ParamRef],
              counts: Counter | None = None) -> bool:
    """True when the op's module or weights are used elsewhere in the graph too (a weight read
    through its transpose included, `_shared_transpose`).

    `counts`: `attribute_use_counts(gm)` computed once by a caller that asks for many nodes
    (it is a walk over the whole graph); it must be recomputed after the graph changes.
    """
    counts = attribute_use_counts(gm) if counts is None else counts
    if node.op == "call_module" and counts[node.target] > 1:
        return True
    return any(counts[ref.qualname] > 1 for ref in params.values()) \
        or any(_shared_transpose(gm, arg, counts) for arg in node.args)


def _shared_transpose(gm: torch.fx.GraphModule, arg: Any, counts: Counter) -> bool:
    """``x @ W.t()`` reads W through its transpose: shared when W has other readers, or when
    the transpose does (``Et = W.t(); z @ Et + Et.sum(0)``)."""
    base = transposed_parameter(gm, arg) if isinstance(arg, torch.fx.Node) else None
    return base is not None and (counts[base.target] > 1 or len(arg.users) > 1)


def downstream(starts: Iterable[torch.fx.Node],
               through: Callable[[torch.fx.Node], bool] = lambda user: True) -> set[torch.fx.Node]:
    """`starts` and every value computed from them, following only the users `through` admits.

        >>> import torch, torch.fx
        >>> gm = torch.fx.symbolic_trace(lambda x: ((x + 1).relu(), x * 2))
        >>> add = next(n for n in gm.graph.nodes if n.name == "add")
        >>> sorted(n.name for n in downstream([add], through=lambda u: u.op != "output"))
        ['add', 'relu']
    """
    found: set[torch.fx.Node] = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if node not in found:
            found.add(node)
            stack.extend(u for u in node.users if through(u))
    return found


def upstream(starts: Iterable[torch.fx.Node],
             through: Callable[[torch.fx.Node], bool] = lambda node: True) -> set[torch.fx.Node]:
    """`starts` and every value they are computed from, looking past only the nodes `through`
    admits (one it refuses is in the set; what it reads is not), the mirror of `downstream`.

        >>> import torch, torch.fx
        >>> gm = torch.fx.symbolic_trace(lambda x, y: (x + 1).relu() * y)
        >>> mul = next(n for n in gm.graph.nodes if n.name == "mul")
        >>> sorted(n.name for n in upstream([mul], through=lambda n: n.name != "relu"))
        ['mul', 'relu', 'y']
    """
    found: set[torch.fx.Node] = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if node not in found:
            found.add(node)
            if through(node):
                stack.extend(node.all_input_nodes)
    return found


#: Ops whose result views their input only when its strides allow: a base of their own.
_MAY_COPY = frozenset({"contiguous", "reshape", "reshape_as", "flatten", "to"})


def _views_in_eager(value: torch.fx.Node, source: torch.fx.Node) -> bool:
    """Whether a reshape (or flatten) `value` of `source` returns a view in eager: `view` never
    copies (it fails instead), and reshape, flatten or contiguous of a row-major value do not
    copy it (recorded in `source`'s shape metadata, from a run of the graph before lowering)."""
    overload = aten_op_of(value)
    if value.op == "call_method" and value.target == "view" \
            or overload is not None and overload.overloadpacket in (torch.ops.aten.view, torch.ops.aten._unsafe_view):
        return True
    view = op_view(value.graph.owning_module, value)
    if view is None or view.kind == "to" or view.attrs.get("memory_format") not in (None, torch.contiguous_format):
        return False  # (a copy into another layout, `contiguous(memory_format=torch.channels_last)`)
    meta = source.meta.get("tensor_meta")
    return getattr(meta, "memory_format", None) == torch.contiguous_format


def _graph_outputs(output: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg(output.args, found.append)
    return found


#: In-place ops that change a value's sizes or strides, not its elements.
_RESTRIDING = frozenset({"transpose_", "t_", "swapdims_", "swapaxes_", "squeeze_", "unsqueeze_", "as_strided_",
                         "resize_", "resize_as_", "set_"})


def _restrides(node: torch.fx.Node) -> bool:
    return op_name(node) in _RESTRIDING


def _gathers(node: torch.fx.Node) -> bool:
    """Whether `node` indexes with a tensor or a list (``h[:, [0, 1]]``, ``h[mask]``): a copy."""
    if node.target is not operator.getitem or len(node.args) < 2:
        return False
    index = node.args[1]
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, (torch.fx.Node, list, torch.Tensor)) for p in parts)


def contiguous_outputs(gm: torch.fx.GraphModule, ndim: int = 4,
                       among: Collection[torch.fx.Node] = ()) -> int:
    """Make every `ndim`-D graph output, and every output of rank 1 or more in `among`,
    contiguous (a no-op at run time when it already is), keeping the outputs' aliasing.

    A lowering that runs convs channels-last must not hand that layout to the caller: code
    after the model does ``out.view(n, -1)``; `among` names the values computed from such
    layouts at other ranks (a lowered conv1d's result). Outputs that view one value
    (``h, h.transpose(1, 3)``, ``h[:, :2]``, ``h`` written in place, and a reshape, flatten or
    contiguous of ``h`` where the example's run held ``h`` row-major and nothing writes into
    it) are those views of the
    value's one contiguous copy, taken after the graph's writes: outputs that shared memory in
    eager still do, with eager's strides, and a value returned twice is copied once. An output
    alone on its value is copied itself (a small slice of a large value: only the slice). Views of
    an input or a parameter are the caller's layout and stay as they are. Returns how many
    copies were made.

        >>> import torch, torch.fx
        >>> gm = torch.fx.symbolic_trace(lambda x: x.contiguous(memory_format=torch.channels_last))
        >>> from fxopt.analysis import propagate_shapes
        >>> _ = propagate_shapes(gm, (torch.randn(1, 2, 3, 3),))
        >>> contiguous_outputs(gm)
        1
        >>> _ = gm.recompile()
        >>> gm(torch.randn(1, 2, 3, 3)).is_contiguous()
        True
    """
    from .effects import aliases_of, is_view, mutated_input  # effects builds on this module

    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    rebased: dict[torch.fx.Node, torch.fx.Node] = {}
    copies = 0
    written = {mutated_input(gm, n) for n in gm.graph.nodes} - {None}

    def viewed(value: torch.fx.Node) -> torch.fx.Node | None:
        """The tensor `value` surely views (a reshape or contiguous of a strided value copies),
        where a replay of the view on its copy at the end gives `value` (no later in-place
        change of its sizes or strides, ``h.transpose_(2, 3)``)."""
        first = value.args[0] if value.args and isinstance(value.args[0], torch.fx.Node) else None
        if first is None or tensor_meta(first) is None or any(_restrides(u) for u in first.users):
            return None
        view = op_view(gm, value)
        may_copy = view is not None and view.kind in _MAY_COPY \
            or value.op == "call_method" and value.target in _MAY_COPY
        if may_copy and _views_in_eager(value, first) and not aliases_of(gm, value) & written:
            # a reshape of a row-major value, one spelled `view`, or the row-major copy a
            # lowering took of a value eager holds row-major (eager's `contiguous` is the value);
            # not one written through: at run time it may be a copy, which the write went into
            return first
        return None if may_copy or not is_view(gm, value) or _gathers(value) else first

    def base_of(value: torch.fx.Node) -> torch.fx.Node:
        while (source := viewed(value)) is not None:
            value = source
        return value

    def contiguous_copy(value: torch.fx.Node) -> torch.fx.Node:
        """One row-major copy of `value`, taken after the graph's writes."""
        nonlocal copies
        if value not in rebased:
            with gm.graph.inserting_before(output):
                rebased[value] = gm.graph.call_method("contiguous", (value,))
            if "tensor_meta" in value.meta:
                rebased[value].meta["tensor_meta"] = value.meta["tensor_meta"]
            copies += 1
        return rebased[value]

    def on_copy(value: torch.fx.Node) -> torch.fx.Node:
        """`value`, read from the contiguous copy of the value it views."""
        source = viewed(value)
        if source is None:
            return contiguous_copy(value)
        if value not in rebased:
            if mutated_input(gm, value) is not None:  # the written value itself, taken after the write
                rebased[value] = on_copy(source)
            else:  # the same view, of the copy
                new_source = on_copy(source)
                with gm.graph.inserting_before(output):
                    rebased[value] = gm.graph.node_copy(value, lambda n: new_source if n is source else n)
                if "tensor_meta" in value.meta:
                    rebased[value].meta["tensor_meta"] = value.meta["tensor_meta"]
        return rebased[value]

    def needs_copy(value: torch.fx.Node) -> bool:
        meta = tensor_meta(value)
        if meta is None or len(meta[0]) != ndim and not (len(meta[0]) >= 1 and value in among):
            return False
        return base_of(value).op not in ("placeholder", "get_attr")

    returned = [v for v in dict.fromkeys(_graph_outputs(output)) if needs_copy(v)]
    sharing = Counter(base_of(v) for v in returned)

    def wrap(value: torch.fx.Node) -> torch.fx.Node:
        if value not in returned:
            return value
        # outputs sharing a value view its one copy; an output alone on its memory is copied itself
        return on_copy(value) if sharing[base_of(value)] > 1 else contiguous_copy(value)

    output.args = torch.fx.node.map_arg(output.args, wrap)
    return copies


#: node.meta key: the module path a use had before `make_private` gave it its own copy
PRIVATE_OF = "fxopt.private_of"


def module_path(node: torch.fx.Node) -> str | None:
    """The dotted path of the module whose call `node` is (`layers.0.fc1`), in either front end:
    the path it had before `make_private` gave it a copy of its own, a symbolic graph's module
    call, or the innermost module export recorded the op in ('' for the root module's own
    forward); None where nothing says (a symbolic graph's functional op, a node a pass made).

        >>> import torch, fxopt
        >>> gm = fxopt.capture(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(2, 4),), mode="export")
        >>> [module_path(n) for n in gm.graph.nodes if n.op == "call_function"]
        ['0']
    """
    if PRIVATE_OF in node.meta:
        return str(node.meta[PRIVATE_OF])
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return path.replace("L['self'].", "").replace("L__self___", "")
    return None


def make_private(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    """Give `node` its own copy of a module or weights that other nodes share.

    Tied weights and modules called twice are common (one ReLU reused, a shared block); a pass
    that rewrites one site must not silently rewrite the others. Tensors are not copied: the
    new attribute points at the same tensor until a pass replaces it with `ParamRef.set`.
    The module path the node had is kept in ``node.meta[PRIVATE_OF]``, so options
    naming layers (prune's `ignore`) still find every use.
    """
    counts = attribute_use_counts(gm)
    if node.op == "call_module":
        node.meta.setdefault(PRIVATE_OF, node.target)
        module = gm.get_submodule(node.target)
        twin = copy.copy(module)
        twin._parameters = dict(module._parameters)
        twin._buffers = dict(module._buffers)
        twin._modules = dict(module._modules)
        node.target = _fresh_module_name(gm, node.target, twin)
        return
    graph = node.graph
    # positional or keyword: a symbolic trace keeps ``F.layer_norm(h, s, weight=w)`` as written
    for key, arg in [*enumerate(node.args), *node.kwargs.items()]:
        update = node.update_arg if isinstance(key, int) else node.update_kwarg
        if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" and counts[arg.target] > 1:
            if "." in arg.target:  # the owning module's path, as a call_module target would say
                node.meta.setdefault(PRIVATE_OF, arg.target.rsplit(".", 1)[0])
            owner, attr = resolve_attr(gm, arg.target)
            name = _fresh_attr_name(gm, arg.target)
            value = getattr(owner, attr)
            if isinstance(value, nn.Parameter):
                gm.register_parameter(name, value)
            else:
                gm.register_buffer(name, value)
            with graph.inserting_before(node):
                fresh = graph.get_attr(name)
            fresh.meta.update(arg.meta)
            update(key, fresh)
        elif _shared_transpose(gm, arg, counts):  # a transpose of its own, of a private W
            with graph.inserting_before(node):
                own = graph.node_copy(arg)
            own.meta.update(arg.meta)
            update(key, own)
            make_private(gm, own)


def _fresh_attr_name(gm: torch.fx.GraphModule, qualname: str) -> str:
    base = qualname.replace(".", "_") + "_private"
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}{i}"
    return name


def _fresh_module_name(gm: torch.fx.GraphModule, target: str, module: nn.Module) -> str:
    name = _fresh_attr_name(gm, target)
    gm.add_submodule(name, module)
    return name


def clone_sharing_tensors(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of `gm` with its own graph and module tree but the same tensor objects.

    Cheap even for large models; safe because passes replace tensors instead of writing into
    them (the manager checks version counters to enforce that).
    """
    return deep_copy(gm, memo={id(t): t for t in _all_tensors(gm)})


def deep_copy(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """`copy.deepcopy` without the FutureWarning torch's pytree specs emit when copied, and
    with the opaque script objects of a module (prepacked int8 weights) shared, not copied.

    Copying a packed weight unpacks and re-packs it under the global quantized engine of the
    moment: a model lowered for x86 copied while the engine is onednn gets onednn packs its
    x86-only ops refuse, and loses the per-layer engine lowering chose. Nothing writes into a
    packed weight (passes replace attributes), so the copy may hold the same one.
    """
    memo = {} if memo is None else memo
    if isinstance(obj, nn.Module):
        for module in obj.modules():
            for value in vars(module).values():
                if isinstance(value, torch.ScriptObject):
                    memo.setdefault(id(value), value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(obj, memo)


def _all_tensors(module: nn.Module):
    for m in module.modules():
        yield from m._parameters.values()
        yield from m._buffers.values()
        for value in vars(m).values():
            if isinstance(value, torch.Tensor):
                yield value


def tensor_versions(module: nn.Module) -> dict[int, tuple[str, int]]:
    """id -> (name, version counter) of every parameter and buffer, to detect in-place writes."""
    out = {}
    for name, t in list(module.named_parameters(remove_duplicate=False)) + list(
        module.named_buffers(remove_duplicate=False)
    ):
        if t is not None and not t.is_inference():
            out[id(t)] = (name, t._version)
    return out
