"""index.html pages: one for a single graph, one linking every step of a pipeline.

Plain HTML with relative links, no scripts, so a dump folder can be zipped, mailed or served
as is.

    >>> page("demo", ["<p>hello</p>"]).startswith("<!doctype html>")
    True
    >>> link("a b.txt", "listing")
    '<a href="a%20b.txt">listing</a>'
"""
from __future__ import annotations

from collections import Counter
from html import escape
from pathlib import Path
from typing import Iterable
from urllib.parse import quote

import torch.fx

from .files import GraphFiles

_STYLE = """
body { font-family: Helvetica, Arial, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.fail { color: #b00020; font-weight: bold; } .pass { color: #1b7f2a; } .note { color: #777; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; }
"""


def page(title: str, body: Iterable[str]) -> str:
    """A complete HTML page with `body` fragments (already escaped)."""
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{_STYLE}</style></head>\n<body>\n<h1>{escape(title)}</h1>\n"
            + "\n".join(body) + "\n</body></html>\n")


def link(path: str | Path, text: str) -> str:
    """A relative link to a file in the same folder."""
    return f'<a href="{quote(Path(path).name)}">{escape(text)}</a>'


def file_links(files: GraphFiles) -> list[str]:
    """Links to the listing, DOT and SVG of one graph (or the note saying why there is no SVG)."""
    links = [link(files.listing, "listing"), link(files.dot, "dot")]
    links.append(link(files.svg, "svg") if files.svg else f'<span class="note">{escape(files.svg_note)}</span>')
    return links


def graph_page(gm: torch.fx.GraphModule, files: GraphFiles, title: str) -> str:
    """The index of a single-graph dump: files, node counts by op, the drawing when there is one."""
    ops = Counter(n.op for n in gm.graph.nodes)
    rows = "".join(f"<tr><td>{escape(op)}</td><td class=\"num\">{c}</td></tr>" for op, c in ops.most_common())
    body = [
        f"<p>{' | '.join(file_links(files))}</p>",
        f"<p>{files.nodes} nodes" + (", drawn collapsed by module scope" if files.collapsed else "") + "</p>",
        f"<table><tr><th>op</th><th>nodes</th></tr>{rows}</table>",
    ]
    if files.svg:
        body.append(f'<p><a href="{quote(files.svg.name)}"><img src="{quote(files.svg.name)}" '
                    'style="max-width: 100%" alt="graph drawing"></a></p>')
    return page(title, body)


def verdict(summary: str) -> str:
    """A verification summary line, coloured by PASS/FAIL."""
    cls = "pass" if summary.startswith("PASS") else "fail" if summary.startswith("FAIL") else "note"
    return f'<span class="{cls}">{escape(summary)}</span>'
