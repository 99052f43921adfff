"""Symbolic tracing that enters modules fx would keep opaque, through traceable forwards.

`torch.fx.symbolic_trace` keeps every torch.nn module as one `call_module` node, and cannot
enter a module whose forward branches on tensor properties (`nn.MultiheadAttention` checks
its inputs' dims and dtypes; `nn.TransformerEncoderLayer` picks a fused fast path). Such a
call hides its linears from pruning and quantization. A *traceable forward* computes the same
thing in ops the passes read (linear, head-split views, scaled_dot_product_attention);
`FxoptTracer` traces it in place of the module's own forward. fxopt registers them for
torch.nn's attention and transformer modules (`fxopt.nn_forwards`); register your own for a
module of yours that does not trace:

    >>> import torch, fxopt
    >>> from fxopt import NotTraceable, register_traceable_forward
    >>> class Gate(torch.nn.Module):            # branches on a tensor property: untraceable
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = torch.nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return self.fc(x) if x.dim() == 2 else self.fc(x).mean(1)
    >>> def gate_2d(module, x):                 # the branch this model takes, in plain ops
    ...     return module.fc(x)
    >>> register_traceable_forward(Gate, gate_2d)
    >>> gm = fxopt.capture(torch.nn.Sequential(Gate()), (torch.randn(2, 4),), mode="symbolic")
    >>> [n.target for n in gm.graph.nodes if n.op == "call_module"]
    ['0.fc']

The capture still checks the graph against the eager model on the example inputs, so a
traceable forward that computes something else makes the symbolic attempt fail (auto mode
then exports). A traceable forward raises `NotTraceable` *before it creates any op* to leave
the module as one call (an option it does not cover, e.g. `add_zero_attn`).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import threading
import warnings
from types import FrameType, FunctionType, MethodType, ModuleType
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.fx
from torch import nn
from torch.fx.node import map_aggregate
from torch.overrides import TorchFunctionMode

from .ir.effects import is_effectful

TraceableForward = Callable[..., Any]
_F = TypeVar("_F", bound=Callable[..., Any])

# torch.fx tracing patches torch.nn.Module.__call__ for the whole process, and torch.export
# pushes modes on process-wide stacks: a model run in one thread while another traces fails
# ("module is not installed as a submodule", "Trying to pop empty mode stack"). fxopt's entry
# points take this lock, so fxopt calls from several threads take turns. Re-entrant: optimize
# calls capture, verify and the pass manager, which take it again.
FX_LOCK = threading.RLock()

#: node meta key: the node was traced in a block of forward with grad off (``torch.no_grad()``),
#: where the trace began with grad on
NO_GRAD = "fxopt_no_grad"


def one_at_a_time(entry_point: _F) -> _F:
    """`entry_point`, run holding `FX_LOCK` (one fxopt call at a time in the process)."""
    @functools.wraps(entry_point)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with FX_LOCK:
            return entry_point(*args, **kwargs)
    return locked  # type: ignore[return-value]
_FORWARDS: dict[type, TraceableForward] = {}
_EXPANDED = "fxopt_traceable_forward"  # node meta: created inside a traceable forward


class NotTraceable(Exception):
    """Raised by a traceable forward, before it creates any op, to keep the module as one call.

        >>> import torch, fxopt
        >>> class Head(torch.nn.Linear):
        ...     frozen = False
        >>> def head_forward(module, x):
        ...     if module.frozen:                   # a case this forward does not cover
        ...         raise fxopt.NotTraceable("frozen heads stay one call")
        ...     return torch.nn.functional.linear(x, module.weight, module.bias)
        >>> fxopt.register_traceable_forward(Head, head_forward)
        >>> frozen = Head(4, 4); frozen.frozen = True
        >>> gm = fxopt.capture(torch.nn.Sequential(Head(4, 4), frozen), torch.randn(2, 4), mode="symbolic")
        >>> [n.op for n in gm.graph.nodes if n.op.startswith("call")]
        ['call_function', 'call_module']
        >>> fxopt.unregister_traceable_forward(Head)
    """


def register_traceable_forward(module_type: type[nn.Module], forward: TraceableForward) -> None:
    """Trace `forward(module, *args, **kwargs)` in place of `module_type`'s own forward.

    Exact type match: a subclass with its own forward is not covered by its base's entry.
    Registering a type again replaces its entry.

        >>> import torch, fxopt
        >>> class Normalize(torch.nn.Module):   # branches on a tensor's value: fx cannot trace it
        ...     def forward(self, x):
        ...         return x / x.norm() if x.norm() > 0 else x
        >>> fxopt.register_traceable_forward(Normalize, lambda module, x: x / x.norm().clamp_min(1e-12))
        >>> gm = fxopt.capture(torch.nn.Sequential(Normalize()), torch.randn(3, 4), mode="symbolic")
        >>> [n.target for n in gm.graph.nodes if n.op == "call_method"]
        ['norm', 'clamp_min']
        >>> fxopt.unregister_traceable_forward(Normalize)
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_traceable_forward expects an nn.Module subclass, got {module_type!r}")
    if not callable(forward):
        raise TypeError(f"the traceable forward for {module_type.__name__} is not callable: {forward!r}")
    _check_arity(module_type, forward)
    _FORWARDS[module_type] = forward


