"""Patterns with their replacements, pattern sets, and applying them to a graph.

A `Pattern` is a match tree (see `fxopt.patterns.core`) plus one of:

- `replacement`: a plain Python function whose parameters are names bound by the match
  (Vars, Consts, and `<op>_<param>` for a named op's parameters, e.g. `fc_weight`). It is
  traced with torch.fx and inlined in place of the matched ops;
- `rewrite`: a function `(r: Rewriter) -> Node | None` for rewrites that compute new tensors
  (batchnorm folding). It builds nodes with `r.call(...)` / `r.tensor(...)` and returns the
  node that now yields the root's value, `r.match.root` itself for annotation-only rewrites,
  or None to decline.

`apply_patterns(gm, patterns)` walks the graph, rewrites every match and returns an
`ApplyReport`: how many times each pattern matched and at which nodes; with `debug=<node
name>` it also says, for each pattern, why it did not match there.
"""
from __future__ import annotations

import hashlib
import inspect
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from ..errors import first_line, node_location
from ..serialize import plain_tensor
from ..tracing import one_at_a_time
from ..ir import (PRIVATE_OF, add_tensor_attr, call_as, get_attr_value, meta_value, module_path, op_view, replace_uses,
                  tensor_meta)
from .core import ANNOTATIONS, CheckError, Match, NoMatch, Op, PatternNode, Var, annotate, annotations, match_or_raise


@dataclass
class Pattern:
    """A named pattern and what to do where it matches; see the module docstring."""

    name: str
    match: PatternNode
    replacement: Callable[..., Any] | None = None
    rewrite: Callable[["Rewriter"], torch.fx.Node | None] | None = None
    check: Callable[[Match], bool | str] | None = None
    #: Written into node.meta["fxopt.annotations"] of the node that yields the result.
    annotation: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if (self.replacement is None) == (self.rewrite is None):
            raise ValueError(f"pattern '{self.name}': give exactly one of replacement= or rewrite=")
        if isinstance(self.match, Var):
            raise ValueError(f"pattern '{self.name}': its root is the Var '{self.match.name}', which would match "
                             "every node (inputs, weights and the output too): the root must be an Op")
        if not isinstance(self.match, Op):
            raise TypeError(f"pattern '{self.name}': match must be an Op tree, got {self.match!r}")
        for option in ("replacement", "rewrite", "check"):
            value = getattr(self, option)
            if value is not None and not callable(value):
                raise TypeError(f"pattern '{self.name}': {option}= must be a function, got {type(value).__name__}")

    def __add__(self, other: "Pattern | PatternSet") -> "PatternSet":
        return PatternSet([self]) + other


class PatternSet:
    """An ordered table of patterns; earlier patterns win where two match at one node.

    Sets compose with `+`, like tinygrad's matchers.
    """

    def __init__(self, patterns: Iterable[Pattern] = ()) -> None:
        self.patterns = list(patterns)
        names = [p.name for p in self.patterns]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"duplicate pattern names: {', '.join(sorted(dupes))}")

    def __add__(self, other: "Pattern | PatternSet") -> "PatternSet":
        more = [other] if isinstance(other, Pattern) else list(other.patterns)
        return PatternSet(self.patterns + more)

    def __iter__(self):
        return iter(self.patterns)

    def __len__(self) -> int:
        return len(self.patterns)

    def select(self, names: Iterable[str]) -> "PatternSet":
        wanted = set(names)
        return PatternSet(p for p in self.patterns if p.name in wanted)


