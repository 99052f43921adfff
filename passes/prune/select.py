"""Which channel classes to remove: a maximum-weight closure, solved exactly by a minimum cut.

Each class k (see `channel_graph`) gets a weight ``w_k(λ) = λ · macs_k / mean_macs − importance_k``:
the compute saved by removing it (less the adapters its removal adds, `importance.adapter_costs`)
against the (normalized) importance lost. Removal must be *closed* under the junction
precedence "y_c dead ⇒ every input of y has c dead" — a produced channel dies only if every
consumer drops it, and a residual-stream channel dies only if every block writing into it
drops it. Choosing the closed set of maximum total weight is the classic project-selection
problem, solved exactly by an s-t minimum cut (Picard 1976)::

    source ─w_k>0─▶ k ─(-w_k)>0─▶ sink       y ──∞──▶ x  for each precedence y ⇒ x
                                             x ──c──▶ y  adapter charge: x dies, y lives

The source side of the minimum cut is the set removed. `λ` is found by bisection so that the
removed producer channels meet `ratio` (per group for scope=local, over the model for
scope=global); ties are filled greedily with classes that keep the closure valid. Then each
producer slot is rounded to a multiple of `round_to` and keeps at least one channel.

The network falls apart into many small independent components (one channel of a residual
stage, one channel of a transformer stream), so `_Solver` solves each component exactly with
the cheapest method that fits it — its sign, a tree dynamic program, an enumeration of its few
closures, or a networkx minimum cut (Boykov-Kolmogorov) for the rest — batching components of
the same shape into numpy. Every method is checked against networkx and brute force in
tests/passes/prune/test_prune_select.py.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import networkx as nx
from networkx.algorithms.flow import boykov_kolmogorov
import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components


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
    #: producer channels the first solve removed, where it was solved again with the classes
    #: rounding would give back held (`prune_pass._rounded_in_advance`); None when it was not
    first_removed: int | None = None


def max_weight_closure(weights: dict, implies: list, forced_out: set | frozenset = frozenset(),
                       penalties: list = ()) -> tuple[set, float, list]:
    """The closed set of maximum weight: (chosen nodes, min-cut value, cut edges).

    `implies` holds pairs (u, v): choosing u requires choosing v. `forced_out` nodes can never be
    chosen (and so neither can anything that implies them). `penalties` holds (u, v, c): c ≥ 0
    is paid when u is chosen and v is not (a finite edge u → v in the cut network).
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
    for u, v, c in penalties:
        if u not in weights or v not in weights or c <= 0:
            continue
        if not g.has_edge(u, v):
            g.add_edge(u, v, capacity=float(c))
        elif "capacity" in g.edges[u, v]:  # an edge without capacity is a requirement: infinite
            g.edges[u, v]["capacity"] += float(c)
    source_side = _source_side(g)
    chosen = source_side - {"s"}
    cut = [(u, v) for u, v in g.edges if u in source_side and v not in source_side]
    value = sum(g.edges[e].get("capacity", float("inf")) for e in cut)
    return chosen, value, cut


def _source_side(g: nx.DiGraph) -> set:
    """The source side of a minimum s-t cut: what the source reaches in the residual network of
    a maximum flow. An edge counts as saturated when its residual is below a rounding error of
    the capacities (networkx's `minimum_cut` asks for `flow == capacity` exactly: float sums
    that miss by one ulp can leave the source reaching the sink, and its partition then holds
    neither side of a minimum cut)."""
    residual = boykov_kolmogorov(g, "s", "t")
    finite = [d["capacity"] for _, _, d in g.edges(data=True) if "capacity" in d]
    tol = 1e-9 * max(finite, default=1.0)
    seen, todo = {"s"}, ["s"]
    while todo:
        u = todo.pop()
        for v, d in residual.adj[u].items():
            if v not in seen and d["capacity"] - d["flow"] > tol:
                seen.add(v)
                todo.append(v)
    return seen


def brute_force_closure(weights: dict, implies: list, forced_out: set | frozenset = frozenset(),
                        penalties: list = ()) -> tuple[set, float]:
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
            w = sum(weights[n] for n in chosen) - sum(c for u, v, c in penalties if u in chosen and v not in chosen)
            if w > best_w + 1e-12:
                best, best_w = chosen, w
    return best, best_w