def _check_arity(module_type: type[nn.Module], forward: TraceableForward) -> None:
    """Refuse a traceable forward that cannot take the module and the inputs `module_type.forward`
    requires (it failed at capture as "<lambda>() takes 1 positional argument", naming neither)."""
    try:
        ours = inspect.signature(forward)
        theirs = inspect.signature(module_type.forward)
    except (TypeError, ValueError):
        return
    required = [p for p in list(theirs.parameters.values())[1:]
                if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    try:
        ours.bind(module_type, *(None for _ in required))
    except TypeError as exc:
        raise TypeError(f"the traceable forward for {module_type.__name__} takes {ours}, but a call passes the module "
                        f"and {module_type.__name__}.forward's inputs ({', '.join(p.name for p in required)}): "
                        f"{exc}") from None


def unregister_traceable_forward(module_type: type[nn.Module]) -> None:
    """Trace `module_type` by fx's default rule again.

        >>> import torch, fxopt
        >>> class Double(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x * 2
        >>> fxopt.register_traceable_forward(Double, lambda module, x: x + x)
        >>> [n.target.__name__ for n in fxopt.capture(Double(), torch.randn(3)).graph.nodes if n.op == "call_function"]
        ['add']
        >>> fxopt.unregister_traceable_forward(Double)
        >>> [n.target.__name__ for n in fxopt.capture(Double(), torch.randn(3)).graph.nodes if n.op == "call_function"]
        ['mul']
    """
    _FORWARDS.pop(module_type, None)


def traceable_forward(module: nn.Module) -> TraceableForward | None:
    """The forward registered for `module`'s exact type, if any."""
    return _FORWARDS.get(type(module))


def registered_by_user(model: nn.Module) -> list[str]:
    """`Type 'name'` for each module of `model` traced through a traceable forward registered
    outside fxopt (fxopt's own, for torch.nn's attention modules, are left out)."""
    return with_traceable_forward(model, by_user=True)


def with_traceable_forward(model: nn.Module, by_user: bool = False) -> list[str]:
    """`Type 'name'` for each module of `model` a trace enters through a traceable forward
    (`by_user`: only those registered outside fxopt)."""
    found = []
    for name, m in model.named_modules():
        forward = traceable_forward(m)
        if forward is not None and not (by_user and getattr(forward, "__module__", "").startswith("fxopt.")):
            found.append(f"{type(m).__name__} '{name}'" if name else f"{type(m).__name__} (the model itself)")
    return found


class FxoptTracer(torch.fx.Tracer):
    """fx's tracer, entering modules that have a registered traceable forward (unless `enter`
    is False: then it is fx's own)."""

    def __init__(self, enter: bool = True) -> None:
        super().__init__()
        self._depth = 0
        self._enter = enter

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        expansion = traceable_forward(m) if self._enter else None
        if expansion is None:
            return super().call_module(m, forward, args, kwargs)

        def expanded(*a: Any, **k: Any) -> Any:
            self._depth += 1
            try:
                if _has_hooks(m):  # the traceable forward would skip them; the module call runs them
                    raise NotTraceable("the module has hooks")
                return expansion(m, *a, **k)
            except NotTraceable:
                pass
            finally:
                self._depth -= 1
            # the leaf call goes inside fx's module scope, where its own leaf calls are made
            return self.create_proxy("call_module", self.path_of_module(m), a, k)

        return super().call_module(m, expanded, args, kwargs)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._enter and traceable_forward(m) is not None:
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def trace(self, root: Any, concrete_args: dict | None = None) -> torch.fx.Graph:
        self._grad_at_start = torch._C.is_grad_enabled()
        return super().trace(root, concrete_args)

    def create_node(self, *args: Any, **kwargs: Any) -> torch.fx.Node:
        node = super().create_node(*args, **kwargs)
        if self._depth:
            node.meta[_EXPANDED] = True
        # a node made in a `torch.no_grad()` block of forward: fx records no block, so capture
        # detaches the values leaving it (`fxopt.capture`); the builtin, not torch.is_grad_enabled,
        # which `GradStateReads` watches for the forward's own reads
        if getattr(self, "_grad_at_start", False) and not torch._C.is_grad_enabled():
            node.meta[NO_GRAD] = True
        return node


def trace(model: nn.Module, concrete_args: dict | None = None, enter: bool = True) -> torch.fx.GraphModule:
    """`torch.fx.symbolic_trace` with `FxoptTracer` (entering traceable forwards unless `enter`
    is False); dead values a traceable forward computed for a result the caller drops
    (attention weights) are erased.

    A concrete arg that is a tuple, list or dict (``dims=(1,)``) is traced as one value: fx
    flattens it into a placeholder per item and generated code that is no Python (a
    ``SyntaxError`` blamed on the model's line)."""
    leaves = {k: _as_one(v) for k, v in concrete_args.items()} if concrete_args is not None else None
    with warnings.catch_warnings():  # fx adds no guard on a value of another type; capture adds its own
        warnings.filterwarnings("ignore", message="Was not able to add assertion")
        tracer, graph = _trace_root(model, leaves, enter)
    for node in graph.nodes:  # the stand-ins back to plain tuples, lists and dicts
        node.args, node.kwargs = map_aggregate(node.args, _same), map_aggregate(node.kwargs, _same)
    for node in reversed(list(graph.nodes)):
        if node.meta.get(_EXPANDED) and not node.users and node.op in ("call_function", "call_method") \
                and not is_effectful(node):
            graph.erase_node(node)
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


class _OneTuple(tuple):
    """A tuple pytree takes as a leaf (it knows only exact types): see `trace`."""


class _OneList(list):
    """A list pytree takes as a leaf."""


class _OneDict(dict):
    """A dict pytree takes as a leaf."""


_AS_ONE: dict[type, type] = {tuple: _OneTuple, list: _OneList, dict: _OneDict}


def _as_one(value: Any) -> Any:
    """`value` as pytree's leaf when it is a plain tuple, list or dict; else itself."""
    one = _AS_ONE.get(type(value))
    return value if one is None else one(value)


def _same(value: Any) -> Any:
    return value


def _trace_root(model: nn.Module, concrete_args: dict | None, enter: bool) -> tuple[FxoptTracer, torch.fx.Graph]:
    """Trace `model`, through its own traceable forward when it has one and `enter` is True (fx
    reads the root's forward from its class: a subclass carrying the traceable one stands in
    while tracing)."""
    expansion = traceable_forward(model) if enter else None
    if expansion is not None:
        tracer, original = FxoptTracer(), type(model)
        model.__class__ = type(original.__name__, (original,), {"forward": expansion})
        tracer._depth = 1
        try:
            return tracer, tracer.trace(model, concrete_args=_with_flag_defaults(expansion, concrete_args))
        except NotTraceable:
            pass
        finally:
            model.__class__ = original
    tracer = FxoptTracer(enter)
    return tracer, tracer.trace(model, concrete_args=concrete_args)


def _with_flag_defaults(forward: TraceableForward, concrete_args: dict | None) -> dict:
    """The caller's concrete args plus the defaults of the flags it did not give: what the
    eager call used (a root's flag left free is a graph input the forward cannot branch on)."""
    concrete = dict(concrete_args or {})
    for name, param in list(inspect.signature(forward).parameters.items())[1:]:
        if name not in concrete and isinstance(param.default, (bool, int, float, str)):
            concrete[name] = param.default
    return concrete


def _has_hooks(m: nn.Module) -> bool:
    from torch.nn.modules import module as module_impl

    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or module_impl._global_forward_hooks or module_impl._global_forward_pre_hooks)


