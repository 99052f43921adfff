"""`fxopt.dump(gm, path)`: everything needed to read one graph, in one folder.

Writes under `path`: `graph.txt` (the listing: op, target, arguments, shape/dtype and
annotations per node), `graph.dot` (Graphviz; collapsed by module scope past
`collapse_threshold` nodes), `graph.svg` when Graphviz's `dot` is on PATH, and `index.html`
linking them (saying why when there is no SVG).

    >>> import tempfile, torch, fxopt
    >>> gm = fxopt.capture(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), (torch.randn(2, 4),))
    >>> index = fxopt.dump(gm, tempfile.mkdtemp(), title="tiny")
    >>> index.name, "%_0 = call_module 0(%input_1)  : f32[2, 4]" in (index.parent / "graph.txt").read_text()
    ('index.html', True)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.fx

from .dot import DEFAULT_COLLAPSE_THRESHOLD
from .files import write_graph
from .html import graph_page
from .render import DEFAULT_TIMEOUT_S
from ..tracing import one_at_a_time


@one_at_a_time
def dump(
    gm: torch.fx.GraphModule | Any,
    path: str | Path,
    *,
    title: str | None = None,
    collapse_threshold: int = DEFAULT_COLLAPSE_THRESHOLD,
    svg: bool = True,
    svg_timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Write listing, DOT, SVG (if `dot` is installed) and index.html under `path`; return the index.

    `gm` may also be an object holding its graph as `.gm` (a prune plan: its graph carries the
    analysis's annotations, groups, pinned nodes and re-expansion cuts). For every step of a
    pipeline, use `fxopt.debug.DumpInstrument` or `fxopt.debug.dump_pipeline` instead.

        >>> import tempfile, torch, fxopt
        >>> gm = fxopt.capture(torch.nn.Linear(4, 2), torch.randn(3, 4))
        >>> index = fxopt.dump(gm, tempfile.mkdtemp())
        >>> sorted(p.name for p in index.parent.iterdir() if p.suffix != ".svg")
        ['graph.dot', 'graph.txt', 'index.html']
    """
    if not isinstance(gm, torch.fx.GraphModule) and isinstance(getattr(gm, "gm", None), torch.fx.GraphModule):
        gm = gm.gm
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"dump expects a torch.fx.GraphModule (or an object with one as .gm), got "
                        f"{type(gm).__name__}{_what_to_pass(gm)}")
    out = Path(path)
    title = title or type(gm).__name__
    files = write_graph(gm, out, "graph", title=title, collapse_threshold=collapse_threshold,
                        svg=svg, svg_timeout_s=svg_timeout_s)
    index = out / "index.html"
    index.write_text(graph_page(gm, files, title))
    return index


def _what_to_pass(value: Any) -> str:
    """The fix for a common wrong argument: an optimize result, or a model never captured."""
    if isinstance(getattr(value, "module", None), torch.fx.GraphModule):
        return ": pass its .module (fxopt.dump(result.module, path))"
    if isinstance(value, torch.nn.Module):
        return ": capture it first (fxopt.dump(fxopt.capture(model, example_inputs), path))"
    return ""
