"""Why a call does not fit an exported graph, said in the caller's words.

torch.export fixes what a graph takes: its keyword inputs, the structure of its inputs, and the
size of every dimension it did not keep dynamic (a sequence length, an image size), guarded on
each call in torch's own words: ``Guard failed: x.size()[1] == 5``, ``Ran into a kwarg keyword
mismatch``, a pytree spec dump. At capture fxopt records the same facts as plain data
(`record_inputs`, in ``gm.meta["fxopt"]["inputs"]``, which `fxopt.save` keeps), and
`explain_failed_calls` wraps the module's call: when a call raises, it compares the call with
the record and raises `InputMismatchError`, which names the input, the dimension, the captured
size or range, and how to capture again. Export assumes every dynamic dim is 2 or more and
guards neither 0 nor 1; capture checks the graph at those sizes, and a size below the min it
found is refused before the call runs the wrong branch. A call that works pays one try/except.
export also traces the example's memory layout (a ``.contiguous()`` on a contiguous example
records no copy): a call on inputs of another layout that fails runs again on contiguous copies.

    >>> import torch, fxopt
    >>> class Seq(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.pos = torch.nn.Parameter(torch.randn(16, 8))
    ...     def forward(self, x):
    ...         return x + self.pos[: x.shape[1]]
    >>> gm = fxopt.capture(Seq(), torch.randn(2, 5, 8), mode="export")
    >>> try:
    ...     gm(torch.randn(2, 6, 8))
    ... except fxopt.errors.InputMismatchError as exc:
    ...     print(str(exc).split(";")[0])
    input 0 ('x') has size 6 at dim 1, where the graph was captured with size 5
"""
from __future__ import annotations

import inspect
import sys
import traceback
from typing import Any

import torch
import torch.fx
from torch.overrides import handle_torch_function, has_torch_function
from torch.utils._pytree import (MappingKey, SequenceKey, tree_flatten, tree_flatten_with_path, tree_structure,
                                tree_unflatten)

from . import size_guards
from .errors import InputMismatchError, first_line
from .ir.effects import written_base

META_KEY = "fxopt"
INPUTS_KEY = "inputs"
# a record whose dynamic dims' mins were checked against the model below export's 2 (capture's
# `_settle_small_sizes`); records without it (files saved before) never refused sizes 1 and 0
FLOORS_CHECKED = "floors_checked"
# a leaf's dims that dynamic_shapes asked to keep dynamic and export kept static (the model's
# code fixes them): a call at another size is not advised to ask for them again
FIXED_BY_MODEL = "fixed_by_model"

_SIMPLE = (int, float, bool, str, type(None))


# ----- at capture ------------------------------------------------------------------------------

def record_inputs(gm: torch.fx.GraphModule, ep: Any, model: torch.nn.Module, args: tuple,
                  kwargs: dict) -> dict | None:
    """The inputs exported graph `gm` takes, as plain data, or None when they cannot be read.

    ``{"parameters": forward's parameter names, "positional": the names of the inputs it was
    captured with by position, "keywords": those by keyword, "leaves": one entry per flat input
    (label, and shape or value)}``. A dimension is its size when export specialized it, else
    ``{"symbol", "min", "max"}`` (``max`` None: unbounded), or ``{"expr"}`` for a size export
    derived from others (not checked).
    """
    spec = getattr(gm, "_in_spec", None)
    if spec is None or spec.num_children != 2:
        return None
    keywords = list(spec.child(1).context or [])
    ordered = {k: kwargs[k] for k in keywords if k in kwargs}
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    flat = tree_flatten_with_path((args, ordered))[0]
    if len(flat) != spec.num_leaves or len(placeholders) != len(flat):
        return None
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()]
    except (TypeError, ValueError):
        params = []
    ranges = getattr(ep, "range_constraints", {}) or {}
    leaves = []
    exported_as: dict[str, int] = {}  # export's text for each flat input (`L['x']`) -> its index
    for (path, value), node in zip(flat, placeholders):
        top, chain = _name_parts(path, params)
        exported_as[f"L[{top!r}]{chain}"] = len(leaves)
        entry: dict[str, Any] = {"label": _label(path, params), "name": top + chain}
        seen = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            shape = seen.shape if isinstance(seen, torch.Tensor) else value.shape
            entry["shape"] = [_dim(size, ranges) for size in shape]
            entry["dtype"] = _dtype_text(value.dtype)
        elif isinstance(value, _SIMPLE):
            entry["value"] = repr(value)
        leaves.append(entry)
    return {"parameters": params, "positional": [_positional_name(i, params) for i in range(len(args))],
            "keywords": keywords, "leaves": leaves,
            "conditions": size_guards.from_export(getattr(ep, "_guards_code", None) or [], exported_as)}