# (with the separator: site-packages/torchvision and a project's fxopt_models/ are the user's)
_LIBRARY_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)


class GradStateReads:
    """Records where the model's own code reads the grad state while the block runs: a call of
    ``torch.is_grad_enabled()``, under any name (``torch._C.is_grad_enabled``, or a name a helper
    module imported it as: the call itself is seen, `calls`), and a tensor's ``.requires_grad``,
    ``.grad_fn`` and ``.is_leaf`` (`attributes`). A graph keeps the branch such a read took when it
    was captured, and fxopt runs models under ``torch.no_grad()`` on inputs that require no grad: a
    forward computing ``h * 2 if torch.is_grad_enabled() else h`` was captured, and verified, for
    the no-grad branch only. Reads from torch's code (a fast path's checks) are not the model's and
    are left out. Entered as a whole, it watches both.

        >>> import torch
        >>> with GradStateReads() as reads, torch.no_grad():
        ...     _ = torch.nn.Linear(2, 2)(torch.ones(1, 2))       # torch's own code reads nothing here
        ...     enabled = torch.is_grad_enabled()
        >>> enabled, [where.split(": ", 1)[0] for where in reads.found]
        (False, ['torch.is_grad_enabled()'])
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        self.found: list[str] = []  # 'a tensor's .requires_grad: "file", line 9', each place once
        self._model = model
        self._stack: list[contextlib.ExitStack] = []

    def __enter__(self) -> "GradStateReads":
        stack = contextlib.ExitStack()
        stack.enter_context(self.calls())
        stack.enter_context(self.attributes())
        self._stack.append(stack)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.pop().close()

    def attributes(self) -> TorchFunctionMode:
        """A torch function mode noting reads of a tensor's ``.requires_grad``, ``.grad_fn`` and
        ``.is_leaf`` (a mode turns torch's fast paths off: a run that must take the path a plain
        call takes watches `calls` only)."""
        return _AttributeReads(self)

    @contextlib.contextmanager
    def calls(self) -> Iterator[None]:
        """Note each call of ``torch.is_grad_enabled``, by whatever name the caller holds it: a
        profile hook sees the call of the builtin itself (a per-call cost on every Python call,
        so entered around eager runs, not around a torch.export trace). A profiler of the user's
        written in Python (``sys.setprofile(f)``) is called from that hook, event by event, as
        before. A call through a ``functools.partial`` of it comes from C code, which no profile
        hook sees: each such partial the model reaches (`_Reach`) calls the watch instead while
        it runs. Where a profiler written in C holds the hook (cProfile: ``sys.setprofile`` could
        not put it back), the names the model reaches are swapped instead, and a name farther
        away than `_Reach` looks is not seen."""
        previous = sys.getprofile()
        if previous is not None and not isinstance(getattr(previous, "__self__", None), GradStateReads):
            if not isinstance(previous, (FunctionType, MethodType)):  # (cProfile's Profile, another C profiler's)
                with self._swapped(names=True):
                    yield
                return
            users, ours = previous, self._profile

            def hook(frame: FrameType, event: str, arg: Any) -> None:
                users(frame, event, arg)
                ours(frame, event, arg)
        else:
            hook = self._profile
        with self._swapped(names=False):
            sys.setprofile(hook)
            try:
                yield
            finally:
                sys.setprofile(previous)

    def _profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if arg is _IS_GRAD_ENABLED and event == "c_call":
            self._note("torch.is_grad_enabled()", frame)

    @contextlib.contextmanager
    def _swapped(self, names: bool) -> Iterator[None]:
        """The watch's reader in place of the builtin in each partial the model reaches, and where
        `names`, in each place `_Reach` finds holding the builtin itself (torch's two names too)."""
        reach = _Reach(self._model, [vars(torch), vars(torch._C)] if names else [])
        undo: list[Callable[[], None]] = []
        reader = self._reading_grad_enabled
        try:
            wanted = _reads_grad_mode if names else _partial_of_grad_mode
            for held, put in reach.places(wanted):
                if isinstance(held, functools.partial):
                    state = held.__reduce__()[2]  # (func, args, keywords, __dict__)
                    held.__setstate__((reader, *state[1:]))
                    undo.append(functools.partial(held.__setstate__, state))
                else:
                    undo.append(put(reader))
            yield
        finally:
            for restore in reversed(undo):
                restore()

    def _reading_grad_enabled(self) -> bool:
        self._note("torch.is_grad_enabled()", sys._getframe(1))
        return _IS_GRAD_ENABLED()

    def _note(self, what: str, frame: FrameType) -> None:
        """Note `what`, read by the code running in `frame`, unless that code is torch's or fxopt's."""
        while frame.f_back is not None and frame.f_code.co_name == "__torch_function__":
            frame = frame.f_back  # the modes of a trace that passed the read on (export's)
        name = frame.f_code.co_filename
        # (a model defined in a notebook cell or a doctest has a '<...>' name too: only fx's own code is left out)
        if name.startswith("<eval_with_key") or os.path.abspath(name).startswith(_LIBRARY_DIRS):
            return
        text = f'{what}: "{name}", line {frame.f_lineno}'
        if text not in self.found:
            self.found.append(text)


_IS_GRAD_ENABLED = torch._C.is_grad_enabled  # (torch.is_grad_enabled is this builtin)


def _partial_of_grad_mode(value: Any) -> bool:
    return isinstance(value, functools.partial) and value.func is _IS_GRAD_ENABLED


def _reads_grad_mode(value: Any) -> bool:
    return value is _IS_GRAD_ENABLED or _partial_of_grad_mode(value)


class _Reach:
    """The places through which a model's code may reach a callable, for the grad-state watch to
    swap it in: the attributes of each of its modules (``self.on = partial(...)``) and of their
    classes, and the globals of their forwards (unwrapped too: a decorated forward's own module);
    then one step on, the globals of each function and the namespace of each module found there,
    the attributes of each class, and each function's defaults and closure cells. `places` yields
    ``(value, put)`` for each: ``put(new)`` puts `new` in the place (in a class, as a staticmethod:
    it must not bind) and returns the function that puts the value back. A place the watch's own
    namespaces hold (`namespaces`, torch's) comes first."""

    def __init__(self, model: nn.Module | None, namespaces: list[dict]) -> None:
        self._dicts: dict[int, dict] = {id(space): space for space in namespaces}
        self._classes: dict[int, type] = {}
        self._functions: dict[int, FunctionType] = {}
        seen: set[type] = set()
        for module in model.modules() if model is not None else ():
            self._add_dict(vars(module))
            for value in vars(module).values():  # (self.scale = helper.scale, a function forward calls)
                if type(value) is FunctionType or type(value) is MethodType:
                    self._first(getattr(value, "__func__", value))
            if type(module) not in seen:
                seen.add(type(module))
                # (static: a TorchScript module's class holds a descriptor that raises when read from the class)
                forward = inspect.getattr_static(type(module), "forward", None)
                for value in (type(module), forward, inspect.unwrap(forward) if callable(forward) else None):
                    self._first(value)

    def _first(self, value: Any) -> None:
        """A function or class the model holds: it, and one step on from what it holds, are places."""
        if isinstance(value, FunctionType) and not _in_library(value.__code__.co_filename):
            self._add_function(value, more=True)
        elif isinstance(value, type) and not _in_library(getattr(sys.modules.get(value.__module__), "__file__", None)):
            self._add_class(value, more=True)

    def _add_dict(self, space: dict, found: list[Any] | None = None) -> None:
        if id(space) not in self._dicts:
            self._dicts[id(space)] = space
            if found is not None:
                found += list(space.values())

    def _add_function(self, fn: FunctionType, more: bool) -> None:
        if id(fn) in self._functions:
            return
        self._functions[id(fn)] = fn
        found: list[Any] | None = [] if more else None
        self._add_dict(fn.__globals__, found)
        if fn.__kwdefaults__:
            self._add_dict(fn.__kwdefaults__)
        for value in found or ():
            self._step(value)

    def _add_class(self, cls: type, more: bool) -> None:
        if id(cls) in self._classes:
            return
        self._classes[id(cls)] = cls
        for value in list(vars(cls).values()) if more else ():
            self._step(value.__func__ if isinstance(value, (staticmethod, classmethod)) else value)

    def _step(self, value: Any) -> None:
        """One step on from a place: what `value` holds becomes places, searched no further (torch's
        and fxopt's own code is left out: a call from there is not the model's)."""
        if isinstance(value, FunctionType):
            if not _in_library(value.__code__.co_filename):
                self._add_function(value, more=False)
        elif isinstance(value, ModuleType):
            if not _in_library(getattr(value, "__file__", None)):
                self._add_dict(vars(value))
        elif isinstance(value, type):
            if not _in_library(getattr(sys.modules.get(value.__module__), "__file__", None)):
                self._add_class(value, more=False)

    def places(self, wanted: Callable[[Any], bool]) -> Iterator[tuple[Any, Callable[[Any], Callable[[], None]]]]:
        """``(value, put)`` for each place holding a value `wanted` accepts."""
        for space in list(self._dicts.values()):
            for key, value in list(space.items()):
                if wanted(value):
                    yield value, functools.partial(_put_item, space, key, value)
        for cls in list(self._classes.values()):
            for key, value in list(vars(cls).items()):
                held = value.__func__ if isinstance(value, staticmethod) else value
                if wanted(held):
                    yield held, functools.partial(_put_attribute, cls, key, value)
        for fn in list(self._functions.values()):
            for i, value in enumerate(fn.__defaults__ or ()):
                if wanted(value):
                    yield value, functools.partial(_put_default, fn, i)
            for cell in fn.__closure__ or ():
                try:
                    value = cell.cell_contents
                except ValueError:  # (a cell not yet set)
                    continue
                if wanted(value):
                    yield value, functools.partial(_put_cell, cell, value)


@functools.lru_cache(maxsize=4096)
def _in_library(path: str | None) -> bool:
    return path is not None and os.path.abspath(path).startswith(_LIBRARY_DIRS)


def _put_item(space: dict, key: Any, old: Any, new: Any) -> Callable[[], None]:
    space[key] = new
    return functools.partial(space.__setitem__, key, old)


def _put_attribute(cls: type, key: str, old: Any, new: Any) -> Callable[[], None]:
    setattr(cls, key, staticmethod(new))
    return functools.partial(setattr, cls, key, old)


def _put_default(fn: FunctionType, i: int, new: Any) -> Callable[[], None]:
    old = fn.__defaults__
    fn.__defaults__ = old[:i] + (new,) + old[i + 1:]
    return functools.partial(setattr, fn, "__defaults__", old)


def _put_cell(cell: Any, old: Any, new: Any) -> Callable[[], None]:
    cell.cell_contents = new
    return functools.partial(setattr, cell, "cell_contents", old)


class _AttributeReads(TorchFunctionMode):
    """`GradStateReads.attributes`: a tensor's grad-state attributes read under the mode."""

    def __init__(self, reads: GradStateReads) -> None:
        super().__init__()
        self._reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        read = getattr(getattr(func, "__self__", None), "__name__", "") if getattr(func, "__name__", "") == "__get__" \
            else ""
        if read in ("requires_grad", "grad_fn", "is_leaf"):
            # (an input's or a parameter's: export traces both as its own); the reader is above this hook
            self._reads._note(f"a tensor's .{read}", sys._getframe(1))
        return func(*args, **(kwargs or {}))
