"""Shared by the prune tests: prune a model, and run the same graph with the removed channels
zeroed instead (the exactness reference: both must agree to float tolerance)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from fxopt.measure import count_parameters
from fxopt.passes.prune.apply import zero_removed
from fxopt.passes.prune.prune_pass import PrunePlan, analyze


@dataclass
class Masked:
    plan: PrunePlan
    original: torch.Tensor       # the captured graph's output before any zeroing
    masked: torch.Tensor         # the same graph with the chosen channels zeroed
    out: torch.Tensor            # the pruned graph's output
    params_before: int
    pruned: torch.fx.GraphModule


def prune_and_mask(model: torch.nn.Module, x: torch.Tensor, mode: str, ratio: float = 0.5, **options) -> Masked:
    """`analyze` (with `adapter_cost=0` unless given: spend the ratio where the MACs are, so every
    adapter path is exercised; with the default charge tiny models would rather keep channels
    than add an adapter), then the zeroed and the pruned run on `x`."""
    options.setdefault("adapter_cost", 0.0)
    plan = analyze(model, (x,), mode=mode, ratio=ratio, **options)
    with torch.no_grad():
        original = plan.gm(x)
    zero_removed(plan.gm, plan.channel_graph, plan.dead)
    with torch.no_grad():
        masked = plan.gm(x)
    params_before = count_parameters(plan.gm)
    pruned = plan.apply()
    with torch.no_grad():
        out = pruned(x)
    return Masked(plan, original, masked, out, params_before, pruned)
