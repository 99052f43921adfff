"""Graphviz DOT text for a graph: one box per node, or one box per module scope when big.

Each box shows the node name, op and target, shape/dtype, and the node's annotations
(`node.meta["fxopt.annotations"]`). Two annotations change the drawing:

- `group`: boxes are filled with a colour per group (fusion clusters; a prune plan's
  `prune.group` too);
- `cut`: names (or nodes) of inputs whose edge into this node is cut; those edges are drawn
  red and dashed (a partitioning boundary; a prune plan's `prune.cut_from`, the channel slot
  its re-expansion cut starts from, ``'transpose:2'``: node `transpose`, axis 2).

Past `collapse_threshold` nodes the drawing collapses by module scope (see `scopes`): one box
per scope with its node count and most frequent ops, edges labelled with how many values
cross. Either way the text is built in one pass over the graph, so thousands of nodes take
milliseconds; Graphviz stays usable because it never sees more than a few hundred boxes.

    >>> import torch, fxopt
    >>> from fxopt.debug import annotate
    >>> gm = fxopt.capture(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), (torch.randn(2, 4),))
    >>> annotate(list(gm.graph.nodes)[2], "cut", ["_0"])
    >>> text = graph_dot(gm, title="demo")
    >>> "f32[2, 4]" in text, "color=red, style=dashed" in text
    (True, True)
    >>> "(4 nodes, collapsed by module scope)" in graph_dot(gm, collapse_threshold=2)
    True
"""
from __future__ import annotations

import zlib
from collections import Counter
from typing import Any

import torch.fx

from .listing import ANNOTATIONS, note_text, subgraph_of, target_text, type_text
from .scopes import collapse_scopes, node_scopes

DEFAULT_COLLAPSE_THRESHOLD = 1500
MAX_GROUPS = 400
_NOTE_CHARS = 60

_OP_FILL = {"placeholder": "#cfe8ff", "output": "#e0e0e0", "get_attr": "#fff4c2"}
_GROUP_FILL = (
    "#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5",
    "#bc80bd", "#ccebc5", "#ffed6f", "#d9d9d9",
)
_HEADER = ('  graph [rankdir=TB, fontname="Helvetica", fontsize=11];\n'
           '  node [shape=box, style="rounded,filled", fillcolor=white, fontname="Helvetica", fontsize=10];\n'
           '  edge [color="#555555", arrowsize=0.6];\n')


def graph_dot(gm: torch.fx.GraphModule, *, title: str | None = None,
              collapse_threshold: int = DEFAULT_COLLAPSE_THRESHOLD) -> str:
    """DOT text for `gm`: per node, or collapsed by scope past `collapse_threshold` nodes."""
    if len(gm.graph.nodes) > collapse_threshold:
        return collapsed_dot(gm, title=title)
    return full_dot(gm, title=title)


def full_dot(gm: torch.fx.GraphModule, *, title: str | None = None) -> str:
    """One box per node, one edge per producer/consumer pair; a subgraph an export graph runs (a
    `torch.cond` branch, a `no_grad` region) is a dashed cluster of its own nodes, drawn from
    the `get_attr` box that reads it."""
    parts = [_open(title)]
    _boxes(gm, "n", "  ", parts)
    parts.append("}\n")
    return "".join(parts)


def _boxes(gm: torch.fx.GraphModule, prefix: str, indent: str, parts: list[str]) -> str | None:
    """Append the boxes and edges of `gm`'s nodes (ids `prefix` + index); returns the first id."""
    ids: dict[torch.fx.Node, str] = {}
    for i, node in enumerate(gm.graph.nodes):
        nid = ids[node] = f"{prefix}{i}"
        parts.append(f"{indent}{nid} [{_node_attrs(node.name, node)}];\n")
        cut = _cut_names(node.meta.get(ANNOTATIONS) or {})
        for src in node.all_input_nodes:
            attrs = " [color=red, style=dashed, penwidth=1.5]" if src.name in cut else ""
            parts.append(f"{indent}{ids[src]} -> {nid}{attrs};\n")
        sub = subgraph_of(gm, node)
        if sub is not None:
            parts.append(f'{indent}subgraph cluster_{nid} {{\n{indent}  label="{_escape(str(node.target))}"; '
                         "style=dashed;\n")
            first = _boxes(sub, f"{nid}_", indent + "  ", parts)
            parts.append(f"{indent}}}\n")
            if first is not None:
                parts.append(f"{indent}{nid} -> {first} [style=dotted];\n")
    return next(iter(ids.values()), None)


