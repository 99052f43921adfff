"""Write one graph's files: listing (.txt), Graphviz (.dot) and, when `dot` exists, .svg.

    >>> import tempfile, torch, fxopt
    >>> gm = fxopt.capture(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), (torch.randn(2, 4),))
    >>> files = write_graph(gm, tempfile.mkdtemp(), "graph", title="demo")
    >>> files.listing.name, files.dot.name, files.nodes
    ('graph.txt', 'graph.dot', 4)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch.fx

from .dot import DEFAULT_COLLAPSE_THRESHOLD, graph_dot
from .listing import graph_listing
from .render import DEFAULT_TIMEOUT_S, render_svg


@dataclass
class GraphFiles:
    """What was written for one graph; `svg_note` says why there is no SVG when `svg` is None."""

    listing: Path
    dot: Path
    svg: Path | None
    svg_note: str
    nodes: int
    collapsed: bool
    #: The listing without its title line, for diffs between steps.
    text: str = field(repr=False, default="")


#: The files a pipeline dump writes per step (`00-captured.txt`, `01-fuse.diff`, ...).
STEP_FILE = re.compile(r"\d{2,}-[A-Za-z0-9_.-]+\.(txt|dot|svg|diff)")


def output_dir(path: str | Path, what: str = "dump") -> Path:
    """`path` as a folder to write into, created when missing; a path that names a file is a
    ValueError that says so (mkdir's bare FileExistsError did not)."""
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{what}: '{directory}' is a file, not a folder; give the path of a folder to write "
                         "into (it is created when missing)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file on the way ('/etc/hostname/x'), no permission, a read-only disk
        raise ValueError(f"{what}: cannot create the folder '{directory}' ({exc.strerror}); give the path of a "
                         "folder you can write") from None
    return directory


def remove_stale_steps(directory: str | Path) -> list[str]:
    """Delete the step files an earlier pipeline dump left in `directory` (only names of the
    `NN-<pass>.txt/.dot/.svg/.diff` pattern fxopt writes; other files stay); their names."""
    removed = []
    for f in sorted(Path(directory).iterdir()):
        if f.is_file() and STEP_FILE.fullmatch(f.name):
            f.unlink()
            removed.append(f.name)
    return removed


def write_graph(
    gm: torch.fx.GraphModule,
    directory: str | Path,
    stem: str,
    *,
    title: str | None = None,
    collapse_threshold: int = DEFAULT_COLLAPSE_THRESHOLD,
    svg: bool = True,
    svg_timeout_s: float = DEFAULT_TIMEOUT_S,
) -> GraphFiles:
    """Write `<stem>.txt`, `<stem>.dot` and maybe `<stem>.svg` under `directory`."""
    directory = output_dir(directory)
    text = graph_listing(gm)
    listing = directory / f"{stem}.txt"
    listing.write_text((f"# {title}\n" if title else "") + text)
    dot = directory / f"{stem}.dot"
    dot.write_text(graph_dot(gm, title=title, collapse_threshold=collapse_threshold))
    svg_file, note = render_svg(dot, timeout_s=svg_timeout_s) if svg else (None, "svg skipped: disabled")
    nodes = len(gm.graph.nodes)
    return GraphFiles(listing, dot, svg_file, note, nodes, nodes > collapse_threshold, text)
