"""Debug dumps: listings, Graphviz drawings, diffs between passes and an index page.

- `graph_listing(gm)`: one line per node (op, target, args, shape/dtype, annotations);
- `annotate(node, key, value)`: attach what a pass knows (qparams, a pruning `group`, `cut` edges);
- `dump(gm, path)`: listing, DOT, SVG (when Graphviz is installed) and index.html for one graph;
- `DumpInstrument(out_dir)`: the same for every step of a pass pipeline, with diffs;
- `dump_pipeline(model, inputs, pipeline, out_dir)`: optimize with that instrument, return the index.

`dump`, `DumpInstrument` and `dump_pipeline` load on first use: the pass manager imports this
package for listings, and the instrument imports the pass manager.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from .listing import annotate, graph_listing

_LAZY = {"dump": ".graph_dump", "DumpInstrument": ".instrument", "dump_pipeline": ".pipeline"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DumpInstrument", "annotate", "dump", "dump_pipeline", "graph_listing"]
