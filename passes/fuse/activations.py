"""Activations spelled out in elementwise ops, recognized as the one op they compute.

Many models write their activation by hand: EfficientNet's swish ``x * sigmoid(x)``, a
MobileNetV3 hard-swish ``x * relu6(x + 3) / 6``, YOLOv4's Mish ``x * tanh(softplus(x))``, BERT's exact GELU
``x * 0.5 * (1 + erf(x / √2))`` and GPT-2's tanh GELU
``0.5 * x * (1 + tanh(√(2/π) · (x + 0.044715 x³)))``. Each is 3-9 eager ops (each a pass over
the tensor); as one `F.silu` / `F.hardswish` / `F.hardsigmoid` / `F.mish` / `F.gelu` call it is one, and a
conv or linear before it becomes a `conv+act` / `linear+act` group that `lower-cpu` fuses
into the kernel.

A clamp with number bounds is the activation it computes: ``clamp(x, 0, 6)`` a hardtanh
(relu6), ``clamp(x, min=0)`` a relu; a one-sided upper clamp is left alone unless a relu
sits on either side of it (``x.clamp(min=0).clamp(max=6)``, ``relu(x.clamp(max=6))``: relu6).

Constants are compared to the value they must have within 1e-6 (relative), so ``/ 1.41421``
written by hand is not taken for ``/ math.sqrt(2)``; a multiplication may sit on either side
and the GELU's 0.5 in any of the three places the product allows.

    >>> import torch, torch.fx, torch.nn.functional as F
    >>> from fxopt.patterns import apply_patterns
    >>> gm = torch.fx.symbolic_trace(lambda x: x * torch.sigmoid(x) + F.relu6(x + 3.0) / 6.0)
    >>> sorted(apply_patterns(gm, ACTIVATION_FORMS).counts.items())
    [('hardsigmoid', 1), ('silu', 1)]
"""
from __future__ import annotations

import math

import torch.fx
import torch.nn.functional as F

from fxopt.ir import tensor_meta
from fxopt.patterns import Const, Match, Op, Pattern, PatternSet, Rewriter, Var


def _near(value: float):
    """A Const check: a Python number within 1e-6 (relative) of `value`."""
    def check(c) -> bool:
        return isinstance(c, (int, float)) and not isinstance(c, bool) and abs(c - value) <= 1e-6 * abs(value)
    return check


def _half_times(inner: Op, x: Var) -> list[Op]:
    """``0.5 · x · inner`` grouped each way a product of three can be: (0.5·x)·inner,
    x·(0.5·inner) and (x·inner)·0.5."""
    half = lambda: Const("half", check=_near(0.5))  # noqa: E731
    return [Op("mul", Op("mul", x, scalar=half()), inner, commutative=True),
            Op("mul", x, Op("mul", inner, scalar=half()), commutative=True),
            Op("mul", Op("mul", x, inner, commutative=True), scalar=half())]


def _one_plus(inner: Op) -> Op:
    return Op("add", inner, scalar=Const("one", check=_near(1.0)))


def _erf_scale_ok(m: Match) -> bool | str:
    """erf's argument is x / √2 or x · (1/√2)."""
    want = math.sqrt(2.0) if m.views["erf_scale"].kind == "div" else math.sqrt(0.5)
    return True if _near(want)(m.values["s"]) else f"erf's argument is x scaled by {m.values['s']!r}, not 1/√2"


def _gelu(approximate: str):
    def rewrite(r: Rewriter) -> torch.fx.Node:
        return r.call(F.gelu, r["x"], approximate=approximate)
    return rewrite


def _unary(fn):
    def rewrite(r: Rewriter) -> torch.fx.Node:
        return r.call(fn, r["x"])
    return rewrite


def _relu6_of_x_plus_3() -> Op:
    return Op("hardtanh", Op("add", Var("x"), scalar=Const("three", check=_near(3.0))),
              attrs={"min_val": 0.0, "max_val": 6.0})


def _divided_by_6(inner: Op) -> list[Op]:
    """``inner / 6`` or ``inner · (1/6)``."""
    return [Op("div", inner, scalar=Const("six", check=_near(6.0))),
            Op("mul", inner, scalar=Const("sixth", check=_near(1 / 6)))]


def _floating(value) -> bool | str:
    """Activations are of floating-point values: `x * sigmoid(x)` of an integer x promotes,
    its silu would not."""
    meta = tensor_meta(value)  # (unrecorded: a bare trace, taken as floating)
    return True if meta is None or meta[1].is_floating_point else "not a floating-point value"


