"""Which channel classes to remove: a maximum-weight closure, solved exactly by a minimum cut.

Each class k (see `channel_graph`) gets a weight ``w_k(λ) = λ · macs_k / mean_macs − importance_k``:
the compute saved by removing it against the (normalized) importance lost. Removal must be
*closed* under the junction precedence "y_c dead ⇒ every input of y has c dead" — a produced
channel dies only if every consumer drops it, and a residual-stream channel dies only if every
block writing into it drops it. Choosing the closed set of maximum total weight is the classic
project-selection problem, solved exactly by one s-t minimum cut (Picard 1976)::

    source ─w_k>0─▶ k ─(-w_k)>0─▶ sink       y ──∞──▶ x  for each precedence y ⇒ x

The source side of the minimum cut is the set removed. `λ` is found by bisection so that the
removed producer channels meet `ratio` (per group for scope=local, over the model for
scope=global); ties are filled greedily with classes that keep the closure valid. Then each
producer slot is rounded to a multiple of `round_to` and keeps at least one channel.

Classes not touched by any precedence edge form trivial closures (remove iff w_k > 0); only the
coupled part goes through networkx.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import networkx as nx
import numpy as np


@dataclass
class Selection:
    """The decision: `dead[k]` per class, how it was reached, and the last cut."""

    dead: np.ndarray
    lam: dict
    target: int
    removed: int
    total: int
    cut_value: float = 0.0
    cut_edges: list = field(default_factory=list)


def max_weight_closure(weights: dict, implies: list, forced_out: set | frozenset = frozenset()) -> tuple[set, float, list]:
    """The closed set of maximum weight: (chosen nodes, min-cut value, cut edges).

    `implies` holds pairs (u, v): choosing u requires choosing v. `forced_out` nodes can never be
    chosen (and so neither can anything that implies them).
    """
    g = nx.DiGraph()
    g.add_node("s")
    g.add_node("t")
    for n, w in weights.items():
        g.add_node(n)
        if n in forced_out:
            g.add_edge(n, "t")  # no capacity attribute: infinite
        elif w > 0:
            g.add_edge("s", n, capacity=float(w))
        elif w < 0:
            g.add_edge(n, "t", capacity=float(-w))
    for u, v in implies:
        if u in weights and v in weights:
            g.add_edge(u, v)
    value, (source_side, _) = nx.minimum_cut(g, "s", "t")
    chosen = set(source_side) - {"s"}
    cut = [(u, v) for u, v in g.edges if (u in source_side) != (v in source_side) and u in source_side]
    return chosen, value, cut


def brute_force_closure(weights: dict, implies: list, forced_out: set | frozenset = frozenset()) -> tuple[set, float]:
    """Reference answer by enumeration (small graphs only; used by the tests)."""
    nodes = sorted(weights)
    best, best_w = set(), 0.0
    for r in range(len(nodes) + 1):
        for combo in itertools.combinations(nodes, r):
            chosen = set(combo)
            if chosen & set(forced_out):
                continue
            if any(u in chosen and v not in chosen for u, v in implies):
                continue
            w = sum(weights[n] for n in chosen)
            if w > best_w + 1e-12:
                best, best_w = chosen, w
    return best, best_w


class _Solver:
    """Closure at a given λ over a subset of classes.

    Trivial classes (no precedence) are vectorized. Coupled classes split into connected
    components; small ones (≤ 12 classes, e.g. one channel of a residual stage) are grouped by
    structure and solved for every λ at once by scoring their few valid closures, which keeps
    the λ bisection fast. The final decision at the chosen λ is always one networkx minimum cut
    over every coupled class (`solve(lam, final=True)`), checked against the fast answer.
    """

    SMALL = 12

    def __init__(self, macs, imp, prod, blocked, precedence, members: np.ndarray) -> None:
        self.macs, self.imp, self.prod, self.blocked = macs, imp, prod, blocked
        self.members = members
        mset = set(members.tolist())
        self.edges = [(u, v) for u, v in precedence if u in mset and v in mset]
        touched = set(itertools.chain.from_iterable(self.edges))
        self.coupled = np.array(sorted(touched), dtype=np.int64)
        self.trivial = np.array([m for m in members.tolist() if m not in touched], dtype=np.int64)
        self.last_cut = (0.0, [])
        self._prepare_components()

    def _prepare_components(self) -> None:
        g = nx.Graph()
        g.add_nodes_from(self.coupled.tolist())
        g.add_edges_from(self.edges)
        out_edges: dict[int, list[int]] = {}
        for u, v in self.edges:
            out_edges.setdefault(u, []).append(v)
        batches: dict[tuple, list[list[int]]] = {}
        self.large: list[list[int]] = []
        for comp in nx.connected_components(g):
            nodes = sorted(comp)
            if len(nodes) > self.SMALL:
                self.large.append(nodes)
                continue
            local = {n: i for i, n in enumerate(nodes)}
            edges = tuple(sorted((local[u], local[v]) for u in nodes for v in out_edges.get(u, ())))
            sig = (len(nodes), edges, tuple(bool(self.blocked[n]) for n in nodes))
            batches.setdefault(sig, []).append(nodes)
        self.batches = []
        for (n, edges, blocked), comps in batches.items():
            masks = np.arange(1 << n)
            bits = ((masks[:, None] >> np.arange(n)) & 1).astype(bool)
            ok = np.ones(len(masks), dtype=bool)
            for u, v in edges:
                ok &= ~(bits[:, u] & ~bits[:, v])
            for i, b in enumerate(blocked):
                if b:
                    ok &= ~bits[:, i]
            self.batches.append((np.array(comps, dtype=np.int64), bits[ok].astype(np.float64)))

    def weights(self, lam: float, idx: np.ndarray) -> np.ndarray:
        # A tiny bonus breaks ties toward removal for classes that cost nothing (free junctions).
        return lam * self.macs[idx] - self.imp[idx] + 1e-9 * (self.imp[idx] == 0)

    def solve(self, lam: float, final: bool = False) -> np.ndarray:
        dead = np.zeros(len(self.macs), dtype=bool)
        if len(self.trivial):
            w = self.weights(lam, self.trivial)
            dead[self.trivial] = (w > 0) & ~self.blocked[self.trivial] & (self.prod[self.trivial] > 0)
        if not len(self.coupled):
            return dead
        if final:
            w = self.weights(lam, self.coupled)
            weights = dict(zip(self.coupled.tolist(), w.tolist()))
            forced = {k for k in weights if self.blocked[k]}
            chosen, value, cut = max_weight_closure(weights, self.edges, forced)
            self.last_cut = (value, cut)
            dead[list(chosen)] = True
            return dead
        for comps, valid in self.batches:
            w = self.weights(lam, comps.reshape(-1)).reshape(comps.shape)
            best = valid[np.argmax(w @ valid.T, axis=1)].astype(bool)
            dead[comps[best]] = True
        for nodes in self.large:
            idx = np.array(nodes, dtype=np.int64)
            weights = dict(zip(nodes, self.weights(lam, idx).tolist()))
            chosen, _, _ = max_weight_closure(weights, self.edges, {k for k in nodes if self.blocked[k]})
            dead[list(chosen)] = True
        return dead

    def count(self, dead: np.ndarray) -> int:
        return int(self.prod[dead].sum())


def select(macs: np.ndarray, imp: np.ndarray, prod: np.ndarray, blocked: np.ndarray, precedence: set,
           groups: list[set[int]], ratio: float, scope: str) -> Selection:
    """Choose dead classes; see the module docstring. Arrays are per class.

    `macs` and `imp` are already normalized; `prod` counts producer channels per class;
    `blocked` classes cannot die (pinned, graph outputs, ignored layers).
    """
    n = len(macs)
    dead = np.zeros(n, dtype=bool)
    lams, cut_value, cut_edges = {}, 0.0, []
    eligible_prod = np.where(blocked, 0, prod)
    if scope == "global":
        parts = [np.arange(n)]
    else:
        parts = [np.array(sorted(g), dtype=np.int64) for g in groups]
    target_total = 0
    for gi, members in enumerate(parts):
        target = int(np.floor(ratio * eligible_prod[members].sum() + 1e-9))
        if target <= 0:
            continue
        target_total += target
        solver = _Solver(macs, imp, prod, blocked, precedence, members)
        part_dead, lam = _bisect(solver, target)
        if len(solver.coupled):  # the decision itself: one networkx minimum cut at the chosen λ
            exact = solver.solve(lam, final=True)
            w_fast = solver.weights(lam, np.nonzero(part_dead)[0]).sum()
            w_cut = solver.weights(lam, np.nonzero(exact)[0]).sum()
            if w_cut >= w_fast - 1e-6 * max(1.0, abs(w_fast)):
                part_dead = exact
        part_dead = _fill(solver, part_dead, target, lam, precedence)
        dead |= part_dead
        lams[gi] = lam
        if solver.last_cut[1]:
            cut_value += solver.last_cut[0]
            cut_edges.extend(solver.last_cut[1])
    return Selection(dead, lams, target_total, int(prod[dead].sum()), int(eligible_prod.sum()), cut_value, cut_edges)


def _bisect(solver: _Solver, target: int) -> tuple[np.ndarray, float]:
    lo, hi = 0.0, 1.0
    dead_lo = solver.solve(1e-12)
    if solver.count(dead_lo) >= target:
        return dead_lo, 1e-12
    reachable = int(solver.prod[~solver.blocked[np.arange(len(solver.prod))] & (solver.prod > 0)].sum())
    last = -1
    for _ in range(60):
        dead_hi = solver.solve(hi)
        c = solver.count(dead_hi)
        if c >= target:
            break
        if c == last and c < reachable and hi > 1e6:
            return dead_hi, hi  # the rest is held by precedence on pinned classes
        last = c
        lo, dead_lo, hi = hi, dead_hi, hi * 4
    else:
        return dead_hi, hi
    for _ in range(50):
        mid = (lo + hi) / 2
        d = solver.solve(mid)
        c = solver.count(d)
        if c == target:
            return d, mid
        if c < target:
            lo, dead_lo = mid, d
        else:
            hi = mid
        if hi - lo < 1e-9 * max(hi, 1e-12):
            break
    return dead_lo, hi


def _fill(solver: _Solver, dead: np.ndarray, target: int, lam: float, precedence: set) -> np.ndarray:
    """Add single classes (best weight first) whose removal keeps the closure valid."""
    need = target - solver.count(dead)
    if need <= 0:
        return dead
    requires: dict[int, list[int]] = {}
    for u, v in precedence:
        requires.setdefault(u, []).append(v)
    cand = [k for k in solver.members.tolist()
            if not dead[k] and not solver.blocked[k] and solver.prod[k] > 0]
    w = solver.weights(lam, np.array(cand, dtype=np.int64)) if cand else np.array([])
    for idx in np.argsort(-w, kind="stable"):
        k = cand[idx]
        if all(dead[v] for v in requires.get(k, ())):
            dead[k] = True
            need -= int(solver.prod[k])
            if need <= 0:
                break
    return dead


def close_free_junctions(dead: np.ndarray, prod: np.ndarray, blocked: np.ndarray, precedence: set) -> np.ndarray:
    """Mark classes without producers dead when everything they require is dead."""
    requires: dict[int, list[int]] = {}
    for u, v in precedence:
        requires.setdefault(u, []).append(v)
    changed = True
    while changed:
        changed = False
        for u, vs in requires.items():
            if not dead[u] and prod[u] == 0 and not blocked[u] and all(dead[v] for v in vs):
                dead[u] = True
                changed = True
    return dead


def revive(dead: np.ndarray, classes, precedence: set) -> None:
    """Bring classes back, and every class whose removal required them."""
    required_by: dict[int, list[int]] = {}
    for u, v in precedence:
        required_by.setdefault(v, []).append(u)
    stack = [k for k in classes if dead[k]]
    while stack:
        k = stack.pop()
        if not dead[k]:
            continue
        dead[k] = False
        stack.extend(u for u in required_by.get(k, ()) if dead[u])
