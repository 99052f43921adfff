"""Pass registry: names in pipeline text -> pass classes.

Built-in and third-party passes register the same way, through the Python entry-point group
`fxopt.passes` (see pyproject.toml), and are imported only when a pipeline names them — so the
core never imports a concrete pass and `fxopt --help` starts fast. A pass defined in a script
or notebook registers at run time with `register_pass`.

Example::

    >>> import dataclasses
    >>> from fxopt import Pass, PassResult, register_pass, get_pass
    >>> @register_pass
    ... @dataclasses.dataclass
    ... class Nothing(Pass):
    ...     name = "nothing-doc-example"
    ...     def run(self, gm, ctx):
    ...         return PassResult(gm, modified=False)
    >>> get_pass("nothing-doc-example") is Nothing
    True
"""
from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

from .errors import PipelineError, did_you_mean
from .pass_base import Pass

ENTRY_POINT_GROUP = "fxopt.passes"

_runtime: dict[str, type[Pass]] = {}
_entry_points: dict[str, EntryPoint] | None = None


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Register a pass class under `cls.name` for this process; usable as a decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise TypeError(f"register_pass expects a Pass subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no `name`; set a class attribute name = '...'")
    _runtime[cls.name] = cls
    return cls


def unregister_pass(name: str) -> None:
    """Forget a pass registered with `register_pass` (tests and notebooks use this)."""
    _runtime.pop(name, None)


def available_passes() -> list[str]:
    """Every pass name a pipeline may use, sorted."""
    return sorted(set(_runtime) | set(_installed()))


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as `name`; a PipelineError lists the valid names otherwise."""
    if name in _runtime:
        return _runtime[name]
    ep = _installed().get(name)
    if ep is None:
        raise PipelineError(f"unknown pass '{name}'" + did_you_mean(name, available_passes()))
    cls = ep.load()
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise PipelineError(f"entry point '{name}' ({ep.value}) is not a fxopt Pass")
    return cls


def _installed() -> dict[str, EntryPoint]:
    global _entry_points
    if _entry_points is None:
        _entry_points = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return _entry_points
