"""Facts the channel rules read off fx nodes: shapes, axes, numbers, tuple pieces, signs,
module paths and reshape digit maps (helpers of `channel_graph` and its `rules`)."""
from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch
import torch.fx

from fxopt.ir import ParamRef, bind_arguments, module_path, op_name, op_view, ref_for_get_attr, spec_for, tensor_meta

from .channel_model import CHANNELWISE, Rule, _Pin


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = tensor_meta(node)
    if meta is None:
        return None
    try:
        return tuple(int(d) for d in meta[0])
    except (TypeError, ValueError):
        return None



def _holds_features(node: torch.fx.Node) -> bool:
    """Whether a tensor attribute can carry channels: floating point. An integer or bool buffer
    holds indices or a mask (Hugging Face BERT's ``position_ids``, sliced to the sequence length
    before the position embedding): removing its "channels" would change what is looked up."""
    meta = tensor_meta(node)
    return meta is not None and meta[1].is_floating_point


def _is_parameter(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether a `get_attr` reads a learned parameter (not a buffer or a folded constant)."""
    return isinstance(ref_for_get_attr(gm, node).get(), torch.nn.Parameter)


_INT_ARITHMETIC = (operator.floordiv, operator.mul, operator.add, operator.sub)


# What a weight computed in the graph usually is, so the pin says what to do about it.
_COMPUTED = (" (computed in the graph from the input, from parameters something else also reads, or with an "
             "op that writes in place: a weight computed from parameters alone, as weight standardization "
             "or a mask, prunes)")


def _size_entries(reshape: torch.fx.Node) -> tuple:
    """The size arguments of a reshape/view/expand call: one sequence or spread over the call."""
    args = reshape.args
    return args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]


def _opaque_layer(module: torch.nn.Module) -> str | None:
    """Why a layer fxopt would prune must be called whole: a parametrization computes its
    weight (weight_norm, spectral_norm), or hooks run around its forward."""
    if torch.nn.utils.parametrize.is_parametrized(module):
        name, chain = next(iter(module.parametrizations.items()))
        how = ", ".join(type(p).__name__.lstrip("_") for p in chain)
        return (f"{type(module).__name__} computes its {name} with a parametrization ({how}): call "
                f"torch.nn.utils.parametrize.remove_parametrizations(module, {name!r}) before pruning, or "
                "capture with mode='export', which prunes the layer and keeps the parametrization")
    if module._forward_hooks or module._forward_pre_hooks:
        return f"{type(module).__name__} has forward hooks, which a pruned layer would not run"
    return None


def _is_number(node: Any) -> bool:
    """A Python number computed in the graph (shape arithmetic): recorded as itself."""
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return isinstance(meta, (int, float)) and not isinstance(meta, bool)


def _channelwise(rule: "Rule") -> bool:
    """Whether `rule` computes each output channel from the same channel of its inputs, so a
    dirty value may pass through it (`info["mixes_channels"]`: it also reads the others)."""
    return (rule.category in ("pass", "split") and (rule.kind in CHANNELWISE or rule.info.get("channelwise"))
            and not rule.info.get("mixes_channels"))


def _norm_axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


def _norm_axes(dims: Any, ndim: int) -> list[int]:
    """An axis argument — one int or a sequence (`mean(dim=(1, 2))`, `roll(dims=...)`) — as
    non-negative axes."""
    return [_norm_axis(int(d), ndim) for d in ([dims] if isinstance(dims, int) else dims)]


# Lower bounds of activations, as floating point computes them: ``sigmoid``, ``exp`` and
# ``tanh(x) + 1`` are > 0 in exact arithmetic but underflow to exactly 0 (tanh(-20) + 1 == 0 in
# float32), so only ``>= 0`` holds; a division by them may give 0 / 0.
_ACTIVATION_BOUNDS = {
    "sigmoid": 0.0, "exp": 0.0, "softplus": 0.0, "tanh": -1.0, "softsign": -1.0, "hardsigmoid": 0.0, "abs": 0.0,
    "square": 0.0, "relu": 0.0, "vector_norm": 0.0, "var": 0.0, "std": 0.0,
    "selu": -1.0507009873554805 * 1.6732632423543772,
}
# ops whose every output element is one of their input's, or an average (max) of them: the
# input's bound holds for them too
_KEEPS_BOUND = frozenset({"reshape", "flatten", "unflatten", "permute", "transpose", "expand", "expand_as",
                          "unsqueeze", "squeeze", "to", "contiguous", "clone", "detach", "getitem", "select", "slice",
                          "mean", "amax", "amin", "dropout", "identity", "repeat", "tile", "movedim", "repeat_interleave",
                          "reshape_as", "max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool"})

Bound = tuple[float, bool]  # (b, strict): every element is >= b; strict: > b too, for a reason
                            # rounding cannot undo (rsqrt of a positive is 0 only at infinity)


def _sign(gm: torch.fx.GraphModule, value: Any) -> str | None:
    """"pos" when every element of `value` is > 0, "nonneg" when ≥ 0, else None (unknown) —
    read off the ops that make it (``clamp_min(norm, eps)``, ``var + eps``, ``h * h + eps``), so
    a division by it, or its rsqrt, is known to be finite. Bounds are taken in the value's
    dtype: a sigmoid or ``elu(x) + 1`` may round to 0, so they are only "nonneg".

        >>> import torch, torch.fx
        >>> gm = torch.fx.symbolic_trace(lambda x: (x.var(1, keepdim=True) + 1e-5, x.abs(), x - 1,
        ...                                         torch.nn.functional.elu(x) + 1, x * x + 1e-6))
        >>> {n.name: _sign(gm, n) for n in gm.graph.nodes if n.op.startswith("call")}
        {'var': 'nonneg', 'add': 'pos', 'abs_1': 'nonneg', 'sub': None, 'elu': None, 'add_1': 'nonneg', 'mul': 'nonneg', 'add_2': 'pos'}
    """
    return _sign_of(_lower_bound(gm, value))


def _sign_of(bound: Bound | None) -> str | None:
    if bound is None or bound[0] < 0:
        return None
    return "pos" if bound[0] > 0 or bound[1] else "nonneg"


def _rounded(x: float, like: Any) -> float:
    """`x` as the dtype of the value `like` holds it (float32 unless recorded otherwise):
    ``1e-46`` is 0 in float32, and ``0.1 - 0.1`` of two float32 roundings is 0."""
    meta = like.meta.get("tensor_meta") if isinstance(like, torch.fx.Node) else None
    dtype = getattr(meta, "dtype", torch.float32)
    return float(torch.tensor(x, dtype=dtype if dtype.is_floating_point else torch.float64))


def _lower_bound(gm: torch.fx.GraphModule, value: Any, depth: int = 16) -> Bound | None:
    """A lower bound on every element of `value` (see `Bound`), or None when none is known."""
    if isinstance(value, bool) or depth == 0:
        return None
    if isinstance(value, (int, float)):
        return (float(value), False)
    if not isinstance(value, torch.fx.Node):
        return None
    if _is_number(value):  # shape arithmetic (SimAM's ``h.shape[2] * h.shape[3] - 1``): its value here
        return _lower_bound(gm, value.meta["tensor_meta"])
    view = op_view(gm, value)
    if view is None:
        return None
    kind, inner = view.kind, (lambda v: _lower_bound(gm, v, depth - 1))
    if kind in _ACTIVATION_BOUNDS:
        return (_rounded(_ACTIVATION_BOUNDS[kind], value), False)
    if kind in ("elu", "celu"):  # x > -alpha, and = -alpha once exp(x) underflows
        alpha = view.attrs.get("alpha", 1.0)
        return (_rounded(-alpha, value), False) if isinstance(alpha, (int, float)) and alpha >= 0 else None
    if kind in ("hardtanh", "clamp"):
        low = view.attrs.get("min_val", -1) if kind == "hardtanh" else view.attrs.get("min")
        if isinstance(low, (int, float)) and not isinstance(low, bool):
            below = inner(view.input)
            return below if below is not None and below[0] > low else (_rounded(low, value), False)
        return inner(view.input) if kind == "clamp" and low is None and view.attrs.get("max") is None else None
    if kind == "pow":
        return _power_bound(view, inner, value)
    if kind in ("rsqrt", "reciprocal"):  # of a positive: > 0, and 0 only at infinity
        return (0.0, True) if _sign_of(inner(view.input)) == "pos" else None
    if kind == "getitem" and isinstance(view.input, torch.fx.Node) and _piece_index(value) == 0 \
            and getattr(op_view(gm, view.input), "kind", None) in ("var_mean", "std_mean"):
        return (0.0, False)
    if kind in _KEEPS_BOUND:
        return inner(view.input)
    if kind in ("sum", "sqrt"):  # a sum of values >= b >= 0 is >= b; sqrt is monotone
        below = inner(view.input)
        if below is None or below[0] < 0:
            return None
        return below if kind == "sum" else (_rounded(below[0] ** 0.5, value), below[1])
    if kind in ("add", "sub", "mul", "div"):
        return _arithmetic_bound(gm, value, view, inner)
    return None


def _power_bound(view: Any, inner: Any, value: torch.fx.Node) -> Bound | None:
    """``x ** e`` for a number e (an even one of any x; another of an x >= 0), and ``c ** t``
    of a positive number c (>= 0: it underflows for a very negative t)."""
    e, base = view.attrs.get("exponent"), view.attrs.get("input")
    if isinstance(base, (int, float)) and not isinstance(base, bool):
        return (0.0, False) if base > 0 else None
    if not isinstance(e, (int, float)) or isinstance(e, bool):
        return None
    below = inner(view.input)
    if below is not None and below[0] >= 0:
        if e < 0:
            return (0.0, True) if _sign_of(below) == "pos" else None
        return (_rounded(below[0] ** e, value), False)
    return (0.0, False) if float(e).is_integer() and int(e) % 2 == 0 else None


def _arithmetic_bound(gm: torch.fx.GraphModule, value: torch.fx.Node, view: Any, inner: Any) -> Bound | None:
    """Bounds through + - * /, each operand rounded as the value's dtype holds it: a sum of
    bounded values; a difference less a number; a square (``h * h``) or a product of values
    >= 0; a quotient of a value >= 0 by a positive one."""
    if view.attrs.get("alpha", 1) != 1 or view.attrs.get("rounding_mode") is not None:
        return None
    args = bind_arguments(value, spec_for(gm, value))
    a, b = args.get("input"), args.get("other")
    if view.kind == "mul" and a is b and isinstance(a, torch.fx.Node):
        return (0.0, False)
    bounds = [inner(a), inner(b)]
    if view.kind == "sub":
        if bounds[0] is None or isinstance(b, bool) or not isinstance(b, (int, float)):
            return None
        return (_rounded(bounds[0][0] - _rounded(b, value), value), bounds[0][1])
    if None in bounds:
        return None
    (low_a, strict_a), (low_b, strict_b) = ((_rounded(low, value), strict) for low, strict in bounds)
    if view.kind == "add":
        return (_rounded(low_a + low_b, value), strict_a or strict_b)
    if low_a < 0 or low_b < 0 or view.kind == "div" and _sign_of((low_b, strict_b)) != "pos":
        return None  # (a division by a value that may be 0 may give inf or nan)
    if view.kind == "div":
        return (0.0, False)
    return (_rounded(low_a * low_b, value), False)  # a product of positives may underflow to 0


_ZERO_FACTORIES = ("zeros", "new_zeros", "zeros_like")


def _is_zero_fill(gm: torch.fx.GraphModule, value: Any) -> bool:
    """Whether `value` is all zeros by construction (``x.new_zeros(B, H)``, ``torch.zeros``,
    ``zeros_like``, a fill of 0): a hand-written RNN's initial state."""
    if not isinstance(value, torch.fx.Node) or value.op not in ("call_function", "call_method"):
        return False
    view = op_view(gm, value)
    if view is not None and view.kind in ("fill_like", "new_fill") and "fill_value" in view.attrs:
        fill = view.attrs["fill_value"]
        return isinstance(fill, (int, float)) and not isinstance(fill, bool) and fill == 0
    return op_name(value) in _ZERO_FACTORIES


def _piece_index(node: torch.fx.Node) -> int | None:
    """Which piece of a tuple `node` takes: ``t[i]``, or ``t.values`` / ``t.indices`` of
    max/min's named tuple."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
        return {"values": 0, "indices": 1}.get(node.args[1])
    index = _getitem_index(node)
    return index if isinstance(index, int) else None


def _piece_sizes(split: torch.fx.Node, dim: int, n: int) -> list[int]:
    """The sizes along `dim` of the pieces of a split/chunk/tensor_split whose sizes the graph
    computes (``torch.split(h, h.shape[1] // 4, 1)``, ``h.chunk(h.shape[1] // 4, 1)``): read
    off the split's own recorded metadata, one shape per piece, which names every piece
    whether read or not (``sp[-1]`` is the last). Without it, off the pieces' shapes, which
    must then all be read, by non-negative indices, so that they add up."""
    recorded = split.meta.get("tensor_meta")
    if isinstance(recorded, (tuple, list)) and recorded and all(hasattr(m, "shape") for m in recorded):
        sizes = [int(m.shape[dim]) for m in recorded]
        if sum(sizes) == n:
            return sizes
    sizes: dict[int, int] = {}
    for user in split.users:
        index = _getitem_index(user)
        piece = _shape(user)
        if not isinstance(index, int) or piece is None:
            raise _Pin("split result used other than by getitem")
        sizes[index] = piece[dim]
    if sorted(sizes) != list(range(len(sizes))) or sum(sizes.values()) != n:
        raise _Pin("split sizes computed in the graph and not every piece is used")
    return [sizes[i] for i in range(len(sizes))]


def _getitem_index(node: torch.fx.Node) -> Any:
    """The index of ``value[index]`` when `node` is such a getitem, else None."""
    return node.args[1] if node.op == "call_function" and node.target is operator.getitem else None


def _digit_map(in_shape: tuple, a: int, shape: tuple, t: int, static: bool = False) -> tuple | None:
    """How channel axis `a` of `in_shape` maps onto axis `t` of a reshape to `shape`, read
    off the row-major strides (a reshape keeps the flat order, so an axis of stride I and
    size s owns the flat "digits" [I, I * s)); None when neither axis's digits hold the
    other's. Returns (in_pos, out_pos, how):

    - `t` lies within the channels (stride I_out, a multiple of the channels' I_in, and
      I_out * s dividing I_in * c): channel ch sits at (ch // (I_out / I_in)) % s on t, so
      the channels that share it are one class and the others of its axes keep their sizes;
    - `t` holds the channels whole: position p of t is channel (p // (I_in / I_out)) % c.
      Its other digits are written as constants by apply, so those above the channels must
      come from static axes: whole axes after the leading (batch) one, or any digits when the
      reshape writes `t`'s size as a number (`static`): torch.nn's attention weights path
      merges heads folded into the batch back with their features, ``(T, B * h, d)`` to
      ``(T * B, h * d)``, with ``h * d`` a constant.
    """
    c, s = in_shape[a], shape[t]
    if s == 1:
        return None
    i_in, i_out = math.prod(in_shape[a + 1:]), math.prod(shape[t + 1:])
    if i_out % i_in == 0 and (i_in * c) % (i_out * s) == 0:
        pos = np.arange(c)
        how = "identity" if s == c else f"axis of {s} within {c} channels"
        return pos, (pos // (i_out // i_in)) % s, how
    if i_in % i_out == 0 and (i_out * s) % (i_in * c) == 0:
        above = (i_out * s) // (i_in * c)
        if not static and not any(math.prod(in_shape[k:a]) == above for k in range(1, a + 1)):
            return None
        pos = np.arange(s)
        return (pos // (i_in // i_out)) % c, pos, f"{c} channels within an axis of {s}"
    return None


def _wrapped_region(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether `node` calls a submodule graph (export's ``wrap_with_set_grad_enabled(False,
    body, *operands)`` for a ``torch.no_grad()`` block, ``wrap_with_autocast``)."""
    return node.op == "call_function" and any(
        isinstance(a, torch.fx.Node) and a.op == "get_attr"
        and isinstance(getattr(gm, a.target, None), torch.fx.GraphModule) for a in node.args)


def _prefix_hits(dims: tuple, target: int) -> bool:
    acc = 1
    for d in dims:
        if acc == target:
            return True
        acc *= d
    return acc == target


def _module_name(node: torch.fx.Node, view, ref: ParamRef | None = None) -> str:
    """The dotted module path of a weighted op (`layers.0.fc1`), in either front end; a use
    given its own copy of shared weights (`make_private`) keeps the path it was called by."""
    path = module_path(node)
    if path is not None:
        return path
    ref = ref if ref is not None else view.params.get("weight")
    return ref.qualname.rsplit(".", 1)[0] if ref is not None else node.name
