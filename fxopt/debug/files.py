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
from typing import Iterable

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


#: The list of the step files the last pipeline dump into a folder wrote, one name a line.
MANIFEST = ".fxopt-dump-steps"


def remove_stale_steps(directory: str | Path) -> list[str]:
    """Delete the step files the last pipeline dump wrote in `directory`, as its manifest
    (`MANIFEST`) lists them; their names. A file fxopt did not write stays, whatever its name
    (`01-notes.txt` too): a folder without a manifest loses nothing."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return []
    removed = []
    for name in manifest.read_text(encoding="utf-8").splitlines():
        path = directory / name
        if STEP_FILE.fullmatch(name) and path.is_file():  # a name, never a path out of the folder
            path.unlink()
            removed.append(name)
    manifest.unlink()
    return removed


def record_step_files(directory: str | Path, paths: Iterable[Path | None]) -> None:
    """Add the files a pipeline dump just wrote to the folder's manifest (`remove_stale_steps`)."""
    names = [Path(p).name for p in paths if p is not None]
    with open(Path(directory) / MANIFEST, "a", encoding="utf-8") as manifest:
        manifest.writelines(f"{name}\n" for name in names)


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
