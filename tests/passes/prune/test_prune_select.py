"""The selection is a maximum-weight closure solved by min cut: check it against brute force."""
import random

import numpy as np
import pytest

from fxopt.passes.prune.select import _Solver, brute_force_closure, max_weight_closure, select


def _random_problem(seed, n=9):
    rng = random.Random(seed)
    weights = {i: rng.uniform(-3, 3) for i in range(n)}
    implies = [(rng.randrange(n), rng.randrange(n)) for _ in range(rng.randrange(2 * n))]
    implies = [(u, v) for u, v in implies if u != v]
    forced = {i for i in range(n) if rng.random() < 0.1}
    return weights, implies, forced


@pytest.mark.parametrize("seed", range(40))
def test_min_cut_closure_matches_brute_force(seed):
    weights, implies, forced = _random_problem(seed)
    chosen, cut_value, _ = max_weight_closure(weights, implies, forced)
    best, best_w = brute_force_closure(weights, implies, forced)
    assert all(v in chosen for u, v in implies if u in chosen), "closed"
    assert not chosen & forced
    assert sum(weights[k] for k in chosen) == pytest.approx(best_w, abs=1e-9)
    # max-flow/min-cut duality: closure weight = positive weights - cut
    positive = sum(w for k, w in weights.items() if w > 0 and k not in forced)
    free_forced = sum(w for k, w in weights.items() if w > 0 and k in forced)
    assert cut_value >= positive - best_w - 1e-9 - 0 * free_forced


def test_producer_dies_only_if_every_consumer_drops_it():
    # y (a residual channel, worth 5 in MACs) requires both writers a and b to die.
    weights = {"y": 5.0, "a": -2.0, "b": -4.0}
    implies = [("y", "a"), ("y", "b")]
    chosen, _, _ = max_weight_closure(weights, implies)
    assert chosen == set()  # 5 - 2 - 4 < 0: keep everything
    weights["y"] = 7.0
    chosen, _, _ = max_weight_closure(weights, implies)
    assert chosen == {"y", "a", "b"}
    chosen, _, _ = max_weight_closure(weights, implies, forced_out={"b"})
    assert chosen == set()


def _residual_like(seed, n=30, soft_weight=0.0):
    rng = np.random.default_rng(seed)
    macs, imp = rng.uniform(0, 2, n), rng.uniform(0, 2, n)
    prod = np.ones(n, dtype=np.int64)
    blocked = rng.random(n) < 0.05
    # a residual-like chain: y_i requires x_i and y_{i-1} (a tree) ...
    precedence = {(i, i + 10) for i in range(1, 5)} | {(i, i - 1) for i in range(1, 5)}
    # ... and a diamond (class 20 read by two junctions: not a tree), plus a wide fan (networkx)
    precedence |= {(21, 20), (22, 20), (23, 21), (23, 22)}
    precedence |= {(24 + (i % 3), 27 + (i % 3)) for i in range(3)} | {(24, 25), (25, 26), (26, 24)}
    soft = {(x, y): soft_weight * rng.uniform(0.1, 1) for y, x in precedence} if soft_weight else {}
    return macs, imp, prod, blocked, precedence, soft


def _solved_like_networkx(solver, lam, precedence, soft, forced):
    """Solve at `lam` and check the result is a valid closure worth what networkx's minimum
    cut over the whole problem is worth; returns what the callers check further."""
    n = len(solver.macs)
    dead = solver.solve(lam)
    weights = dict(enumerate(solver.weights(lam, np.arange(n)).tolist()))
    penalties = [(x, y, lam * c) for (x, y), c in soft.items()]
    chosen, cut_value, _ = max_weight_closure(weights, list(precedence), forced, penalties)

    def value(d):
        return sum(weights[k] for k in d) - sum(c for x, y, c in penalties if x in d and y not in d)

    got = set(np.nonzero(dead)[0].tolist())
    assert all(v in got for u, v in precedence if u in got) and not got & forced
    assert value(got) == pytest.approx(value(chosen), abs=1e-7)
    return dead, got, value, weights, penalties, cut_value


@pytest.mark.parametrize("soft_weight", [0.0, 0.5])
@pytest.mark.parametrize("seed", range(10))
def test_component_solvers_agree_with_networkx_and_brute_force(seed, soft_weight):
    """Trees (DP), small non-trees (enumeration) and cycles (networkx) give the optimum."""
    macs, imp, prod, blocked, precedence, soft = _residual_like(seed, soft_weight=soft_weight)
    n = len(macs)
    solver = _Solver(macs, imp, prod, blocked, precedence, np.arange(n), soft)
    assert solver.trees and solver.enums and solver.large, "every method is exercised"
    forced = set(np.nonzero(blocked)[0].tolist())
    for lam in (0.1, 0.7, 1.3, 4.0):
        dead, got, value, weights, penalties, cut_value = _solved_like_networkx(solver, lam, precedence, soft, forced)
        assert solver.cut(lam, dead)[0] == pytest.approx(cut_value, abs=1e-7)
        for comp in (set(range(5)) | set(range(11, 15)), {20, 21, 22, 23}, set(range(24, 30))):
            sub = {k: w for k, w in weights.items() if k in comp}
            _, best = brute_force_closure(sub, list(precedence), forced & comp, [p for p in penalties if p[0] in comp])
            assert value(got & comp) == pytest.approx(best, abs=1e-7)


