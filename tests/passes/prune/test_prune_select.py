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


@pytest.mark.parametrize("seed", range(10))
def test_fast_component_solver_agrees_with_networkx(seed):
    rng = np.random.default_rng(seed)
    n = 30
    macs, imp = rng.uniform(0, 2, n), rng.uniform(0, 2, n)
    prod = (rng.random(n) < 0.7).astype(np.int64)
    blocked = rng.random(n) < 0.05
    # residual-like chains: y_i requires x_i and y_{i-1}
    precedence = set()
    for i in range(1, 8):
        precedence.add((i, i + 10))
        precedence.add((i, i - 1))
    solver = _Solver(macs, imp, prod, blocked, precedence, np.arange(n))
    for lam in (0.1, 0.7, 1.3, 4.0):
        fast, exact = solver.solve(lam), solver.solve(lam, final=True)
        w = lambda d: solver.weights(lam, np.nonzero(d)[0]).sum()  # noqa: E731
        assert w(fast) == pytest.approx(w(exact), abs=1e-7)


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
