"""Analysis base class and the caching manager."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

import torch
import torch.fx

T = TypeVar("T")


class Analysis:
    """Base for analyses. Subclasses set `name` and implement `run`.

        >>> import torch, fxopt
        >>> class CallCount(fxopt.Analysis):
        ...     name = "call-count"
        ...     def run(self, gm, am):
        ...         return sum(n.op.startswith("call") for n in gm.graph.nodes)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> am = fxopt.AnalysisManager(fxopt.capture(model, torch.randn(2, 4)))
        >>> am.get(CallCount), am.get(CallCount), am.computed     # computed once, then cached
        (2, 2, ['call-count'])
    """

    name: ClassVar[str] = ""

    def run(self, gm: torch.fx.GraphModule, am: "AnalysisManager") -> Any:
        raise NotImplementedError


class AnalysisManager:
    """Caches analysis results for one module, with the example inputs analyses may run on.

    Inside a pass it is ``ctx.analyses``; the pass manager drops what a pass that modified
    the graph does not list in its `preserves`, as `invalidate` does here.

        >>> import torch, fxopt
        >>> x = torch.randn(2, 4)
        >>> am = fxopt.AnalysisManager(fxopt.capture(torch.nn.Linear(4, 2), x), example_inputs=(x,))
        >>> shapes = am.get(fxopt.ShapeAnalysis)
        >>> am.get(fxopt.ShapeAnalysis) is shapes, am.computed
        (True, ['shapes'])
        >>> am.invalidate(preserved={"shapes"}); am.cached("shapes")
        True
        >>> am.invalidate(); am.cached("shapes")
        False
    """

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: tuple = (),
        example_kwargs: dict | None = None,
    ) -> None:
        self.gm = gm
        self.example_inputs = tuple(example_inputs)
        self.example_kwargs = dict(example_kwargs or {})
        self._cache: dict[tuple[str, type | None, tuple], Any] = {}  # (name, unnamed class, options) -> result
        self.computed: list[str] = []  # every computation, for tests and --time-passes output

    def get(self, analysis: type[T] | Any) -> Any:
        """The (cached) result of `analysis` (a class, or an instance with options) on `self.gm`.

        Results are cached per name and options: a dataclass analysis with other field values
        is another result; an analysis without a `name` goes by its class name (which `preserves`
        and `invalidate` use), and is cached per class: another library's class of that name has
        results of its own."""
        instance = analysis() if isinstance(analysis, type) else analysis
        name, options = _analysis_name(instance), _options(instance)
        key = (name, None if instance.name else type(instance), options)
        if key not in self._cache:
            self._cache[key] = instance.run(self.gm, self)
            self.computed.append(name + (f"{{{','.join(f'{k}={v!r}' for k, v in options)}}}" if options else ""))
        return self._cache[key]

    def cached(self, name: str) -> bool:
        """Whether a result of the analysis called `name` (with any options) is cached."""
        return any(key[0] == name for key in self._cache)

    def invalidate(self, preserved: frozenset[str] | set[str] = frozenset()) -> None:
        """Drop every cached result whose analysis name is not in `preserved`."""
        self._cache = {k: v for k, v in self._cache.items() if k[0] in preserved}

    def rebind(self, gm: torch.fx.GraphModule) -> None:
        """Point at a new module object (a pass returned a different one); keep valid results."""
        self.gm = gm


def _analysis_name(instance: Analysis) -> str:
    return instance.name or type(instance).__qualname__


def _options(instance: Analysis) -> tuple:
    """A dataclass analysis's field values, as a hashable key (repr for unhashable values)."""
    if not dataclasses.is_dataclass(instance):
        return ()
    values = []
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        try:
            hash(value)
        except TypeError:
            value = repr(value)
        values.append((f.name, value))
    return tuple(values)
