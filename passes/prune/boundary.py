"""Where pruned channels are re-expanded to full width: a minimum cut over the slot graph.

Once classes are chosen, most values simply get narrower. Some readers cannot shrink: an op
without a rule, an exact layer/group norm (which then gathers its own output), an ignored
layer. Rather than giving up every class that reaches such a reader (what all-or-nothing
grouping does), fxopt re-expands the value — an index_select from ``cat([x, zeros])`` that
puts zeros back in the removed channels — exactly where it is cheapest. Each slot holding
removed channels is *reduced* (source side) or *full* (sink side); moving between the two
costs one adapter of the value's size:

    source ─∞─▶ slots that must be reduced (producers, norms, params, softmax)
    source ─∞─▶ use:conv ──bytes(x)──▶ x       (a shrinking consumer that would need a gather)
    x ──bytes(x)──▶ pin:op ─∞─▶ sink           (a pinned reader needs full width)
    u ⇄ v with bytes(u)                         (a passthrough op between two slots)

Example: ``conv → bn → relu → maxpool(2) → unknown_op`` re-expands after the pool (a quarter of
the bytes of the conv output), not at the conv.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from .channel_model import ChannelGraph

MUST_REDUCE = frozenset({"softmax"})


@dataclass
class Boundary:
    """`full`: slot ids kept at full width; `cut_edges`: (from, to) labels where adapters go."""

    full: set = field(default_factory=set)
    cut_edges: list = field(default_factory=list)
    cut_value: float = 0.0


def plan_boundaries(cg: ChannelGraph, dead: np.ndarray, ignored: set[str]) -> Boundary:
    has_dead = {s.id for s in cg.slots if dead[cg.positions(s.id)].any()}
    if not has_dead:
        return Boundary()
    g = nx.DiGraph()
    g.add_nodes_from(["s", "t"])
    any_pin = False

    def label(sid: int) -> str:
        return cg.slots[sid].label

    for sid in has_dead:
        g.add_node(label(sid))
    for name, rule in cg.rules.items():
        pinned = rule.category == "pinned" or name in ignored
        if pinned or rule.category == "gather":  # reads at full width
            for src, sid in rule.consumed + [(r[0], r[1]) for r in rule.inputs]:
                if sid in has_dead:
                    pin = f"pin:{name}"
                    g.add_edge(pin, "t")
                    _add_cap(g, label(sid), pin, cg.slots[sid].bytes)
                    any_pin = True
            if pinned:
                continue
        for sid in rule.outputs:
            if sid in has_dead and (rule.category in ("producer", "param", "norm", "gather")
                                    or rule.kind in MUST_REDUCE):
                g.add_edge("s", label(sid))
        for src, sid in rule.consumed:
            if sid in has_dead:
                use = f"use:{name}"
                g.add_edge("s", use)
                _add_cap(g, use, label(sid), cg.slots[sid].bytes)
        for src, sid, _, _, out in rule.inputs:
            if sid in has_dead and out in has_dead:
                b = cg.slots[sid].bytes
                _add_cap(g, label(sid), label(out), b)
                _add_cap(g, label(out), label(sid), b)
    if not any_pin:
        return Boundary()
    value, (source_side, sink_side) = nx.minimum_cut(g, "s", "t")
    full = {sid for sid in has_dead if label(sid) in sink_side}
    cut = [(u, v) for u, v in g.edges if u in source_side and v in sink_side and "capacity" in g.edges[u, v]]
    return Boundary(full, cut, float(value))


def _add_cap(g: nx.DiGraph, u: str, v: str, cap: float) -> None:
    if g.has_edge(u, v) and "capacity" in g.edges[u, v]:
        g.edges[u, v]["capacity"] += float(cap)
    elif not g.has_edge(u, v):
        g.add_edge(u, v, capacity=float(cap))