@dataclass
class ApplyReport:
    """What `apply_patterns` did: counts and locations per pattern, and debug answers."""

    counts: dict[str, int] = field(default_factory=dict)
    locations: dict[str, list[str]] = field(default_factory=dict)
    #: pattern name -> why it did not match at the debug node ("matched" when it did).
    why_not: dict[str, str] = field(default_factory=dict)
    declined: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def record(self, name: str, node_name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1
        self.locations.setdefault(name, []).append(node_name)

    def __str__(self) -> str:
        lines = [f"{name}: {n} at {', '.join(self.locations[name])}" for name, n in self.counts.items()]
        lines += [f"{name} did not match: {why}" for name, why in self.why_not.items() if why != "matched"]
        return "\n".join(lines) or "no matches"


class Rewriter:
    """What a `rewrite` function gets: the match and helpers that insert before its root."""

    def __init__(self, gm: torch.fx.GraphModule, match: Match, stored: dict | None = None) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.match = match
        self.new_nodes: list[torch.fx.Node] = []
        self._new_attributes: list[str] = []
        # (sources, role, value digest) -> attribute: what the rewrites of one `apply_patterns`
        # stored with `shared=True`; `_stored_now` joins it when this rewrite is kept
        self._stored = stored if stored is not None else {}
        self._stored_now: dict = {}

    def __getitem__(self, name: str) -> Any:
        return self.match[name]

    def view(self, name: str):
        return self.match.views[name]

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> torch.fx.Node:
        """Insert `call_function(fn, args, kwargs)` before the match's root."""
        with self.graph.inserting_before(self.match.root):
            node = self.graph.call_function(fn, tuple(args), dict(kwargs))
        self.new_nodes.append(node)
        return node

    def copy(self, node: torch.fx.Node, reading: dict[torch.fx.Node, Any]) -> torch.fx.Node:
        """Insert a copy of `node` (a module call too) before the match's root, reading
        ``reading[n]`` where it read `n`: an op moved past another (a batchnorm before the
        slice it followed). The copy keeps `node`'s metadata; set what changed."""
        with self.graph.inserting_before(self.match.root):
            new = self.graph.node_copy(node, lambda n: reading.get(n, n))
        new.meta = dict(node.meta)
        self.new_nodes.append(new)
        return new

    def tensor(self, base_name: str, value: torch.Tensor, *, parameter: bool = True,
               shared: bool = False) -> torch.fx.Node:
        """Store a new tensor on the root module and insert a `get_attr` reading it; a
        parameter is trainable where the matched ops' parameters it comes from are.

        `shared=True` says the value is computed from the matched ops' parameters and stored
        tensors alone (a batchnorm folded into a conv): a rewrite of the same `apply_patterns`
        run at another call of the same modules computes it again from the same tensors, and
        reads this one instead. A conv + batchnorm called at three feature-pyramid levels kept
        three folded copies (+62% parameters, trained apart; fuse tester)."""
        key = self._provenance(base_name, value) if shared else None
        name = self._stored.get(key) if key is not None else None
        if name is None or not hasattr(self.gm, name):
            name = add_tensor_attr(self.gm, base_name, value, parameter=parameter,
                                   requires_grad=parameter and self._trains())
            self._new_attributes.append(name)
            if key is not None:
                self._stored_now[key] = name
        with self.graph.inserting_before(self.match.root):
            node = self.graph.get_attr(name)
        if value.layout == torch.strided:
            node.meta["tensor_meta"] = _extract_tensor_metadata(value.detach())
        self.new_nodes.append(node)
        return node

    def _provenance(self, base_name: str, value: torch.Tensor) -> tuple:
        """What a `shared` tensor is computed from: the matched ops' parameters and the stored
        tensors the match's inputs are computed from (a layer scale's ``gamma[:, None, None]``),
        by path; its role (`base_name` less the root's name); and its value, by digest."""
        params = sorted(ref.qualname for view in self.match.views.values() for ref in view.params.values())
        stored = sorted(_stored_sources(node) for node in self.match.nodes.values()
                        if isinstance(node, torch.fx.Node) and node not in self.match.ops)
        role = base_name.removeprefix(self.match.root.name)
        return tuple(params), tuple(stored), role, str(value.dtype), tuple(value.shape), _digest(value)

    def _trains(self) -> bool:
        """Whether a parameter of the matched ops requires grad."""
        return any(getattr(ref.get(), "requires_grad", False)
                   for view in self.match.views.values() for ref in view.params.values())

    def param(self, op_name: str, param: str) -> torch.fx.Node | None:
        """A `get_attr` reading a named op's existing parameter (shared, not copied)."""
        ref = self.match.views[op_name].params.get(param)
        if ref is None:
            return None
        with self.graph.inserting_before(self.match.root):
            node = self.graph.get_attr(ref.qualname)
        self.new_nodes.append(node)
        return node

    def where(self) -> str:
        return node_location(self.match.root)

    def _roll_back(self) -> None:
        """Erase the nodes and tensors this rewrite added, as far as nothing else reads them:
        a declined or refused rewrite leaves the caller's graph and module as they were."""
        for node in reversed(self.new_nodes):
            if not node.users and not getattr(node, "_erased", False):
                self.graph.erase_node(node)
        still_read = {n.target for n in self.new_nodes if n.op == "get_attr" and not getattr(n, "_erased", False)}
        for name in self._new_attributes:
            if name not in still_read:
                delattr(self.gm, name)


@one_at_a_time
def apply_patterns(
    gm: torch.fx.GraphModule,
    patterns: Pattern | PatternSet | Sequence[Pattern],
    *,
    debug: str | None = None,
    max_rounds: int = 8,
) -> ApplyReport:
    """Rewrite every match of `patterns` in `gm` (in place) and report what matched where.

    Nodes are visited from the output backwards so the largest pattern rooted at a node is
    tried first (conv+add+relu before add+relu); rounds repeat while the graph changes, so a
    rewrite that creates a new match (conv+bn folded, then conv+relu) is found. `debug` names a
    node: the report's `why_not` says, per pattern, why it did not match rooted there — as the
    graph stood in the last round the node was in ("matched" if it matched in any round: a
    conv+relu that matches only once its batchnorm is folded says so).
    """
    table = patterns if isinstance(patterns, PatternSet) else PatternSet(
        [patterns] if isinstance(patterns, Pattern) else patterns)
    report = ApplyReport()
    # only the patterns whose root is the node's op kind can match there: a fuse table of ~140
    # patterns tried each on every node made fusion ~10 ms a node (7 s for 200 conv blocks)
    by_kind: dict[str, list[Pattern]] = {}
    for pattern in table:
        for kind in pattern.match.kinds:
            by_kind.setdefault(kind, []).append(pattern)
    if debug is not None:
        _explain_all(gm, table, _debug_node(gm, debug), report)
    # (pattern, node) that matched and left the node in place (an annotation, a decline): a
    # later round, run because another pattern rewrote something, finds them again
    kept: set[tuple[str, torch.fx.Node]] = set()
    stored: dict = {}  # what rewrites stored with `Rewriter.tensor(shared=True)`
    declined: set[tuple[str, torch.fx.Node]] = set()  # counted once; tried again (the graph moves on)
    for round_ in range(max_rounds):
        if debug is not None and round_:
            node = next((n for n in gm.graph.nodes if n.name == debug), None)
            if node is not None:
                _explain_all(gm, table, node, report)
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if getattr(node, "_erased", False):
                continue
            view = op_view(gm, node)
            for pattern in by_kind.get(view.kind, ()) if view is not None else ():
                try:
                    m = _match_or_raise(gm, node, pattern)
                except NoMatch:
                    continue
                key = (pattern.name, node)
                if key in kept:  # (applied again, an annotation would add its size guards again)
                    break
                result = _apply_one(gm, pattern, m, stored)
                if result is None:
                    if key not in declined:
                        report.declined[pattern.name] = report.declined.get(pattern.name, 0) + 1
                        declined.add(key)
                    continue
                if result is not node:
                    changed = True
                else:
                    kept.add(key)
                report.record(pattern.name, node.name)
                break
        if not changed:
            break
    else:
        if changed:  # still rewriting after the last round: a replacement that holds its own pattern
            busiest = max(report.counts, key=report.counts.get)
            warnings.warn(f"apply_patterns: still matching after max_rounds={max_rounds} rounds ('{busiest}' "
                          f"matched {report.counts[busiest]} times); does its replacement contain its own "
                          "pattern?", stacklevel=2)
    gm.graph.lint()
    return report


def _debug_node(gm: torch.fx.GraphModule, node_name: str) -> torch.fx.Node:
    node = next((n for n in gm.graph.nodes if n.name == node_name), None)
    if node is None:
        import difflib

        ops = [n.name for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
        close = difflib.get_close_matches(node_name, ops, n=5, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else f"; op nodes start with: {', '.join(ops[:10])}"
        raise ValueError(f"debug node '{node_name}' is not in the graph{hint}")
    return node


def _explain_all(gm: torch.fx.GraphModule, table: PatternSet, node: torch.fx.Node, report: ApplyReport) -> None:
    for pattern in table:
        if report.why_not.get(pattern.name) == "matched":
            continue
        try:
            _match_or_raise(gm, node, pattern)
            report.why_not[pattern.name] = "matched"
        except NoMatch as exc:
            report.why_not[pattern.name] = str(exc)


def _match_or_raise(gm: torch.fx.GraphModule, node: torch.fx.Node, pattern: Pattern) -> Match:
    """`match_or_raise` for a whole `Pattern`: a check of it that raised also names the pattern."""
    try:
        return match_or_raise(gm, node, pattern.match, pattern.check)
    except CheckError as exc:
        raise CheckError(f"pattern '{pattern.name}': {exc}") from exc.__cause__


def _stored_sources(node: torch.fx.Node, depth: int = 4) -> tuple:
    """The stored tensors (`get_attr` targets) a few ops compute `node` from; () where it is
    computed from the inputs."""
    if node.op == "get_attr":
        return (str(node.target),)
    if depth == 0 or node.op not in ("call_function", "call_method") or not node.all_input_nodes:
        return ()
    parts = [_stored_sources(a, depth - 1) for a in node.all_input_nodes]
    return tuple(t for part in parts for t in part) if all(parts) else ()


def _apply_one(gm: torch.fx.GraphModule, pattern: Pattern, m: Match, stored: dict) -> torch.fx.Node | None:
    rw = Rewriter(gm, m, stored)
    try:
        new = _checked_replacement(rw, pattern)
    except BaseException:
        rw._roll_back()  # a refused rewrite leaves nothing behind in the caller's graph
        raise
    if new is None:
        rw._roll_back()
        return None
    stored.update(rw._stored_now)
    if pattern.annotation:
        annotate(new, **pattern.annotation)
    _assert_sizes(gm, pattern, m, new)
    if new is m.root:
        return new
    _carry_provenance(gm, m, rw.new_nodes)
    _carry_annotations(gm, m.root, new)
    replace_uses(m.root, new)
    for op in reversed(m.ops[:-1]):
        if not op.users and op.graph is gm.graph:
            gm.graph.erase_node(op)
    return new


def _digest(value: torch.Tensor) -> str:
    """The SHA-1 of `value`'s elements in row-major order, whatever its strides (a channels-last
    1x1 conv weight is `is_contiguous()` with a last stride of 8, and `.view(torch.uint8)` refuses
    it), layout or quantization (its integers and scales)."""
    t = value.detach()
    if t.is_quantized:
        plain = plain_tensor(t)
        return _digest(plain.pop("int_repr")) + repr(sorted((k, str(v.tolist()) if isinstance(v, torch.Tensor) else v)
                                                             for k, v in plain.items()))
    if t.layout != torch.strided:
        t = t.to_dense()
    flat = t.cpu().resolve_conj().resolve_neg().clone(memory_format=torch.contiguous_format).reshape(-1)
    return hashlib.sha1(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


#: The metadata that says where a node came from in the user's model.
_PROVENANCE = ("nn_module_stack", "stack_trace")


def _carry_provenance(gm: torch.fx.GraphModule, m: Match, new_nodes: list[torch.fx.Node]) -> None:
    """A new op of the kind of exactly one matched op stands for it: it takes that op's module
    path and source line. A conv with its batchnorm folded is still the user's `c1`, for
    prune's `ignore`, quantize's `skip` and error messages (api tester: after `fuse`, the
    folded conv had no module, and `prune{ignore=[c1]}` silently pruned it)."""
    kinds: dict[str, list[torch.fx.Node]] = {}
    for op in m.ops:
        if (view := op_view(gm, op)) is not None:
            kinds.setdefault(view.kind, []).append(op)
    for node in new_nodes:
        if node.op not in ("call_function", "call_method", "call_module") or getattr(node, "_erased", False):
            continue
        view = op_view(gm, node)
        sources = kinds.get(view.kind, []) if view is not None else []
        if len(sources) != 1 or module_path(node) is not None:
            continue  # (a merge of two linears is neither; a copy kept its own)
        source = sources[0]
        path = module_path(source)
        if path is not None and source.op == "call_module":
            node.meta[PRIVATE_OF] = path  # (an export node says it in nn_module_stack, carried below)
        for key in _PROVENANCE:
            if key in source.meta and key not in node.meta:
                node.meta[key] = source.meta[key]


def _carry_annotations(gm: torch.fx.GraphModule, old: torch.fx.Node, new: torch.fx.Node) -> None:
    """`new` computes `old`'s value: it takes `old`'s annotations (its own win), and the
    annotations that name `old` name `new` (fuse tester: a conv+act group kept naming the conv a
    later batchnorm fold replaced, and the new conv had no role in it)."""
    carried = annotations(old)
    if not carried:
        return  # (nothing names a node that carries no annotation of its own: fxopt's groups don't)
    new.meta[ANNOTATIONS] = {**carried, **annotations(new)}
    for node in gm.graph.nodes:
        notes = annotations(node)
        if old.name in notes.values():
            node.meta[ANNOTATIONS] = {key: new.name if value == old.name else value for key, value in notes.items()}


def _assert_sizes(gm: torch.fx.GraphModule, pattern: Pattern, m: Match, new: torch.fx.Node) -> None:
    """Before the rewritten value, assert the sizes the pattern's `shape` constraints fixed
    where the graph may run at others (`Match.size_guards`): at those the rewrite computes
    other numbers, and the graph says so instead."""
    for value, dim, size in m.size_guards:
        what, kind = (f"size {size} at dim {dim}", "size") if dim is not None else (f"{size} dims", "rank")
        # before the replacement; after it where the guard reads it (then each node after the last)
        with gm.graph.inserting_after(new) if value is new else gm.graph.inserting_before(new):
            got = gm.graph.call_method("size", (value, dim)) if dim is not None else gm.graph.call_method("dim", (value,))
        with gm.graph.inserting_after(got):
            same = gm.graph.call_function(operator.eq, (got, size))
        with gm.graph.inserting_after(same):
            gm.graph.call_function(torch._assert, (same, (
                f"pattern '{pattern.name}' rewrote '{m.root.name}' for {what} of "
                f"'{value.name}' (its shape constraint); the graph runs only at that {kind} now")))


def _checked_replacement(rw: Rewriter, pattern: Pattern) -> torch.fx.Node | None:
    """The node that yields the root's value after `pattern`'s rewrite, None where it declined;
    raises where the rewrite returned no node or one of another shape or dtype."""
    new = pattern.rewrite(rw) if pattern.rewrite is not None else _inline_replacement(rw, pattern)
    if new is None:
        return None
    if not isinstance(new, torch.fx.Node):
        raise TypeError(f"pattern '{pattern.name}' at {node_location(rw.match.root)}: rewrite= returned "
                        f"{type(new).__name__}; it must return the node that now yields the root's value "
                        "(r.call(...), or r.match.root to keep it), or None to decline")
    if new is not rw.match.root:
        _check_same_value_kind(pattern, rw.match.root, new, rw.new_nodes)
    return new


def _check_same_value_kind(pattern: Pattern, root: torch.fx.Node, new: torch.fx.Node,
                           new_nodes: list[torch.fx.Node]) -> None:
    """A replacement must compute what the matched value was: the same shape and dtype. Its new
    nodes run once on meta tensors of the recorded shapes (no data); where they cannot (no
    recorded shapes, an op without a meta kernel, a quantized value), nothing is said. A new
    node's trial value is recorded as its `tensor_meta`, so later patterns can read its shape
    and dtype (a mask a rewrite summed, checked by the attention pattern).

    A `(x + x).half()` in place of a float `x * 2` matched silently and the graph failed later,
    in a linear, with no word of the pattern."""
    want = tensor_meta(root)
    if want is None:
        return
    try:
        values = _run_new_nodes(new_nodes, meta_value)
        got = None if values is None else values[new] if new in values else meta_value(new)
    except (LookupError, NotImplementedError):  # nothing recorded, no meta kernel: no trial, no verdict
        return
    except Exception as exc:  # noqa: BLE001 - an op that refused its inputs, or one meta cannot run
        if _fails_on_real_tensors(new_nodes):
            raise ValueError(f"pattern '{pattern.name}' at {node_location(root)}: the replacement cannot run at "
                             f"the matched shapes: {type(exc).__name__}: {first_line(exc)}") from None
        return
    if values is None:
        return
    for n, v in values.items():
        if isinstance(v, torch.Tensor) and "tensor_meta" not in n.meta:
            n.meta["tensor_meta"] = _extract_tensor_metadata(v)
    if isinstance(got, torch.Tensor) and (tuple(got.shape) != tuple(want[0]) or got.dtype != want[1]):
        raise ValueError(f"pattern '{pattern.name}' at {node_location(root)}: the replacement computes "
                         f"{_describe(got.dtype, got.shape)} where the matched value is "
                         f"{_describe(want[1], want[0])}; a replacement must compute the same shape and dtype")


def _run_new_nodes(new_nodes: list[torch.fx.Node],
                   value_of: Callable[[torch.fx.Node], Any]) -> dict[torch.fx.Node, Any] | None:
    """Each new op node's value, run on the values `value_of` gives the nodes it reads; None
    where a module call is among them (not tried)."""
    values: dict[torch.fx.Node, Any] = {}

    def value(n: torch.fx.Node) -> Any:
        return values[n] if n in values else value_of(n)

    for n in new_nodes:
        if n.op == "get_attr":
            continue
        if n.op not in ("call_function", "call_method"):
            return None
        values[n] = call_as(n.op, n.target, torch.fx.node.map_arg(n.args, value),
                            torch.fx.node.map_arg(n.kwargs, value))
    return values


#: The most elements of zeros a failed meta trial is confirmed on (a meta tensor has no data
#: for `.item()`: only a real run tells a refused shape from an op meta cannot run).
_CONFIRM_LIMIT = 1 << 22


def _fails_on_real_tensors(new_nodes: list[torch.fx.Node]) -> bool:
    """Whether the new nodes also raise on zeros of the recorded shapes (False when they run, or
    when the inputs are too large to make, or unrecorded)."""
    def zeros(n: torch.fx.Node) -> Any:
        if n.op == "get_attr":
            return get_attr_value(n.graph.owning_module, n.target)
        value = meta_value(n)
        if not isinstance(value, torch.Tensor):
            return value
        if value.numel() > _CONFIRM_LIMIT or value.dtype.is_complex or value.is_quantized:
            raise LookupError(f"'{n.name}' cannot be tried on zeros")
        return torch.zeros(value.shape, dtype=value.dtype)

    try:
        _run_new_nodes(new_nodes, zeros)
    except LookupError:
        return False
    except Exception:  # noqa: BLE001 - the replacement's own error, which the meta trial already has
        return True
    return False


def _describe(dtype: torch.dtype, shape) -> str:
    return f"{str(dtype).removeprefix('torch.')}{list(shape)}"


def _inline_replacement(rw: Rewriter, pattern: Pattern) -> torch.fx.Node | None:
    fn = pattern.replacement
    traced = _traced(fn)
    env: dict[torch.fx.Node, Any] = {}
    for ph in traced.graph.nodes:
        if ph.op != "placeholder":
            continue
        env[ph] = _binding(rw, ph.target, pattern)
    out = None
    for n in traced.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            out = torch.fx.node.map_arg(n.args[0], lambda a: env[a])
            break
        if n.op == "get_attr":
            value = getattr(traced, n.target)
            env[n] = rw.tensor(f"{pattern.name}_{n.target}", value)
            continue
        if n.op == "call_module":
            raise ValueError(f"pattern '{pattern.name}': a replacement function must call functions, "
                             f"not modules (found {n.target}); use torch.nn.functional")
        args = torch.fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env[a])
        with rw.graph.inserting_before(rw.match.root):
            if n.op == "call_method":
                new = rw.graph.call_method(n.target, args, kwargs)
            else:
                new = rw.graph.call_function(n.target, args, kwargs)
        rw.new_nodes.append(new)
        env[n] = new
    if not isinstance(out, torch.fx.Node):
        raise ValueError(f"pattern '{pattern.name}': the replacement must return one tensor")
    return out


_TRACE_CACHE: dict[Any, torch.fx.GraphModule] = {}


def _traced(fn: Callable[..., Any]) -> torch.fx.GraphModule:
    if fn not in _TRACE_CACHE:
        _TRACE_CACHE[fn] = torch.fx.symbolic_trace(fn)
    return _TRACE_CACHE[fn]


def _binding(rw: Rewriter, name: str, pattern: Pattern) -> Any:
    m = rw.match
    if name in m.values:
        return m.values[name]
    if name in m.nodes:
        return m.nodes[name]
    if name in m.params:
        op_name, param = m.params[name]
        return rw.param(op_name, param)
    for op_name, view in m.views.items():
        for param in view.params:
            if name == f"{op_name}_{param}":
                return rw.param(op_name, param)
        prefix = f"{op_name}_"
        if name.startswith(prefix) and name[len(prefix):] in view.attrs:
            return view.attrs[name[len(prefix):]]
    bound = sorted(set(m.values) | set(m.nodes) | {f"{o}_{p}" for o, v in m.views.items() for p in v.params})
    raise ValueError(f"pattern '{pattern.name}': replacement parameter '{name}' is not bound by the "
                     f"match; bound: {', '.join(bound)}")


def replacement_params(fn: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(fn).parameters)