def _patterns() -> list[Pattern]:
    x = Var("x", check=_floating)
    erf_gelu = _one_plus(Op("erf", Op(("div", "mul"), x, scalar=Const("s"), name="erf_scale")))
    # x³ as ``pow(x, 3)`` or ``x * x * x`` (either grouping)
    cubes = [Op("pow", x, attrs={"exponent": lambda e: e == 3}),
             Op("mul", Op("mul", x, x), x, commutative=True)]
    tanh_gelus = [_one_plus(Op("tanh", Op("mul", Op("add", x, Op("mul", cube, scalar=Const("k", check=_near(0.044715))),
                                                        commutative=True),
                                          scalar=Const("c", check=_near(math.sqrt(2 / math.pi))))))
                  for cube in cubes]
    hardsigmoid = _divided_by_6(_relu6_of_x_plus_3())
    table = [Pattern(f"gelu/{i}", root, rewrite=_gelu("none"), check=_erf_scale_ok)
             for i, root in enumerate(_half_times(erf_gelu, x))]
    table += [Pattern(f"gelu-tanh/{i}", root, rewrite=_gelu("tanh"))
              for i, root in enumerate(root for tanh_gelu in tanh_gelus for root in _half_times(tanh_gelu, x))]
    table.append(Pattern("silu", Op("mul", x, Op("sigmoid", x), commutative=True), rewrite=_unary(F.silu)))
    # Mish, x · tanh(softplus(x)), with softplus at its defaults (β = 1, threshold 20), as F.mish computes it
    table.append(Pattern("mish", Op("mul", x, Op("tanh", Op("softplus", x, attrs={"beta": 1, "threshold": 20})),
                                    commutative=True), rewrite=_unary(F.mish)))
    # hard-swish before hard-sigmoid: x · relu6(x + 3) / 6 holds no hard-sigmoid subtree, but
    # x · (relu6(x + 3) / 6) does, and is a hard-swish
    table += [Pattern(f"hardswish/{i}", root, rewrite=_unary(F.hardswish)) for i, root in enumerate(
        [*_divided_by_6(Op("mul", x, _relu6_of_x_plus_3(), commutative=True)),
         *(Op("mul", x, h, commutative=True) for h in hardsigmoid),
         Op("mul", x, Op("hardsigmoid", x), commutative=True)])]
    table += [Pattern(f"hardsigmoid/{i}" if i else "hardsigmoid", root, rewrite=_unary(F.hardsigmoid))
              for i, root in enumerate(hardsigmoid)]
    # ``torch.clamp(x, 0, 6)``, ``x.clamp(min=0)``: relu6 / relu under another name (a later
    # round then finds a hard-swish spelled with clamp)
    table.append(Pattern("clamp", Op("clamp", x, name="clamp"), rewrite=_clamp_as_activation, check=_clamp_bounds))
    # relu6 in two halves, either order: max(min(x, hi), 0) = min(max(x, 0), hi)
    table += [Pattern(name, root, rewrite=_capped_relu, check=_upper_bound) for name, root in (
        ("relu-clamp", Op("clamp", Op("relu", x), name="clamp")),
        ("clamp-relu", Op("relu", Op("clamp", x, name="clamp"))))]
    return table


def _bounds(m: Match) -> tuple:
    view = m.views["clamp"]
    return view.attrs.get("min"), view.attrs.get("max")


def _clamp_bounds(m: Match) -> bool | str:
    """A clamp is an activation kernel's when its bounds are numbers: both (hardtanh), or a
    lower bound of 0 alone (relu); of a floating-point value (hardtanh takes no integers)."""
    lo, hi = _bounds(m)
    if not all(v is None or isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
        return "its bounds are tensors"
    if lo is None or hi is None and lo != 0 or hi is not None and not lo < hi:
        return f"bounds ({lo}, {hi}) are no relu or hardtanh"
    return True  # (x, the clamped value, is floating: `_floating`; float bounds on ints promote)


def _clamp_as_activation(r: Rewriter) -> torch.fx.Node:
    lo, hi = _bounds(r.match)
    return r.call(F.relu, r["x"]) if hi is None else r.call(F.hardtanh, r["x"], float(lo), float(hi))


def _upper_bound(m: Match) -> bool | str:
    """The clamp beside a relu caps it: a number upper bound above 0, and no lower bound above
    0 (one at or below 0 does nothing next to the relu)."""
    lo, hi = _bounds(m)
    numbers = all(v is None or isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi))
    if not numbers or hi is None or hi <= 0 or lo is not None and lo > 0:
        return f"bounds ({lo}, {hi}) do not cap the relu"
    return True


def _capped_relu(r: Rewriter) -> torch.fx.Node:
    return r.call(F.hardtanh, r["x"], 0.0, float(_bounds(r.match)[1]))


#: The spelled-out activations, most specific first.
ACTIVATION_FORMS = PatternSet(_patterns())