def symbol_mins(record: dict) -> dict[str, int | None]:
    """The min of each dynamic dim's symbol in `record` (`record_inputs`), by symbol."""
    return {d["symbol"]: d["min"] for e in record["leaves"] for d in e.get("shape", ())
            if isinstance(d, dict) and "symbol" in d}


def set_symbol_min(record: dict, symbol: str, low: int) -> None:
    """Make `low` the min of every dim of `record` that export named `symbol`."""
    for entry in record["leaves"]:
        for d in entry.get("shape", ()):
            if isinstance(d, dict) and d.get("symbol") == symbol:
                d["min"] = low


def _symbol_dims(record: dict, args: tuple, kwargs: dict) -> list[tuple[int, int, str, Any]]:
    """(leaf index, dim, symbol, the call's flat input) for each dynamic dim of `record`."""
    flat = tree_flatten((args, {k: kwargs[k] for k in record["keywords"] if k in kwargs}))[0]
    return [(i, dim, d["symbol"], flat[i]) for i, entry in enumerate(record["leaves"]) if i < len(flat)
            for dim, d in enumerate(entry.get("shape", ())) if isinstance(d, dict) and "symbol" in d]


def symbols_by_size(record: dict, args: tuple, kwargs: dict) -> list[set[str]]:
    """The dynamic dims' symbols of `record`, grouped by the size they have in the example
    (`args`, `kwargs`): export may give each input's batch a symbol of its own
    (``input_ids`` and ``attention_mask``), yet a call has one batch size for them all."""
    groups: dict[int, set[str]] = {}
    for _, dim, symbol, value in _symbol_dims(record, args, kwargs):
        if isinstance(value, torch.Tensor):
            groups.setdefault(value.shape[dim], set()).add(symbol)
    return list(groups.values())


def sizes_taken(record: dict, args: tuple, kwargs: dict, symbols: set[str], sizes: range) -> list[int]:
    """The sizes among `sizes` a call meets `record`'s ranges and size conditions at, with every
    dim `record` names by one of `symbols` at that size and the rest as in the example (`args`,
    `kwargs`). Shapes only: nothing runs."""
    flat = tree_flatten((args, {k: kwargs[k] for k in record["keywords"] if k in kwargs}))[0]
    dims = [(i, dim) for i, dim, symbol, value in _symbol_dims(record, args, kwargs)
            if symbol in symbols and isinstance(value, torch.Tensor)]
    bounds = [d for e in record["leaves"] for d in e.get("shape", ()) if isinstance(d, dict) and d.get("symbol") in symbols]
    taken = []
    for size in sizes:
        if any((d["min"] is not None and size < d["min"]) or (d["max"] is not None and size > d["max"]) for d in bounds):
            continue
        trial = list(flat)
        for i, dim in dims:
            shape = list(trial[i].shape)
            shape[dim] = size
            trial[i] = torch.empty(shape, device="meta")
        if size_guards.failed(record.get("conditions") or (), trial) is None:
            taken.append(size)
    return taken


def inputs_at_size(record: dict, args: tuple, kwargs: dict, symbols: set[str], size: int) -> tuple[tuple, dict]:
    """(`args`, `kwargs`) with every dim that `record` names by one of `symbols` cut to its
    first `size`."""
    keywords = {k: kwargs[k] for k in record["keywords"] if k in kwargs}
    flat, spec = tree_flatten((args, keywords))
    for i, dim, symbol, value in _symbol_dims(record, args, kwargs):
        if symbol in symbols:
            flat[i] = flat[i].narrow(dim, 0, size)
    new_args, new_keywords = tree_unflatten(flat, spec)
    return new_args, {**kwargs, **new_keywords}


def upgrade_record(record: dict | None) -> dict | None:
    """`record` as this version reads it: one saved before `FLOORS_CHECKED` took every size
    under its dynamic dims' min of 2 (unchecked), so it keeps taking them."""
    if record and not record.get(FLOORS_CHECKED):
        for symbol, low in symbol_mins(record).items():
            if low == 2:
                set_symbol_min(record, symbol, 0)
        record[FLOORS_CHECKED] = True
    return record


