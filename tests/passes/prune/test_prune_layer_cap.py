"""`max_layer_ratio` as a priced constraint: the selection moves removals, coupled ones included."""
import numpy as np
import pytest

from fxopt.examples import zoo
from fxopt.measure import count_macs
from fxopt.passes.prune.prune_pass import analyze


def _lost_fractions(plan) -> dict[str, float]:
    cg, dead = plan.channel_graph, plan.selection.dead
    return {name: float(dead[cg.positions(r.outputs[0])].sum()) / cg.slots[r.outputs[0]].size
            for name, r in cg.rules.items() if r.category in ("producer", "param")}


@pytest.fixture(scope="module")
def bert():
    return zoo.get("bert", batch=2)


def test_cap_on_a_transformer_stream_keeps_the_budget_and_prunes_the_stream(bert):
    """Uncapped, the selection empties every FFN's output rows (scattered back into a full-width
    stream). Capped at 0.6, the surcharge on those rows makes narrowing the stream itself, with
    all its writers, the cheaper way to the same budget: fewer MACs, not more."""
    model, x2 = bert
    _, x1 = zoo.get("bert", batch=1)
    options = dict(mode="export", ratio=0.5, exact_norms=False)
    free = analyze(model, x2, **options)
    capped = analyze(model, x2, max_layer_ratio=0.6, **options)
    assert max(_lost_fractions(free).values()) > 0.95, "uncapped, some layer is all but emptied"
    lost = _lost_fractions(capped)
    assert max(lost.values()) <= 0.6
    assert capped.selection.removed == capped.selection.target == free.selection.target
    stream = next(name for name, r in capped.channel_graph.rules.items() if r.kind == "embedding")
    assert lost[stream] >= 0.5, "the stream itself is narrowed"
    base = count_macs(model, x1)
    macs_free, macs_capped = (count_macs(p.apply(), x1) / base for p in (free, capped))
    # Torch-Pruning's uniform 50% keeps 26.0% of this model's MACs (docs/benchmarks.md); holding
    # the over-cap layers' classes fixed instead of pricing them kept 27.8%
    assert macs_capped < min(macs_free, 0.26)


def test_cap_fallback_still_holds_when_pricing_cannot_settle(monkeypatch, bert):
    """With no pricing rounds the hold-based fallback alone must enforce the cap."""
    import fxopt.passes.prune.prune_pass as pp

    model, x2 = bert
    monkeypatch.setattr(pp, "CAP_PRICING_ROUNDS", 0)
    plan = analyze(model, x2, mode="export", ratio=0.5, exact_norms=False, max_layer_ratio=0.6)
    assert max(_lost_fractions(plan).values()) <= 0.6
    assert np.all(plan.selection.dead <= ~plan.blocked)
