"""Pattern trees and the matcher: what a pattern is and how it is found in a graph.

A pattern is a small tree of `Op` (an op kind from fxopt's semantic op view, see
`fxopt.ir.op_view`), `Var` (any value, bound by name) and `Const` (a Python scalar argument,
bound by name). Matching reads op kinds, never raw targets, so `torch.relu`, `nn.ReLU`,
`x.relu()` and `aten.relu` are all `Op("relu", ...)`, on symbolic and export graphs alike.

    >>> import torch
    >>> from fxopt.patterns import Op, Var, match
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    >>> relu = [n for n in gm.graph.nodes if n.op == "call_module"][-1]
    >>> m = match(gm, relu, Op("relu", Op("linear", Var("x"), name="fc")))
    >>> m.views["fc"].kind, m.nodes["x"].name
    ('linear', 'input_1')

Failures carry a reason (`explain`), so a researcher can ask why a chosen node did not match.
"""
from __future__ import annotations

import difflib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
import torch.fx

from ..errors import is_library_frame, node_label, node_location, user_source_line
from ..ir import (SPECS, OpView, aliases_of, bind_arguments, module_path, mutated_input, op_view, spec_for,
                  symbolic_sizes, tensor_meta, written_base)

ANNOTATIONS = "fxopt.annotations"


# ----- the pattern language -------------------------------------------------------------------

@dataclass(frozen=True)
class Var:
    """Any value (a node), bound to `name`; a name used twice must bind the same node.

    Constraints read the shape/dtype metadata capture records on every node:
    `ndim` (int or tuple of allowed ints), `dtype` (dtype or tuple), `shape` (a tuple whose
    entries are ints or None for "any"), `check` (a predicate on the node: True (or None), or
    False or a string saying why not). A value without metadata fails a shape/dtype constraint (the
    matcher never guesses). The metadata holds the example's sizes, but a graph captured with
    a dynamic batch runs at any: a `shape` that fixes dim 0 of a value whose dim 0 is the
    example's batch size does not match (write None there), since the rewrite would run at
    every batch size.
    """

    name: str
    ndim: int | tuple[int, ...] | None = None
    dtype: torch.dtype | tuple[torch.dtype, ...] | None = None
    shape: tuple | None = None
    check: Callable[[torch.fx.Node], bool] | None = None

    def __post_init__(self) -> None:
        # a wrong type never matches, and the reason ("is torch.float32, wants float32") reads as equal
        _require_name("Var", self.name)
        where = f"Var('{self.name}')"
        if self.ndim is not None and not _all_of(self.ndim, int):
            raise TypeError(f"{where}: ndim= must be an int or a tuple of ints, got {self.ndim!r}")
        if self.dtype is not None and not _all_of(self.dtype, torch.dtype):
            hint = (f" (torch.{self.dtype}?)" if isinstance(self.dtype, str)
                    and isinstance(getattr(torch, self.dtype, None), torch.dtype) else "")
            raise TypeError(f"{where}: dtype= must be a torch.dtype or a tuple of them, got {self.dtype!r}{hint}")
        if self.shape is not None:
            if not isinstance(self.shape, (tuple, list)) or not all(
                    d is None or (isinstance(d, int) and not isinstance(d, bool)) for d in self.shape):
                raise TypeError(f"{where}: shape= must be a tuple of ints and None (any size), got {self.shape!r}")
            object.__setattr__(self, "shape", tuple(self.shape))
        _require_callable(where, "check", self.check)


@dataclass(frozen=True)
class Const:
    """A non-tensor argument (a Python number, e.g. an attention scale), bound to `name`.

    `literal`: the value a pattern function wrote (`x / 8.0`), which `check` compares with; a
    failed match then names the graph's argument and both values."""

    name: str
    check: Callable[[Any], bool] | None = None
    literal: Any = None

    def __post_init__(self) -> None:
        _require_name("Const", self.name)
        _require_callable(f"Const('{self.name}')", "check", self.check)


