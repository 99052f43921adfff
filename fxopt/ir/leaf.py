"""Functions a pass puts in a graph that every fx tracer keeps as one call.

A pass may call a Python function of its own from the graph (an int8 cat that re-quantizes
its inputs, a channel scatter over a matrix view). Any later trace of the generated code walks
into such a function unless it is a leaf: torch re-traces a GraphModule's code when it is
pickled (``torch.save(model)``, a multiprocessing worker) and ``torch.fx.symbolic_trace`` of
the result does the same, and a function that branches on its inputs
(``if q.dtype != torch.quint8``) then fails with a TraceError. `torch.fx.wrap` marks a name
for tracers of the module that calls it, which a GraphModule's generated code is not.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch
import torch.fx

F = TypeVar("F", bound=Callable[..., Any])


def leaf_function(fn: F) -> F:
    """`fn`, recorded as one ``call_function`` node when any fx tracer calls it with proxies.

        >>> import torch, torch.fx
        >>> @leaf_function
        ... def clamp_if_positive(x):
        ...     return x.clamp(min=0) if x.sum() > 0 else x   # branches on data
        >>> gm = torch.fx.symbolic_trace(lambda x: clamp_if_positive(x) + 1)
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_function', 'call_function', 'output']
        >>> gm(torch.tensor([1.0, -2.0, 3.0]))
        tensor([2., 1., 4.])
    """
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        proxy = _first_proxy((args, kwargs))
        if proxy is not None:
            return proxy.tracer.create_proxy("call_function", call, args, kwargs)
        return fn(*args, **kwargs)

    return call  # type: ignore[return-value]


def _first_proxy(values: Any) -> torch.fx.Proxy | None:
    found: list[torch.fx.Proxy] = []
    torch.fx.node.map_aggregate(values, lambda v: found.append(v) if isinstance(v, torch.fx.Proxy) else None)
    return found[0] if found else None


__all__ = ["leaf_function"]
