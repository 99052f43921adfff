"""Pass registry: names in pipeline text -> pass classes.

Built-in and third-party passes register the same way, through the Python entry-point group
`fxopt.passes` (see pyproject.toml), and are imported only when a pipeline names them — so the
core never imports a concrete pass and `fxopt --help` starts fast. A pass defined in a script
or notebook registers at run time with `register_pass`.

Example::

    >>> import dataclasses
    >>> from fxopt import Pass, PassResult, register_pass, get_pass, unregister_pass
    >>> @register_pass
    ... @dataclasses.dataclass
    ... class Nothing(Pass):
    ...     name = "nothing-doc-example"
    ...     def run(self, gm, ctx):
    ...         return PassResult(gm, modified=False)
    >>> get_pass("nothing-doc-example") is Nothing
    True
    >>> unregister_pass("nothing-doc-example")
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .errors import PipelineError, did_you_mean, first_line
from .pass_base import Pass, text_can_write
from .pipeline import is_pass_name
from .verify import loosest

ENTRY_POINT_GROUP = "fxopt.passes"

_runtime: dict[str, type[Pass]] = {}
_entry_points: dict[str, EntryPoint] | None = None


def register_pass(cls: type[Pass] | None = None, *, replace: bool = False) -> Any:
    """Register a pass class under `cls.name` for this process; usable as a decorator.

    A name an installed pass already has (a built-in such as `fuse`, or a package's entry point)
    is refused unless `replace=True`: a pipeline naming it would silently run another pass.
    Registering a name again at run time replaces the earlier class (a notebook cell run twice).
    `unregister_pass(name)` brings a replaced installed pass back.

        >>> import dataclasses, fxopt
        >>> @fxopt.register_pass
        ... @dataclasses.dataclass
        ... class Noop(fxopt.Pass):
        ...     name = "noop-example"
        ...     def run(self, gm, ctx):
        ...         return fxopt.PassResult(gm, modified=False)
        >>> "noop-example" in fxopt.available_passes()
        True
        >>> @dataclasses.dataclass
        ... class MyDce(Noop):
        ...     name = "dce"
        >>> fxopt.register_pass(MyDce)
        Traceback (most recent call last):
        ...
        fxopt.errors.PipelineError: register_pass: 'dce' is the name of an installed pass (fxopt.passes.cleanup:DeadCodeElimination); pass replace=True to run MyDce in its place, or give MyDce another name
        >>> fxopt.register_pass(MyDce, replace=True) is MyDce
        True
        >>> fxopt.unregister_pass("dce"), fxopt.unregister_pass("noop-example")
        (None, None)
    """
    if cls is None:  # @register_pass(replace=True)
        return functools.partial(register_pass, replace=replace)
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise TypeError(f"register_pass expects a Pass subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no `name`; set a class attribute name = '...'")
    if not is_pass_name(cls.name):
        raise PipelineError(f"register_pass: pipeline text cannot spell {cls.__qualname__}'s name {cls.name!r}; "
                            "use letters, digits, '-', '_' and '.'")
    try:  # a typo in the promise would otherwise show only when the pass has run
        loosest(getattr(cls, "tolerance", "exact"))
    except (KeyError, ValueError, TypeError) as exc:
        raise PipelineError(f"register_pass: {cls.__qualname__}.tolerance: {exc}") from None
    _check_options(cls)
    installed = _installed().get(cls.name)
    if installed is not None and not replace:
        raise PipelineError(f"register_pass: '{cls.name}' is the name of an installed pass ({installed.value}); "
                            f"pass replace=True to run {cls.__name__} in its place, or give "
                            f"{cls.__name__} another name")
    _runtime[cls.name] = cls
    return cls


def _check_options(cls: type[Pass]) -> None:
    """Refuse a pass whose options pipeline text could not set: one that is no dataclass (its
    annotated attributes are then no options: `name{k=2}` said it has no option 'k'), or one
    with an option of a type text does not convert (a dict: it failed only when text named it)."""
    own = [k for k, v in vars(cls).get("__annotations__", {}).items() if "ClassVar" not in str(v)]
    if own and "__dataclass_fields__" not in vars(cls):
        raise PipelineError(f"register_pass: {cls.__qualname__} is not a @dataclasses.dataclass, so its annotated "
                            f"attributes ({', '.join(own)}) are no options; decorate it with @dataclasses.dataclass")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001  (a name the hints cannot resolve: option_specs says so when asked)
        return
    for f in dataclasses.fields(cls):
        if f.init and f.name in hints and not text_can_write(hints[f.name]):
            raise PipelineError(f"register_pass: {cls.__qualname__} option '{f.name}' has type "
                                f"{getattr(hints[f.name], '__name__', hints[f.name])}, which pipeline text cannot "
                                "write; use bool, int, float, str, a Literal, an Enum, a tuple of them or None "
                                "(or use the pass unregistered, as an object in a pipeline list)")


def unregister_pass(name: str) -> None:
    """Forget a pass registered with `register_pass` (tests and notebooks use this); an
    installed pass it replaced is used again.

        >>> import fxopt
        >>> fxopt.unregister_pass("never-registered")   # unknown names are ignored
        >>> "fuse" in fxopt.available_passes()          # installed passes cannot be unregistered
        True
    """
    _runtime.pop(name, None)


def available_passes() -> list[str]:
    """Every pass name a pipeline may use, sorted: installed and registered at run time.

        >>> import fxopt
        >>> {"dce", "fuse", "prune", "quantize"} <= set(fxopt.available_passes())
        True
    """
    return sorted(set(_runtime) | set(_installed()))


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as `name`; a PipelineError lists the valid names otherwise.

        >>> import fxopt
        >>> fxopt.get_pass("dce").__name__
        'DeadCodeElimination'
        >>> fxopt.get_pass("dcee")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fxopt.errors.PipelineError: unknown pass 'dcee' (did you mean 'dce'?); valid: dce, ...
    """
    if name in _runtime:
        return _runtime[name]
    ep = _installed().get(name)
    if ep is None:
        raise PipelineError(f"unknown pass '{name}'" + did_you_mean(name, available_passes()))
    try:
        cls = ep.load()
    except Exception as exc:  # a third-party package's import error: say whose it is
        raise PipelineError(f"pass '{name}' (entry point {ep.value}) cannot be loaded: {type(exc).__name__}: "
                            f"{first_line(exc)}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise PipelineError(f"entry point '{name}' ({ep.value}) is not a fxopt Pass")
    return cls


def _installed() -> dict[str, EntryPoint]:
    global _entry_points
    if _entry_points is None:
        _entry_points = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return _entry_points