class _Solver:
    """Exact closure at a given λ over a subset of classes, fast enough to bisect on λ.

    Classes without precedence edges are decided by their sign (vectorized). The coupled ones
    split into connected components, and each is solved exactly by the cheapest method that
    fits it; components of the same structure are batched into one numpy computation:

    - *trees* (every class required by at most one other, e.g. one channel of a residual
      stream with the block outputs written into it): dynamic programming over the tree;
    - other small components: their valid closures are enumerated once (≤ `CAP`) and scored
      for every λ by one matrix product;
    - components that are trees but for a few classes required twice (an embedding shared by
      an encoder's and a decoder's stream): each dead/alive assignment of those few classes
      leaves a forest, solved by the tree program; the best assignment wins (conditioning);
    - the rest: a networkx minimum cut per component (`max_weight_closure`).

    `soft` holds adapter charges (x, y, c): c is paid when x dies and y (which requires x) lives.
    """

    CAP = 4096

    def __init__(self, macs: np.ndarray, imp: np.ndarray, prod: np.ndarray, blocked: np.ndarray,
                 precedence: set, members: np.ndarray, soft: dict | None = None) -> None:
        self.macs, self.imp, self.prod, self.blocked = macs, imp, prod, blocked
        self.members = members
        in_members = np.zeros(len(macs), dtype=bool)
        in_members[members] = True
        pairs = _pair_array(precedence)
        pairs = pairs[in_members[pairs[:, 0]] & in_members[pairs[:, 1]]]
        self._pairs = pairs
        self.edges = list(map(tuple, pairs.tolist()))
        self.soft = {e: c for e, c in (soft or {}).items() if in_members[e[0]] and in_members[e[1]]}
        touched = np.zeros(len(macs), dtype=bool)
        touched[pairs.reshape(-1)] = True
        self.coupled = np.nonzero(touched & in_members)[0]
        self.trivial = np.nonzero(~touched & in_members)[0]
        self.trees: list[tuple] = []
        self.enums: list[tuple] = []
        self.conditioned: list[_Conditioned] = []
        self.large: list[tuple] = []  # (classes, their requirements, blocked ones, soft charges)
        self._prepare_components()

    # ----- structure ------------------------------------------------------------------------
    def _prepare_components(self) -> None:
        n = len(self.coupled)
        if not n:
            return
        local = np.full(len(self.macs), -1, dtype=np.int64)
        local[self.coupled] = np.arange(n)
        e = local[self._pairs]  # (requirer, required) in local ids
        graph = sp.coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
        n_comps, labels = connected_components(graph, directed=True, connection="weak")
        order = np.argsort(labels, kind="stable")  # by component, ascending class id inside
        starts = np.searchsorted(labels[order], np.arange(n_comps + 1))
        # a component is a tree when it has one edge less than nodes and nobody has two requirers
        two_parents = np.bincount(e[:, 1], minlength=n) > 1
        is_tree = np.bincount(labels[e[:, 0]], minlength=n_comps) == np.diff(starts) - 1
        is_tree[labels[two_parents]] = False
        parent = np.full(n, -1, dtype=np.int64)
        parent[e[:, 1]] = e[:, 0]
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n) - starts[labels[order]]
        local_parent = np.where(parent >= 0, rank[np.maximum(parent, 0)], -1)
        pen = np.zeros(n)  # soft charge on the tree edge x -> parent(x)
        for (x, y), c in self.soft.items():
            if parent[local[x]] == local[y]:
                pen[local[x]] += c
        blocked = self.blocked[self.coupled]
        trees: dict[tuple, list] = {}
        others = []
        for ci in range(n_comps):
            seg = order[starts[ci]:starts[ci + 1]]
            if is_tree[ci]:
                trees.setdefault((local_parent[seg].tobytes(), blocked[seg].tobytes()), []).append(seg)
            else:
                others.append(self.coupled[seg].tolist())
        for segs in trees.values():
            segs = np.stack(segs)
            shape = tuple(local_parent[segs[0]].tolist())
            self.trees.append((self.coupled[segs], np.array(shape), _children_first(shape), blocked[segs[0]], pen[segs]))
        self._prepare_general(others)

    def _prepare_general(self, components: list[list[int]]) -> None:
        """Non-tree components: enumerate closures when few, else networkx."""
        requires: dict[int, list[int]] = {}
        for u, v in self.edges:
            requires.setdefault(u, []).append(v)
        enums: dict[tuple, list] = {}
        conditioned: dict[tuple, list] = {}
        closures: dict[tuple, np.ndarray | None] = {}
        structures: dict[tuple, _Conditioned | None] = {}
        for nodes in components:
            pos = {k: i for i, k in enumerate(nodes)}
            # sorted: components of one shape share a signature whatever order the pairs came in
            edges = tuple(sorted((pos[u], pos[v]) for u in nodes for v in requires.get(u, ())))
            sig = (len(nodes), edges, tuple(bool(self.blocked[k]) for k in nodes))
            if sig not in closures:
                closures[sig] = _closures(*sig, self.CAP)
            soft = [self.soft.get((nodes[x], nodes[y]), 0.0) for y, x in edges]
            if closures[sig] is not None:
                enums.setdefault(sig, []).append((nodes, np.array(soft)))
                continue
            if sig not in structures:
                structures[sig] = _Conditioned.build(*sig)
            if structures[sig] is not None:
                conditioned.setdefault(sig, []).append((nodes, soft))
            else:  # its own requirements and charges (one per requirement), for every λ tried
                self.large.append((nodes, [(nodes[y], nodes[x]) for y, x in edges],
                                   {k for k in nodes if self.blocked[k]},
                                   [(nodes[x], nodes[y], c) for (y, x), c in zip(edges, soft) if c]))
        for sig, items in conditioned.items():
            self.conditioned.append(structures[sig].batch(np.array([it[0] for it in items], dtype=np.int64),
                                                          np.array([it[1] for it in items], dtype=np.float64)))
        for sig, items in enums.items():
            valid, edges = closures[sig], sig[1]
            comps = np.array([it[0] for it in items], dtype=np.int64)
            # broken[e, m]: closure m removes the required class of edge e but keeps the requirer
            ys, xs = (np.array([e[i] for e in edges], dtype=np.int64) for i in (0, 1))
            broken = (valid[:, xs] & ~valid[:, ys]).T.astype(np.float64) if edges else np.zeros((0, len(valid)))
            soft = np.stack([it[1] for it in items]) if edges else np.zeros((len(items), 0))
            self.enums.append((comps, valid.astype(np.float64), soft, broken))

    # ----- solving --------------------------------------------------------------------------
    def weights(self, lam: float, idx: np.ndarray) -> np.ndarray:
        # A tiny bonus breaks ties toward removal for classes that cost nothing (free junctions).
        return lam * self.macs[idx] - self.imp[idx] + 1e-9 * (self.imp[idx] == 0)

    def solve(self, lam: float) -> np.ndarray:
        """The maximum-weight closure at `lam` (a dead mask over all classes)."""
        dead = np.zeros(len(self.macs), dtype=bool)
        if len(self.trivial):
            w = self.weights(lam, self.trivial)
            dead[self.trivial] = (w > 0) & ~self.blocked[self.trivial] & (self.prod[self.trivial] > 0)
        for comps, parent, order, blocked, pen in self.trees:
            w = self.weights(lam, comps.reshape(-1)).reshape(comps.shape)
            dead[comps] = _solve_trees(w, lam * pen, parent, order, blocked)[0]
        for comps, valid, soft, broken in self.enums:
            w = self.weights(lam, comps.reshape(-1)).reshape(comps.shape)
            score = w @ valid.T - lam * (soft @ broken)
            dead[comps] = valid[np.argmax(score, axis=1)].astype(bool)
        for cond in self.conditioned:
            dead[cond.comps] = cond.solve(self.weights(lam, cond.comps.reshape(-1)).reshape(cond.comps.shape), lam)
        for nodes, edges, forced_out, soft in self.large:
            weights = dict(zip(nodes, self.weights(lam, np.array(nodes, dtype=np.int64)).tolist()))
            chosen, _, _ = max_weight_closure(weights, edges, forced_out, [(x, y, lam * c) for x, y, c in soft])
            dead[list(chosen)] = True
        return dead

    def cut(self, lam: float, dead: np.ndarray) -> tuple[float, list]:
        """Value and edges of the minimum s-t cut that `dead` (an optimal closure) defines."""
        w = self.weights(lam, self.members)
        d = dead[self.members]
        members = self.members.tolist()
        gain = ~d & (w > 0) & ~self.blocked[self.members]  # a blocked class is tied to the sink
        edges = [("s", members[i]) for i in np.flatnonzero(gain)]
        edges += [(members[i], "t") for i in np.flatnonzero(d & (w < 0))]
        value = float(w[gain].sum() - w[d & (w < 0)].sum())
        for (x, y), c in self.soft.items():
            if dead[x] and not dead[y]:
                edges.append((x, y))
                value += lam * c
        return value, edges

    def count(self, dead: np.ndarray) -> int:
        return int(self.prod[dead].sum())