def collapsed_dot(gm: torch.fx.GraphModule, *, title: str | None = None, max_groups: int = MAX_GROUPS) -> str:
    """One box per module scope (node count, top ops), edges labelled with value counts."""
    nodes = list(gm.graph.nodes)
    scopes = collapse_scopes(node_scopes(gm.graph), max_groups)
    scope_of = dict(zip(nodes, scopes))
    members: dict[str, list[torch.fx.Node]] = {}
    edges: Counter[tuple[str, str]] = Counter()
    cut_edges: Counter[tuple[str, str]] = Counter()
    for node, scope in zip(nodes, scopes):
        members.setdefault(scope, []).append(node)
        cut = _cut_names(node.meta.get(ANNOTATIONS) or {})
        for src in node.all_input_nodes:
            key = (scope_of[src], scope)
            if key[0] != key[1]:
                edges[key] += 1
                if src.name in cut:
                    cut_edges[key] += 1
    ids = {scope: f"s{i}" for i, scope in enumerate(members)}
    parts = [_open(f"{title or 'graph'} ({len(nodes)} nodes, collapsed by module scope)")]
    for scope, group in members.items():
        parts.append(f"  {ids[scope]} [{_scope_attrs(scope, group)}];\n")
    for (a, b), count in edges.items():
        cuts = cut_edges[(a, b)]
        label = f"{count}" + (f" ({cuts} cut)" if cuts else "")
        style = ", color=red, style=dashed" if cuts else ""
        parts.append(f'  {ids[a]} -> {ids[b]} [label="{label}"{style}];\n')
    parts.append("}\n")
    return "".join(parts)


def _node_attrs(heading: str, node: torch.fx.Node) -> str:
    lines = [heading, f"{node.op} {target_text(node)}" if node.op not in _OP_FILL else node.op]
    typ = type_text(node)
    if typ:
        lines.append(typ)
    notes = node.meta.get(ANNOTATIONS) or {}
    lines.extend(f"{k}: {_clip(note_text(v))}" for k, v in notes.items())
    group = _group(notes)
    fill = group_color(group) if group is not None else _OP_FILL.get(node.op)
    return f'label="{_label(lines)}"' + (f', fillcolor="{fill}"' if fill else "")


def _scope_attrs(scope: str, group: list[torch.fx.Node]) -> str:
    if len(group) == 1:
        return _node_attrs(scope, group[0])
    ops = Counter(target_text(n) if n.op not in _OP_FILL else n.op for n in group)
    lines = [scope, f"{len(group)} nodes"] + [f"{op} x{c}" for op, c in ops.most_common(3)]
    groups = {str(g) for n in group if (g := _group(n.meta.get(ANNOTATIONS) or {})) is not None}
    annotated = sum(1 for n in group if n.meta.get(ANNOTATIONS))
    if annotated:
        lines.append(f"{annotated} annotated" + (f", groups {_clip(', '.join(sorted(groups)))}" if groups else ""))
    fill = group_color(next(iter(groups))) if len(groups) == 1 else _OP_FILL.get(group[0].op)
    return f'label="{_label(lines)}"' + (f', fillcolor="{fill}"' if fill else "")


def group_color(group: Any) -> str:
    """A stable fill colour for a group id (ints cycle the palette; other ids are hashed)."""
    index = group if isinstance(group, int) else zlib.crc32(str(group).encode())
    return _GROUP_FILL[index % len(_GROUP_FILL)]


def _group(notes: dict) -> Any:
    """The group a node's annotations put it in (`group`, or a prune plan's `prune.group`), or None."""
    return notes["group"] if notes.get("group") is not None else notes.get("prune.group")


def _cut_names(notes: dict) -> set[str]:
    """Names of the inputs whose edge into the node is cut: `cut`, and the node of a prune
    plan's `prune.cut_from` slot (``'transpose:2'``, or ``'pin:gru'`` for a pinned node)."""
    names = _names(notes.get("cut"))
    for slot in _names(notes.get("prune.cut_from")):
        kind, _, rest = slot.partition(":")
        names.add(rest if kind in ("pin", "use") else kind)
    return names


def _names(value: Any) -> set[str]:
    if value is None:
        return set()
    items = [value] if isinstance(value, (str, torch.fx.Node)) else value
    return {c.name if isinstance(c, torch.fx.Node) else str(c) for c in items}


def _open(title: str | None) -> str:
    head = "digraph fxopt {\n" + _HEADER
    if title:
        head += f'  label="{_escape(title)}"; labelloc=t;\n'
    return head


def _label(lines: list[str]) -> str:
    return "\\n".join(_escape(line) for line in lines)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def _clip(text: str) -> str:
    return text if len(text) <= _NOTE_CHARS else text[: _NOTE_CHARS - 3] + "..."
