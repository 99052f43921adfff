"""Capture: turn any model into a torch.fx GraphModule, by the front end that can.

- `symbolic`: `torch.fx.symbolic_trace` — a module-level graph (`call_module` nodes).
- `export`: `torch.export.export(..., strict=False).module()` — an ATen-level graph with
  parameters as `get_attr`; takes models symbolic tracing cannot (Hugging Face transformers,
  data-dependent Python) and keeps dict outputs and registered dataclasses (Hugging Face's
  `ModelOutput`; `torch.export.register_dataclass` for one of yours). The batch dimension is exported
  dynamic, so the graph also runs on other batch sizes than the example's.
- `auto`: symbolic first, checked against the eager model on the example inputs (a trace can
  succeed and still be wrong when Python control flow got baked in), then export.

The user's model is deep-copied and put in eval mode first: it is never mutated, and the graph
is captured with inference semantics (dropout off, batchnorm on running statistics). A model
with a batchnorm or a dropout in training mode gets a `fxopt.TrainingModeWarning` naming them:
what fxopt optimizes and verifies against is then not what that model computes as it stands.

Non-tensor inputs (``flag=True``, ``scale=0.5``, ``mode="fast"``, ``mask=None``, positional or
keyword, or left out at a default that is not a number) are *specialized*: the graph is valid
for the captured value only. The symbolic graph keeps the argument under its own name and
checks it on every call; a call with another value raises `fxopt.InputMismatchError`, "captured
with flag=True ..." (an exported graph raises it too, from export's guard, and, for an input
captured as None, which export does not check, from fxopt's own).

A forward that draws random numbers from torch (noise, `rand_like`, dropout in training mode)
is checked, like every comparison fxopt makes, with both runs drawing the same numbers
(`fxopt.ir.same_random_draws`); one that draws from Python's `random` or NumPy is named as
not deterministic.

    >>> import torch, fxopt
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    >>> gm = fxopt.capture(model, (torch.randn(2, 4),), mode="export")
    >>> gm.meta["fxopt"]["frontend"], tuple(gm(torch.randn(5, 4)).shape)
    ('export', (5, 8))
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import io
import logging
import math
import operator
import os
import re
import sys
import sysconfig
import threading
import traceback
import types
import warnings
from contextlib import contextmanager, nullcontext, redirect_stderr
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Mapping

import torch
import torch.fx
from torch import nn
from torch.nn.parameter import is_lazy
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_leaves, tree_map

from .analysis.shapes import propagate_shapes
from .call_check import (CALLED_WITH_ANOTHER, FIXED_BY_MODEL, FLOORS_CHECKED, explain_failed_calls, inputs_at_size,
                         record_inputs, set_symbol_min, sizes_taken, specialized_guard, symbol_mins, symbols_by_size)
from .errors import CaptureError, CaptureWarning, TrainingModeWarning, did_you_mean, first_line, user_stacklevel
from .ir.effects import drop_fresh_copies, fresh_literal_constants, written_base
from .ir.interpret import BufferState, fresh_inputs, same_random_draws
from .ir.opview import spec_for
from .ir.rewrite import deep_copy
from .serialize import rebuild_coded_attributes, set_container_mode
from .tracing import NO_GRAD, GradStateReads, one_at_a_time, registered_by_user, trace, with_traceable_forward
from .verify import PythonAttributes

# torch.nn's traceable forwards register themselves when their module is imported
importlib.import_module(".nn_forwards", __package__)

Mode = Literal["auto", "symbolic", "export"]
MODES = ("auto", "symbolic", "export")
META_KEY = "fxopt"


@dataclass
class Attempt:
    """One front end's try: whether it worked and, if not, why and where."""

    frontend: str
    ok: bool
    reason: str = ""
    location: str = ""

    def describe(self) -> str:
        where = f"\n      at {self.location}" if self.location else ""
        return f"  - {self.frontend}: {self.reason}{where}"


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """(args, kwargs) from a tensor, a tuple/list of args, or a dict of keyword args (any mapping: a
    tokenizer's BatchEncoding is a UserDict, which was taken for one positional input)."""
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if example_inputs is None:
        return (), {}
    return (example_inputs,), {}


@one_at_a_time
def capture(
    model: nn.Module,
    example_inputs: Any,
    mode: Mode = "auto",
    *,
    dynamic_batch: bool = True,
    dynamic_shapes: dict | tuple | list | None = None,
) -> torch.fx.GraphModule:
    """Capture `model` as a GraphModule; see the module docstring for the front ends.

    `example_inputs` is a tensor, a tuple of positional args, or a dict of keyword args.
    `dynamic_shapes` is torch.export's (``{"x": {1: torch.export.Dim.AUTO}}`` keeps dim 1 of
    input `x`, a sequence length, dynamic), for the export front end: by input name, or as a
    tuple or list by position, it is added to the dynamic batch (an input's dims it does not name
    keep fxopt's batch dim); a dim an input does not have is refused, and one that export kept
    static all the same is warned about. A symbolic graph runs at any size without it (a static
    size or a Dim's range it asks is warned about there: only an exported graph checks it). An exported
    graph called with a size or a keyword it does not take raises `fxopt.errors.InputMismatchError`,
    which names the input, the dimension and the size or range it was captured with.
    The result records its front end in `gm.meta["fxopt"]["frontend"]` and carries shape and
    dtype metadata on every node (`node.meta["tensor_meta"]`). Raises CaptureError naming
    each front end tried and the op or source line that stopped it, or, when the inputs are the
    problem (they do not fit forward's signature, or forward itself fails on them), naming the
    inputs by position or key with their types.

        >>> import torch, fxopt
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU())
        >>> gm = fxopt.capture(model, torch.randn(3, 4))
        >>> gm.meta["fxopt"]["frontend"], [n.op for n in gm.graph.nodes]
        ('symbolic', ['placeholder', 'call_module', 'call_module', 'output'])
        >>> [n.meta["tensor_meta"].shape for n in gm.graph.find_nodes(op="call_module")]
        [torch.Size([3, 2]), torch.Size([3, 2])]
    """
    if mode not in MODES:
        raise ValueError(f"capture mode {mode!r} is unknown{did_you_mean(str(mode), MODES)}")
    if dynamic_shapes is not None and not isinstance(dynamic_shapes, (dict, tuple, list)):
        raise TypeError(f"dynamic_shapes is torch.export's: a dict by input name, or a tuple or list by position, "
                        f"got {type(dynamic_shapes).__name__}")
    if isinstance(model, torch.export.ExportedProgram):
        raise TypeError("capture expects an nn.Module, got an ExportedProgram: pass its module "
                        "(fxopt.capture(ep.module(), inputs)) or the model it was exported from")
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise CaptureError(f"{type(model).__name__} is a TorchScript module, which neither front end can "
                           "capture; pass the nn.Module it was scripted or traced from")
    args, kwargs = normalize_inputs(example_inputs)
    problem = unmaterialized(model)
    if problem is not None:
        raise CaptureError(problem)
    if isinstance(model, torch.fx.GraphModule):
        return adopt_graph_module(model, args, kwargs)
    _check_example_inputs(model, example_inputs, args, kwargs)
    dynamic_shapes = _checked_dynamic_shapes(model, args, kwargs, dynamic_shapes)

    _warn_training_mode(model)
    user_model, model = model, _private_eval_copy(model)
    frontends = ["symbolic", "export"] if mode == "auto" else [mode]
    attempts: list[Attempt] = []
    for frontend in frontends:
        if attempts:  # the failed attempt ran the forward: state it keeps in Python (`self.calls += 1`) moved on
            model = _private_eval_copy(user_model)
        note = ""
        try:
            if frontend == "symbolic":
                gm, note = _symbolic_attempt(user_model, model, args, kwargs)
                info: dict[str, Any] = {"dynamic_batch": True}
                _warn_sizes_unchecked(dynamic_shapes)
            else:
                gm, info = _export(model, args, kwargs, dynamic_batch, dynamic_shapes)
        except Exception as exc:  # each front end fails in its own way; report them all
            attempts.append(_failed_attempt(frontend, exc))
            if frontend == "symbolic" and (entered := registered_by_user(model)):
                attempts[-1].reason += (f" (the trace entered {', '.join(entered[:3])} through a traceable forward "
                                        "registered with fxopt.register_traceable_forward: check that it computes "
                                        "what the module's forward does)")
            continue
        if frontend == "symbolic":
            note = (note + _opaque_note(gm)).rstrip("; ")
        if info.get("dynamic_batch"):  # shapes in the metadata are at this batch; the graph runs at any
            info["example_batch"] = _batch_size(_leading_sizes(args, kwargs))
        attempts.append(Attempt(frontend, True, note))
        gm.meta[META_KEY] = {
            "frontend": frontend,
            "attempts": [a.__dict__ for a in attempts],
            "model_class": type(model).__qualname__,
            # every submodule's name, those the graph does not call too (a training-only head):
            # prune's ignore= names them
            "module_names": [name for name, _ in model.named_modules() if name],
            **info,
        }
        return explain_failed_calls(gm)
    _raise_if_eager_fails(model, args, kwargs)  # then the inputs, not the front ends, are the problem
    lines = "\n".join(a.describe() for a in attempts) + _hint(attempts, model)
    raise CaptureError(f"could not capture {type(model).__qualname__}; front ends tried:\n{lines}")


def unmaterialized(model: nn.Module) -> str | None:
    """Why `model` has no values to run with, or None: a parameter or buffer on the meta device
    (a shape without values), or one of a lazy module that never ran (``nn.LazyLinear``: its
    first forward would draw random weights in the copy fxopt runs, and, run on the caller's
    model, turn it into an ``nn.Linear``). Capture and verification refuse such a model."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if is_lazy(t):
            owner = name.rpartition(".")[0]
            module = type(model.get_submodule(owner)).__name__
            where = f"{module} '{owner}'" if owner else f"{module} (the model itself)"
            return (f"'{name}' of {where} is not initialized (a lazy module that has not run yet): fxopt "
                    "would run it on random weights it draws itself; run the model once on an example input "
                    "(model(x)) or load its weights first")
        if t.is_meta:
            return (f"'{name}' is on the meta device (a shape without values): fxopt runs the model to "
                    "capture and verify it; load real weights first (model.to_empty(device='cpu') then "
                    "load_state_dict)")
    return None


def frontend_of(gm: torch.fx.GraphModule) -> str:
    """'symbolic' or 'export' for graphs fxopt captured; a best guess for foreign graphs
    (ATen operator calls mean export).

        >>> import torch, fxopt
        >>> model = torch.nn.Linear(4, 2)
        >>> fxopt.frontend_of(fxopt.capture(model, torch.randn(3, 4), mode="export"))
        'export'
        >>> fxopt.frontend_of(torch.fx.symbolic_trace(model))   # not captured by fxopt: guessed
        'symbolic'
    """
    info = getattr(gm, "meta", {}).get(META_KEY)
    if info:
        return info["frontend"]
    uses_aten = any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)
    return "export" if uses_aten else "symbolic"


# ----- front ends ---------------------------------------------------------------------------

def _symbolic_attempt(user_model: nn.Module, model: nn.Module, args: tuple,
                      kwargs: dict) -> tuple[torch.fx.GraphModule, str]:
    """`_symbolic`, and a note; where the graph traced through fxopt's traceable forwards for
    torch.nn's modules fails (one written for batched inputs, called on unbatched ones), the
    graph traced with those modules kept as one call each, which the note names (their weights
    stay opaque to the passes). A forward the user registered is the user's to fix: its failure
    is reported (`capture`)."""
    try:
        return _symbolic(model, args, kwargs), ""
    except Exception as exc:
        entered = with_traceable_forward(model)
        if not entered or registered_by_user(model):
            raise
        try:
            gm = _symbolic(_private_eval_copy(user_model), args, kwargs, enter=False)
        except Exception:
            raise exc from None
        return gm, (f"kept {', '.join(entered[:3])} as one call each: traced through their traceable forwards, "
                    f"the graph failed ({first_line(exc)}); ")


def _symbolic(model: nn.Module, args: tuple, kwargs: dict, enter: bool = True) -> torch.fx.GraphModule:
    _refuse_var_keyword_inputs(model, kwargs)
    _refuse_tensor_defaults(model, args, kwargs)
    concrete = _concrete_inputs(model, args, kwargs)
    state = BufferState(model)
    versions = _buffer_versions(model)
    attributes = {id(m): dict(vars(m)) for m in model.modules()}
    grad_reads = GradStateReads(model)
    with _FrozenDraws() as draws, grad_reads.attributes():
        gm = trace(model, concrete_args=concrete or None, enter=enter)
    if draws.found:
        state.restore()
        raise CaptureError(f"forward draws random numbers from no traced value ({draws.found[0]}): symbolic "
                           "tracing ran the draw once and froze its values into the graph, so every call would "
                           "repeat them; draw from an input (torch.randn_like(x)) or use mode='export', which "
                           "records the draw")
    _put_back_traced_attributes(model, attributes)
    # a write that reads no traced value runs at trace time (`self.m.mul_(0.5)`), even one that
    # leaves the values as they were (zeros times 0.5): its version counter says it ran
    written = state.changed() or _buffer_versions(model, versions)
    if written:
        state.restore()
        raise CaptureError(f"forward writes {_buffer_names(written)} in place: symbolic tracing ran the write once "
                           "instead of recording it (export records it)")
    # fx rebuilds the containers on the path to each leaf as fresh nn.Module()s, which start in
    # training mode; they hold no state, so give them the model's mode
    set_container_mode(gm, model.training)
    _drop_string_annotations(gm)
    fresh_literal_constants(gm)  # a literal the forward writes is a new tensor each call, as in eager
    _name_specialized_inputs(gm, concrete)
    _guard_tensor_inputs(gm, model, args, kwargs)
    detach_no_grad_values(gm, args, kwargs)
    # the check passes every input, the specialized ones too, exactly as the caller will
    try:
        _record_shapes_and_check(model, gm, args, kwargs, grad_reads)
    except CaptureError as exc:
        _blame_root_hooks(model, exc)
        _blame_grad_state_reads(grad_reads, exc)
        _blame_augmented_assignments(gm, exc)
        raise
    _check_next_call(model, gm, args, kwargs)
    _check_global_hooks(model, gm, args, kwargs)
    _warn_grad_state_read(grad_reads)
    return gm


def _global_forward_hooks() -> list[tuple[str, Callable]]:
    """The global module forward hooks and pre-hooks (`nn.modules.module.register_module_forward_hook`),
    each with its kind: they run on every module call, the graph's leaf calls included."""
    from torch.nn.modules import module as module_impl

    return ([("forward pre-hook", h) for h in module_impl._global_forward_pre_hooks.values()]
            + [("forward hook", h) for h in module_impl._global_forward_hooks.values()])