class Op:
    """An op of a given kind (or one of several kinds) whose activation inputs match `inputs`.

    - `inputs` match `view.inputs` (the node operands, in order); `commutative=True` also
      tries them swapped (two inputs);
    - `scalar` (a `Const`) matches the one non-tensor operand of an elementwise op
      (`x / 8.0`, `0.125 * x`), which the view does not list as an input; for an op whose
      operands do not commute it must sit where `scalar_first` says (`2 / x` vs `x / 2`);
    - `attrs` constrain view attributes: a value means equality, a callable is a predicate.
      An argument that changes what the op computes beyond its kind (`OpSpec.modifiers`: add's
      `alpha`, div's `rounding_mode`) must have its neutral value unless `attrs` names it;
    - `name` binds the node and its `OpView` in the match;
    - `single_use` (default for every op below the root): the op's value must feed only this
      pattern, since the rewrite removes it. Set False for ops that stay in the graph.

    A value the pattern reads at several places is one `Op` object given as an input at each
    (``d = Op("sub", ...)`` in ``Op("div", d, Op("mul", d, d))``; `pattern_from_function` does so
    for a value its function reads twice): it matches one node read at each place, whose users
    may all be ops of the match, or, where the graph computes it again (``(x - m) * (x - m)``),
    one node per computation. Two distinct `Op` objects never match one node.
    """

    def __init__(
        self,
        kind: str | tuple[str, ...],
        *inputs: "PatternNode",
        name: str | None = None,
        scalar: Const | None = None,
        attrs: dict[str, Any] | None = None,
        commutative: bool = False,
        single_use: bool = True,
        check: Callable[[OpView], bool | str] | None = None,
        params: dict[str, str] | None = None,
        scalar_first: bool = False,
    ) -> None:
        self.kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        unknown = [k for k in self.kinds if k not in _KNOWN_KINDS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], _KNOWN_KINDS, n=1)
            raise ValueError(f"Op('{unknown[0]}'): no op has that kind" + (f" (did you mean '{close[0]}'?)" if close
                             else "") + "; kinds are fxopt.ir.op_view's, listed by fxopt.ir.SPECS")
        bad = next((i for i in inputs if not isinstance(i, (Op, Var))), None)
        if bad is not None:
            raise TypeError(f"Op('{self.kinds[0]}'): an input must be an Op or a Var, got {bad!r} "
                            "(a number operand is scalar=Const(...))")
        _check_op_options(self.kinds, len(inputs), name, scalar, attrs, check)
        self.inputs = tuple(inputs)
        self.name = name
        self.scalar = scalar
        self.scalar_first = scalar_first
        self.attrs = dict(attrs or {})
        self.commutative = commutative
        self.single_use = single_use
        self.check = check
        #: view parameter -> binding name, e.g. {"weight": "w"}: the match's `params["w"]`.
        self.params = dict(params or {})
        # the Ops below this one, and those among them reached along more than one path
        # (a value the pattern reads twice, and what it is computed from)
        reached: dict[Op, int] = {}
        for child in (i for i in self.inputs if isinstance(i, Op)):
            for op in (child, *child._below):
                reached[op] = reached.get(op, 0) + 1
        self._below: frozenset[Op] = frozenset(reached)
        self._shared: frozenset[Op] = frozenset(op for op, n in reached.items() if n > 1).union(
            *(child._shared for child in self.inputs if isinstance(child, Op)))
        if self.params and not name:
            raise ValueError(f"Op('{self.kinds[0]}'): binding parameters needs a name= for the op")

    def __repr__(self) -> str:
        kind = self.kinds[0] if len(self.kinds) == 1 else "|".join(self.kinds)
        inner = ", ".join(repr(i) if isinstance(i, Op) else i.name for i in self.inputs)
        return f"{kind}({inner})"


PatternNode = Union[Op, Var]
_KNOWN_KINDS = frozenset(spec.kind for spec in SPECS)


def _require_name(what: str, name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"{what}: the name must be a non-empty string, got {name!r}")


