"""Why a call does not fit an exported graph, said in the caller's words.

torch.export fixes what a graph takes: its keyword inputs, the structure of its inputs, and the
size of every dimension it did not keep dynamic (a sequence length, an image size), guarded on
each call in torch's own words: ``Guard failed: x.size()[1] == 5``, ``Ran into a kwarg keyword
mismatch``, a pytree spec dump. At capture fxopt records the same facts as plain data
(`record_inputs`, in ``gm.meta["fxopt"]["inputs"]``, which `fxopt.save` keeps), and
`explain_failed_calls` wraps the module's call: only when a call raises does it compare the
call with the record and raise `InputMismatchError`, which names the input, the dimension, the
captured size or range, and how to capture again. A call that works pays one try/except.

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
from typing import Any

import torch
import torch.fx
from torch.overrides import handle_torch_function, has_torch_function
from torch.utils._pytree import MappingKey, SequenceKey, tree_flatten, tree_flatten_with_path

from .errors import InputMismatchError

META_KEY = "fxopt"
INPUTS_KEY = "inputs"

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
    for (path, value), node in zip(flat, placeholders):
        entry: dict[str, Any] = {"label": _label(path, params)}
        seen = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            shape = seen.shape if isinstance(seen, torch.Tensor) else value.shape
            entry["shape"] = [_dim(size, ranges) for size in shape]
        elif isinstance(value, _SIMPLE):
            entry["value"] = repr(value)
        leaves.append(entry)
    return {"parameters": params, "positional": [_positional_name(i, params) for i in range(len(args))],
            "keywords": keywords, "leaves": leaves}


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
    `recompile`): runs the call and, only when it raises, looks for an input that does not fit
    the module's record (`mismatch`). `structure` (positional count, keyword names) is checked
    before the call where torch's own check of it is gone (a copy drops export's pre-hook: a
    dict-captured ``forward(y, x)`` then took ``g(X, Y)`` with x and y swapped): one length and
    one key-set comparison."""

    def __init__(self, inner: Any, structure: tuple[int, frozenset] | None) -> None:
        self.inner = inner
        self.structure = structure

    def __call__(self, module: torch.fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
        structure = self.structure
        if structure is not None and (len(args) != structure[0] or kwargs.keys() != structure[1]):
            problem = mismatch(module.meta.get(META_KEY, {}).get(INPUTS_KEY), args, kwargs)
            if problem is not None:
                raise InputMismatchError(problem)
        try:
            return self.inner(module, *args, **kwargs)
        except InputMismatchError:
            raise  # fxopt's input guard (`InputGuard`) said it already
        except Exception as exc:
            problem = mismatch(module.meta.get(META_KEY, {}).get(INPUTS_KEY), args, kwargs)
            if problem is None:
                raise
            raise InputMismatchError(problem) from exc


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
    structure = None if torch_checks else (len(record["positional"]), frozenset(record["keywords"]))
    cls._wrapped_call = _ExplainedCall(inner, structure)
    return gm


def specialized_guard(fits: Any, message: str) -> None:
    """The guard a captured graph calls on a non-tensor input it was specialized to
    (``captured with flag=True ...``): raises `InputMismatchError` when `fits` is false, under
    ``python -O`` too (``torch._assert`` is an ``assert``). A traced value (fx tracing the graph
    again, as ``torch.load`` does) records the call instead, as ``torch._assert`` does."""
    if has_torch_function((fits,)):
        return handle_torch_function(specialized_guard, (fits,), fits, message)
    if not fits:
        raise InputMismatchError(message)
    return None


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
    gm.add_module(GUARD_TARGET, InputGuard(record))
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
        problem = _leaf_problem(entry, value, symbols, only_dynamic)
        if problem is not None:
            return problem
    return None


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
                  only_dynamic: bool = False) -> str | None:
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
            if size != want:
                return (f"{label} has size {size} at dim {dim}, where the graph was captured with size {want}; "
                        "torch.export specialized that dimension (the example's size, or one the model's code "
                        f"fixes), so the graph runs at size {want} only: {_recapture_dim(label, dim, size)}")
            continue
        if "symbol" not in want:
            continue
        low, high = want["min"], want["max"]
        # export traces a dynamic dim from 2 up, but runs a size of 1 (or 0) that fits the code
        if (high is not None and size > high) or (low is not None and low > 2 and size < low):
            allowed = f"{low} to {high}" if high is not None else f"{low} or more"
            return (f"{label} has size {size} at dim {dim}; the graph takes sizes {allowed} there (the range "
                    f"torch.export kept for it); capture again with an example and dynamic_shapes that cover {size}")
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


def _recapture_dim(label: str, dim: int, size: int) -> str:
    name = label.split("'")[1] if "'" in label else None
    spec = (f"dynamic_shapes={{'{name}': {{{dim}: torch.export.Dim.AUTO}}}}" if name
            else f"dynamic_shapes marking dim {dim} of that input torch.export.Dim.AUTO")
    return (f"capture again with an example of size {size} there, or keep the dimension dynamic with "
            f"fxopt.capture(model, inputs, mode='export', {spec}), or use mode='symbolic' when the model traces "
            "(its graphs run at any size)")