@pytest.mark.parametrize("seed", range(20))
def test_min_cut_with_adapter_penalties_matches_brute_force(seed):
    weights, implies, forced = _random_problem(seed)
    rng = random.Random(seed)
    penalties = [(v, u, rng.uniform(0, 2)) for u, v in implies[: len(implies) // 2]]
    chosen, _, _ = max_weight_closure(weights, implies, forced, penalties)
    best, best_w = brute_force_closure(weights, implies, forced, penalties)
    got = sum(weights[k] for k in chosen) - sum(c for u, v, c in penalties if u in chosen and v not in chosen)
    assert got == pytest.approx(best_w, abs=1e-9)


def test_adapter_charge_keeps_a_block_output_alive_unless_its_stream_channel_dies():
    """y = x + b: removing only b's channel c costs an adapter (soft charge), removing the whole
    stream channel (x, b and y) does not."""
    imp = np.array([0.0, 1.0, 0.5])  # y (the stream channel), x (the stream input), b (the block)
    prod = np.array([0, 1, 1])
    precedence = {(0, 1), (0, 2)}
    blocked = np.zeros(3, dtype=bool)
    macs = np.array([0.1, 0.2, 1.0])  # weights at λ=1: y 0.1, x -0.8, b 0.5
    for soft, expect in (({}, [False, False, True]), ({(2, 0): 5.0}, [False, False, False])):
        solver = _Solver(macs, imp, prod, blocked, precedence, np.arange(3), soft)
        assert solver.solve(1.0).tolist() == expect
    # with enough compute behind it, the whole channel goes and no adapter is paid
    solver = _Solver(np.array([3.0, 0.2, 1.0]), imp, prod, blocked, precedence, np.arange(3), {(2, 0): 5.0})
    assert solver.solve(1.0).tolist() == [True, True, True]


def test_select_meets_ratio_and_respects_precedence():
    rng = np.random.default_rng(0)
    n = 40
    macs, imp = rng.uniform(0.5, 2, n), rng.uniform(0.1, 2, n)
    prod = np.ones(n, dtype=np.int64)
    prod[:5] = 0  # junction outputs
    precedence = {(i, 5 + 2 * i) for i in range(5)} | {(i, 6 + 2 * i) for i in range(5)}
    blocked = np.zeros(n, dtype=bool)
    sel = select(macs, imp, prod, blocked, precedence, [set(range(n))], 0.5, "global")
    assert sel.removed == 17  # floor(0.5 * 35)
    assert all(sel.dead[v] for u, v in precedence if sel.dead[u])


def _shared_stream_copies(seed, copies=3, n=40, shared=2, soft_weight=0.5):
    """`copies` components of one shape: a random forest of requirements (too many closures to
    enumerate) whose first `shared` classes are each required by two or three others (an
    embedding read by an encoder's and a decoder's stream), some of those requiring classes
    of the forest or each other; random weights, blocked classes and adapter charges."""
    rng = np.random.default_rng(seed)
    edges = {(int(rng.integers(shared, v)) if v > shared else shared, v) for v in range(shared + 1, n)}
    for s in range(shared):
        for y in rng.choice(np.arange(shared, n), size=int(rng.integers(2, 4)), replace=False):
            edges.add((int(y), s))
        if rng.random() < 0.5:
            edges.add((s, int(rng.integers(shared, n))))
    if shared > 1 and rng.random() < 0.5:
        edges.add((1, 0))
    total = copies * n
    macs, imp = rng.uniform(0, 2, total), rng.uniform(0, 2, total)
    blocked = np.tile(rng.random(n) < 0.05, copies)
    precedence = {(c * n + y, c * n + x) for c in range(copies) for y, x in edges}
    soft = {(x, y): soft_weight * rng.uniform(0.1, 1) for y, x in precedence if rng.random() < 0.7}
    return macs, imp, np.ones(total, dtype=np.int64), blocked, precedence, soft


@pytest.mark.parametrize("shared", [1, 2, 6])
@pytest.mark.parametrize("seed", range(8))
def test_conditioning_on_classes_required_twice_gives_the_optimum(seed, shared):
    """Components that are trees but for a few classes with two requirers are solved by trying
    each dead/alive assignment of those few (batched over same-shaped components), more of
    them by networkx: the same value as networkx's minimum cut over the whole problem."""
    macs, imp, prod, blocked, precedence, soft = _shared_stream_copies(seed, shared=shared)
    n = len(macs)
    solver = _Solver(macs, imp, prod, blocked, precedence, np.arange(n), soft)
    if shared > 4:
        assert solver.large and not solver.conditioned
    else:
        assert not solver.large and len(solver.conditioned) == 1 and len(solver.conditioned[0].comps) == 3
    forced = set(np.nonzero(blocked)[0].tolist())
    for lam in (0.05, 0.7, 1.3, 4.0):
        _solved_like_networkx(solver, lam, precedence, soft, forced)