def _pair_array(pairs) -> np.ndarray:
    """Precedence pairs (a set or an array) as an int64 array of shape (m, 2)."""
    return np.asarray(pairs if isinstance(pairs, np.ndarray) else list(pairs), dtype=np.int64).reshape(-1, 2)


def _children_first(parent: tuple) -> list[int]:
    depth = [0] * len(parent)
    for v in range(len(parent)):
        p, d = parent[v], 0
        while p != -1:
            p, d = parent[p], d + 1
        depth[v] = d
    return sorted(range(len(parent)), key=lambda v: -depth[v])


def _solve_trees(w: np.ndarray, pen: np.ndarray, parent: np.ndarray, order: list[int],
                 blocked: np.ndarray, forced: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Closure DP on a batch of same-shaped forests (rows of `w`): a class dies with its whole
    subtree (`full`) or stays and lets each child decide (`free`); `pen[:, x]` is paid when x
    dies while its parent stays. `blocked` classes cannot die, `forced` ones must. Returns the
    dead mask and each row's total weight (-inf where `blocked` and `forced` contradict)."""
    full, free = w.copy(), np.zeros_like(w)
    if forced is not None:
        free[:, forced] = -np.inf
    for v in order:
        if blocked[v]:
            full[:, v] = -np.inf
        p = parent[v]
        if p >= 0:
            full[:, p] += full[:, v]
            free[:, p] += np.maximum(full[:, v] - pen[:, v], free[:, v])
    dead = np.zeros(w.shape, dtype=bool)
    for v in reversed(order):
        p = parent[v]
        own = full[:, v] - (pen[:, v] if p >= 0 else 0) > free[:, v]
        dead[:, v] = own | dead[:, p] if p >= 0 else own
    roots = np.asarray(parent) < 0
    return dead, np.maximum(full[:, roots], free[:, roots]).sum(axis=1)


@dataclass
class _Conditioned:
    """A component that is a forest once a few classes `cut` (each required by two or more)
    are decided: for each dead/alive assignment of them, the forest's requirements on them
    become classes that must stay (a requirer of a live one) or must die (required by a dead
    one), their adapter charges become weights, and the tree program solves the rest. Every
    assignment is scored for a whole batch of same-shaped components at once."""

    MAX_CUT = 4  # 16 assignments

    n: int
    edges: tuple          # (requirer, required) in local positions
    blocked: np.ndarray   # per local position
    cut: list[int]        # the conditioned positions
    forest: list[int]     # the others, in forest order
    parent: np.ndarray    # per forest index: its requirer's forest index, or -1
    order: list[int]
    comps: np.ndarray | None = None  # (components, n) class ids
    soft: np.ndarray | None = None   # (components, edges) adapter charge per edge

    @staticmethod
    def build(n: int, edges: tuple, blocked: tuple) -> "_Conditioned | None":
        requirers = np.bincount([x for _, x in edges], minlength=n)
        cut = np.flatnonzero(requirers > 1).tolist()
        if not cut or len(cut) > _Conditioned.MAX_CUT:
            return None
        forest = [v for v in range(n) if v not in set(cut)]
        index = {v: i for i, v in enumerate(forest)}
        parent = np.full(len(forest), -1, dtype=np.int64)
        for y, x in edges:
            if x in index and y in index:
                parent[index[x]] = index[y]
        if not _acyclic(parent):
            return None
        return _Conditioned(n, edges, np.array(blocked, dtype=bool), cut, forest, parent,
                            _children_first(tuple(parent.tolist())))

    def batch(self, comps: np.ndarray, soft: np.ndarray) -> "_Conditioned":
        return dataclasses.replace(self, comps=comps, soft=soft)

    def solve(self, w: np.ndarray, lam: float) -> np.ndarray:
        """The dead mask (components × n) of the best closure at weights `w`."""
        rows, forest = len(w), np.array(self.forest, dtype=np.int64)
        index = {v: i for i, v in enumerate(self.forest)}
        best_value = np.full(rows, -np.inf)
        best_dead = np.zeros((rows, self.n), dtype=bool)
        for bits in range(1 << len(self.cut)):
            state = {v: bool(bits >> i & 1) for i, v in enumerate(self.cut)}  # True: dead
            if any(state[v] and self.blocked[v] for v in self.cut):
                continue
            wf = w[:, forest].copy()
            pen = np.zeros_like(wf)
            value = sum((w[:, v] for v in self.cut if state[v]), np.zeros(rows))
            blocked, forced = self.blocked[forest].copy(), np.zeros(len(forest), dtype=bool)
            feasible = True
            for e, (y, x) in enumerate(self.edges):  # y requires x; charge when x dies, y lives
                c = lam * self.soft[:, e]
                if y in index and x in index:
                    pen[:, index[x]] += c
                elif y in index:  # a forest class requiring a decided one
                    if state[x]:
                        wf[:, index[y]] += c  # paid unless y dies too
                        value = value - c
                    else:
                        blocked[index[y]] = True
                elif x in index:  # a decided class requiring a forest one
                    if state[y]:
                        forced[index[x]] = True
                    else:
                        wf[:, index[x]] -= c
                elif state[y] and not state[x]:
                    feasible = False
                elif state[x] and not state[y]:
                    value = value - c
            if not feasible:
                continue
            dead, total = _solve_trees(wf, pen, self.parent, self.order, blocked, forced)
            value = value + total
            better = value > best_value
            best_value = np.where(better, value, best_value)
            best_dead[np.ix_(better, forest)] = dead[better]
            for v in self.cut:
                best_dead[better, v] = state[v]
        return best_dead


def _acyclic(parent: np.ndarray) -> bool:
    """Whether following `parent` from every node reaches a root."""
    for v in range(len(parent)):
        seen = 0
        while v >= 0 and seen <= len(parent):
            v, seen = parent[v], seen + 1
        if v >= 0:
            return False
    return True


def _closures(n: int, edges: tuple, blocked: tuple, cap: int) -> np.ndarray | None:
    """Every closed set of a small component as a bool matrix (closures × n), or None when the
    requirements have a cycle or there are more than `cap` closures."""
    if n > 62:
        return None
    requires = [0] * n
    indegree = [0] * n
    users: dict[int, list[int]] = {}
    for y, x in edges:
        requires[y] |= 1 << x
        indegree[y] += 1
        users.setdefault(x, []).append(y)
    ready = [v for v in range(n) if indegree[v] == 0]
    masks = np.zeros(1, dtype=np.int64)
    seen = 0
    while ready:  # requirements before requirers, so each closure is extended exactly once
        v = ready.pop()
        seen += 1
        for y in users.get(v, ()):
            indegree[y] -= 1
            if indegree[y] == 0:
                ready.append(y)
        if blocked[v]:
            continue
        ok = masks[(masks & requires[v]) == requires[v]]
        masks = np.concatenate([masks, ok | (1 << v)])
        if len(masks) > cap:
            return None
    if seen < n:
        return None
    return ((masks[:, None] >> np.arange(n)) & 1).astype(bool)


def select(macs: np.ndarray, imp: np.ndarray, prod: np.ndarray, blocked: np.ndarray, precedence: set,
           groups: list[set[int]], ratio: float, scope: str, soft: dict | None = None,
           counted: np.ndarray | None = None) -> Selection:
    """Choose dead classes; see the module docstring. Arrays are per class.

    `macs` and `imp` are already normalized; `prod` counts producer channels per class;
    `blocked` classes cannot die (pinned, graph outputs, ignored layers); `soft` maps a
    precedence pair (x, y) to the adapter charge paid when x dies and y lives; `counted` marks
    the classes the ratio is taken of (default: those not blocked).
    """
    n = len(macs)
    dead = np.zeros(n, dtype=bool)
    lams, cut_value, cut_edges = {}, 0.0, []
    eligible_prod = np.where(~blocked if counted is None else counted, prod, 0)
    if scope == "global":
        parts = [np.arange(n)]
    else:
        parts = [np.array(sorted(g), dtype=np.int64) for g in groups]
    part_of = np.full(n, -1, dtype=np.int64)
    for gi, members in enumerate(parts):
        part_of[members] = gi
    # split the precedence and the soft charges by part once (a part holds both ends of each)
    pairs = _pair_array(precedence)
    pairs = pairs[np.argsort(part_of[pairs[:, 0]], kind="stable")]
    cuts = np.searchsorted(part_of[pairs[:, 0]], np.arange(len(parts) + 1))
    soft_parts: dict[int, dict] = {}
    for (x, y), c in (soft or {}).items():
        soft_parts.setdefault(int(part_of[x]), {})[(x, y)] = c
    target_total = 0
    for gi, members in enumerate(parts):
        target = int(np.floor(ratio * eligible_prod[members].sum() + 1e-9))
        if target <= 0:
            continue
        target_total += target
        solver = _Solver(macs, imp, prod, blocked, pairs[cuts[gi]:cuts[gi + 1]], members, soft_parts.get(gi))
        part_dead, lam = _bisect(solver, target)
        value, edges = solver.cut(lam, part_dead)
        part_dead = _fill(solver, part_dead, target, lam, precedence)
        dead |= part_dead
        lams[gi] = lam
        cut_value += value
        cut_edges.extend(edges)
    return Selection(dead, lams, target_total, int(prod[dead].sum()), int(eligible_prod.sum()), cut_value, cut_edges)


def _bisect(solver: _Solver, target: int) -> tuple[np.ndarray, float]:
    lo, hi = 0.0, 1.0
    dead_lo = solver.solve(1e-12)
    if solver.count(dead_lo) >= target:
        return dead_lo, 1e-12
    m = solver.members
    reachable = int(solver.prod[m][~solver.blocked[m]].sum())
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
    """Add single classes (best weight first) whose removal keeps the closure valid — never one
    whose adapters cost more compute than it saves (net MACs < 0): `ratio` is then not met."""
    need = target - solver.count(dead)
    if need <= 0:
        return dead
    requires: dict[int, list[int]] = {}
    for u, v in precedence:
        requires.setdefault(u, []).append(v)
    charged = np.zeros(len(dead))  # soft adapter charges a class pays if it dies alone now
    for (x, y), c in solver.soft.items():
        if not dead[y]:
            charged[x] += c
    net = solver.macs - charged
    cand = [k for k in solver.members.tolist()
            if not dead[k] and not solver.blocked[k] and solver.prod[k] > 0 and net[k] >= 0]
    idx = np.array(cand, dtype=np.int64)
    w = solver.weights(lam, idx) - lam * charged[idx] if cand else np.array([])
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


def required_by(precedence: set) -> dict[int, list[int]]:
    """For each class, the classes whose removal requires its removal (`revive`'s index)."""
    index: dict[int, list[int]] = {}
    for u, v in precedence:
        index.setdefault(v, []).append(u)
    return index


def revive(dead: np.ndarray, classes, precedence: set | dict[int, list[int]]) -> None:
    """Bring classes back, and every class whose removal required them. `precedence`: the pairs,
    or their `required_by` index (a caller reviving many times builds it once)."""
    index = precedence if isinstance(precedence, dict) else required_by(precedence)
    stack = [k for k in classes if dead[k]]
    while stack:
        k = stack.pop()
        if not dead[k]:
            continue
        dead[k] = False
        stack.extend(u for u in index.get(k, ()) if dead[u])