def _dim(size: Any, ranges: dict) -> Any:
    if isinstance(size, int):
        return size
    expr = size.node.expr if isinstance(size, torch.SymInt) else None
    if expr is not None and expr.is_number:
        return int(expr)
    if expr is None or not expr.is_Symbol:
        return {"expr": str(expr if expr is not None else size)}
    bounds = ranges.get(expr)
    low = _bound(bounds.lower) if bounds is not None else None
    high = _bound(bounds.upper) if bounds is not None else None
    return {"symbol": str(expr), "min": low, "max": high}


def _bound(value: Any) -> int | None:
    """An integer bound, or None for an unbounded one (torch's ``int_oo``, sympy's ``oo``)."""
    try:
        number = int(value)
    except Exception:  # noqa: BLE001  (int_oo raises an AttributeError of sympy's)
        return None
    return number if abs(number) < 2 ** 62 else None


def _positional_name(index: int, params: list[str]) -> str:
    return params[index] if index < len(params) else f"#{index}"


def _name_parts(path: tuple, params: list[str]) -> tuple[str, str]:
    """(`x`, `['a'][0]`): the name of the input at pytree `path` of (args, kwargs), and the
    subscripts that reach the value inside it, as forward's code writes them."""
    side, head, *rest = path
    if side == SequenceKey(0):
        top = params[head.idx] if head.idx < len(params) else f"#{head.idx}"
    else:
        top = head.key
    return top, "".join(f"[{k.key!r}]" if isinstance(k, MappingKey) else f"[{getattr(k, 'idx', k)}]" for k in rest)


def _label(path: tuple, params: list[str]) -> str:
    """`input 0 ('x')`, `input 'mask'`, `input 1 ('pair')[0]` for a pytree path into (args, kwargs)."""
    side, head, *rest = path
    if side == SequenceKey(0):
        name = params[head.idx] if head.idx < len(params) else None
        text = f"input {head.idx}" + (f" ('{name}')" if name else "")
    else:
        text = f"input '{head.key}'"
    for key in rest:
        text += f"[{key.key!r}]" if isinstance(key, MappingKey) else f"[{getattr(key, 'idx', key)}]"
    return text


# ----- at call ---------------------------------------------------------------------------------

