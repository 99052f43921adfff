"""Facts the channel rules read off fx nodes: shapes, axes, numbers, tuple pieces, signs,
module paths and reshape digit maps (helpers of `channel_graph` and its `rules`)."""
from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch
import torch.fx

from fxopt.ir import PRIVATE_OF, ParamRef, bind_arguments, op_view, ref_for_get_attr, spec_for, tensor_meta

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


# lower bounds of activations: `x > b` (strict) or `x >= b`; elu/celu read their alpha
_ACTIVATION_BOUNDS = {
    "sigmoid": (0.0, True), "exp": (0.0, True), "softplus": (0.0, True), "tanh": (-1.0, True),
    "softsign": (-1.0, True), "hardsigmoid": (0.0, False), "abs": (0.0, False), "square": (0.0, False),
    "relu": (0.0, False), "vector_norm": (0.0, False), "var": (0.0, False), "std": (0.0, False),
    "selu": (-1.0507009873554805 * 1.6732632423543772, True),
}
# ops whose every output element is one of their input's, or an average (max) of them: the
# input's bound holds for them too
_KEEPS_BOUND = frozenset({"reshape", "flatten", "unflatten", "permute", "transpose", "expand", "expand_as",
                          "unsqueeze", "squeeze", "to", "contiguous", "clone", "getitem", "select", "slice", "mean", "amax",
                          "amin", "dropout", "identity", "repeat", "tile", "movedim", "repeat_interleave", "reshape_as", "max_pool",
                          "avg_pool", "adaptive_avg_pool", "adaptive_max_pool"})
# ops that keep only their input's sign (a sum of values > -1 may be anything; sqrt of x >= 0)
_KEEPS_SIGN = frozenset({"sum", "sqrt"})

Bound = tuple[float, bool]  # (b, strict): every element is > b when strict, else >= b


def _sign(gm: torch.fx.GraphModule, value: Any) -> str | None:
    """"pos" when every element of `value` is > 0, "nonneg" when ≥ 0, else None (unknown) —
    read off the ops that make it (``clamp_min(norm, eps)``, ``var + eps``, ``elu(g) + 1``), so
    a division by it, or its rsqrt, is known to be finite.

        >>> import torch, torch.fx
        >>> gm = torch.fx.symbolic_trace(lambda x: (x.var(1, keepdim=True) + 1e-5, x.abs(), x - 1,
        ...                                         torch.nn.functional.elu(x) + 1, x * x))
        >>> {n.name: _sign(gm, n) for n in gm.graph.nodes if n.op.startswith("call")}
        {'var': 'nonneg', 'add': 'pos', 'abs_1': 'nonneg', 'sub': None, 'elu': None, 'add_1': 'pos', 'mul': 'nonneg'}
    """
    return _sign_of(_lower_bound(gm, value))


def _sign_of(bound: Bound | None) -> str | None:
    if bound is None or bound[0] < 0:
        return None
    return "pos" if bound[0] > 0 or bound[1] else "nonneg"


def _bound_of_sign(sign: str | None) -> Bound | None:
    return None if sign is None else (0.0, sign == "pos")


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
    inner_sign = lambda v: _sign_of(inner(v))  # noqa: E731
    if kind in _ACTIVATION_BOUNDS:
        return _ACTIVATION_BOUNDS[kind]
    if kind in ("elu", "celu"):  # x > -alpha
        alpha = view.attrs.get("alpha", 1.0)
        return (-float(alpha), True) if isinstance(alpha, (int, float)) and alpha >= 0 else None
    if kind == "hardtanh":
        low = view.attrs.get("min_val", -1)
        return (float(low), False) if isinstance(low, (int, float)) else None
    if kind == "pow":
        e, base = view.attrs.get("exponent"), view.attrs.get("input")
        if isinstance(base, (int, float)) and not isinstance(base, bool) and base > 0:
            return (0.0, True)  # a positive base to any power (a sinusoidal inv_freq's 10000 ** t)
        if isinstance(e, int) and not isinstance(e, bool) and e % 2 == 0:
            return (0.0, inner_sign(view.input) == "pos")
        return _bound_of_sign(inner_sign(view.input)) if isinstance(e, (int, float)) else None
    if kind == "clamp":
        low = view.attrs.get("min")
        if isinstance(low, (int, float)) and not isinstance(low, bool):
            below = inner(view.input)
            return below if below is not None and below[0] > low else (float(low), False)
        return inner(view.input) if low is None and view.attrs.get("max") is None else None
    if kind == "rsqrt":
        return (0.0, True) if inner_sign(view.input) == "pos" else None
    if kind == "getitem" and isinstance(view.input, torch.fx.Node) and _piece_index(value) == 0 \
            and getattr(op_view(gm, view.input), "kind", None) in ("var_mean", "std_mean"):
        return (0.0, False)
    if kind in _KEEPS_BOUND:
        return inner(view.input)
    if kind in _KEEPS_SIGN:
        return _bound_of_sign(inner_sign(view.input))
    if kind in ("add", "sub", "mul", "div"):
        return _arithmetic_bound(gm, value, view, inner)
    return None


def _arithmetic_bound(gm: torch.fx.GraphModule, value: torch.fx.Node, view: Any, inner: Any) -> Bound | None:
    """Bounds through + - * /: a sum of bounded values; a difference less a number; a square
    (``h * h``) or a product or quotient of signs (a division by a value that may be 0 may
    give inf or nan, so its divisor must be positive)."""
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
        return (bounds[0][0] - b, bounds[0][1])
    if None in bounds:
        return None
    if view.kind == "add":
        return (bounds[0][0] + bounds[1][0], bounds[0][1] or bounds[1][1])
    signs = [_sign_of(bound) for bound in bounds]
    if None in signs or view.kind == "div" and signs[1] != "pos":
        return None
    return (0.0, signs == ["pos", "pos"])


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
    target = value.target
    name = target if isinstance(target, str) else getattr(target, "_opname", None) or getattr(target, "__name__", "")
    return name in _ZERO_FACTORIES


def _piece_index(node: torch.fx.Node) -> int | None:
    """Which piece of a tuple `node` takes: ``t[i]``, or ``t.values`` / ``t.indices`` of
    max/min's named tuple."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
        return {"values": 0, "indices": 1}.get(node.args[1])
    index = _getitem_index(node)
    return index if isinstance(index, int) else None


def _piece_sizes(split: torch.fx.Node, dim: int, n: int) -> list[int]:
    """Split sizes read off the recorded shapes of the pieces (getitem users) when the sizes
    are computed in the graph; every piece must be used so that they add up."""
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
    if PRIVATE_OF in node.meta:
        return str(node.meta[PRIVATE_OF])
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return path.replace("L['self'].", "").replace("L__self___", "")
    ref = ref if ref is not None else view.params.get("weight")
    return ref.qualname.rsplit(".", 1)[0] if ref is not None else node.name