def _require_callable(where: str, option: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{where}: {option}= must be a function, got {type(value).__name__}")


def _all_of(value: Any, cls: type) -> bool:
    """`value` is one `cls` or a non-empty tuple of them (a bool is no int here)."""
    items = value if isinstance(value, tuple) else (value,)
    return bool(items) and all(isinstance(v, cls) and not isinstance(v, bool) for v in items)


def _check_op_options(kinds: tuple[str, ...], n_inputs: int, name: Any, scalar: Any, attrs: Any,
                      check: Any) -> None:
    """Refuse, when the Op is built, options that could never match: each would only make the
    pattern silently match nothing."""
    where = f"Op('{kinds[0]}')"
    if name is not None:
        _require_name(where, name)
    _require_callable(where, "check", check)
    if scalar is not None and not isinstance(scalar, Const):
        raise TypeError(f"{where}: scalar= must be a Const, got {scalar!r}")
    if scalar is not None and all(_max_operands(k) <= n_inputs for k in kinds):
        raise ValueError(f"{where}: scalar= matches a number operand in place of a tensor one (x * 0.5), and "
                         f"'{kinds[0]}' takes no more than {_max_operands(kinds[0])} tensor operand(s), which "
                         f"the {n_inputs} input(s) already take")
    if attrs is not None and not isinstance(attrs, dict):
        raise TypeError(f"{where}: attrs= must be a dict of attribute name to value or predicate, got {attrs!r}")
    for key in attrs or {}:
        known = set().union(*(_attribute_names(k) for k in kinds))
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            raise ValueError(f"{where}: attrs names '{key}', which no op of that kind has"
                             + (f" (did you mean '{close[0]}'?)" if close else "")
                             + f"; its attributes: {', '.join(sorted(known)) or 'none'}")


def _max_operands(kind: str) -> int:
    """The most tensor operands an op of `kind` takes in any spelling."""
    return max(len(spec.tensor_args) for spec in SPECS if spec.kind == kind)


@functools.cache
def _attribute_names(kind: str) -> frozenset[str]:
    """Every name an op of `kind` may report as an attribute or argument, in any spelling: its
    specs' argument names, its ATen schemas', its functions' and module constructors'
    parameters, and the names its module views report (generous: a name missing here would
    refuse a pattern that matches)."""
    names: set[str] = set()
    for spec in (s for s in SPECS if s.kind == kind):
        names |= {*spec.arg_names, *spec.tensor_args, *spec.param_args, *spec.defaults, *spec.modifiers,
                  *spec.renames, *spec.renames.values()}
        for op in spec.aten:
            overloads = [getattr(op, o) for o in op.overloads()] if hasattr(op, "overloads") else [op]
            names |= {a.name for o in overloads for a in o._schema.arguments}
        for fn in (*spec.functions, *(cls.__init__ for cls in spec.modules)):
            try:
                names |= set(inspect.signature(fn).parameters)
            except (TypeError, ValueError):  # a builtin without a signature: its ATen schema names it
                pass
        if spec.module_attrs is not None:
            names |= _string_constants(spec.module_attrs.__code__)
    return frozenset(names)


def _string_constants(code: Any) -> set[str]:
    """The strings a function's code holds: the keys of the dict a `module_attrs` builds."""
    found: set[str] = set()
    for const in code.co_consts:
        if isinstance(const, str):
            found.add(const)
        elif isinstance(const, tuple):
            found |= {c for c in const if isinstance(c, str)}
    return found


@dataclass
class Match:
    """One place a pattern matched.

    `root` is the node the pattern's top op matched; `nodes` maps every bound name (Vars and
    named Ops) to its node; `views` maps named Ops to their OpView (its `params` reach the
    weights); `values` maps Const names to the scalars; `ops` lists every op node of the
    match, root last.
    """

    gm: torch.fx.GraphModule
    root: torch.fx.Node
    nodes: dict[str, torch.fx.Node] = field(default_factory=dict)
    views: dict[str, OpView] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    ops: list[torch.fx.Node] = field(default_factory=list)
    #: alias -> (op name, parameter name), from Op(params=...).
    params: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: (value, dim, size) a Var's `shape` fixed where the graph may run at other sizes (a
    #: symbolic graph's image or sequence dims): the rewrite asserts them (`apply_patterns`).
    #: dim None: the value's rank (a Var's int `ndim`, `Rewriter.hold_rank`).
    size_guards: list[tuple[torch.fx.Node, int | None, int]] = field(default_factory=list)
    #: the Ops the pattern reads at several places (`Op`'s docstring), and the nodes each matched.
    reads_shared: frozenset[Op] = frozenset()
    shared: dict[Op, tuple[torch.fx.Node, ...]] = field(default_factory=dict)

    def hold_rank(self, value: torch.fx.Node, rank: int | None = None) -> None:
        """Make the rewrite assert `value`'s rank (its recorded one, or `rank`) where the graph
        may run at another (a symbolic graph: ``BatchNorm1d`` takes (N, C) and (N, C, L)
        alike); a graph tensor's rank is fixed. `value` may be the node the rewrite returns: the
        assert then follows it. The assert is one more reader of `value`: a later pattern that
        would take `value` as an inner op of its own no longer matches, so hold a value no
        pattern removes (above rank-keeping ops: `passes/fuse/rules._rank_source`)."""
        meta = tensor_meta(value)
        rank = rank if rank is not None else len(meta[0]) if meta is not None else None
        if rank is not None and value.op != "get_attr" and not _is_export_graph(value) \
                and (value, None, rank) not in self.size_guards:
            self.size_guards.append((value, None, rank))

    def __getitem__(self, name: str) -> Any:
        if name in self.values:
            return self.values[name]
        return self.nodes[name]

    def copy(self) -> "Match":
        return Match(self.gm, self.root, dict(self.nodes), dict(self.views), dict(self.values), list(self.ops),
                     dict(self.params), list(self.size_guards), self.reads_shared, dict(self.shared))


class NoMatch(Exception):
    """Why a pattern did not match at a node (the message names the node)."""


class CheckError(RuntimeError):
    """A check or predicate of a pattern raised (not refused) at a node; the message names the
    check and the node, and `apply_patterns` adds the pattern's name."""


def _run_check(fn: Callable[[Any], Any], value: Any, what: str, node: Any) -> Any:
    """`fn(value)`; an exception it raises names `what` ran at `node` (a bare ZeroDivisionError
    from inside the matcher said neither)."""
    try:
        return fn(value)
    except NoMatch:
        raise
    except Exception as exc:
        raise CheckError(f"{what} raised {type(exc).__name__}: {exc} (at {_where(node)})") from exc


def _refusal(verdict: Any) -> str | None:
    """What a check's verdict says: None where it passes, else why not ('' where it gave no
    reason). True and None pass (a check may return only its reasons); a string is a reason;
    anything else counts by its truth (a numpy or tensor bool). One rule for the checks of
    `Op`, `Var`, `Const` and `Pattern` (fuse tester: a `Var` check refused on None, which the
    others pass)."""
    if verdict is None or verdict is True:
        return None
    if isinstance(verdict, str):
        return verdict
    return None if bool(verdict) else ""


# ----- matching -------------------------------------------------------------------------------

def match(gm: torch.fx.GraphModule, node: torch.fx.Node, pattern: PatternNode,
          check: Callable[[Match], bool | str] | None = None) -> Match | None:
    """The match of `pattern` rooted at `node`, or None (see `explain` for the reason)."""
    try:
        return match_or_raise(gm, node, pattern, check)
    except NoMatch:
        return None


def explain(gm: torch.fx.GraphModule, node: torch.fx.Node, pattern: PatternNode,
            check: Callable[[Match], bool | str] | None = None) -> str:
    """'matched' or the reason `pattern` does not match rooted at `node`."""
    try:
        match_or_raise(gm, node, pattern, check)
    except NoMatch as exc:
        return str(exc)
    return "matched"


def match_or_raise(gm: torch.fx.GraphModule, node: torch.fx.Node, pattern: PatternNode,
                   check: Callable[[Match], bool | str] | None = None) -> Match:
    m = Match(gm, node, reads_shared=getattr(pattern, "_shared", frozenset()))
    m = _match(gm, node, pattern, m, is_root=True)
    _refuse_outside_readers_of_shared(m)
    for op in m.ops:
        _refuse_visible_write(gm, op, m)
    _refuse_write_before_root(gm, m)
    if check is not None:
        reason = _refusal(_run_check(check, m, "the pattern's check", node))
        if reason is not None:
            raise NoMatch(f"extra check refused the match at {_where(node)}: {reason or 'the extra check refused it'}")
    return m


def _refuse_outside_readers_of_shared(m: "Match") -> None:
    """An op the pattern reads at several places may have several users, all of them ops of the
    match (`single_use`, checked once the whole match is known)."""
    for pat, nodes in m.shared.items():
        for node in nodes:
            outside = [u.name for u in node.users if u not in m.ops]
            if pat.single_use and node is not m.root and outside:
                raise _no_match(node, f" is read by {', '.join(outside)} outside the pattern, which would remove "
                                      "it (use single_use=False for ops that stay)")


def _refuse_visible_write(gm: torch.fx.GraphModule, op: torch.fx.Node, m: "Match") -> None:
    """A matched op that writes its input in place (``y.mul_(sigmoid(y))``, ``relu_(y)``,
    ``h[:, :2].clamp_(0, 6)``) is replaced by a value of its own: the memory it wrote — an
    input's, an attribute's, or one a reader sees after it through any view — would not be
    written. ``relu_(conv(x))``, whose input nothing else reads later, is the usual case and
    matches."""
    if mutated_input(gm, op) is None:
        return
    base = written_base(gm, op)
    if base.op in ("placeholder", "get_attr"):
        raise _no_match(op, f" writes '{base.name}' in place, an input or attribute the caller sees")
    aliases = aliases_of(gm, base)
    later = sorted({u for a in aliases for u in a.users
                    if u is not op and u not in aliases and u not in m.ops and u > op}, key=lambda u: u.name)
    if later:
        raise _no_match(op, f" writes '{base.name}' in place and {', '.join(repr(u.name) for u in later)} "
                            "reads it after; the rewrite would drop the write")


def _refuse_write_before_root(gm: torch.fx.GraphModule, m: "Match") -> None:
    """The replacement runs where the root was: an input the match reads that is written in
    place between its first reader and the root (``a = conv(h); h.mul_(2); a + b``, export's
    form), directly or through any view, would reach it written."""
    ops = set(m.ops)
    for value in {n for n in m.nodes.values() if n not in ops}:
        readers = [op for op in m.ops if value in op.all_input_nodes]
        if not readers:
            continue
        first = min(readers)
        for writer in _writers_of(gm, value):
            if first < writer < m.root:
                raise _no_match(m.root, f": '{writer.name}' writes '{value.name}' in place after "
                                        f"'{first.name}' reads it; the rewrite, placed here, would read the write")


def _writers_of(gm: torch.fx.GraphModule, value: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes writing `value`'s memory in place, through any view of it or of what it views."""
    base = value
    while base.args and isinstance(base.args[0], torch.fx.Node) and base in aliases_of(gm, base.args[0]):
        base = base.args[0]  # up to the value it views
    aliases = aliases_of(gm, base)
    return [u for a in aliases for u in a.users if mutated_input(gm, u) in aliases]


def _where(node: Any) -> str:
    return node_location(node) if isinstance(node, torch.fx.Node) else repr(node)


def _no_match(node: torch.fx.Node, reason: str) -> NoMatch:
    """`node 'x' (op target) <reason>`, then the user's source line (the reason reads first), or
    where the graph recorded only torch's own lines (an export graph's nn.Sequential layer:
    `torch/nn/modules/linear.py`), the module the node computes in."""
    line = user_source_line(node.meta.get("stack_trace"))
    if line and is_library_frame(line):
        line = None
    where = f" — at {line}" if line else (f" — in module '{path}'" if (path := module_path(node)) else "")
    return NoMatch(f"{node_label(node)}{reason}{where}")


def _match(gm, value: Any, pat: PatternNode, m: Match, is_root: bool = False) -> Match:
    if isinstance(pat, Var):
        return _match_var(value, pat, m)
    if not isinstance(pat, Op):
        raise TypeError(f"pattern element {pat!r} is not an Op or a Var")
    if not isinstance(value, torch.fx.Node):
        raise NoMatch(f"pattern {pat!r} wants an op, found the constant {value!r}")
    node = value
    view = op_view(gm, node)
    if view is None:
        raise _no_match(node, f" is not an op fxopt's op view knows; pattern wants {pat!r}")
    shared = pat in m.reads_shared
    if shared and node in m.shared.get(pat, ()):  # read again: the node it matched, not matched anew
        return m
    if view.kind not in pat.kinds:
        raise _no_match(node, f" is '{view.kind}', pattern wants '{'|'.join(pat.kinds)}'")
    if not is_root and pat.single_use and not shared and len(node.users) > 1:
        users = ", ".join(u.name for u in node.users)
        raise _no_match(node, f" has {len(node.users)} users ({users}); the pattern would remove it (use "
                              "single_use=False for ops that stay; where the pattern reads this value at several "
                              "places, give one Op object at each)")
    if node in m.ops:
        raise _no_match(node, " is matched twice by the pattern (by two Op objects: one value the pattern reads "
                              "at several places is one Op object given at each)")
    for key, want in pat.attrs.items():
        got = view.attrs.get(key, _MISSING)
        if got is _MISSING:
            got = _bound_arg(node, key)
        if got is _MISSING and node.op == "call_module":  # a module's own attribute (nn.MaxPool2d's kernel_size)
            got = getattr(view.module, key, _MISSING)
        ok = _run_check(want, got, f"the attrs predicate for '{key}' of {pat!r}", node) if callable(want) \
            else _same(got, want, key)
        if not ok:
            # (a predicate may say what it wants in words: its `description`)
            wanted = (getattr(want, "description", None) or f"a value passing {getattr(want, '__name__', 'a check')}"
                      if callable(want) else repr(want))
            word = "attribute" if node.op == "call_module" else "argument"
            found = f"has no {word} '{key}'" if got is _MISSING else f": {word} '{key}' is {got!r}"
            raise _no_match(node, f"{' ' if got is _MISSING else ''}{found} but the pattern wants {wanted}")
    spec = spec_for(gm, node)
    for key, neutral in (spec.modifiers if spec is not None else {}).items():
        got = view.attrs.get(key, neutral)
        if key not in pat.attrs and not _same(got, neutral, key):
            raise _no_match(node, f": '{key}' is {got!r}; a pattern that does not name '{key}' in attrs "
                                  f"matches only {key}={neutral!r}")
    if pat.check is not None:
        reason = _refusal(_run_check(pat.check, view, f"the check of {pat!r}", node))
        if reason is not None:
            raise _no_match(node, f": {reason or 'op check refused it'}")
    if pat.scalar is not None:
        scalar, first, key = _scalar_operand(node, view)
        if scalar is _MISSING:
            wanted = f"one equal to {pat.scalar.literal!r}" if pat.scalar.literal is not None \
                else f"Const('{pat.scalar.name}')"
            raise _no_match(node, f" has no scalar operand; the pattern wants {wanted}")
        if first != pat.scalar_first and not pat.commutative and view.kind not in _COMMUTATIVE:
            # `2 / x` is not `x / 2`
            raise _no_match(node, f" has its scalar as the {'first' if first else 'second'} operand; pattern "
                                  f"{pat!r} wants it {'first' if pat.scalar_first else 'second'}")
        m = _bind_const(pat.scalar, scalar, node, m, key)
    inputs = list(view.inputs)
    if len(inputs) != len(pat.inputs):
        raise _no_match(node, f" has {len(inputs)} tensor inputs, pattern {pat!r} wants {len(pat.inputs)}")
    orders = [inputs]
    if pat.commutative and len(inputs) == 2:
        orders.append(inputs[::-1])
    failure: NoMatch | None = None
    for order in orders:
        trial = m.copy()
        try:
            for child_value, child_pat in zip(order, pat.inputs):
                trial = _match(gm, child_value, child_pat, trial)
        except NoMatch as exc:
            failure = failure or exc
            continue
        trial.ops.append(node)
        if shared:
            trial.shared[pat] = (*trial.shared.get(pat, ()), node)
        if pat.name:
            _bind_node(pat.name, node, trial)
            trial.views[pat.name] = view
            for param, alias in pat.params.items():
                if param not in view.params:
                    raise _no_match(node, f" has no parameter '{param}' (pattern binds it as '{alias}')")
                if alias in trial.params:  # a name used twice: one tensor (tied weights), not two
                    op, other = trial.params[alias]
                    if trial.views[op].params[other].get() is not view.params[param].get():
                        raise _no_match(node, f"'s {param} is not the tensor the pattern already bound as "
                                              f"'{alias}' (at {trial.views[op].node.name})")
                trial.params[alias] = (pat.name, param)
        return trial
    raise failure  # type: ignore[misc]


def _capture_record(node: torch.fx.Node) -> dict:
    """What capture recorded about the graph holding `node` (``gm.meta["fxopt"]``: its front
    end, its example's batch), empty for a graph fxopt did not capture."""
    return getattr(node.graph.owning_module, "meta", {}).get("fxopt", {})


def _is_export_graph(node: torch.fx.Node) -> bool:
    return _capture_record(node).get("frontend") == "export"


def _example_batch(value: torch.fx.Node) -> int | None:
    """The example's batch size, where capture made the graph's batch dynamic; else None."""
    info = _capture_record(value)
    return info.get("example_batch") if info.get("dynamic_batch") else None


def _match_var(value: Any, pat: Var, m: Match) -> Match:
    if not isinstance(value, torch.fx.Node):
        raise NoMatch(f"Var('{pat.name}') wants a tensor value, found the constant {value!r}")
    meta = tensor_meta(value)
    if pat.ndim is not None or pat.dtype is not None or pat.shape is not None:
        if meta is None:
            raise NoMatch(f"Var('{pat.name}'): {_where(value)} has no shape metadata "
                          "(capture with example inputs, or run the shapes analysis)")
        shape, dtype = meta
        allowed = pat.ndim if isinstance(pat.ndim, tuple) else (pat.ndim,)
        if pat.ndim is not None and len(shape) not in allowed:
            raise NoMatch(f"Var('{pat.name}'): {_where(value)} has {len(shape)} dims, wants {pat.ndim}")
        dtypes = pat.dtype if isinstance(pat.dtype, tuple) else (pat.dtype,)
        if pat.dtype is not None and dtype not in dtypes:
            raise NoMatch(f"Var('{pat.name}'): {_where(value)} is {dtype}, wants {pat.dtype}")
        if pat.shape is not None and (len(shape) != len(pat.shape) or any(
                w is not None and w != s for w, s in zip(pat.shape, shape))):
            raise NoMatch(f"Var('{pat.name}'): {_where(value)} has shape {tuple(shape)}, wants {pat.shape}")
        batch = _example_batch(value)
        if pat.shape is not None and pat.shape and pat.shape[0] is not None and batch == shape[0]:
            raise NoMatch(f"Var('{pat.name}'): dim 0 of {_where(value)} is the example's batch size {batch}, and "
                          f"the graph was captured to run at any batch: a shape constraint fixing it would apply "
                          f"the rewrite at every batch size (write None for dim 0)")
        if pat.shape is not None:
            _hold_fixed_sizes(value, pat, m)
        if isinstance(pat.ndim, int):
            m.hold_rank(value)
    if pat.check is not None:
        reason = _refusal(_run_check(pat.check, value, f"the check of Var('{pat.name}')", value))
        if reason is not None:
            raise NoMatch(f"Var('{pat.name}'): {_where(value)} fails its check" + (f": {reason}" if reason else ""))
    _bind_node(pat.name, value, m)
    return m


def _hold_fixed_sizes(value: torch.fx.Node, pat: Var, m: Match) -> None:
    """The sizes `pat.shape` fixes hold at the example; where the graph may run at others the
    rewrite must not run there. An export graph runs at other sizes only on the dims export kept
    symbolic (`symbolic_sizes`): no match. A symbolic graph runs at any batch, image size or
    sequence length (fuse tester: an 8x8 pool rewrite gave 9-14% off on 9x9 and 12x12 inputs):
    the rewrite asserts each fixed size. Dim 0 too: the batch rule above refuses a dim 0 equal
    to the example's batch, but one computed from it (``x.reshape(-1, 2)``: 4x the batch, the
    (B*H, T, d) of folded heads, a time-major sequence) varies as well (fuse tester: 0.85-1.98
    off at other batches)."""
    symbols = symbolic_sizes(value)
    for dim, size in enumerate(pat.shape):
        if size is None:
            continue
        if dim in symbols:
            raise NoMatch(f"Var('{pat.name}'): dim {dim} of {_where(value)} is dynamic in this export graph "
                          f"({symbols[dim]}): a shape constraint fixing it would apply the rewrite at every "
                          "size (write None there)")
        if not _is_export_graph(value):
            m.size_guards.append((value, dim, size))


def _bind_node(name: str, node: torch.fx.Node, m: Match) -> None:
    bound = m.nodes.get(name)
    if bound is not None and bound is not node:
        raise NoMatch(f"'{name}' is bound to node '{bound.name}' and cannot also be '{node.name}'")
    m.nodes[name] = node


def _bind_const(pat: Const, value: Any, node: torch.fx.Node, m: Match, key: str = "") -> Match:
    if isinstance(value, torch.fx.Node) or isinstance(value, torch.Tensor):
        raise _no_match(node, f": Const('{pat.name}') wants a Python scalar, found a tensor")
    if pat.check is not None and _refusal(_run_check(pat.check, value, f"the check of Const('{pat.name}')", node)) \
            is not None:
        if pat.literal is not None:  # a literal of a pattern function: its name says nothing
            raise _no_match(node, f": argument '{key}' is {value!r} but the pattern wants {pat.literal!r}")
        raise _no_match(node, f": argument '{key}' is {value!r}, which fails the check of Const('{pat.name}')")
    if pat.name in m.values and m.values[pat.name] != value:
        raise NoMatch(f"Const('{pat.name}') is bound to {m.values[pat.name]!r}, not {value!r}")
    m.values[pat.name] = value
    return m


_MISSING = object()


def _bound_arg(node: torch.fx.Node, key: str) -> Any:
    spec = spec_for(node.graph.owning_module, node) if node.graph.owning_module is not None else None
    if spec is None or node.op == "call_module":
        return _MISSING
    return bind_arguments(node, spec).get(key, _MISSING)


_COMMUTATIVE = frozenset({"add", "mul"})


def _scalar_operand(node: torch.fx.Node, view: OpView) -> tuple[Any, bool, str]:
    """The one non-node operand of an elementwise op (`x * 0.5`, `2 * x`), or _MISSING, whether
    it is the first operand (`2 / x`), and the name of its argument (`other`)."""
    if node.op == "call_module":
        return _MISSING, False, ""
    spec = spec_for(node.graph.owning_module, node)
    if spec is None:
        return _MISSING, False, ""
    args = bind_arguments(node, spec)
    scalars = [(args[k], i == 0, k) for i, k in enumerate(spec.tensor_args)
               if k in args and isinstance(args[k], (int, float)) and not isinstance(args[k], bool)]
    return scalars[0] if len(scalars) == 1 else (_MISSING, False, "")


#: Conv and pool arguments torch expands from one number to one per spatial axis.
_PER_AXIS = frozenset({"kernel_size", "stride", "padding", "dilation", "output_padding", "output_size"})


def _same(got: Any, want: Any, key: str | None = None) -> bool:
    """Equal arguments, whatever sequence spells them; one value and a one-entry list are the
    same (export writes ``mean(x, -1)``'s dim as ``[-1]``, kernel sizes and paddings alike), and
    for the `_PER_AXIS` arguments so are one number and a sequence repeating it (torch expands a
    conv's ``padding=1`` to ``(1, 1)``; a roll's shifts or a layer norm's shape it does not)."""
    got, want = _unwrapped(got), _unwrapped(want)
    sequences = isinstance(got, (list, tuple)), isinstance(want, (list, tuple))
    if all(sequences):
        return tuple(got) == tuple(want)
    if any(sequences) and key in _PER_AXIS:
        many, one = (got, want) if sequences[0] else (want, got)
        return isinstance(one, int) and not isinstance(one, bool) and len(many) > 0 and all(v == one for v in many)
    return got == want


def _unwrapped(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value


# ----- annotations ------------------------------------------------------------------------------

def annotations(node: torch.fx.Node) -> dict:
    """The fxopt annotations of a node (a fresh dict; never edit it in place)."""
    return dict(node.meta.get(ANNOTATIONS) or {})


def annotate(node: torch.fx.Node, **values: Any) -> None:
    """Add annotations to `node.meta["fxopt.annotations"]`, replacing (not mutating) the dict.

    node.meta is copied shallowly when a GraphModule is cloned, so mutating the dict in place
    would leak into snapshots the manager keeps.
    """
    merged = annotations(node)
    merged.update(values)
    node.meta[ANNOTATIONS] = merged