class _ExplainedCall:
    """Stands in for a GraphModule class's `_wrapped_call` (what its `__call__` runs, kept by
    `recompile`): runs the call and, when it raises, looks for an input that does not fit the
    module's record (`mismatch`). Three things are checked before the call, where the call would
    not raise: the number of dims of each tensor input (`ranks`: export's guard checks none, and
    a graph a pass folded for 2-D inputs ran a 3-D one, wrongly); the structure of the inputs
    (`structure`: where torch's own check of it is gone, a copy or a loaded graph, whose
    flattening read a dict-captured ``forward(y, x)`` called as ``g(X, Y)`` with x and y
    swapped, and took a list of 3 captured as 2 without its last item), and `floors`, the
    dynamic dims a size below their min would take through the other branch of the model's code
    (``if x.shape[0] == 1:``; export guards none of sizes 0 and 1). A call that fits pays a
    comparison of its input structure and a flattening of its inputs."""

    def __init__(self, inner: Any, structure: bool, floors: tuple[tuple[int, int, int], ...],
                 keywords: list[str], ranks: tuple[tuple[int, int], ...]) -> None:
        self.inner = inner
        self.structure = structure
        self.floors = floors
        self.keywords = keywords
        self.ranks = ranks
        #: A call on inputs of another memory layout failed and ran on contiguous copies: later
        #: calls make them contiguous up front (`_run_contiguous`).
        self.contiguous = False

    def __call__(self, module: torch.fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
        record = module.meta.get(META_KEY, {}).get(INPUTS_KEY)
        if self._suspect(module, args, kwargs):
            args, kwargs = _fitted(module, record, args, kwargs)
        if self.contiguous:
            args, kwargs = _contiguous(args, kwargs) or (args, kwargs)
        try:
            return self._quietly(module, args, kwargs)
        except InputMismatchError:
            raise  # fxopt's input guard (`InputGuard`) said it already
        except Exception as exc:
            try:
                conformed = _conformed(getattr(module, "_in_spec", None), record, args, kwargs)
            except _Unfit as unfit:
                raise InputMismatchError(str(unfit)) from exc
            if conformed is not None:  # export's check refused what eager takes; its graph runs on it
                return self(module, *conformed[0], **conformed[1])
            ran, out = self._run_contiguous(module, args, kwargs)
            if ran:
                return out
            problem = mismatch(record, args, kwargs) or _dtype_problem(record, args, kwargs, exc)
            if problem is None:
                _print_failed_line(exc)
                raise
            raise InputMismatchError(problem) from exc

    def _quietly(self, module: torch.fx.GraphModule, args: tuple, kwargs: dict) -> Any:
        """The call as `inner` (torch.fx's `_WrappedCall`) runs it, less the failing line of the
        graph's code it prints to stderr before raising: a retry here may yet succeed, and the
        line is printed (`_print_failed_line`) only where the model's error reaches the caller."""
        cls = getattr(self.inner, "cls", None)
        if cls is None or not hasattr(self.inner, "cls_call"):  # not torch.fx's wrapper: run it as it is
            return self.inner(module, *args, **kwargs)
        if self.inner.cls_call is not None:
            return self.inner.cls_call(module, *args, **kwargs)
        return super(cls, module).__call__(*args, **kwargs)

    def _run_contiguous(self, module: torch.fx.GraphModule, args: tuple, kwargs: dict) -> tuple[bool, Any]:
        """(True, the output) of the call run again on contiguous copies of its inputs that are
        not; (False, None) where every input is contiguous, the graph writes into an input or a
        buffer (the failed call may have written it: a run again writes it twice), or the call
        fails all the same. export traces the example's
        layout: ``y.contiguous().view(...)`` on a contiguous example records no copy, and a
        channels_last input then fails in the view, where eager runs it."""
        fixed = _contiguous(args, kwargs)
        if fixed is None or _writes_state(module):
            return False, None
        try:
            out = self._quietly(module, fixed[0], fixed[1])
        except Exception:  # noqa: BLE001  (not the layout: the first failure is explained instead)
            return False, None
        self.contiguous = True
        return True, out

    def _suspect(self, module: torch.fx.GraphModule, args: tuple, kwargs: dict) -> bool:
        """Whether the call's structure differs from the captured one, a tensor input has another
        number of dims (export's guard checks none: a graph folded for 2-D inputs ran a 3-D one),
        or a size is below a floor."""
        spec = getattr(module, "_in_spec", None)
        if self.structure and spec is not None and tree_structure((args, kwargs)) != spec:
            return True
        if not (self.floors or self.ranks):
            return False
        keywords = [kwargs[k] for k in self.keywords if k in kwargs]
        if all(isinstance(v, torch.Tensor) for v in (*args, *keywords)):  # plain tensors: no containers to flatten
            flat = (*args, *keywords)
        else:
            flat = tree_flatten((args, {k: kwargs[k] for k in self.keywords if k in kwargs}))[0]
        if any(i < len(flat) and isinstance(flat[i], torch.Tensor) and flat[i].dim() != rank
               for i, rank in self.ranks):
            return True
        return any(i < len(flat) and isinstance(flat[i], torch.Tensor) and flat[i].dim() > dim
                   and flat[i].shape[dim] < low for i, dim, low in self.floors)


def _print_failed_line(exc: Exception) -> None:
    """What torch.fx's `_WrappedCall` prints for an error raised in a graph's generated code: the
    line of that code that failed, in its context."""
    frames = traceback.extract_tb(exc.__traceback__)
    message = getattr(torch.fx.graph_module._WrappedCall, "_generate_error_message", None)
    if frames and "eval_with_key" in frames[-1].filename and message is not None:
        print(message(frames[-1]), file=sys.stderr)


def _fitted(module: torch.fx.GraphModule, record: dict | None, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's inputs in the captured containers (`_conformed`); raises `InputMismatchError`
    where they do not fit the record."""
    try:
        conformed = _conformed(getattr(module, "_in_spec", None), record, args, kwargs)
    except _Unfit as unfit:
        raise InputMismatchError(str(unfit)) from None
    if conformed is not None:
        args, kwargs = conformed
    problem = mismatch(record, args, kwargs)
    if problem is not None:
        raise InputMismatchError(problem)
    return args, kwargs


def _contiguous(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The call's inputs with each tensor that is not contiguous as a contiguous copy, or None
    where every one is."""
    flat, spec = tree_flatten((args, kwargs))
    fixed = [v.contiguous() if isinstance(v, torch.Tensor) and not v.is_contiguous() else v for v in flat]
    if all(a is b for a, b in zip(fixed, flat)):
        return None
    return tree_unflatten(fixed, spec)


def _writes_state(module: torch.fx.GraphModule) -> bool:
    """Whether the graph writes into one of its inputs or buffers in place (``x.mul_(2)``, a step
    counter, through a view too), calls a module, which may keep state (an observer counts its
    batches), draws random numbers, or runs a subgraph (none of this is looked for inside one): the failed call may have written it, or drawn, already, and
    a run again would write it twice, or draw other numbers than eager."""
    if any(isinstance(child, torch.fx.GraphModule) for child in module.children()):
        return True  # a region a higher-order op runs (no_grad, cond): not looked into
    return any((node.op == "call_module" and not str(node.target).startswith("_guards"))
               or _draws_random(node)
               or getattr(written_base(module, node), "op", None) in ("placeholder", "get_attr")
               for node in module.graph.nodes)


def _draws_random(node: torch.fx.Node) -> bool:
    """Whether `node` calls an aten op torch tags as drawing from the random generator."""
    return node.op == "call_function" and torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())


class _Unfit(Exception):
    """A container input of a call that cannot be read as the captured one (`_conform`)."""


def _conformed(spec: Any, record: dict | None, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The call's (`args`, `kwargs`) in the containers the graph was captured with, where only
    their kinds or order differ from it (a tuple for a list, a dict's keys in another order:
    eager code reads both alike, export's input check refused them); None where nothing differs
    or the inputs themselves do (`mismatch` names those). Raises `_Unfit` naming the input whose
    container has other keys or another length."""
    if spec is None or spec.num_children != 2 or not record:
        return None
    arg_spec, keyword_spec = spec.child(0), spec.child(1)
    if len(args) != arg_spec.num_children or set(kwargs) != set(keyword_spec.context or ()):
        return None
    params = record["parameters"]
    conformed = (tuple(_conform(c, v, (SequenceKey(0), SequenceKey(i)), params)
                       for i, (c, v) in enumerate(zip(arg_spec.children(), args))),
                 {k: _conform(c, kwargs[k], (SequenceKey(1), MappingKey(k)), params)
                  for k, c in zip(keyword_spec.context or (), keyword_spec.children())})
    return None if tree_structure(conformed) == tree_structure((args, kwargs)) else conformed


def _conform(spec: Any, value: Any, path: tuple, params: list[str]) -> Any:
    """`value`, at pytree `path` of the call, in `spec`'s containers (see `_conformed`)."""
    if spec.type in (list, tuple, dict) and isinstance(value, (list, tuple, dict)) \
            and (spec.type is dict) != isinstance(value, dict):
        raise _Unfit(f"{_label(path, params)} is a {type(value).__name__}, where the graph was captured with a "
                     f"{spec.type.__name__}: {_recapture('an example of this kind')}")
    if spec.type is dict and isinstance(value, dict):
        if set(value) != set(spec.context):
            raise _Unfit(f"{_label(path, params)} holds keys {sorted(map(str, value))}, where the graph was captured "
                         f"with {sorted(map(str, spec.context))}: {_recapture('an example with these keys')}")
        return {k: _conform(c, value[k], (*path, MappingKey(k)), params) for k, c in zip(spec.context, spec.children())}
    if spec.type in (list, tuple) and isinstance(value, (list, tuple)):
        if len(value) != spec.num_children:
            raise _Unfit(f"{_label(path, params)} holds {len(value)} values, where the graph was captured with "
                         f"{spec.num_children}: {_recapture('an example of this length')}")
        return spec.type(_conform(c, v, (*path, SequenceKey(i)), params)
                         for i, (c, v) in enumerate(zip(spec.children(), value)))
    return value


def explain_failed_calls(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Make `gm` (one with a record of its inputs) raise `InputMismatchError` for a call that
    does not fit it; returns `gm`. A GraphModule has a class of its own, so this touches no other
    module; copies (each pass's) need it again."""
    info = getattr(gm, "meta", {}).get(META_KEY) or {}
    record = info.get(INPUTS_KEY)
    if not record:
        return gm
    cls = type(gm)
    inner = vars(cls).get("_wrapped_call")
    if inner is None or isinstance(inner, _ExplainedCall):
        return gm
    torch_checks = any(getattr(h, "__name__", "") == "_check_input_constraints_pre_hook"
                       for h in gm._forward_pre_hooks.values())
    cls._wrapped_call = _ExplainedCall(inner, not torch_checks, _floors(record), record["keywords"],
                                       _ranks(record))
    return gm


def _ranks(record: dict) -> tuple[tuple[int, int], ...]:
    """(leaf, number of dims) of every tensor input of `record`."""
    return tuple((i, len(entry["shape"])) for i, entry in enumerate(record["leaves"]) if "shape" in entry)


def _floors(record: dict) -> tuple[tuple[int, int, int], ...]:
    """(leaf, dim, min) of every dynamic dim of `record` with a min above 0."""
    return tuple((i, dim, d["min"]) for i, entry in enumerate(record["leaves"])
                 for dim, d in enumerate(entry.get("shape", ()))
                 if isinstance(d, dict) and "symbol" in d and (d["min"] or 0) > 0)


# what a guard's message says of the call until the guard knows the value (`specialized_guard`)
CALLED_WITH_ANOTHER = "was called with another"


def specialized_guard(fits: Any, message: str, *called: Any) -> None:
    """The guard a captured graph calls on a non-tensor input it was specialized to
    (``captured with flag=True ...``): raises `InputMismatchError` when `fits` is false, under
    ``python -O`` too (``torch._assert`` is an ``assert``), its message naming the value the
    graph was `called` with where the graph passes it (graphs saved before it did pass none). A
    traced value (fx tracing the graph again, as ``torch.load`` does) records the call instead,
    as ``torch._assert`` does."""
    if has_torch_function((fits,)):
        return handle_torch_function(specialized_guard, (fits,), fits, message, *called)
    if not fits:
        if called:
            message = message.replace(CALLED_WITH_ANOTHER, f"was called with {_called_text(called[0])}", 1)
        raise InputMismatchError(message)
    return None


def _called_text(value: Any) -> str:
    """`5`, `'a'`, `a float32 tensor of shape [2, 4]`: the value a specialized input was called with."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__} ({text[:57]}...)"


torch.fx.node.has_side_effect(specialized_guard)  # dead-code removal keeps it: it has no users


GUARD_TARGET = "_guards_fxopt"


class InputGuard(torch.nn.Module):
    """The sizes and values an exported graph was captured for, checked on every call: what
    torch.export's own guard (`_guards_fn`, which `fxopt.save` cannot store) checked, put back
    into a loaded graph (`guard_inputs`). Called on the graph's flat inputs; raises
    `InputMismatchError`. Kept by dead-code removal (its name starts with `_guards`)."""

    _is_impure = True

    def __init__(self, record: dict) -> None:
        super().__init__()
        self.record = record
        # (leaf, rank, ((dim, size) of every static dim)): the whole check of most calls
        self._static = tuple(
            (i, len(e["shape"]), tuple((d, w) for d, w in enumerate(e["shape"]) if isinstance(w, int)))
            for i, e in enumerate(record["leaves"]) if "shape" in e)

    def forward(self, *leaves: Any) -> None:
        for i, rank, sizes in self._static:
            value = leaves[i]
            if not isinstance(value, torch.Tensor) or value.dim() != rank:
                break
            shape = value.shape
            if any(shape[d] != w for d, w in sizes):
                break
        else:
            problem = _leaves_problem(self.record, leaves, only_dynamic=True)
            if problem is None:
                return
            raise InputMismatchError(problem)
        raise InputMismatchError(_leaves_problem(self.record, leaves) or "the inputs do not fit the graph")


def guard_inputs(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Give `gm` (an exported graph with a record of its inputs and no guard of its own) an
    `InputGuard` call after its inputs; returns `gm`."""
    record = (getattr(gm, "meta", {}).get(META_KEY) or {}).get(INPUTS_KEY)
    graph = gm.graph
    if not record or any(n.op == "call_module" and str(n.target).startswith("_guards") for n in graph.nodes):
        return gm
    placeholders = list(graph.find_nodes(op="placeholder"))
    if len(placeholders) != len(record["leaves"]):
        return gm
    gm.add_module(GUARD_TARGET, InputGuard(record).train(gm.training))
    with graph.inserting_after(placeholders[-1]):
        graph.call_module(GUARD_TARGET, tuple(placeholders))
    gm.recompile()
    return gm


def mismatch(record: dict | None, args: tuple, kwargs: dict) -> str | None:
    """What in a call of (`args`, `kwargs`) does not fit `record` (`record_inputs`), or None."""
    if not record:
        return None
    problem = _keyword_problem(record, args, kwargs)
    if problem is not None:
        return problem
    keywords = record["keywords"]
    flat, _ = tree_flatten((args, {k: kwargs[k] for k in keywords}))
    if len(flat) != len(record["leaves"]):
        return (f"the inputs hold {len(flat)} values where the graph was captured with {len(record['leaves'])} "
                f"({_captured_listing(record)}): a tuple, list or dict input has another length or keys; "
                f"{_recapture('an example with the new structure')}")
    return _leaves_problem(record, flat)


def _leaves_problem(record: dict, flat: Any, only_dynamic: bool = False) -> str | None:
    """What in the flat inputs does not fit `record`'s leaves, or None; `only_dynamic` skips
    what `InputGuard` has compared already (ranks and static sizes)."""
    symbols: dict[str, tuple[str, int, int]] = {}
    for entry, value in zip(record["leaves"], flat):
        problem = _leaf_problem(entry, value, symbols, only_dynamic, record.get("parameters") or ())
        if problem is not None:
            return problem
    condition = size_guards.failed(record.get("conditions") or (), flat,
                                   lambda: [e.get("name", e["label"]) for e in record["leaves"]])
    if condition is None:
        return None
    return (f"the input sizes do not meet {condition}, a condition of the model's code torch.export traced it "
            f"under (a branch on the sizes): the graph holds that path only; "
            f"{_recapture('an example of the sizes you will call it with')}")


def _dtype_problem(record: dict | None, args: tuple, kwargs: dict, exc: Exception) -> str | None:
    """The first tensor input of another dtype than the one `record` holds for it, or None. Asked
    of a call that failed (`exc`) on a dtype only: a graph runs on other dtypes where nothing checks
    them, but export asserts the dtype of an input the model converts (``mask.to(torch.float32)``:
    "Tensor dtype mismatch! Expected: Long, Got: int", naming no input)."""
    if not record or not any(word in str(exc).lower() for word in ("dtype", "scalar type")):
        return None  # another failure (an id out of range) is the model's own, whatever dtypes came with it
    flat = tree_flatten((args, {k: kwargs[k] for k in record["keywords"] if k in kwargs}))[0]
    for entry, value in zip(record["leaves"], flat):
        want = entry.get("dtype")  # (a record of an older file has none)
        if want is None or not isinstance(value, torch.Tensor) or _dtype_text(value.dtype) == want:
            continue
        return (f"{entry['label']} is {_dtype_text(value.dtype)}; the graph was captured with {want} there, and "
                f"the call fails on it ({type(exc).__name__}: {first_line(exc)}): pass {want} (.to(torch.{want})), "
                f"or {_recapture(f'an example of dtype {_dtype_text(value.dtype)}')}")
    return None


def _dtype_text(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _keyword_problem(record: dict, args: tuple, kwargs: dict) -> str | None:
    positional, keywords, params = record["positional"], record["keywords"], record["parameters"]
    taken = f"the graph takes {_captured_listing(record)}"
    for key in kwargs:
        if key in keywords:
            continue
        if key in positional:
            return (f"input '{key}' was given by keyword, but the graph was captured with it by position "
                    f"(input {positional.index(key)}); {taken}: pass it by position")
        if params and key not in params:
            return f"forward has no input '{key}'; {taken}"
        return (f"the graph was captured without input '{key}'; {taken}. torch.export fixes the inputs a graph "
                f"takes: {_recapture(f'{key!r} in the example inputs (a dict of keyword inputs)')}")
    if len(args) != len(positional):
        return (f"called with {len(args)} positional input{'s' if len(args) != 1 else ''}; {taken}; pass them "
                f"as the graph takes them, or {_recapture('an example of the inputs you will pass')}")
    missing = [k for k in keywords if k not in kwargs]
    if missing:
        return (f"input '{missing[0]}' is missing: the graph was captured with it by keyword; {taken}, and "
                "every one must be passed")
    return None


def _leaf_problem(entry: dict, value: Any, symbols: dict[str, tuple[str, int, int]],
                  only_dynamic: bool = False, parameters: Any = ()) -> str | None:
    label = entry["label"]
    if "value" in entry:
        if isinstance(value, _SIMPLE) and repr(value) != entry["value"]:
            return (f"captured with {label}={entry['value']}: the graph is specialized to that value of a non-tensor "
                    f"input and was called with {value!r}; {_recapture('the new value')}")
        return None
    if "shape" not in entry:
        return None
    if not isinstance(value, torch.Tensor):
        return (f"{label} is a {type(value).__name__}; the graph was captured with a tensor there "
                f"(shape {_shape_text(entry['shape'])})")
    shape = entry["shape"]
    if value.dim() != len(shape):
        return (f"{label} has {value.dim()} dimensions (shape {tuple(value.shape)}); the graph was captured with "
                f"{len(shape)} (shape {_shape_text(shape)})")
    for dim, (want, size) in enumerate(zip(shape, value.shape)):
        if isinstance(want, int):
            if only_dynamic:
                continue
            if size != want and dim in entry.get(FIXED_BY_MODEL, ()):
                return (f"{label} has size {size} at dim {dim}, where the graph was captured with size {want}; "
                        "the model's code fixes that dimension (torch.export kept it static though it was asked "
                        f"to keep it dynamic: a branch on it, or an operation tying it to a fixed size), so the "
                        f"graph runs at size {want} only: call it at that size, or capture with mode='symbolic' "
                        "when the model traces (its graphs run at any size)")
            if size != want:
                return (f"{label} has size {size} at dim {dim}, where the graph was captured with size {want}; "
                        "torch.export specialized that dimension (the example's size, or one the model's code "
                        f"fixes), so the graph runs at size {want} only: "
                        f"{_recapture_dim(label, dim, size, parameters)}")
            continue
        if "symbol" not in want:
            continue
        low, high = want["min"], want["max"]
        if (high is not None and size > high) or (low is not None and size < low):
            allowed = f"{low} to {high}" if high is not None else f"{low} or more"
            fix = ("an example of that size (for a graph of its path)" if low is not None and size < low
                   else f"an example and dynamic_shapes that cover {size}")
            return (f"{label} has size {size} at dim {dim}; the graph takes sizes {allowed} there (the model's code "
                    f"takes another path at other sizes, a branch on the size, which the graph does not hold); "
                    f"{_recapture(fix)}")
        seen = symbols.setdefault(want["symbol"], (label, dim, size))
        if seen[2] != size:
            return (f"{label} has size {size} at dim {dim}, where {seen[0]} has {seen[2]} at dim {seen[1]}: the "
                    "graph was captured with these sizes equal")
    return None


def _captured_listing(record: dict) -> str:
    parts = list(record["positional"]) + [f"{k}=" for k in record["keywords"]]
    return f"({', '.join(parts)})" if parts else "no inputs"


def _shape_text(shape: list) -> str:
    def one(d: Any) -> str:
        if isinstance(d, int):
            return str(d)
        if "symbol" in d:
            return "any" if d["max"] is None else f"{d['min']}..{d['max']}"
        return d["expr"]

    return f"[{', '.join(one(d) for d in shape)}]"


def _recapture(what: str) -> str:
    return f"capture again (fxopt.capture / fxopt.optimize) with {what}"


def _recapture_dim(label: str, dim: int, size: int, parameters: Any = ()) -> str:
    """How to get a graph that runs at `size`: `parameters` (forward's) tell an input forward takes
    through ``**kwargs``, which torch.export cannot keep dynamic (dynamic_shapes naming it is refused)."""
    name = label.split("'")[1] if "'" in label else None
    spec = (f"dynamic_shapes={{'{name}': {{{dim}: torch.export.Dim.AUTO}}}}" if name
            else f"dynamic_shapes marking dim {dim} of that input torch.export.Dim.AUTO")
    through_kwargs = name is not None and parameters and name not in parameters
    keep = (f"name '{name}' in forward's signature (torch.export cannot keep an input passed through **kwargs "
            f"dynamic) and capture with {spec}" if through_kwargs
            else f"keep the dimension dynamic with fxopt.capture(model, inputs, mode='export', {spec})")
    return (f"capture again with an example of size {size} there, or {keep}, or use mode='symbolic' when the model "
            "traces (its graphs run at any size)")