@contextmanager
def _without_global_forward_hooks() -> Iterator[None]:
    """Torch's global module forward hooks and pre-hooks off, and back on after (the same dicts)."""
    from torch.nn.modules import module as module_impl

    saved = [(d, dict(d)) for d in (module_impl._global_forward_pre_hooks, module_impl._global_forward_hooks)]
    try:
        for d, _ in saved:
            d.clear()
        yield
    finally:
        for d, before in saved:
            d.clear()
            d.update(before)


def _check_global_hooks(model: nn.Module, gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """Refuse a symbolic graph whose output depends on a global module forward hook: the capture
    check cannot see it, since the graph's call_module leaves run the hook as the model's modules
    do, but a pass that rewrites such a call (fuse folding a ReLU into its conv) drops the hook
    with it (api tester: a hook scaling every ReLU by 1.5 came out 0.21 off after fuse,lower-cpu).
    The graph run without the global hooks must compute what the model with them does: a hook
    that only looks (a logger, a profiler's) changes nothing and passes."""
    hooks = _global_forward_hooks()
    if not hooks:
        return
    state = BufferState(model, gm)
    with torch.no_grad():
        outputs = []
        for run, hooked in ((model, True), (gm, False)):
            run_args, run_kwargs = fresh_inputs(args, kwargs)
            with same_random_draws(), (nullcontext() if hooked else _without_global_forward_hooks()):
                outputs.append(run(*run_args, **run_kwargs))
            state.restore()
    try:
        _check_same_outputs(*outputs)
    except CaptureError as exc:
        kind, hook = hooks[0]
        code = getattr(hook, "__code__", None)
        # the file's name alone: a failed front end's reason is cut at 300 characters, which a
        # long path took the line number from (a fresh clone under /tmp)
        where = f" at {os.path.basename(code.co_filename)}:{code.co_firstlineno}" if code is not None else ""
        more = f" (and {len(hooks) - 1} more)" if len(hooks) > 1 else ""
        # advice before the hook's file: a failed front end's reason is cut at 300 characters
        raise CaptureError(f"a global module {kind} changes the output ({first_line(exc).split(': ')[0]}); use "
                           "mode='export', which records it: in a symbolic graph, a pass that rewrites a module call "
                           f"it runs on (fuse folding a ReLU) drops it ({kind} "
                           f"{getattr(hook, '__name__', type(hook).__name__)}{more}{where})") from None


def _check_next_call(model: nn.Module, gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """Where the graph writes a buffer (a running mean), check a second call too: fx ran the
    part of the update that reads no traced value once, at trace time (``self.m * 0.5``
    became a constant of the graph), and the graph computes the first call only right.
    Both run twice from the same state, which is left as it was."""
    written = sorted({base.target for node in gm.graph.nodes
                      if (base := written_base(gm, node)) is not None and base.op == "get_attr"})
    if not written:
        return
    state = BufferState(model, gm)
    outputs = []
    with torch.no_grad():
        for run in (model, gm):
            for _ in range(2):
                run_args, run_kwargs = fresh_inputs(args, kwargs)
                with same_random_draws():
                    out = run(*run_args, **run_kwargs)
            outputs.append(out)
            state.restore()
    try:
        _check_same_outputs(*outputs)
    except CaptureError as exc:
        raise CaptureError(f"on a second call, {first_line(exc)}: forward updates {_buffer_names(written)} in place, "
                           "and symbolic tracing ran the part of the update that reads no input once, as a constant "
                           "(export records it)") from None


def _buffer_versions(model: nn.Module, before: dict[str, int] | None = None) -> Any:
    """The version counter of each of `model`'s buffers by name; given `before`, the names of
    those written in place since (buffer 'm')."""
    now = {name: b._version for name, b in model.named_buffers()}
    if before is None:
        return now
    return [name for name, version in now.items() if before.get(name, version) != version]


def _buffer_names(names: list[str]) -> str:
    """"buffer 'm'", "buffers 'a', 'b'" (three at most)."""
    return f"buffer{'s' if len(names) > 1 else ''} {', '.join(repr(n) for n in names[:3])}"


def _put_back_traced_attributes(model: nn.Module, before: dict[int, dict[str, Any]]) -> None:
    """Give each attribute the trace left a traced value in (``self.last = y.detach()``) the
    value it had before: the next run would read the Proxy. Whether the output depends on it is
    the capture check's to say (the state warning), not a reason to refuse the graph."""
    for m in model.modules():
        for key, value in list(vars(m).items()):
            if isinstance(value, torch.fx.Proxy):
                if key in before.get(id(m), {}):
                    m.__dict__[key] = before[id(m)][key]
                else:
                    del m.__dict__[key]


def _blame_root_hooks(model: nn.Module, exc: CaptureError) -> None:
    """fx traces the model's `forward`, not its `__call__`: a forward hook or pre-hook on the
    model itself is missing from the graph. When the graph then computes something else, say so
    (the check blamed "Python control flow or state"). Hooks on submodules run where they are called."""
    for attr, kind in (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook")):
        for hook in (getattr(model, attr, None) or {}).values():
            code = getattr(hook, "__code__", None)
            where = f" at {code.co_filename}:{code.co_firstlineno}" if code is not None else ""
            raise CaptureError(f"{first_line(exc).split(': ')[0]}: {type(model).__name__} has a {kind} on itself "
                               f"({getattr(hook, '__name__', type(hook).__name__)}{where}); symbolic tracing runs "
                               "forward without it, mode='export' records it") from exc


#: The operators an augmented assignment (`y += 1`) traces to: a Proxy has no in-place form.
_AUGMENTED = frozenset({operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
                        operator.mod, operator.pow, operator.and_, operator.or_, operator.xor, operator.lshift,
                        operator.rshift, operator.matmul})


def _blame_augmented_assignments(gm: torch.fx.GraphModule, exc: CaptureError) -> None:
    """Where the graph computes an operator's result nothing uses, name it as the likely cause:
    symbolic tracing turns `y += 1` into `y = y + 1`, so when another name still holds the tensor
    (`y = h; y += 1`) eager code changed `h` in place and the graph did not (the check blamed
    "Python control flow or state")."""
    dropped = [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target in _AUGMENTED and not n.users]
    what, baked, _ = first_line(exc).partition(_BAKED)
    if not dropped or not baked:
        return
    names = ", ".join(f"'{name}'" for name in dropped[:2])
    raise CaptureError(f"{what}the graph uses {names} nowhere: an augmented assignment on a tensor another name "
                       "holds (y = h; y += 1)? eager code writes it in place, a trace does not; write y.add_(1), "
                       "or use mode='export'") from exc


_BAKED = "the trace baked in Python control flow or state"


def _blame_grad_state_reads(reads: GradStateReads, exc: CaptureError) -> None:
    """Where the traced forward read the grad state, name the read as the likely cause: traced with
    grad on (as capture is called), it took the grad branch, and the check, run under no_grad,
    blamed "Python control flow or state"."""
    what, baked, _ = first_line(exc).partition(_BAKED)
    if not reads.found or not baked:
        return
    # what and the fix first: capture lists each front end's reason cut at 300 characters, and a
    # long file path in the middle cut the fix off (a clone in a deeper folder failed its test)
    kinds = "; ".join(dict.fromkeys(read.split(': "', 1)[0] for read in reads.found))
    raise CaptureError(f"{what}forward reads the grad state ({kinds}): capture under torch.no_grad() (the graph "
                       "then computes that branch on every call, with a warning), or take the branch out of "
                       "forward; the trace took the branch of the grad mode capture was called in, and capture "
                       f"checks the graph under torch.no_grad() (read at {'; '.join(reads.found)})") from exc


_RANDOM_OPS = frozenset({"rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial", "poisson",
                         "rand_like", "randn_like", "randint_like", "uniform_", "normal_", "random_", "bernoulli_",
                         "exponential_", "geometric_", "log_normal_", "cauchy_"})


class _FrozenDraws(TorchFunctionMode):
    """Records the random draws a symbolic trace runs for real: one whose arguments hold no
    traced value (`torch.randn(8)`) becomes a constant of the graph, and the capture check
    then blamed "Python control flow or state" and named no line."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _RANDOM_OPS and not any(isinstance(a, torch.fx.Proxy) for a in tree_leaves((args, kwargs))):
            self.found.append(f"{name}{_user_line(traceback.extract_stack())}")
        return func(*args, **kwargs)


def _user_line(frames: list) -> str:
    """' at "file", line N: code' for the deepest frame in the user's code, or ''."""
    user = [f for f in frames if _is_user_file(f.filename)]
    if not user:
        return ""
    f = user[-1]
    return f' at "{f.filename}", line {f.lineno}: {(f.line or "").strip()}'


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic_batch: bool, dynamic_shapes: Any = None):
    """An exported graph of `model`, checked against it, with the batch dimension dynamic when
    it can be (else static, with a warning), and the info capture records about it."""
    from torch.export import export

    info: dict[str, Any] = {"dynamic_batch": False}
    error: Exception | None = None
    gm = None
    args, kwargs = _distinct_tensors(args, kwargs)
    grad_reads = GradStateReads(model)
    if dynamic_batch and _leading_sizes(args, kwargs):
        try:
            gm, inputs = _export_dynamic_batch(model, args, kwargs, dynamic_shapes, grad_reads)
            info["dynamic_batch"] = True
        except Exception as exc:  # fall back to a static batch, and say so in the meta
            error = exc
    if gm is None:
        with _quiet_torch(), grad_reads.attributes():
            ep = export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        try:
            gm, inputs = _checked_graph(model, ep, args, kwargs, grad_reads)
        except CaptureError as exc:
            _blame_grad_state_reads(grad_reads, exc)
            raise
        if error is not None:
            info["dynamic_batch_error"] = first_line(error)
            if not _pins_batch(dynamic_shapes):  # (where the caller asked for a static batch: no news)
                # a graph that runs at one batch size only surprises at the next call: say it now
                warnings.warn(f"capture: {type(model).__name__} was exported with a static batch size (dim 0 "
                              f"of the inputs could not stay dynamic: {info['dynamic_batch_error']}); the graph "
                              "runs at the example's shapes only", CaptureWarning, stacklevel=user_stacklevel())
    if inputs is not None:
        info["inputs"] = inputs
        _warn_static_requested(inputs, model, dynamic_shapes)
        if info["dynamic_batch"]:
            _warn_narrow_batch(inputs, model, args, kwargs)
    _warn_grad_state_read(grad_reads)
    return gm, info


def _distinct_tensors(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The inputs with a tensor given again (``(x, x)``: a self-attention example of a
    cross-attention model) replaced by a copy: torch.export takes the same tensor object in two
    places for one input, and its graph reads the last of them in place of the first, for any
    two tensors it is called with."""
    seen: set[int] = set()

    def distinct(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if id(value) in seen:
            return value.clone()
        seen.add(id(value))
        return value

    return tree_map(distinct, (args, kwargs))


def _export_dynamic_batch(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any,
                          grad_reads: GradStateReads) -> tuple[torch.fx.GraphModule, dict | None]:
    """`_checked_graph` of an export with dim 0 dynamic; raises when there is no batch to keep
    dynamic, export kept none, or the graph does not compute the model at the example (a graph
    traced at a batch of 2 for an example of 1 took the branch of 2). The export runs under
    `grad_reads.attributes()`, the checked run of the model under its `calls()`."""
    from torch.export import Dim, export

    sizes = _leading_sizes(args, kwargs)
    batch = _batch_size(sizes)
    if batch is None:
        raise ValueError(f"the inputs' dim 0 sizes {sizes} name no batch (the first input's batch of 1 could be "
                         "any of them)")
    # A batch of 1 is specialized by export; trace on a batch of 2 so dim 0 stays dynamic.
    ex_args, ex_kwargs = _widen_batch(args, kwargs) if batch == 1 else (args, kwargs)
    dyn = _dynamic_batch_spec(model, ex_args, ex_kwargs, Dim.AUTO, batch if batch > 1 else 2)
    with _quiet_torch(), grad_reads.attributes():
        ep = export(model, ex_args, ex_kwargs, dynamic_shapes=_with_user_dims(dyn, dynamic_shapes), strict=False)
    if not _batch_is_symbolic(ep):  # Dim.AUTO gave way to a guard (dim 0 is no batch: a sequence-first model)
        raise ValueError("export specialized dim 0 of every input")
    try:
        return _checked_graph(model, ep, args, kwargs, grad_reads)
    except CaptureError as exc:
        if batch > 1:
            raise
        raise ValueError(f"traced at a batch of 2, the graph differs from the model at the example's batch of 1 "
                         f"(a branch on the batch size?): {first_line(exc)}") from exc


def _checked_graph(model: nn.Module, ep: Any, args: tuple, kwargs: dict,
                   grad_reads: GradStateReads) -> tuple[torch.fx.GraphModule, dict | None]:
    """`ep`'s module, checked against `model` on the example (the model's run watched by
    `grad_reads.calls()`), and export's record of its inputs (`record_inputs`) with the smallest
    size each dynamic dim runs at (`_settle_small_sizes`)."""
    gm = ep.module()
    set_container_mode(gm, model.training)  # export builds them in training mode (and refuses gm.eval())
    inputs = record_inputs(gm, ep, model, args, kwargs)  # before any pass: export's own reading of them
    drop_fresh_copies(gm)  # a literal tensor (`torch.tensor([...])`) read as the constant it is
    inline_no_grad_regions(gm)  # (checked with the rest of the graph below)
    _guard_none_inputs(gm, model, args, kwargs, inputs)
    _record_shapes_and_check(model, gm, args, kwargs, grad_reads)
    if inputs is not None:
        _settle_small_sizes(model, gm, args, kwargs, inputs)
    return gm, inputs


def _settle_small_sizes(model: nn.Module, gm: torch.fx.GraphModule, args: tuple, kwargs: dict,
                        record: dict) -> None:
    """Set the min of each dynamic dim in `record` to the smallest size the graph computes the
    model at. torch.export traces a dynamic dim as 2 or more and does not guard sizes 1 and 0,
    so a branch on them (`if x.shape[0] == 1:`) is gone from the graph, which then silently
    computes the other branch at a batch of 1. So the graph is run against the model at size 1,
    then 0 (the dims of one size in the example together: one batch, one sequence length); a call
    below the first size where they differ is refused (`call_check`). A model whose runs differ
    at the example already (state its forward keeps in Python, which capture warns about) tells
    nothing: its dims keep taking every size, as before this check."""
    mins = symbol_mins(record)
    if not _agrees(model, gm, args, kwargs):
        mins = {symbol: 0 if low == 2 else low for symbol, low in mins.items()}
    else:
        for symbols in symbols_by_size(record, args, kwargs):
            low = max(mins[s] for s in symbols)
            if low > 2:  # a min above 2 is the model's code's (a branch export saw)
                continue
            for size in range(low - 1, -1, -1):
                if not _agrees(model, gm, *inputs_at_size(record, args, kwargs, symbols, size)):
                    break
                low = size
            mins.update(dict.fromkeys(symbols, low))
    for symbol, low in mins.items():
        set_symbol_min(record, symbol, low)
    record[FLOORS_CHECKED] = True


def _agrees(model: nn.Module, gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> bool:
    """Whether `gm` computes what `model` does on these inputs (False when either fails), both
    run from the same state and random draws; the state is left as it was."""
    state, kept = BufferState(model, gm), PythonAttributes(model, gm)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # a probe's warnings are no news for the caller
            outputs = []
            for run in (model, gm):
                run_args, run_kwargs = fresh_inputs(args, kwargs)
                with same_random_draws():
                    outputs.append(run(*run_args, **run_kwargs))
                state.restore()
                kept.restore()
        _check_same_outputs(*outputs)
    except Exception:  # noqa: BLE001  (a size either side cannot run at is one the graph must refuse)
        return False
    finally:
        state.restore()
        kept.restore()
    return True


@contextmanager
def _quiet_torch() -> Iterator[None]:
    """Keep a torch.export attempt from writing to the terminal; restore everything after.

    A failed attempt is reported in the CaptureError (or tried again another way), yet torch
    logs warnings about it and prints the partial graph (`partial_fx_graph`, several times over)
    to stderr. The `torch` loggers are silenced while the attempt runs, and what it prints to
    stderr is kept back: dropped when it fails, written out when it succeeds.
    """
    # "torch", and the child loggers torch._logging gives levels of their own ("Unable to find
    # user code corresponding to {u0}" comes from torch.fx.experimental.symbolic_shapes)
    loggers = [logging.getLogger("torch")]
    loggers += [lg for name, lg in logging.root.manager.loggerDict.items()
                if isinstance(lg, logging.Logger) and name.startswith("torch.") and lg.level != logging.NOTSET]
    levels = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    printed = io.StringIO()
    try:
        with redirect_stderr(printed):
            yield
        sys.stderr.write(printed.getvalue())  # a successful export's output is the user's to see
    finally:
        for lg, level in levels:
            lg.setLevel(level)


def _opaque_note(gm: torch.fx.GraphModule) -> str:
    """What the symbolic graph hides from the passes, and what to do about it ("" for nothing).

    Symbolic tracing keeps every torch.nn module without a traceable forward (`fxopt.tracing`)
    as one call; for most (conv, linear, norms) the op view knows what the call computes, but a
    `nn.MultiheadAttention` with `add_zero_attn` or an `nn.GRU` is opaque: its weights can be
    neither pruned nor quantized. Export decomposes some of them, at a price `auto` does not
    pay for the user: an exported graph keeps only the batch dimension dynamic, where the
    symbolic graph runs at any sequence length. So the choice is said, not made.
    """
    hidden = _opaque_parameters(gm)
    if not hidden:
        return ""
    names = ", ".join(sorted(hidden, key=hidden.get, reverse=True)[:3])
    return (f"left {sum(hidden.values())} parameters inside modules fxopt cannot read ({names}); "
            "mode='export' decomposes some of them (a graph for one sequence length)")


def _opaque_parameters(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Parameter elements each op fxopt has no view of reads (by node name)."""
    params = dict(gm.named_parameters())
    opaque: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and spec_for(gm, node) is None:
            count = sum(p.numel() for p in gm.get_submodule(node.target).parameters())
        elif node.op == "get_attr" and node.target in params:
            unread = [u for u in node.users if u.op != "output" and spec_for(gm, u) is None]
            count = params[node.target].numel() if unread else 0
        else:
            continue
        if count:
            opaque[node.name] = count
    return opaque


def _batch_is_symbolic(ep) -> bool:
    """Whether some tensor input of the exported program kept a symbolic dim 0."""
    from torch.fx.experimental.symbolic_shapes import free_symbols

    user_inputs = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" and node.name in user_inputs else None
        # a SymInt export has since guarded to one value has no free symbol left
        if isinstance(value, torch.Tensor) and value.dim() and free_symbols(value.shape[0]):
            return True
    return False


def _record_shapes_and_check(model: nn.Module, gm: torch.fx.GraphModule, args: tuple, kwargs: dict,
                             grad_reads: GradStateReads) -> None:
    """Record every node's shape on `gm` and check that it computes what `model` does; the
    model's run notes its calls of torch.is_grad_enabled in `grad_reads` (`GradStateReads.calls`:
    a profile hook, which costs every Python call, so here and not around export's trace).

    Each run gets its own copy of the inputs (`propagate_shapes` copies them itself): a model
    that writes into its inputs must change neither the caller's tensors nor the other run.
    Every run starts from the state the model had (a forward that updates a buffer, a step
    counter or a running average, must be compared from the same state), and the graph is left
    in it; the model's Python attributes too (``self.calls``, a value kept from the first call).
    """
    state = BufferState(model, gm)  # a symbolic graph shares the model's buffers: one snapshot
    plain_before = _plain_attributes(model)
    kept = PythonAttributes(model)  # the Python state the model starts from, put back after
    with torch.no_grad():  # each run draws the same random numbers (`same_random_draws`)
        model_args, model_kwargs = fresh_inputs(args, kwargs)
        with same_random_draws(), grad_reads.calls():
            expected = model(*model_args, **model_kwargs)
        state.restore()
        with same_random_draws():
            propagate_shapes(gm, args, kwargs)  # runs on private copies of the buffers
        graph_args, graph_kwargs = fresh_inputs(args, kwargs)
        with same_random_draws():
            got = gm(*graph_args, **graph_kwargs)
        state.restore()
    _check_same_outputs(expected, got, lambda: _nondeterministic(model, args, kwargs, state))
    _check_same_input_writes(model, (model_args, model_kwargs), (graph_args, graph_kwargs))
    moved = _changed_plain_attributes(plain_before, _plain_attributes(model))
    if moved:
        _warn_python_state(model, gm, args, kwargs, state, got, moved, kept)
    kept.restore()


def _warn_grad_state_read(reads: GradStateReads) -> None:
    """Warn where the forward read the grad state (`GradStateReads`: its tensor-attribute mode entered
    around the trace only, since a torch function mode turns torch's fast paths off and the model's
    checked run must take the path a plain call does; its call watch around that run)."""
    if reads.found:
        warnings.warn(f"capture: forward reads the grad state ({'; '.join(reads.found)}): the graph takes, on "
                      "every call, the branch these reads took at capture, which capture checked under "
                      "torch.no_grad(), on inputs that require no grad and with the parameters' requires_grad as "
                      "they are; with grad on, an input that requires grad, or parameters frozen or unfrozen since, "
                      "the model may compute something else", CaptureWarning, stacklevel=user_stacklevel())


def _check_same_input_writes(model: nn.Module, eager: tuple[tuple, dict], graph: tuple[tuple, dict]) -> None:
    """Refuse a graph that leaves an input as the model does not (or the other way): symbolic
    tracing records ``x += h`` as ``x + h``, so the caller's tensor is no longer written, though
    the outputs agree. `eager` and `graph` are the inputs each run got (fresh copies of one)."""
    for (path, e), g in zip(tree_flatten_with_path(eager)[0], tree_leaves(graph)):  # one flattening: one order
        if isinstance(e, torch.Tensor) and isinstance(g, torch.Tensor) and not _same_tensor_values(e, g):
            raise CaptureError(f"forward writes into {_input_label(model, path)} in place, and the graph does not "
                               "write it as the model does (symbolic tracing records `x += h` as `x = x + h`): the "
                               "caller's tensor would be left as it was; use mode='export', which records the write")


def _input_label(model: nn.Module, path: tuple) -> str:
    """"input 1 ('x')", "input 'mask'", "input 0 ('cfg').scale": a leaf of ``(args, kwargs)`` by
    its pytree path, named as `_labelled_inputs` names inputs."""
    kind, key, rest = path[0], path[1], keystr(path[2:])
    if kind.idx == 1:
        return f"input {key.key!r}{rest}"
    names = [label for label, _ in _labelled_inputs(model, (None,) * (key.idx + 1), {})]
    return f"{names[key.idx]}{rest}"


def _same_tensor_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and values, NaN where the other has NaN (a sparse tensor, which torch.equal does
    not compare, is taken as the same)."""
    if a.layout != torch.strided or b.layout != torch.strided:
        return True
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))


_PLAIN = (int, float, bool, str, type(None))


def _plain_attributes(model: nn.Module) -> dict[str, Any]:
    """'module.attribute' -> value, for every plain Python value (a number, a flag) the modules
    hold, and a `_Held` snapshot of each list, tuple, set or dict (a log a forward appends to, a
    step count kept in a dict) and of each tensor that is no parameter or buffer (a running
    value a forward rebinds)."""
    found: dict[str, Any] = {}
    for prefix, m in model.named_modules():
        for key, value in vars(m).items():
            name = f"{prefix}.{key}" if prefix else key
            if isinstance(value, _PLAIN) and key != "training":
                found[name] = value
            elif isinstance(value, torch.Tensor) or (isinstance(value, (list, tuple, set, dict))
                                                     and not key.startswith("_")):
                found[name] = _Held.of(value)
    return found


@dataclass(frozen=True)
class _Held:
    """An attribute as `_plain_attributes` compares it: its kind and, for a container, each item
    (a plain value, else which object it is); a tensor by which object it is. `text` says it."""

    kind: str
    items: tuple
    text: str = dataclasses.field(compare=False)

    @staticmethod
    def of(value: Any) -> "_Held":
        if isinstance(value, torch.Tensor):
            return _Held("tensor", (id(value),), f"a tensor of shape {tuple(value.shape)}")
        contents = value.items() if isinstance(value, dict) else value
        items = tuple(_held_item(v) for v in contents)
        text = repr(value) if len(repr(items)) <= 60 else f"a {type(value).__name__} of {len(value)}"
        return _Held(type(value).__name__, frozenset(items) if isinstance(value, set) else items, text)

    def __repr__(self) -> str:
        return self.text


def _held_item(value: Any) -> Any:
    """A container item as `_Held` compares it: a plain value (or a dict's (key, value)), else its id."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], _PLAIN):  # a dict's item
        return value[0], _held_item(value[1])
    return value if isinstance(value, _PLAIN) else id(value)


def _changed_plain_attributes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """"calls: 0 -> 1" for each plain attribute a run rebound to another value."""
    return [f"{key}: {before.get(key)!r} -> {after[key]!r}" for key in after if before.get(key) != after[key]]


def _warn_python_state(model: nn.Module, gm: torch.fx.GraphModule, args: tuple, kwargs: dict, state: BufferState,
                       got: Any, moved: list[str], kept: PythonAttributes) -> None:
    """Warn when the state forward keeps in Python attributes changes its output: the graph does
    on every call what the captured call did (export baked `self.calls` in as 1, silently;
    a value computed once and kept, `if self.c is None: self.c = x.mean(0)`, is computed
    again on every call)."""
    if _same_call_differs(model, args, kwargs, state, got) or _next_call_differs(model, gm, args, kwargs, kept):
        warnings.warn(f"capture: {type(model).__name__}'s output depends on state its forward keeps in Python "
                      f"attributes ({', '.join(moved[:3])}); no graph records Python state, so the captured "
                      "one does on every call what the captured call did, unlike the model: keep the state "
                      "in a buffer updated in place if it should change", CaptureWarning, stacklevel=user_stacklevel())


def _same_call_differs(model: nn.Module, args: tuple, kwargs: dict, state: BufferState, got: Any) -> bool:
    """Whether the model, called on the example again from the state its first call left
    (`self.calls` now 1), computes other than the graph did (`got`)."""
    with torch.no_grad():
        run_args, run_kwargs = fresh_inputs(args, kwargs)
        with same_random_draws():
            again = model(*run_args, **run_kwargs)
        state.restore()
    try:
        _check_same_outputs(again, got)
    except CaptureError:
        return True
    return False


def _next_call_differs(model: nn.Module, gm: torch.fx.GraphModule, args: tuple, kwargs: dict,
                       kept: PythonAttributes) -> bool:
    """Whether, on other inputs, the model computes other than the graph from the state the
    example's calls left, but what the graph does from the state it started from: a value the
    first call computed and kept (a mean of the first batch), which the example alone cannot
    tell from the one the graph computes again."""
    varied = _varied_inputs(args, kwargs)
    if varied is None:
        return False
    differs = not _agrees(model, gm, *varied)
    kept.restore()
    return differs and _agrees(model, gm, *varied)


def _varied_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The inputs with seeded noise added to each floating-point tensor, each integer one (token
    ids) shifted by one within the example's own range (its smallest value after its largest;
    one value throughout: one more),
    which keeps every value one the model takes, and each bool one (a mask) in a seeded shuffle;
    None where there is no tensor to vary. The global random state is left alone."""
    generator = torch.Generator().manual_seed(0)
    found = False

    def vary(value: Any) -> Any:
        nonlocal found
        if not isinstance(value, torch.Tensor) or value.numel() < 2 or value.is_complex() or value.is_quantized:
            return value
        found = True
        value = value.detach()
        if value.dtype == torch.bool:
            order = torch.randperm(value.numel(), generator=generator).to(value.device)
            return value.flatten()[order].reshape(value.shape)
        if not value.is_floating_point():  # (one value throughout, a dummy of zeros: the next one up)
            low, high = value.min(), value.max()
            return value + 1 if low == high else (value - low + 1) % (high - low + 1) + low
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float32)
        return value + noise.to(value.device, value.dtype)

    varied = tree_map(vary, (args, kwargs))
    return varied if found else None


def adopt_graph_module(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
    """A GraphModule the user captured: copy it, inline its no_grad regions
    (`inline_no_grad_regions`), record its front end and shapes.

    Its opaque attributes (prepacked int8 weights) are rebuilt for the copy as `load` rebuilds
    them: the copy shares them otherwise (`deep_copy`), and running them here at the example's
    batch would leave the user's packs tuned to that shape (a oneDNN pack keeps its first
    call's primitive; other shapes take a slower path)."""
    gm = deep_copy(gm)
    rebuild_coded_attributes(gm)
    info = dict(getattr(gm, "meta", {}).get(META_KEY) or {})
    info.setdefault("frontend", frontend_of(gm))
    gm.meta[META_KEY] = info
    inline_no_grad_regions(gm)  # an `ep.module()` of the user's keeps them as export made them
    if args or kwargs:
        with torch.no_grad():
            propagate_shapes(gm, args, kwargs)
    return explain_failed_calls(gm)


# ----- export's no_grad regions ------------------------------------------------------------

_SET_GRAD_ENABLED = torch.ops.higher_order.wrap_with_set_grad_enabled
# Python operators a region may compute sizes with (a dynamic dim's arithmetic), none in place
_PLAIN_OPERATORS = frozenset(getattr(operator, name) for name in (
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "eq", "ne", "lt", "le", "gt",
    "ge", "and_", "or_", "not_"))


def inline_no_grad_regions(gm: torch.fx.GraphModule) -> int:
    """Inline into `gm`'s graph each region export keeps for a ``torch.no_grad()`` (or
    ``torch.set_grad_enabled(False)``) block of forward, each value leaving it detached; returns
    how many were inlined.

    Export runs such a block as ``wrap_with_set_grad_enabled(False, body, *operands)``, `body` a
    submodule graph the passes do not enter: a frozen backbone's convs were neither folded,
    quantized nor pruned. Inlined, the block's ops run with grad as the caller has it and each
    value that leaves the block goes through ``aten.detach``: it requires no grad and no gradient
    flows back through it, as under no_grad, and the values are the same. What differs is cost
    only: a call with grad on records the block's ops for autograd (memory until backward).

    Left as they are:
    - a block that writes in place (an EMA update of a buffer, a ``weight.clamp_``): with grad
      on the write would be recorded by autograd, or refused on a parameter;
    - a block holding anything but plain ops (another region: an autocast block inside);
    - a grad-ENABLING region (``torch.enable_grad()`` in a forward captured under no_grad): its
      outputs carry gradients, and inlined ops would run without grad in a no_grad call;
    - autocast, cond and while regions: their ops run under a mode, or on a branch, that the
      parent graph has no other way to say.

        >>> import torch, fxopt
        >>> class Frozen(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
        ...     def forward(self, x):
        ...         with torch.no_grad():
        ...             h = self.a(x)
        ...         return self.b(h)
        >>> gm = fxopt.capture(Frozen(), torch.randn(2, 4), mode="export")
        >>> [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        ['aten.linear.default', 'aten.detach.default', 'aten.linear.default']
    """
    inlined = 0
    for node in list(gm.graph.nodes):
        body = _inlinable_region(gm, node)
        if body is not None:
            _inline_region(gm, node, body)
            inlined += 1
    if inlined:
        read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for name, child in list(gm.named_children()):  # the bodies nothing reads any more
            if isinstance(child, torch.fx.GraphModule) and name not in read:
                gm.delete_submodule(name)
        gm.graph.lint()
        gm.recompile()
    return inlined


def _inlinable_region(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.GraphModule | None:
    """The body of `node` when it runs a grad-disabling region `inline_no_grad_regions` inlines:
    plain ops, none writing in place, each output a known value, read by index only."""
    if node.op != "call_function" or node.target is not _SET_GRAD_ENABLED or node.args[0] is not False:
        return None
    holder = node.args[1]
    if node.kwargs or not isinstance(holder, torch.fx.Node) or holder.op != "get_attr":
        return None
    body = getattr(gm, holder.target, None)
    if not isinstance(body, torch.fx.GraphModule):
        return None
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(node.args) - 2:
        return None
    for n in body.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        if n.op != "call_function":
            return None  # a nested region's get_attr, a module call
        target = n.target
        plain = target in _PLAIN_OPERATORS if not isinstance(target, torch._ops.OpOverload) \
            else not target._schema.is_mutable
        if not plain:
            return None
    outputs = body.graph.output_node().args[0]
    if not isinstance(outputs, (tuple, list)):
        return None
    for value in outputs:
        # whether to detach it: a value with no recorded val could be a tensor or a size
        if isinstance(value, torch.fx.Node) and value.op != "placeholder" and "val" not in value.meta:
            return None
    if any(u.op != "call_function" or u.target is not operator.getitem or not isinstance(u.args[1], int)
           for u in node.users):
        return None
    return body


def _inline_region(gm: torch.fx.GraphModule, node: torch.fx.Node, body: torch.fx.GraphModule) -> None:
    """Copy `body`'s ops in before `node` on its operands, route each ``node[i]`` to output i
    (a tensor computed in the block through ``aten.detach``), and drop `node`."""
    graph = gm.graph
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    env: dict[torch.fx.Node, Any] = dict(zip(placeholders, node.args[2:]))
    results: list[Any] = []
    with graph.inserting_before(node):
        for n in body.graph.nodes:
            if n.op not in ("placeholder", "output"):
                env[n] = graph.node_copy(n, lambda a: env[a])
        for value in body.graph.output_node().args[0]:
            if not isinstance(value, torch.fx.Node):
                results.append(value)
            elif value.op == "placeholder" or not isinstance(value.meta["val"], torch.Tensor):
                # an operand given back as it is (no_grad leaves `y = x` x itself) or a size
                results.append(env[value])
            else:
                detached = graph.call_function(torch.ops.aten.detach.default, (env[value],))
                detached.meta = dict(env[value].meta)  # its shape, and the source line and module
                results.append(detached)
    for user in list(node.users):
        user.replace_all_uses_with(results[user.args[1]])
        graph.erase_node(user)
    holder = node.args[1]
    graph.erase_node(node)
    if not holder.users:
        graph.erase_node(holder)


def detach_no_grad_values(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> int:
    """Detach each tensor a ``torch.no_grad()`` block of forward computed where the symbolic
    graph reads it after the block; returns how many. fx records no block: its ops were traced as
    plain ops (`FxoptTracer` marks them `NO_GRAD`), so a call with grad on let gradients flow
    through them, into the block's layers too. `torch.detach` at the block's edge stops them as
    no_grad does (as `inline_no_grad_regions` does for export's regions); the values are the same.

    Not covered (export keeps such a block as a region; `mode='export'`): a write in place inside
    the block into a value from outside it (an EMA update of a buffer, ``weight.clamp_``) still
    runs with grad as the caller has it (autograd records it, or refuses it on a parameter, in a
    call with grad on), and a tuple made in the block and read whole after it (``torch.cat(parts)``
    of ``parts = h.chunk(2)``) is not detached.
    """
    inside = {n for n in gm.graph.nodes if n.meta.get(NO_GRAD) and n.op in ("call_function", "call_method",
                                                                              "call_module")}
    if not inside:
        return 0
    for node in gm.graph.nodes:  # an item taken after the block of a tuple made in it
        source = node.args[0] if node.op == "call_function" and node.target is operator.getitem else None
        if isinstance(source, torch.fx.Node) and source in inside:
            inside.add(node)
    propagate_shapes(gm, args, kwargs)  # which values are tensors
    detached = 0
    for node in [n for n in gm.graph.nodes if n in inside]:
        after = [u for u in node.users if u not in inside]
        if not after or not hasattr(node.meta.get("tensor_meta"), "shape"):
            continue  # read in the block only; a size, a flag, a tuple
        with gm.graph.inserting_after(node):
            detach = gm.graph.call_function(torch.detach, (node,))
        detach.meta = {k: v for k, v in node.meta.items() if k != NO_GRAD}
        for user in after:
            user.replace_input_with(node, detach)
        detached += 1
    gm.recompile()
    return detached


# ----- example inputs -----------------------------------------------------------------------

def _check_example_inputs(model: nn.Module, example_inputs: Any, args: tuple, kwargs: dict) -> None:
    """Refuse, before any tracing, example inputs that cannot be what `model.forward` takes:
    an array that is not a torch tensor, or arguments that do not bind to its signature.

    Nothing else is judged here: a non-tensor value (a flag, a scale, None, a string, a tuple
    of ints) is a valid input that capture specializes; whether forward can use it shows when
    it runs (`_raise_if_eager_fails`).
    """
    for label, value in _labelled_inputs(model, args, kwargs):
        if not isinstance(value, torch.Tensor) and getattr(value, "ndim", 0) and hasattr(value, "__array__"):
            raise CaptureError(f"example {label} is a {_type_name(value)}, not a torch.Tensor: convert it "
                               "first (torch.from_numpy(a), or torch.as_tensor(a))")
    sizes = _leading_sizes(args, kwargs)
    if sizes and sizes[0] == 0:
        first = next(t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0)
        raise CaptureError(f"the example inputs hold an empty batch (the first tensor input has shape "
                           f"{tuple(first.shape)}): capture and the passes read shapes and values off the "
                           "example, and a verification on it would compare nothing; give at least one sample")
    if model._forward_pre_hooks:  # a pre-hook may supply or change the arguments forward gets
        return
    try:
        # the signature of what is called: a decorator (Hugging Face's, renaming deprecated
        # keywords) may take other arguments than the forward it wraps
        signature = inspect.signature(model.forward, follow_wrapped=False)
    except (TypeError, ValueError):  # no signature to read (a builtin forward): forward will say
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        given = ("example_inputs is None, which gives forward no arguments" if example_inputs is None
                 else f"given {_describe_call(args, kwargs)}")
        fix = "pass a tensor, a tuple of positional inputs or a dict of keyword inputs"
        if isinstance(example_inputs, Mapping) and _binds(signature, (example_inputs,)):
            # a dict is read as keyword inputs; a forward that takes one dict gets it in a tuple
            fix = (f"a {type(example_inputs).__name__} is read as keyword inputs "
                   f"({', '.join(map(repr, example_inputs))}); to pass it as "
                   "forward's one dict input, wrap it in a tuple: ({...},)")
        elif isinstance(example_inputs, list) and _binds(signature, (example_inputs,)):  # so is a list, by position
            fix = (f"a list is read as positional inputs ({len(example_inputs)} of them); to pass it as forward's "
                   "one list input, wrap it in a tuple: ([...],)")
        raise CaptureError(f"the example inputs do not fit {type(model).__qualname__}.forward{signature}: "
                           f"{exc} ({given}); {fix}") from None


def _binds(signature: inspect.Signature, args: tuple) -> bool:
    try:
        signature.bind(*args)
    except TypeError:
        return False
    return True


def _raise_if_eager_fails(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """After every front end failed: when the model itself does not run on the example inputs,
    say that, with the inputs whose type the error names (a str or a list where forward wants
    a tensor) — the front ends' reports would only repeat it from inside torch."""
    run_args, run_kwargs = fresh_inputs(args, kwargs)
    try:
        with torch.no_grad():
            model(*run_args, **run_kwargs)
    except Exception as exc:  # whatever forward raises on these inputs
        _raise_if_needs_gradients(model, args, kwargs, exc)
        text = str(exc).strip() or type(exc).__name__
        where = _user_frame(exc)
        where = f"\n      at {where}" if where else ""
        suspects = _suspect_inputs(model, args, kwargs, text)
        listed = "".join(f"\n  - example {label} is {_short(value)}" for label, value in suspects)
        hint = ("\n  hint: pass a tensor where forward computes with one; other values (flags, None, "
                "strings, numbers) reach forward as they are and are captured as constants") if suspects else ""
        raise CaptureError(f"{type(model).__qualname__} does not run on the example inputs, so there is "
                           f"nothing to capture: {type(exc).__name__}: {text}{where}{listed}{hint}") from exc


def _raise_if_needs_gradients(model: nn.Module, args: tuple, kwargs: dict, exc: Exception) -> None:
    """When forward failed under `torch.no_grad()` only (it computes gradients itself: forces as
    -dE/dx), say that, not that the inputs are wrong: the capture checks and verification run the
    model without gradients, and a graph records inference, not the gradient computation."""
    run_args, run_kwargs = fresh_inputs(args, kwargs)
    try:
        with torch.enable_grad():
            model(*run_args, **run_kwargs)
    except Exception:  # noqa: BLE001  (it fails either way: the inputs are the question)
        return
    raise CaptureError(f"{type(model).__qualname__}'s forward computes gradients itself (torch.autograd.grad or "
                       f"backward): it runs with gradients on only ({type(exc).__name__} under torch.no_grad(): "
                       f"{first_line(exc)}), and fxopt captures inference graphs, which hold no gradient "
                       "computation; capture the part of the model before the gradient is taken") from exc


def _suspect_inputs(model: nn.Module, args: tuple, kwargs: dict, error: str) -> list[tuple[str, Any]]:
    """The example inputs the error names the type of ("must be Tensor, not list"), else every
    input that is not a tensor."""
    labelled = _labelled_inputs(model, args, kwargs)
    words = set(re.findall(r"[\w.]+", error))
    named = [(label, v) for label, v in labelled if not isinstance(v, torch.Tensor) and type(v).__name__ in words]
    if named:
        return named
    return [(label, v) for label, v in labelled
            if not isinstance(v, (torch.Tensor, tuple, list, dict))]


def _labelled_inputs(model: nn.Module, args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    """(label, value) for every example input and everything inside a tuple, list or dict of
    them: `input 0 ('x')`, `input 'mask'`, `input 1 ('pair')[0]`, outermost first."""
    try:
        names = [p.name for p in inspect.signature(model.forward).parameters.values()
                 if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        names = []
    found: list[tuple[str, Any]] = []

    def walk(label: str, value: Any) -> None:
        found.append((label, value))
        if isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                walk(f"{label}[{i}]", item)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{label}[{key!r}]", item)

    for i, value in enumerate(args):
        walk(f"input {i}" + (f" ('{names[i]}')" if i < len(names) else ""), value)
    for key, value in kwargs.items():
        walk(f"input '{key}'", value)
    return found


def _describe_call(args: tuple, kwargs: dict) -> str:
    parts = [_type_name(a) for a in args] + [f"{k}={_type_name(v)}" for k, v in kwargs.items()]
    return f"({', '.join(parts)})" if parts else "no arguments"


def _type_name(value: Any) -> str:
    cls = type(value)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _short(value: Any) -> str:
    """`a str ('hello')`, `None`, `a list of 2 items`: what an input is, briefly."""
    if value is None:
        return "None"
    if isinstance(value, (tuple, list, dict)):
        return f"a {_type_name(value)} of {len(value)} item{'s' if len(value) != 1 else ''}"
    text = repr(value)
    shown = f" ({text})" if len(text) <= 40 else ""
    return f"a {_type_name(value)}{shown}"


# ----- helpers ------------------------------------------------------------------------------

def _private_eval_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode, for capture to run and trace (the caller's never runs).
    Where `copy.deepcopy` refuses an attribute, the copy gets a tensor computed from the
    parameters (``torch.nn.utils.weight_norm``'s weight, which its hook computes again before
    every forward; a buffer registered as ``w.sum(0) * 2``) detached, a threading lock a new lock,
    and a Python module (``self.ops = torch.nn.functional``: code, not state) is shared; any other is refused naming it
    (deepcopy failed on all with its own words, naming nothing). The attributes set on a
    parameter, which deepcopy drops, are kept."""
    try:
        private = deep_copy(model)
    except Exception:  # noqa: BLE001  (deepcopy's errors are of any type: TypeError, RuntimeError)
        private = deep_copy(model, _uncopyable_attributes(model))
    _keep_parameter_tags(model, private)
    return private.eval()


def _keep_parameter_tags(model: nn.Module, private: nn.Module) -> None:
    """Give each parameter of `private` the attributes set on `model`'s (``p._no_weight_decay =
    True``, which optimizer recipes group parameters by): deepcopy of a parameter drops them."""
    for (_, mine), (_, copied) in zip(model.named_parameters(remove_duplicate=False),
                                      private.named_parameters(remove_duplicate=False)):
        if vars(mine):
            copied.__dict__.update(copied_tags(mine))


def copied_tags(p: torch.Tensor) -> dict:
    """The attributes set on parameter `p`, each tensor among them (``p.ema``, ``p.state["ema"]``,
    in dicts, lists and tuples) copied, anything else shared: a back-reference (``p.model =
    model``) must not copy the model once per parameter."""
    def copied(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().clone()
        if isinstance(value, (dict, list)):  # a copy of its class: an OrderedDict's order, a defaultdict's factory
            new = copy.copy(value)
            for key, item in (value.items() if isinstance(value, dict) else enumerate(value)):
                new[key] = copied(item)
            return new
        if isinstance(value, tuple):
            items = [copied(v) for v in value]
            return type(value)._make(items) if hasattr(type(value), "_make") else type(value)(items)  # (a namedtuple)
        return value

    return {key: copied(value) for key, value in vars(p).items()}


_LOCKS = (type(threading.Lock()), type(threading.RLock()))


def _uncopyable_attributes(model: nn.Module) -> dict[int, Any]:
    """A `deep_copy` memo giving each attribute deepcopy refuses its stand-in (`_private_eval_copy`);
    raises CaptureError for one it has none for."""
    memo: dict[int, Any] = {}
    for prefix, module in model.named_modules():
        for buffer in module._buffers.values():  # one computed from the parameters holds their graph
            if buffer is not None and buffer.grad_fn is not None:
                memo[id(buffer)] = buffer.detach().clone()
        for key, value in vars(module).items():
            if isinstance(value, nn.Module) or key in ("_parameters", "_buffers", "_modules"):
                continue
            try:
                copy.deepcopy(value)
            except Exception as exc:  # noqa: BLE001  (as above)
                memo[id(value)] = _stand_in(f"{prefix}.{key}" if prefix else key, value, exc)
    return memo


def _stand_in(name: str, value: Any, exc: Exception) -> Any:
    """What the private copy holds for attribute `name`, which deepcopy refused with `exc`."""
    if isinstance(value, torch.Tensor) and value.grad_fn is not None:
        return value.detach().clone()
    if isinstance(value, _LOCKS):
        return threading.RLock() if isinstance(value, _LOCKS[1]) else threading.Lock()
    if isinstance(value, types.ModuleType):
        return value
    raise CaptureError(f"capture runs a copy of the model, never the model, and copy.deepcopy refuses its attribute "
                       f"'{name}' (a {type(value).__name__}: {type(exc).__name__}: {first_line(exc)}): give its "
                       "class a __deepcopy__, or set the attribute aside while capturing") from exc


# A module with a float rate under one of these names drops out in training mode
# (nn.MultiheadAttention's `dropout`, an RNN's, Hugging Face attention's `attention_dropout`).
_DROPOUT_RATES = ("dropout", "dropout_p", "attention_dropout", "attn_dropout")


def _training_mode_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, kind) for each submodule in training mode that computes something else in
    eval mode: a batchnorm or instance norm that tracks running statistics ("norm"), a dropout
    with p > 0 or a module with a dropout rate above 0 ("dropout"), a module of the user's whose
    code reads ``self.training`` (``y * 0.5 if self.training else y``: "branch")."""
    found = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            found.append((name, module, "norm"))
        elif isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            found.append((name, module, "dropout"))
        elif any(isinstance(getattr(module, attr, None), float) and getattr(module, attr) > 0
                 for attr in _DROPOUT_RATES):
            found.append((name, module, "dropout"))
        elif _reads_training(type(module)):
            found.append((name, module, "branch"))
    return found


def _reads_training(cls: type) -> bool:
    """Whether a method of `cls` or of its bases outside torch.nn reads an attribute named
    `training` (`self.training`): its forward may compute something else in eval mode."""
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.") or klass is object:
            continue
        for value in vars(klass).values():
            code = getattr(getattr(value, "__func__", value), "__code__", None)
            if code is not None and _code_reads_training(code):
                return True
    return False


def _code_reads_training(code: Any) -> bool:
    if "training" in code.co_names:
        return True
    return any(_code_reads_training(c) for c in code.co_consts if hasattr(c, "co_names"))


def _warn_training_mode(model: nn.Module) -> None:
    """Say so when capture's eval copy computes something else than `model` as it stands: a
    train-mode batchnorm normalizes each batch with its own statistics, and a verification
    against the eval copy would pass while the user's model gives other outputs."""
    found = _training_mode_modules(model)
    if not found:
        return
    listed = ", ".join(f"{type(m).__name__} '{name}'" if name else f"{type(m).__name__} (the model itself)"
                       for name, m, _ in found[:3])
    if len(found) > 3:
        listed += f" and {len(found) - 3} more"
    effects = []
    if any(kind == "norm" for _, _, kind in found):
        effects.append("batchnorm uses its running statistics, not each batch's (`fuse` folds them into the "
                       "conv or linear before it)")
    if any(kind == "dropout" for _, _, kind in found):
        effects.append("dropout is off")
    if any(kind == "branch" for _, _, kind in found):
        effects.append("code that reads self.training takes its eval-mode path")
    warnings.warn(
        f"capture: {type(model).__name__} is in training mode ({listed}); fxopt optimizes its eval-mode "
        f"semantics, as after model.eval(): {' and '.join(effects)}. The result is verified against that "
        "eval-mode copy, not against the model in training mode (left as it is); call model.eval() first to "
        "optimize for inference without this warning", TrainingModeWarning, stacklevel=user_stacklevel())


def _drop_string_annotations(gm: torch.fx.GraphModule) -> None:
    """Forget annotations fx kept as strings (``x: "Tensor"``, or any module using
    ``from __future__ import annotations``): the generated code then refers to a string as a
    global, and torch.save of the GraphModule fails ("'str' object has no attribute
    '__name__'"). They only annotate the generated forward; nothing reads them."""
    changed = False
    for node in gm.graph.nodes:
        if isinstance(node.type, str):
            node.type = None
            changed = True
    if changed:
        gm.recompile()


def _refuse_tensor_defaults(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """A parameter with a tensor default (``b=torch.ones(4)``) becomes a graph input whose default
    fx's generated code cannot spell, given or not (it failed with "name '_tensor_constant0' is
    not defined")."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return
    for param in params:
        if param.default is not inspect.Parameter.empty and _holds_tensor(param.default):
            raise CaptureError(f"forward's input '{param.name}' defaults to a tensor (or an object holding one), which "
                               "the code of a symbolic graph cannot spell; capture with mode='export' (auto does)")


def _refuse_var_keyword_inputs(model: nn.Module, kwargs: dict) -> None:
    """fx makes a ``**kw`` parameter one input named `kw`: inputs that would land in it cannot
    reach the graph (the run said "missing input 'kw'", a name the caller never gave)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return
    var_keyword = next((p.name for p in params.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    extra = [k for k in kwargs if k not in params]
    if var_keyword is not None and extra:
        raise CaptureError(f"{type(model).__name__}.forward takes inputs {', '.join(map(repr, extra))} through "
                           f"**{var_keyword}, which symbolic tracing cannot pass (it makes '{var_keyword}' one "
                           "input); capture with mode='export'")


def _concrete_inputs(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Inputs that hold no tensor (flags like return_dict, scales, modes, None) become trace constants.

    Keyword args by their name; positional args by the name of the parameter they bind to
    (one that lands in ``*args`` stays a graph input: fx cannot specialize part of it); a
    parameter left out at its default, unless the default is a number. A value holding a tensor
    (a list of tensors) stays an input: specializing it would bake the tensor in.
    """
    concrete = {k: v for k, v in kwargs.items() if not _holds_tensor(v)}
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for param, value in zip(params, args):
        if param.kind not in positional:
            break
        if not _holds_tensor(value):
            concrete[param.name] = value
    # an argument left out takes its default in eager, and in the trace too: fx would make it
    # an input, a Proxy where forward tests `mask is not None` or `if flag:`. A number stays an
    # input (`y * scale` runs at any scale); a branch on it falls back to export.
    given = {p.name for p, _ in zip(params, args)} | set(kwargs)
    for param in params:
        default = param.default
        if param.name in given or default is inspect.Parameter.empty or param.kind is inspect.Parameter.POSITIONAL_ONLY:
            continue
        if not _holds_tensor(default) and (isinstance(default, bool) or not isinstance(default, (int, float))):
            concrete[param.name] = default
    return concrete


def _holds_tensor(value: Any) -> bool:
    """Whether `value` holds a tensor: in a pytree container, or as an attribute of an object
    pytree takes as a leaf (an unregistered dataclass ``Batch(x=...)``)."""
    return any(isinstance(leaf, torch.Tensor) or _attributes_hold_tensor(leaf) for leaf in tree_leaves(value))


def _attributes_hold_tensor(value: Any) -> bool:
    attributes = getattr(value, "__dict__", None)
    return (isinstance(attributes, dict) and not isinstance(value, (type, nn.Module))
            and any(isinstance(leaf, torch.Tensor) for leaf in tree_leaves(list(attributes.values()))))


def _specialization_message(name: str, value: Any) -> str:
    """The message of the guard on an input specialized to `value` (the guard puts the value it
    was called with in place of `CALLED_WITH_ANOTHER`)."""
    return (f"captured with {name}={value!r}: the graph is specialized to that value of the "
            f"non-tensor input '{name}' and {CALLED_WITH_ANOTHER}; capture again with the new value")


def _name_specialized_inputs(gm: torch.fx.GraphModule, concrete: dict) -> None:
    """Give each specialized input its own name back, and a guard that says what it was captured with.

    fx names the placeholder of a concrete arg ``flag_1`` (so ``gm(x, flag=True)`` would be
    rejected, and a keyword given to fxopt's interpreter would be ignored for the default),
    and its guard message blames the caller ("flag has been specialized to have value True but
    got another value"); its None guard (`_assert_is_none`) is not kept by dead-code removal,
    so it becomes the same `==` + `torch._assert` guard as the others.
    """
    if not concrete:
        return
    from torch.fx._symbolic_trace import _assert_is_none

    graph = gm.graph
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    changed = False
    for name, value in concrete.items():
        node = placeholders.get(f"{name}_1")
        if node is None or name in placeholders:
            continue  # not a parameter of forward
        node.target = name
        if node.name != name:
            node._rename(name)
        message = _specialization_message(name, value)
        guarded = False
        for user in list(node.users):
            if user.op != "call_function":
                continue
            if user.target is _assert_is_none:
                with graph.inserting_before(user):
                    _insert_none_guard(graph, node, message)
                graph.erase_node(user)
                guarded = True
            elif user.target is operator.eq:
                for check in list(user.users):
                    if check.op == "call_function" and check.target is torch._assert:
                        check.target, check.args = specialized_guard, (check.args[0], message, node)
                        guarded = True
        if not guarded:  # fx guards numbers, strings and None only (a tuple, an enum: a warning)
            with graph.inserting_after(node):
                same = graph.call_function(operator.eq, (node, value))
            with graph.inserting_after(same):
                graph.call_function(specialized_guard, (same, message, node))
        changed = True
    if changed:
        graph.lint()
        gm.recompile()


def _guard_none_inputs(gm: torch.fx.GraphModule, model: nn.Module, args: tuple, kwargs: dict,
                       record: dict | None) -> None:
    """Give an exported graph the guard export leaves out: an input captured as None, given as a
    whole input or inside a dict, list or tuple one (`record`'s leaves, one per placeholder).

    Export checks the other non-tensor inputs it specialized on (``Guard failed: flag ==
    True``), but a tensor given where None was captured is silently ignored: the graph
    computes the None branch (``x if mask is None else x * mask``) and returns a wrong answer.
    """
    guarded = {node: node.name for _, value, node in _bound_placeholders(gm, model, args, kwargs) if value is None}
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    leaves = record["leaves"] if record and len(record["leaves"]) == len(placeholders) else []
    for entry, node in zip(leaves, placeholders):
        if entry.get("value") == "None":
            guarded.setdefault(node, entry["name"])
    _insert_guards(gm, [(node, operator.eq, _specialization_message(name, None)) for node, name in guarded.items()])


def _guard_tensor_inputs(gm: torch.fx.GraphModule, model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Give a symbolic graph a guard on each input captured as a tensor that forward lets the
    caller leave out as None (``bias=None``): fx keeps the default, so ``gm(x)`` ran the tensor's
    branch on None and returned a wrong answer (``F.linear(x, w, None)`` where the model took
    its own bias) or failed deep in the generated code."""
    guarded = [node for param, value, node in _bound_placeholders(gm, model, args, kwargs)
               if param.default is None and isinstance(value, torch.Tensor)]
    _insert_guards(gm, [(node, operator.ne, f"input '{node.name}' is None (or left out), where the graph was captured "
                                            "with a tensor: the model takes another path without one; pass a "
                                            f"tensor, or capture again with {node.name}=None")
                        for node in guarded])


def _bound_placeholders(gm: torch.fx.GraphModule, model: nn.Module, args: tuple,
                        kwargs: dict) -> list[tuple[inspect.Parameter, Any, torch.fx.Node]]:
    """(forward's parameter, the example's value, the graph's placeholder of that name) for each
    input the example gives or leaves at its default."""
    try:
        signature = inspect.signature(model.forward)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return []
    bound.apply_defaults()
    placeholders = {n.name: n for n in gm.graph.find_nodes(op="placeholder")}
    return [(signature.parameters[name], value, placeholders[name]) for name, value in bound.arguments.items()
            if name in placeholders]


def _insert_guards(gm: torch.fx.GraphModule, guards: list[tuple[torch.fx.Node, Callable, str]]) -> None:
    """`specialized_guard(compare(node, None), message)` after the graph's inputs, per guard."""
    if not guards:
        return
    last_input = list(gm.graph.find_nodes(op="placeholder"))[-1]
    with gm.graph.inserting_before(last_input.next):
        for node, compare, message in guards:
            _insert_none_guard(gm.graph, node, message, compare)
    gm.recompile()


def _insert_none_guard(graph: torch.fx.Graph, node: torch.fx.Node, message: str,
                       compare: Callable = operator.eq) -> None:
    """`specialized_guard(node == None, message)` (or `!=`) at the graph's insert point. `== None`
    rather than `is None`: a traced Proxy compares into a node, so the guard survives re-tracing
    (torch.load); the guard is marked side-effectful, so it survives dead-code removal."""
    fits = graph.call_function(compare, (node, None))
    graph.call_function(specialized_guard, (fits, message, node))


def _leading_sizes(args: tuple, kwargs: dict) -> list[int]:
    """Dim 0 of each tensor input (of rank >= 1), in order."""
    return [t.shape[0] for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0]


def _batch_size(sizes: list[int]) -> int | None:
    """The batch size from the inputs' `_leading_sizes`: the one they all share, or else the
    first input's when it is at least 2 (a side input such as a bias vector ``[d]`` keeps its
    static size); None when they disagree and the first is 1 (any of them could be the batch)."""
    if not sizes:
        return None
    return sizes[0] if len(set(sizes)) == 1 or sizes[0] > 1 else None


def _widen_batch(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def widen(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1:
            return torch.cat([x, x], dim=0)
        return x

    return tree_map(widen, args), tree_map(widen, kwargs)


def _dynamic_batch_spec(model: nn.Module, args: tuple, kwargs: dict, dim: Any, batch: int) -> Any:
    """Dim 0 dynamic for each tensor input whose leading size is `batch`."""
    def spec(x: Any) -> Any:
        return {0: dim} if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch else None

    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError:
        return None
    params = inspect.signature(model.forward).parameters
    out = {}
    for name, value in bound.arguments.items():
        kind = params[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(tree_map(spec, v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD and value:
            # torch.export's dynamic shapes fail on them with words of its own ("Must provide a tree_name")
            raise ValueError(f"torch.export cannot make inputs passed through **{name} dynamic "
                             f"({', '.join(map(repr, value))}); name them in forward's signature")
        else:
            out[name] = tree_map(spec, value)
    return out


def _checked_dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict, user: Any) -> Any:
    """The caller's `dynamic_shapes` by input name (a tuple or list by position is named from
    forward's signature, so it joins the dynamic batch as the by-name form does), each dim an
    index of that input (a negative one counted from the end). A dim the input does not have is
    refused: torch.export ignored it and kept the dim static without a word."""
    if user is None:
        return None
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return user
    if isinstance(user, (tuple, list)):
        if len(user) != len(bound):
            raise CaptureError(f"dynamic_shapes gives {len(user)} entries by position; forward takes "
                               f"{len(bound)} inputs here ({', '.join(bound)}): give one per input, or name them "
                               "in a dict")
        user = dict(zip(bound, user))
    for name in user:
        var_keyword = _var_keyword_taking(model, bound, name)
        if var_keyword is not None:
            raise CaptureError(f"dynamic_shapes names input '{name}', which forward takes through **{var_keyword}: "
                               "torch.export cannot keep an input passed through **kwargs dynamic; name it in "
                               f"forward's signature (def forward(self, {name}, ..., **{var_keyword}))")
        if name not in bound:
            raise CaptureError(f"dynamic_shapes names input '{name}', which the example inputs do not give; "
                               f"they give: {', '.join(bound)}")
    # every input named (None: no dim of it), as torch.export takes a dict: fxopt takes one naming some
    return {name: _checked_dims(name, value, user.get(name)) if isinstance(value, torch.Tensor)
            else user.get(name) for name, value in bound.items()}


def _var_keyword_taking(model: nn.Module, bound: dict, name: str) -> str | None:
    """The name of forward's ``**kwargs`` where it takes input `name` that way, else None (the
    refusal of dynamic_shapes naming it read "which the example inputs do not give")."""
    params = inspect.signature(model.forward).parameters
    var = next((p for p in params.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    return var.name if var is not None and name in (bound.get(var.name) or {}) else None


def _checked_dims(name: str, value: torch.Tensor, dims: Any) -> Any:
    """One tensor input's `dynamic_shapes` entry as {dim index: spec}: a tuple or list of one
    spec per dim (None: static) is read as that dict. Refused: a dim the input does not have
    (torch.export ignored it and kept the dim static without a word), and a spec that is no
    torch.export.Dim, hint or int (torch blamed the top-level keys for a string), an entry that is
    none of a dict, a tuple or None, and a Dim whose range leaves out the example's size (torch
    said "5 not in range [6, 10]", or, where the batch could not stay dynamic, blamed the keys)."""
    if dims is None:
        return None
    if isinstance(dims, (tuple, list)):
        if len(dims) != value.dim():
            raise CaptureError(f"dynamic_shapes: input '{name}' has {value.dim()} dimensions (shape "
                               f"{tuple(value.shape)}); its entry gives {len(dims)}")
        dims = {dim: spec for dim, spec in enumerate(dims) if spec is not None}
    if not isinstance(dims, dict):
        raise CaptureError(f"dynamic_shapes: input '{name}' is given {dims!r} ({_a(type(dims).__name__)}); give a "
                           "dict {dim: spec}, a tuple of one spec per dim, or None")
    fixed = {}
    for dim, spec in dims.items():
        if not isinstance(dim, int) or not -value.dim() <= dim < value.dim():
            raise CaptureError(f"dynamic_shapes: input '{name}' has {value.dim()} dimensions (shape "
                               f"{tuple(value.shape)}); it has no dim {dim!r}")
        if not isinstance(spec, (torch.export.Dim, type(torch.export.Dim.AUTO), int)) or isinstance(spec, bool):
            raise CaptureError(f"dynamic_shapes: dim {dim} of input '{name}' is {spec!r} (a {type(spec).__name__}); "
                               "give torch.export.Dim.AUTO, a torch.export.Dim('name', min=..., max=...), or an "
                               "int for a static size")
        _check_in_range(name, dim, spec, value.shape[dim])
        fixed[dim % value.dim()] = spec
    return fixed


def _check_in_range(name: str, dim: int, spec: Any, size: int) -> None:
    """Refuse a torch.export.Dim whose [min, max] leaves out the example's `size` at that dim."""
    if isinstance(spec, torch.export.Dim) and not spec.min <= size <= spec.max:
        raise CaptureError(f"dynamic_shapes: dim {dim} of input '{name}' is {spec!r}, but the example's size there "
                           f"is {size}: give an example inside the range, or widen it")


def _a(noun: str) -> str:
    """"an int", "a str": `noun` with its article."""
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _is_static(spec: Any) -> bool:
    """Whether a `dynamic_shapes` dim spec asks for a static size (an int, or Dim.STATIC)."""
    return isinstance(spec, int) or spec is torch.export.Dim.STATIC


def _warn_sizes_unchecked(user: Any) -> None:
    """Warn where the caller's (checked) `dynamic_shapes` asks a symbolic graph for a size it will not
    check: a static dim or a Dim's range binds an exported graph only; the symbolic one runs at any
    size (an unbounded Dim or a hint asks for nothing more), and the request went unheeded silently."""
    if not isinstance(user, dict):
        return
    asked = [f"dim {dim} of input '{name}' ({_size_asked(spec)})" for name, dims in user.items()
             if isinstance(dims, dict) for dim, spec in dims.items() if _size_asked(spec)]
    if asked:
        warnings.warn(f"capture: the symbolic graph runs at any size, so dynamic_shapes' {', '.join(asked)} is not "
                      "checked when it is called; pass mode='export' for a graph that refuses other sizes",
                      CaptureWarning, stacklevel=user_stacklevel())


def _size_asked(spec: Any) -> str:
    """What a `dynamic_shapes` dim spec asks beyond "any size": 'static', a Dim's range, or ''."""
    if _is_static(spec):
        return "static"
    if isinstance(spec, torch.export.Dim) and (spec.min > 1 or spec.max < math.inf):
        return repr(spec)
    return ""


def _pins_batch(user: Any) -> bool:
    """Whether the caller's (checked) `dynamic_shapes` asks for dim 0 of an input to be static."""
    return isinstance(user, dict) and any(isinstance(dims, dict) and _is_static(dims.get(0))
                                          for dims in user.values())


def _warn_static_requested(record: dict, model: nn.Module, user: Any) -> None:
    """Say when a dim the caller asked to keep dynamic came out static in export's `record` of
    the inputs (torch.export's Dim.AUTO gives way to the model's code without a word: `x + y`
    ties x's dim to y's static one)."""
    if not isinstance(user, dict):
        return
    entries = {}
    for entry in record["leaves"]:
        name = entry["label"].split("'")[1] if "'" in entry["label"] and "[" not in entry["label"] else None
        if name is not None and "shape" in entry:
            entries[name] = entry
    fixed = [(name, d) for name, dims in user.items() if isinstance(dims, dict) and name in entries
             for d, spec in dims.items() if d < len(entries[name]["shape"])
             and isinstance(entries[name]["shape"][d], int) and not _is_static(spec)]
    for name, d in fixed:  # a call at another size is told the model fixes it (`call_check`)
        entries[name].setdefault(FIXED_BY_MODEL, []).append(d)
    static = [f"dim {d} of '{name}' (size {entries[name]['shape'][d]})" for name, d in fixed]
    if static:
        warnings.warn(f"capture: {type(model).__name__} was exported with {', '.join(static)} static, which "
                      "dynamic_shapes asked to keep dynamic: the model's code fixes it (a branch on it, or an "
                      "operation that ties it to a static size); the graph runs at that size only",
                      CaptureWarning, stacklevel=user_stacklevel())


def _warn_narrow_batch(record: dict, model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Say when export kept the batch dynamic over some sizes only (`if x.shape[0] > 2:` keeps one
    branch, for batches of 3 or more; `if x.shape[0] == 1:`, which export does not see, for 2 or
    more; `x.chunk(2)` traced at 4 refuses 2 and 3 too, by a condition on the size): the graph
    refuses the others at the call. The sizes are read off the record for the first
    `_SIZES_CHECKED` from the smallest."""
    first = next((e["shape"][0] for e in record["leaves"] if e.get("shape") and isinstance(e["shape"][0], dict)
                  and "symbol" in e["shape"][0]), None)
    if first is None:
        return
    low, high = first["min"] or 0, first["max"]
    window = range(low, (min(high, low + _SIZES_CHECKED - 1) if high is not None else low + _SIZES_CHECKED - 1) + 1)
    group = next((g for g in symbols_by_size(record, args, kwargs) if first["symbol"] in g), {first["symbol"]})
    taken = sizes_taken(record, args, kwargs, group, window)
    if taken == list(window):
        if low <= 1 and high is None:
            return
        allowed = f"{low} to {high} only" if high is not None else f"{low} or more only"
    else:
        shown = ", ".join(map(str, taken[:8])) + (", ..." if len(taken) > 8 or high is None else "")
        allowed = (f"{shown} only (of {low} to {window[-1]}, the others fail a condition on the sizes export traced "
                   "the model under; gm.meta['fxopt']['inputs']['conditions'] lists them)")
    warnings.warn(f"capture: {type(model).__name__} was exported for batch sizes {allowed}: its code "
                  "branches on the batch size (or fixes a range of it), and the graph keeps the branch the "
                  "example took", CaptureWarning, stacklevel=user_stacklevel())


#: How many batch sizes, from the smallest the graph takes, `_warn_narrow_batch` checks.
_SIZES_CHECKED = 16


def _with_user_dims(batch_spec: Any, user: Any) -> Any:
    """The batch spec (`_dynamic_batch_spec`) with the caller's `dynamic_shapes` added: by input
    name, an input's dims the caller names are the caller's, its batch dim stays; a tuple or list
    (by position) replaces the batch spec."""
    if user is None:
        return batch_spec
    if not isinstance(user, dict) or not isinstance(batch_spec, dict):
        return user
    merged = dict(batch_spec)
    for name, dims in user.items():
        if dims is None:  # names no dim of the input: its batch stays
            continue
        ours = merged.get(name)
        merged[name] = {**ours, **dims} if isinstance(ours, dict) and isinstance(dims, dict) else dims
    return merged


def _structure_difference(expected: Any, got: Any, path: str = "") -> str:
    """Where the captured graph's output structure (pytree spec `got`) first parts from the model's
    (`expected`), in words: "output ['shape']: captured graph returns a tuple, the model a Size"
    (the outer containers' names alone said "a dict, the model a dict")."""
    if expected.type is not got.type or expected.context != got.context \
            or expected.num_children != got.num_children:
        where = f"output {path}: " if path else ""
        text = (f"{where}captured graph returns {_spec_text(got)}, the model {_spec_text(expected)} "
                "(output structure differs)")
        if expected.type is torch.Size:
            text += ("; torch.export returns a torch.Size as a tuple: return tuple(x.shape), or capture with "
                     "mode='symbolic'")
        return text
    keys = expected.context if isinstance(expected.context, list) else range(expected.num_children)
    for i, key in enumerate(keys):
        if expected.child(i) != got.child(i):
            return _structure_difference(expected.child(i), got.child(i), f"{path}[{key!r}]")
    return "captured graph's output structure differs from the model's"


def _spec_text(spec: Any) -> str:
    """One level of a pytree spec in words: 'a Size', 'a dict with keys 'y', 'shape'', 'a list of 2'."""
    if spec.type is None:
        return "a value"
    name = spec.context.__name__ if isinstance(spec.context, type) else spec.type.__name__  # a namedtuple's class
    if isinstance(spec.context, list) and spec.context:
        return f"{_a(name)} with keys {', '.join(map(repr, spec.context))}"
    return f"{_a(name)} of {spec.num_children}" if spec.type in (tuple, list) else _a(name)


def _nondeterministic(model: nn.Module, args: tuple, kwargs: dict, state: BufferState) -> bool:
    """Whether two eager runs from one state and one seed differ: the forward draws random
    numbers torch's generator does not drive (Python's `random`, NumPy)."""
    outputs = []
    with torch.no_grad():
        for _ in range(2):
            run_args, run_kwargs = fresh_inputs(args, kwargs)
            with same_random_draws():
                outputs.append(tree_flatten(model(*run_args, **run_kwargs))[0])
            state.restore()
    return any(isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
               and not torch.equal(a, b) for a, b in zip(*outputs))


def _check_same_outputs(expected: Any, got: Any, nondeterministic: Callable[[], bool] = lambda: False) -> None:
    exp_leaves, exp_spec = tree_flatten(expected)
    got_leaves, got_spec = tree_flatten(got)
    if len(exp_leaves) != len(got_leaves):
        raise CaptureError(
            f"captured graph returns {len(got_leaves)} values, the model {len(exp_leaves)}"
        )
    if exp_spec != got_spec:
        # e.g. symbolic tracing turns a Hugging Face ModelOutput into a plain dict
        raise CaptureError(_structure_difference(exp_spec, got_spec))
    for i, (e, g) in enumerate(zip(exp_leaves, got_leaves)):
        if type(e) is not type(g) and not (isinstance(e, torch.Tensor) and isinstance(g, torch.Tensor)):
            raise CaptureError(
                f"output {i}: captured graph returns a {type(g).__name__}, the model a {type(e).__name__}"
            )
        if isinstance(e, torch.Tensor):
            if not isinstance(g, torch.Tensor) or e.shape != g.shape:
                raise CaptureError(f"output {i}: captured graph gives a different shape or type")
            # a few rounding steps of the output's own dtype: bf16 kernels differ by one step (1/128)
            tol = max(1e-4, 4 * torch.finfo(e.dtype).eps) if e.is_floating_point() else 0.0
            if e.is_floating_point() and not torch.allclose(e, g, rtol=tol, atol=tol / 10, equal_nan=True):
                why = ("forward is not deterministic: two eager runs with the same inputs and torch seed differ "
                       "(random numbers from Python's `random` or NumPy, or state forward keeps in Python "
                       "attributes such as a call counter, which no graph records; draw random numbers with "
                       "torch, keep state in buffers)" if nondeterministic()
                       else _BAKED)
                raise CaptureError(f"output {i} differs from the model by {float((e - g).abs().max()):.3g}: {why}")


_UNKNOWN_OUTPUT = re.compile(r"Found <class '([\w.]+)'> in output, which is not a known type")
# export's GuardOnDataDependentSymNode: a Python branch on a tensor's values (symbolic tracing's
# "cannot be used as inputs to control flow" is said of branches on shapes too, which export takes)
_DATA_DEPENDENT = re.compile(r"data-dependent expression")
_SPECIALIZED_DIM_NOTE = re.compile(r"the model's code fixes \w+ to \d+\)")


def _hint(attempts: list[Attempt], model: nn.Module) -> str:
    """What to do about a failure we recognize (empty when there is none)."""
    for attempt in attempts:
        match = _UNKNOWN_OUTPUT.search(attempt.reason)
        if not match:
            continue
        kind = match.group(1).rsplit(".", 1)[-1]
        fix = "return tensors (or tuples/lists/dicts of them) from forward"
        if _is_dataclass_named(match.group(1)):
            return (f"\n  hint: the output is a {kind}, a dataclass torch.export does not know: register it with "
                    f"torch.export.register_dataclass({kind}) before capturing, or capture with mode='symbolic'")
        if "use_cache" in inspect.signature(model.forward).parameters:
            fix = ("pass use_cache=False with the inputs, e.g. example_inputs={'input_ids': ids, "
                   "'use_cache': False} (the model returns a " + kind + " otherwise)")
        return f"\n  hint: the output holds a {kind}, which is not a tensor container: {fix}"
    if any(a.frontend == "symbolic" and "co_varnames is too small" in a.reason for a in attempts):
        return ("\n  hint: symbolic tracing cannot rebuild the signature of a forward wrapped by a decorator "
                "that takes *args/**kwargs (Hugging Face models' forwards are): capture with mode='export' "
                "or 'auto'")
    if any(_SPECIALIZED_DIM_NOTE.search(a.reason) for a in attempts):
        return ("\n  hint: dynamic_shapes names a torch.export.Dim for a dimension the model's code fixes to one "
                "size (a branch on it, or an operation that ties it to a parameter's size): leave that dim out of "
                "dynamic_shapes, or give it torch.export.Dim.AUTO (export then keeps it static and capture warns), "
                "or capture with mode='symbolic', whose graphs run at any size")
    branching = [a for a in attempts if _DATA_DEPENDENT.search(a.reason)]
    if branching and all(_TORCH_NN_DIR in a.location for a in branching) \
            and all(a.frontend != "symbolic" for a in attempts):
        return ("\n  hint: a branch on a tensor's values stopped torch.export in torch.nn's code, no line of the "
                "model's own code (nn.TransformerEncoder's check of its mask, say): capture with "
                "mode='symbolic' (mode='auto' tries it first), which traces torch.nn's attention and transformer "
                "modules with the branch your inputs take")
    if branching:
        return ("\n  hint: forward branches on a tensor's values (`if x.sum() > 0:`), which no graph can "
                "record as a Python `if`: write the branch with torch.cond(pred, true_fn, false_fn, (x,)) or "
                "torch.where, or register a traceable forward for the module that takes the branch your "
                "inputs need (fxopt.register_traceable_forward)")
    return ""


def _is_dataclass_named(qualified: str) -> bool:
    """Whether `module.Class`, as export's error names it, is a dataclass (its module already
    imported: the model's own)."""
    module_name, _, name = qualified.rpartition(".")
    cls = getattr(sys.modules.get(module_name), name, None)
    return isinstance(cls, type) and dataclasses.is_dataclass(cls)


def _failed_attempt(frontend: str, exc: Exception) -> Attempt:
    reason = f"{type(exc).__name__}: {first_line(exc)}"
    fixed = _SPECIALIZED_DIM.search(str(exc))
    if fixed:  # what export says below its first line, which names no size
        reason += f" (the model's code fixes {fixed.group(1)} to {fixed.group(2)})"
    return Attempt(frontend, False, reason + _violated_constraints(str(exc)), _user_frame(exc))


def _violated_constraints(text: str) -> str:
    """What torch.export says below "Constraints violated (seq)! For more information, run with
    TORCH_LOGS=...": the guard each range fails ("Not all values of seq ... satisfy the generated
    guard (L['x'].size()[1] % 2) == 0") and its suggested fixes, on one line; "" for other errors."""
    lines = text.strip().splitlines()
    if not lines or not lines[0].startswith("Constraints violated"):
        return ""
    reasons, fixes, in_fixes = [], [], False
    for line in lines[1:]:
        if not line.strip():  # export's closing advice (draft_export) follows a blank line
            break
        if line.strip() == "Suggested fixes:":
            in_fixes = True
        elif in_fixes:
            fixes.append(line.strip())
        else:
            reasons.append(line.strip().removeprefix("- ").rstrip("."))
    told = reasons + ([f"suggested fixes: {'; '.join(fixes)}"] if fixes else [])
    return f" ({'; '.join(told)})" if told else ""


# torch.export, of a Dim the model's code ties to one size
_SPECIALIZED_DIM = re.compile(r"You marked (\w+) as dynamic but your code specialized it to be a constant \((\d+)\)")


_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (torch,)
) + (os.path.dirname(os.path.abspath(__file__)) + os.sep,)
# The standard library (inspect binding the arguments), but not the packages installed in it:
# a Hugging Face model's forward in site-packages is the line to show.
_STDLIB_DIR = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep
_INSTALLED_DIRS = tuple({os.path.abspath(sysconfig.get_paths()[k]) + os.sep for k in ("purelib", "platlib")})


def _is_user_file(filename: str) -> bool:
    """Whether a traceback frame is the user's code: not torch, fxopt or the standard library,
    and not code generated at run time (`<string>`, fx's `<eval_with_key>.3`), which has no
    line to show."""
    if filename.startswith("<"):
        return False
    path = os.path.abspath(filename)
    if path.startswith(_LIBRARY_DIRS):
        return False
    return not path.startswith(_STDLIB_DIR) or path.startswith(_INSTALLED_DIRS)


def _user_frame(exc: BaseException) -> str:
    """The deepest traceback frame in the user's code (`_is_user_file`): the line that failed;
    without one, the deepest in torch.nn's modules (a check torch's own layer makes)."""
    frames = traceback.extract_tb(exc.__traceback__)
    cause = exc.__cause__ or exc.__context__
    while cause is not None:  # export re-raises; the user frame may sit in the cause
        frames = frames + traceback.extract_tb(cause.__traceback__)
        cause = cause.__cause__ or cause.__context__
    user = [f for f in frames if _is_user_file(f.filename)] or [f for f in frames if _in_torch_nn(f.filename)]
    if not user:
        return ""
    f = user[-1]
    return f'File "{f.filename}", line {f.lineno}, in {f.name}: {(f.line or "").strip()}'


_TORCH_NN_DIR = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "nn") + os.sep


def _in_torch_nn(filename: str) -> bool:
    """Whether a frame is torch.nn's code (a layer's forward, torch.nn.functional)."""
    return os.path.abspath(filename).startswith(_TORCH_NN_DIR)
