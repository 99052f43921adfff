"""`prune` — structured channel pruning with a channel-dependency graph and minimum cuts.

What it rewrites: conv/linear/embedding/batchnorm/depthwise parameters, and the weights of
``addmm(b, x, W)`` / ``x @ W`` (a linear layer stored [in, out], GPT-2's Conv1D), get physically smaller
(channels removed), shape arguments follow, and adapters re-index values where a residual
stream or a pinned reader needs other channels. The result is a smaller, faster GraphModule.

How (one module per step):
1. `channel_graph` — a networkx graph over channel slots; union-find classes of channels that
   must go together; junction precedence for add/sub; pinned nodes named with a reason.
2. `importance` — per-class importance (l1, l2, bn_scale, taylor) and MACs saved
   (with `cost=latency`, `latency` times the producers and their channels save measured time).
3. `select` — a maximum-weight closure by minimum cut picks the classes to remove.
4. `boundary` — a minimum cut picks where removed channels are re-expanded for pinned readers.
5. `apply` — new tensors via ParamRef.set, updated module attributes, adapters.

Preconditions: shape metadata (capture records it). Works on symbolic and export graphs.
Tolerance: lossy (it removes channels); exact when the removed channels contribute zero.

Example (a residual block, ratio=0.5)::

    before: %conv1 = conv1(%x) : f32[1, 16, 8, 8]   %bn1 = bn1(%conv1)  %relu = relu(%bn1)
            %conv2 = conv2(%relu) : f32[1, 16, 8, 8] ...  %add = add(%bn2, %x)
    after:  %conv1 = conv1(%x) : f32[1, 8, 8, 8]  {prune.kept: 8/16, prune.group: 1}
            %conv2 = conv2(%relu) : f32[1, 16, 8, 8]  ...

Research API: ``plan = analyze(model, inputs, ratio=0.5)`` returns the `PrunePlan` with the
channel graph, per-class costs, groups, the selection cut and the boundary cut;
``plan.apply()`` returns a new, pruned GraphModule (the plan's own graph stays as analyzed).
"""
from __future__ import annotations

import fnmatch
import time
import warnings
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Collection, Literal, Sequence

import numpy as np
import torch
import torch.fx

from fxopt.analysis import propagate_shapes
from fxopt.call_check import explain_failed_calls
from fxopt.debug.listing import annotate
from fxopt.errors import PassWarning, did_you_mean, user_stacklevel
from fxopt.ir import (
    attribute_use_counts,
    clone_sharing_tensors,
    delete_unused_attributes,
    drop_empty_cat_inputs,
    functionalize_writes,
    is_effectful,
    is_shared,
    make_private,
    op_view,
    split_packed_parameters,
    unpack_tuples,
)
from fxopt.distillation import inference_kernels
from fxopt.manager import record_pipeline
from fxopt.measure import count_parameters
from fxopt.pass_base import Pass, PassContext, PassResult
from fxopt.verify import loosest

from .apply import apply_pruning, share_equal_ties, tied_parameters
from .boundary import Boundary, plan_boundaries
from .channel_graph import ChannelGraphAnalysis, build_channel_graph
from .channel_model import WEIGHT_LAYOUTS, ZERO_PRESERVING, ChannelGraph, Rule, param_arg
from .importance import IMPORTANCES, adapter_costs, class_costs, timed_macs
from .latency import LayerTime, LayerTimer
from .select import Selection, close_free_junctions, required_by, revive, select


@dataclass
class PrunePlan:
    """Everything the pass decided, for inspection before (or instead of) applying it.

    - `channel_graph`: the `ChannelGraph` (networkx graph in `.graph`, classes, precedence);
    - `costs`: per-class arrays `imp` (normalized importance), `macs`, `prod` (producer channels),
      `adapter` (MACs charged for the adapters a removal adds) and `soft` ((x, y) -> MACs charged
      when class x dies while y lives; see `importance.adapter_costs`); with `cost=latency` also
      `timed` (producer name -> `latency.LayerCost`, the measured slopes `macs` was built from);
    - `groups`: lists of class ids coupled by unions or precedence;
    - `selection`: the dead classes, λ per group, the min-cut value and cut edges;
    - `boundary`: slots kept at full width and the re-expansion cut edges;
    - `ignored`: node names excluded by the `ignore` option; `seconds`: time per step.
    """

    gm: torch.fx.GraphModule
    channel_graph: ChannelGraph
    costs: dict
    groups: list
    selection: Selection
    boundary: Boundary
    ignored: set
    blocked: np.ndarray
    seconds: dict = field(default_factory=dict)
    example_inputs: tuple = ()
    example_kwargs: dict = field(default_factory=dict)
    #: channels the selection removed before `round_to` gave some back (`_shortfall` tells the two apart)
    selected: int | None = None
    #: the options the plan was made with (ratio, round_to, adapter_cost, max_layer_ratio, exact_norms)
    options: dict = field(default_factory=dict)
    #: names that held one parameter when the plan was made (`apply` re-ties those pruned alike;
    #: read then, as `zero_removed` on `gm` unties a weight tied across kinds)
    ties: list = field(default_factory=list)

    @property
    def dead(self) -> np.ndarray:
        return self.selection.dead

    def kept_channels(self) -> dict[str, str]:
        """node name -> 'kept/size' for every slot that loses channels."""
        cg, out = self.channel_graph, {}
        for s in cg.slots:
            alive = int((~self.dead[cg.positions(s.id)]).sum())
            if alive != s.size:
                out[s.node] = f"{alive}/{s.size}"
        return out

    def stats(self) -> dict[str, Any]:
        cg = self.channel_graph
        return {
            "classes": cg.n_classes,
            "groups": len(self.groups),
            "removed_channels": self.selection.removed,
            "target_channels": self.selection.target,
            "prunable_channels": self.selection.total,
            "unread_classes": int(cg.unread_classes.sum()),
            "selection_cut": round(self.selection.cut_value, 6),
            "selection_cut_edges": len(self.selection.cut_edges),
            "reexpanded_slots": len(self.boundary.full),
            "boundary_cut_edges": [f"{u}->{v}" for u, v in self.boundary.cut_edges],
            "pinned": dict(cg.pinned_nodes),
            "ignored": sorted(self.ignored),
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
        }

    def slot_groups(self) -> dict[int, int]:
        """Slot id -> index in `groups` of the pruning group its channels belong to (what the
        dump shows as ``prune.group``; a slot's classes are always in one group)."""
        group_of_class = np.zeros(self.channel_graph.n_classes, dtype=np.int64)
        for gi, classes in enumerate(self.groups):
            group_of_class[list(classes)] = gi
        return {s.id: int(group_of_class[self.channel_graph.positions(s.id)[0]])
                for s in self.channel_graph.slots if s.size}

    def apply(self, dead: np.ndarray | None = None) -> torch.fx.GraphModule:
        """A new GraphModule: `self.gm` without the chosen classes (or `dead`, a bool mask per class).

        `self.gm` stays as analyzed (the copy shares its tensors, and pruning only ever replaces
        tensors), so one plan can be applied again, e.g. with another mask. A custom `dead` mask
        must respect the precedence and pins; the boundary cut is recomputed for it.
        """
        cg = self.channel_graph
        boundary = self.boundary
        if dead is None:
            dead = self.selection.dead
        else:  # the plan keeps its own selection: it can be applied again, with or without a mask
            dead = _checked_mask(cg, dead, self.blocked)
            boundary = plan_boundaries(cg, dead, self.ignored)
        start = time.perf_counter()
        gm = explain_failed_calls(clone_sharing_tensors(self.gm))
        info = apply_pruning(gm, cg, dead, boundary, self.ignored, self.slot_groups())
        _retie(gm, self.ties)
        if self.example_inputs or self.example_kwargs:
            propagate_shapes(gm, self.example_inputs, self.example_kwargs)
        # what `optimize` records for the pass: `fxopt.verify` then judges the result as pruned
        # (lossy: NOT CHECKED), not as an exact copy of the model (FAIL)
        record_pipeline(gm, self.gm, "prune", loosest(Prune.tolerance))
        self.seconds["apply"] = time.perf_counter() - start
        self.applied = info
        return gm


def _checked_mask(cg: ChannelGraph, dead: Any, blocked: np.ndarray) -> np.ndarray:
    """A research mask for `PrunePlan.apply`, as a bool array per class, or a ValueError that
    names the value at fault: a mask of the wrong length, one that removes a pinned channel or
    breaks a junction precedence (a channel removed from a sum some other writer keeps), or
    one that empties a value an op cannot run without (a layer left with no channel)."""
    given = np.asarray(dead)
    other = given[~np.isin(given, (0, 1))] if given.dtype != bool else given[:0]
    if other.size:  # (a float mask of scores became all True; the error then blamed a pinned channel)
        raise ValueError(f"the dead mask holds {given.dtype} values other than 0 and 1 (e.g. "
                         f"{other.flat[0].item()!r}): give a bool per class (True removes it), e.g. scores > threshold")
    dead = given.astype(bool)
    if dead.shape != (cg.n_classes,):
        raise ValueError(f"the dead mask has shape {dead.shape}; the plan has {cg.n_classes} channel classes "
                         "(a bool per class: plan.channel_graph.n_classes)")

    def holder(k: int) -> str:
        slot = next(s for s in cg.slots if k in cg.positions(s.id))
        return f"'{slot.node}' (axis {slot.axis})"

    broken = next(((u, v) for u, v in cg.precedence if dead[u] and not dead[v]), None)
    if broken is not None:
        raise ValueError(f"the dead mask removes a channel of {holder(broken[0])} but keeps the channel of "
                         f"{holder(broken[1])} that feeds it (a sum's channel dies only with every writer's): "
                         "remove both or neither")
    pinned = np.flatnonzero(dead & blocked)
    if pinned.size:
        raise ValueError(f"the dead mask removes a pinned channel of {holder(int(pinned[0]))} (see "
                         "plan.channel_graph.pinned_nodes and output_classes)")
    emptied = next(iter(_emptied_slots(cg, dead)), None)
    if emptied is not None:
        readers = [r.node for r in cg.rules.values()
                   if emptied.id in {entry[1] for entry in (*r.inputs, *r.consumed)}]
        read_by = f", the input of {', '.join(map(repr, readers[:3]))}" if readers else ""
        raise ValueError(f"the dead mask removes every channel of '{emptied.node}' (axis {emptied.axis}){read_by}: "
                         "keep at least one (an op cannot run on a value with no channels)")
    return dead


def plan_pruning(gm: torch.fx.GraphModule, *, ratio: float = 0.5, importance: str = "l1", scope: str = "local",
                 round_to: int = 1, ignore: tuple[str, ...] = (), exact_norms: bool = True,
                 adapter_cost: float = 1.0, max_layer_ratio: float = 1.0, cost: str | LayerTime = "macs",
                 calibration: list | None = None, channel_graph: ChannelGraph | None = None,
                 example_inputs: tuple = (), example_kwargs: dict | None = None,
                 model_modules: Collection[str] = ()) -> PrunePlan:
    """Analyze `gm` and choose channels, without changing it; see `PrunePlan`.

    A given `channel_graph` must have been built with the same `exact_norms`. `model_modules`:
    the module names of the model `gm` was captured from (an `ignore` entry naming one the
    graph never calls, a training-only head, is no typo).
    """
    _check_options(ratio, importance, scope, round_to, adapter_cost, max_layer_ratio, cost, exact_norms)
    frozen = inference_kernels(gm)
    if frozen:  # (it read as "the model has no prunable channels")
        name, what = frozen[0]
        raise ValueError(f"node '{name}' ({what}) is an inference kernel (int8 or oneDNN) whose channels "
                         "cannot be removed; run prune before quantize and lower-cpu")
    ignore = _patterns(ignore)
    seconds = {}
    start = time.perf_counter()
    cg = channel_graph if channel_graph is not None else build_channel_graph(gm, exact_norms)
    seconds["analysis"] = time.perf_counter() - start

    ignored = _match_ignore(cg, ignore, model_modules)
    start = time.perf_counter()
    timer = None if cost == "macs" else LayerTimer(gm, cg, measure=None if cost == "latency" else cost)
    costs = class_costs(gm, cg, importance, calibration, timed=timer.runners if timer else ())
    untimed_macs = costs["macs"]
    if timer is not None:
        costs["timed"] = timer.costs(ratio)
        costs["macs"] = untimed_macs + timed_macs(cg, costs["timed"])
    blocked = cg.pinned_classes | cg.output_classes
    for name in ignored:
        for sid in cg.rules[name].outputs:
            blocked[cg.positions(sid)] = True
    prod = costs["prod"]
    if ratio > 0 and prod[~blocked].sum() == 0:
        if ignored:
            raise ValueError(f"option 'ignore': every prunable layer is ignored "
                             f"(pinned: {', '.join(sorted(cg.pinned_nodes)) or 'none'})")
        raise NothingToPrune("nothing to prune: the model has no prunable channels (every channel is "
                             f"pinned or reaches the graph output).{_pinned_summary(cg)}")
    costs["adapter"], costs["soft"] = adapter_costs(gm, cg, blocked, ignored, ratio, adapter_cost)
    groups = [sorted(g) for g in cg.groups()]
    seconds["costs"] = time.perf_counter() - start

    start = time.perf_counter()
    sel = _select_capped(cg, costs, blocked, groups, ratio, scope, max_layer_ratio, round_to)
    if timer is not None:
        sel = _refine_by_latency(timer, cg, costs, untimed_macs, sel, blocked, groups, ratio, scope,
                                 max_layer_ratio, round_to)
    dead = sel.dead
    # Free junctions first: rounding has the last word, so that every value keeps at least one
    # channel (a split piece whose only channel is a dead junction would otherwise vanish).
    dead = close_free_junctions(dead, prod, blocked, cg.precedence)
    # what the selection removed before rounding (the first solve's, where it was solved again)
    selected = max(int(prod[dead].sum()), sel.first_removed or 0)
    _round_slots(cg, dead, costs["imp"], round_to)
    sel.dead, sel.removed = dead, int(prod[dead].sum())
    seconds["select"] = time.perf_counter() - start

    start = time.perf_counter()
    boundary = plan_boundaries(cg, dead, ignored)
    seconds["boundary"] = time.perf_counter() - start
    plan = PrunePlan(gm, cg, costs, groups, sel, boundary, ignored, blocked, seconds, tuple(example_inputs),
                     dict(example_kwargs or {}), selected,
                     dict(ratio=ratio, importance=importance, round_to=round_to, adapter_cost=adapter_cost,
                          max_layer_ratio=max_layer_ratio, exact_norms=exact_norms), tied_parameters(gm))
    _annotate(gm, plan)
    return plan


def analyze(model: torch.nn.Module, example_inputs: Any, *, mode: str = "auto", calibration: list | None = None,
            **options: Any) -> PrunePlan:
    """Capture `model` (a private copy), build the channel graph and choose channels.

    Returns the `PrunePlan`; call `.apply()` for the pruned GraphModule. `options` are the pass
    options (ratio, importance, scope, round_to, ignore, exact_norms, adapter_cost, max_layer_ratio,
    cost).
    """
    import fxopt
    from fxopt.capture import normalize_inputs

    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(Prune)})
    if unknown:
        raise TypeError(f"analyze(): unknown option(s) {', '.join(unknown)}; the options are "
                        f"{', '.join(f.name for f in dataclasses.fields(Prune))}")
    if "ignore" in options:
        options["ignore"] = _module_names(model, options["ignore"])
    args, kwargs = normalize_inputs(example_inputs)
    # (a copy is a class of its own: it needs capture's check of each call's inputs again)
    gm = explain_failed_calls(clone_sharing_tensors(fxopt.capture(model, example_inputs, mode=mode)))
    if _prepare(gm):  # (capture recorded every node's shape; only a rewrite needs a new run)
        propagate_shapes(gm, args, kwargs)
    if calibration is not None:
        calibration = [normalize_inputs(b) for b in calibration]
    return plan_pruning(gm, calibration=calibration, example_inputs=args, example_kwargs=kwargs,
                        model_modules=[name for name, _ in model.named_modules()], **options)


@dataclass
class Prune(Pass):
    """Structured channel pruning; see the module docstring."""

    name: ClassVar[str] = "prune"
    tolerance: ClassVar[str] = "lossy"
    ratio: float = 0.5
    importance: Literal["l1", "l2", "bn_scale", "taylor"] = "l1"
    scope: Literal["local", "global"] = "local"
    round_to: int = 1
    ignore: tuple[str, ...] = ()
    # False: layer/group norm channels are pruned with the stream they normalize (Torch-Pruning's
    # behaviour; not exact, their statistics then cover the kept channels only)
    exact_norms: bool = True
    # how much the selection charges for the adapters a removal adds (1: their measured CPU cost
    # in MACs; 0: ignore them and spend the ratio where the MACs are, whatever adapters follow)
    adapter_cost: float = 1.0
    # the most any one layer (producer) may lose, as a fraction of its channels
    max_layer_ratio: float = 1.0
    # what a removed channel saves: its MACs, or its layer's time measured on the weights'
    # device at the recorded shapes (see `latency`; slower to analyze, not deterministic)
    cost: Literal["macs", "latency"] = "macs"

    def __post_init__(self) -> None:
        _check_options(self.ratio, self.importance, self.scope, self.round_to, self.adapter_cost,
                       self.max_layer_ratio, self.cost, self.exact_norms)
        self.ignore = _patterns(self.ignore)

    def plan(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PrunePlan:
        changed = _prepare(gm)
        am = ctx.analyses
        if changed or am is None or not self.exact_norms:  # the cached analysis is the exact one
            if ctx.example_inputs or ctx.example_kwargs:
                propagate_shapes(gm, ctx.example_inputs, ctx.example_kwargs)
            cg = build_channel_graph(gm, self.exact_norms)
        else:
            cg = am.get(ChannelGraphAnalysis)
        return plan_pruning(gm, ratio=self.ratio, importance=self.importance, scope=self.scope,
                            round_to=self.round_to, ignore=self.ignore, exact_norms=self.exact_norms,
                            adapter_cost=self.adapter_cost, max_layer_ratio=self.max_layer_ratio,
                            cost=self.cost, calibration=ctx.calibration,
                            channel_graph=cg, example_inputs=ctx.example_inputs, example_kwargs=ctx.example_kwargs,
                            model_modules=_model_modules(ctx.reference))

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.ratio == 0:
            return PassResult(gm, modified=False, stats={"removed_channels": 0})
        try:  # planning gives shared weights private names: on a copy, so "nothing" leaves gm as it was
            plan = self.plan(clone_sharing_tensors(gm), ctx)
        except NothingToPrune as exc:  # in a pipeline, the passes after prune still run
            warnings.warn(f"prune: {exc}", PassWarning, stacklevel=user_stacklevel())
            return PassResult(gm, modified=False, stats={"removed_channels": 0, "note": str(exc)})
        stats = plan.stats()
        shortfall = _shortfall(plan, self.ratio, self.exact_norms) or _overshoot(plan, self.ratio)
        if shortfall:
            stats["note"] = shortfall
            warnings.warn(f"prune: {shortfall}", PassWarning, stacklevel=user_stacklevel())
        thinned = _thinned_layers(plan, self.ratio) if self.max_layer_ratio == 1 else None
        if thinned:
            stats["thinned_layers"] = thinned
            shown = ", ".join(f"'{name}' {kept}" for name, kept in list(thinned.items())[:3])
            more = f" and {len(thinned) - 3} more" if len(thinned) > 3 else ""
            warnings.warn(f"prune: {len(thinned)} layer(s) keep under an eighth of the width ratio={self.ratio} asks "
                          f"({shown}{more}): the selection spends the ratio where the MACs are, and a layer this "
                          "thin may not recover accuracy in fine-tuning or distillation (a trained CNN whose "
                          "stride-2 conv kept 1 of 64 channels: 19% after distillation, 91% with a cap). "
                          "max_layer_ratio=0.75 keeps a quarter of every layer", PassWarning,
                          stacklevel=user_stacklevel())
        if plan.selection.removed == 0:
            return PassResult(gm, modified=False, stats=stats)
        pruned = plan.apply()
        stats.update(plan.applied)
        before, after = count_parameters(gm), count_parameters(pruned)
        if after > before:  # every private copy of a weight another op reads whole stays beside it
            warnings.warn(f"prune: the pruned model holds more parameters ({after:,}) than its input ({before:,}): "
                          "a weight read whole by one op and sliced for another (x @ W.t() next to W.sum(1)) is "
                          "stored twice; the MACs still fell", PassWarning, stacklevel=user_stacklevel())
        stats["seconds"] = {k: round(v, 4) for k, v in plan.seconds.items()}
        return PassResult(pruned, modified=True, stats=stats)


# ----- helpers ---------------------------------------------------------------------------------

class NothingToPrune(ValueError):
    """The model has no channel the analysis may remove (all pinned or feeding the output)."""


def _pinned_summary(cg: ChannelGraph, shown: int = 5) -> str:
    """` Pinned nodes: name: reason; ...` — the first few, for messages a user acts on."""
    pinned = cg.pinned_nodes
    if not pinned:
        return ""
    listed = "; ".join(f"{name}: {why}" for name, why in list(pinned.items())[:shown])
    more = f" (+{len(pinned) - shown} more in stats['pinned'])" if len(pinned) > shown else ""
    return f" Pinned nodes: {listed}{more}."


#: The pass warns when it removed less than this fraction of its target. The selection meets
#: the target exactly unless something holds channels back: adapters that would cost more than
#: they save (`adapter_cost`), `max_layer_ratio`, `round_to`, pinned readers. At the defaults
#: the zoo models land at 93-100% of it (BERT at ratio=0.5: 93%, a head is many channels); a
#: model that keeps more than a tenth of what was asked has a cause worth naming (a pre-LN
#: stack at d=32 removed 57% of its target in silence while the threshold was one half).
SHORTFALL_WARNING = 0.9
#: removing more than this many times the target is said (`_overshoot`)
OVERSHOOT_WARNING = 1.25


def _shortfall(plan: PrunePlan, ratio: float, exact_norms: bool) -> str | None:
    """What a user who asked for `ratio` and got nothing, or less than `SHORTFALL_WARNING` of
    what it targets, should read: what held the channels back (the selection's costs and
    caps, or `round_to`), which nodes hold them at full width, and the options that would
    remove more. None when the selection removed at least that much of its target."""
    sel = plan.selection
    if sel.removed > 0 and sel.removed >= SHORTFALL_WARNING * sel.target:
        return None
    cg = plan.channel_graph
    opts = plan.options
    adapter_cost, cap = opts.get("adapter_cost", 1.0), opts.get("max_layer_ratio", 1.0)
    round_to = opts.get("round_to", 1)
    selected = sel.removed if plan.selected is None else plan.selected
    causes, options = [], []
    if sel.target == 0:
        return (f"removed no channel at ratio={ratio}: {ratio} of the {sel.total} prunable channels rounds to "
                f"a target of 0; a larger ratio removes some")
    # the selection's own shortfall, when it matters (a few channels short of a target that
    # `round_to` then misses by far is rounding's doing)
    if selected < sel.target and (selected < SHORTFALL_WARNING * sel.target or sel.removed == selected):
        held = []
        if adapter_cost > 0:
            held.append("importance lost plus the re-expansion adapters it needs")
        if cap < 1:
            held.append(f"max_layer_ratio={cap} caps what each layer may lose")
        causes.append(f"the selection stopped at {selected}: no further removal saved more than it cost"
                      f" ({'; '.join(held)})" if held else
                      f"the selection stopped at {selected}: the rest is held by pinned nodes or the graph output")
        if plan.ignored:
            shown = ", ".join(sorted(plan.ignored)[:5]) + (", ..." if len(plan.ignored) > 5 else "")
            causes.append(f"the ignored layers ({shown}) read their inputs at full width, so channels that reach "
                          "them need a re-expansion")
        tied = _tied_importance(plan)
        if tied:
            causes.append(tied)
            options.append("importance=l1 or l2 (the weights tell channels apart)")
        norms = any((view := op_view(plan.gm, n)) is not None and view.kind in ("layer_norm", "group_norm")
                    for n in plan.gm.graph.nodes if n.op != "placeholder")
        if norms and exact_norms:
            options.append("exact_norms=false prunes through norms")
        if adapter_cost > 0 and (cg.pinned_nodes or plan.ignored
                                 or any(r.category == "gather" for r in cg.rules.values())):
            options.append("adapter_cost=0 stops charging the re-expansions in front of pinned nodes and exact norms")
        if cap < 1:
            options.append("a larger max_layer_ratio")
    if sel.removed < selected:  # `_round_slots`: widths rounded up, and no layer emptied
        if round_to > 1:
            causes.append(f"round_to={round_to} gave {selected - sel.removed} back (every width rounded up to a "
                          f"multiple of {round_to}, and at least one)")
            options.append("a smaller round_to")
        else:
            causes.append(f"keeping at least one channel in every layer gave {selected - sel.removed} back")
    hint = f" Options: {'; '.join(options)}." if options else ""
    # (the total, then the target: "only 160 of the 320 channels at ratio=0.5" read as the
    # target met; api tester)
    what = ("removed no channel" if sel.removed == 0 else
            f"removed only {sel.removed} of the {sel.total} prunable channels")
    if sel.removed and sel.target:
        causes.insert(0, f"{100 * sel.removed / sel.target:.0f}% of the {sel.target} targeted")
    return (f"{what} at ratio={ratio}: {'; '.join(causes) or 'nothing more could be removed'}."
            f"{_pinned_summary(plan.channel_graph)}{hint}")


def _tied_importance(plan: PrunePlan) -> str | None:
    """Why a selection may stop short when most prunable classes share one importance (a
    batchnorm scale at its initial 1.0 under `bn_scale`): a layer's classes then tie in cost
    and importance, so they are removed all together or not at all (prune tester: a fresh
    ResNeXt removed 208 of the 496 channels targeted; 496 with l1)."""
    imp = plan.costs.get("imp")
    if imp is None:
        return None
    free = imp[~plan.blocked]
    if free.size < 2:
        return None
    values, counts = np.unique(free, return_counts=True)
    if counts.max() < 2 or counts.max() < 0.5 * free.size:
        return None
    return (f"{counts.max()} of the {free.size} channel classes have the same importance "
            f"(importance={plan.options.get('importance')}: {values[counts.argmax()]:.3g}), so a layer's channels "
            "tie and are removed all together or not at all")


def _overshoot(plan: PrunePlan, ratio: float) -> str | None:
    """What a user who asked for `ratio` and got clearly more should read: channels coupled in
    classes (grouped convs of different group counts tie every 12th channel of a 48-wide value,
    a junction ties its writers) are removed whole, so the last class may carry the removal far
    past the target. None within `OVERSHOOT_WARNING` times the target (a transformer's heads, a
    few classes of 64, overshoot a 0.3 target by 15%), or one channel of it."""
    sel = plan.selection
    prod, imp = plan.costs.get("prod"), plan.costs.get("imp")
    bound = max(OVERSHOOT_WARNING * sel.target, sel.target + 1)
    if prod is None or sel.removed <= bound:
        return None
    # a channel whose weights are all zero costs nothing to remove: the selection takes it at
    # any ratio (the outputs do not change), and a model with many was cut far past the target
    free = int(prod[sel.dead & (imp == 0)].sum()) if imp is not None else 0
    if free and sel.removed - free <= bound:
        return (f"removed {sel.removed} of the {sel.total} prunable channels at ratio={ratio}, "
                f"{100 * sel.removed / max(sel.target, 1):.0f}% of the {sel.target} targeted: {free} of them have "
                "zero importance (all-zero weights: they add nothing to any output), and those are removed at "
                "every ratio, exactly. To keep them, prune a copy whose zero weights you perturb.")
    largest = int(prod[sel.dead].max())
    if largest <= 1:
        return None
    return (f"removed {sel.removed} of the {sel.total} prunable channels at ratio={ratio}, "
            f"{100 * sel.removed / max(sel.target, 1):.0f}% of the {sel.target} targeted: coupled channels are "
            f"removed together (classes of up to {largest}, tied by grouped convs or junctions), so the last "
            "class chosen carried it past the target. Options: a smaller ratio; max_layer_ratio caps each layer.")


def _thinned_layers(plan: PrunePlan, ratio: float) -> dict[str, str]:
    """Layers (conv/linear outputs of 8 channels or more) the plan leaves under an eighth of
    the width `ratio` asks of each: module path (or node name) -> 'kept/size'."""
    cg, thinned = plan.channel_graph, {}
    for rule in cg.rules.values():
        if rule.category != "producer":
            continue
        slot = cg.slots[rule.outputs[0]]
        kept = int((~plan.dead[cg.positions(slot.id)]).sum())
        if slot.size >= 8 and kept < slot.size * (1 - ratio) / 8:
            thinned[cg.module_names.get(rule.node) or rule.node] = f"{kept} of {slot.size}"
    return thinned


def _check_options(ratio: float, importance: str, scope: str, round_to: int, adapter_cost: float = 1.0,
                   max_layer_ratio: float = 1.0, cost: str = "macs", exact_norms: bool = True) -> None:
    if not isinstance(exact_norms, bool):  # a string such as "false" would read as true
        raise ValueError(f"option 'exact_norms' must be True or False, got {exact_norms!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"option 'ratio' must be a number with 0 <= ratio < 1, got {ratio!r}")
    if importance not in IMPORTANCES:
        raise ValueError(f"option 'importance': unknown '{importance}'; valid: {', '.join(IMPORTANCES)}")
    if scope not in ("local", "global"):
        raise ValueError(f"option 'scope' must be 'local' or 'global', got {scope!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"option 'round_to' must be an integer >= 1, got {round_to!r}")
    if isinstance(adapter_cost, bool) or not isinstance(adapter_cost, (int, float)) or not adapter_cost >= 0:
        raise ValueError(f"option 'adapter_cost' must be a number >= 0, got {adapter_cost!r}")
    if isinstance(max_layer_ratio, bool) or not isinstance(max_layer_ratio, (int, float)) \
            or not 0 < max_layer_ratio <= 1:
        raise ValueError(f"option 'max_layer_ratio' must be a number with 0 < r <= 1, got {max_layer_ratio!r}")
    if not callable(cost) and cost not in COSTS:
        raise ValueError(f"option 'cost' must be one of {', '.join(COSTS)} (or, from Python, a "
                         f"function (layer, cin, cout) -> seconds), got {cost!r}")


def _patterns(ignore: str | Sequence[str]) -> tuple[str, ...]:
    """`ignore` as a tuple of patterns: one string is one pattern, not its characters."""
    patterns = (ignore,) if isinstance(ignore, str) else tuple(ignore)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"option 'ignore' takes module names or glob patterns ('fc', 'layer4.*'); got a "
                             f"{type(pattern).__name__} (module objects, as in Torch-Pruning's "
                             "ignored_layers=[model.fc], are taken by analyze(model, ..., ignore=[...]))")
    return patterns


def _module_names(model: torch.nn.Module, ignore: Any) -> Any:
    """`ignore` with each module object of `model` in it (Torch-Pruning's ``ignored_layers=[model.fc]``)
    replaced by its name in `model`; strings stay as they are."""
    if isinstance(ignore, (str, torch.nn.Module)):
        ignore = [ignore]
    names = {id(module): name for name, module in model.named_modules()}
    out = []
    for item in ignore:
        if isinstance(item, torch.nn.Module):
            name = names.get(id(item))
            if not name:  # not in the model, or the model itself
                raise ValueError(f"option 'ignore': the {type(item).__name__} given is "
                                 f"{'the model itself' if name == '' else 'not a submodule of the model'}; "
                                 "give the layers to leave whole (or their names)")
            item = name
        out.append(item)
    return tuple(out)


def _prepare(gm: torch.fx.GraphModule) -> bool:
    """Make `gm` ready for the analysis, in place: packed parameters read in pieces split into
    one per piece (cross-attention's q/k/v rows of `in_proj_weight`), tuples a split's
    pieces make spelled as tuples of them (``h.chunk(4, 1)[1:]``), every weighted op with
    its own parameters (`_privatize`), and in-place writes rewritten out of place where that
    is exact (``h.add_(x)`` then h read, as export writes it, so h can be narrowed). Whether
    anything changed."""
    unpacked = split_packed_parameters(gm) > 0
    unpacked = unpack_tuples(gm) > 0 or unpacked
    unpacked = drop_empty_cat_inputs(gm) > 0 or unpacked  # an empty KV cache concatenated to k
    privatized = _privatize(gm)
    written = functionalize_writes(gm) > 0
    return _drop_dead_values(gm) or written or privatized or unpacked


def _drop_dead_values(gm: torch.fx.GraphModule) -> bool:
    """Erase values nothing reads and that write nothing (BART's ``inputs_embeds[:, :, -1]``,
    taken for its shape only): they would be pinned for what they index, and named in the
    report, for no effect on the model."""
    removed = False
    for node in reversed(list(gm.graph.nodes)):  # readers first: a value only they read goes too
        if node.op in ("call_function", "call_method", "call_module") and not node.users and not is_effectful(node):
            gm.graph.erase_node(node)
            removed = True
    return removed


def _privatize(gm: torch.fx.GraphModule) -> bool:
    """Give every weighted op its own parameters, so pruning one site never resizes another."""
    changed = False
    counts = attribute_use_counts(gm)
    for node in list(gm.graph.nodes):
        if node.op not in ("call_module", "call_function"):
            continue
        view = op_view(gm, node)
        params = dict(view.params) if view is not None else {}
        if view is not None and view.kind == "matmul":  # x @ W: W is an operand, not a view param
            ref = param_arg(gm, view, WEIGHT_LAYOUTS["matmul"].weight)
            if ref is not None:
                params["other"] = ref
        if params and is_shared(gm, node, params, counts):
            make_private(gm, node)
            counts = attribute_use_counts(gm)
            changed = True
    if changed:
        gm.recompile()
    return changed


def _retie(gm: torch.fx.GraphModule, ties: list[list[str]]) -> None:
    """Share one parameter again among the names of a tie that were pruned alike.

    Pruning replaces each use's tensor on its own (a tied embedding and LM head, or the private
    copy of a weight export reads twice), so a tie whose uses lost the same channels would be
    stored twice, and a name nothing reads any more (export's dead `get_attr` of the other end)
    would keep the full-size tensor. Both go; ties pruned differently stay apart."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
    delete_unused_attributes(gm)
    share_equal_ties(gm, ties)


def _match_ignore(cg: ChannelGraph, patterns: tuple[str, ...], model_modules: Collection[str] = ()) -> set[str]:
    """The nodes the `ignore` patterns name. A pattern naming a module of the model that the
    graph never calls (a training-only auxiliary head) has nothing to ignore; one naming
    nothing at all is a mistake (with the closest names)."""
    ignored: set[str] = set()
    for pattern in patterns:
        hits = {node for node, module in cg.module_names.items() if _names(pattern, module) or node == pattern}
        if not hits and not any(_names(pattern, module) for module in model_modules):
            raise ValueError(f"option 'ignore': pattern '{pattern}' matches no layer"
                             + did_you_mean(pattern, set(cg.module_names.values()), limit=8))
        ignored |= hits
    return ignored


def _model_modules(reference: Any) -> Collection[str]:
    """The module names of the model the pipeline captured (`fxopt.capture` records them: a
    symbolic graph holds only the modules it calls)."""
    info = getattr(reference, "meta", {}).get("fxopt", {}) if isinstance(reference, torch.fx.GraphModule) else {}
    recorded = info.get("module_names")
    if recorded is not None:
        return recorded
    return [name for name, _ in reference.named_modules()] if isinstance(reference, torch.nn.Module) else ()


def _names(pattern: str, module: str) -> bool:
    """Whether an `ignore` pattern names the module path (itself, a glob, or a parent of it)."""
    return bool(module) and (module == pattern or fnmatch.fnmatchcase(module, pattern) or module.startswith(pattern + "."))


#: What the selection counts as saved by removing a channel (the `cost` option).
COSTS = ("macs", "latency")

#: Rounds of re-measuring the timed layers at the chosen widths (`cost=latency`).
LATENCY_REFINEMENTS = 1

#: Rounds of surcharge doubling for `max_layer_ratio` before over-cap classes are held instead.
CAP_PRICING_ROUNDS = 16


def _refine_by_latency(timer: LayerTimer, cg: ChannelGraph, costs: dict, untimed_macs: np.ndarray,
                       sel: Selection, blocked: np.ndarray, groups: list, ratio: float, scope: str,
                       max_layer_ratio: float, round_to: int) -> Selection:
    """Re-linearize the timed layers' slopes at the widths chosen, solve again, and keep the
    selection whose timed layers measure fastest (sequential linear programming on a kernel
    cost that is a step function of the width: thinning a layer below its kernel's block
    saves nothing, which the first secant, taken at ``1 − ratio``, cannot know)."""
    best = (timer.total_seconds(sel.dead), sel, costs["timed"], costs["macs"])
    for _ in range(LATENCY_REFINEMENTS):
        costs["timed"] = timer.costs(ratio, sel.dead)
        costs["macs"] = untimed_macs + timed_macs(cg, costs["timed"])
        sel = _select_capped(cg, costs, blocked, groups, ratio, scope, max_layer_ratio, round_to)
        seconds = timer.total_seconds(sel.dead)
        if seconds < best[0]:
            best = (seconds, sel, costs["timed"], costs["macs"])
    _, sel, costs["timed"], costs["macs"] = best  # the plan shows the costs its selection used
    return sel


def _select_capped(cg: ChannelGraph, costs: dict, blocked: np.ndarray, groups: list,
                   ratio: float, scope: str, max_layer_ratio: float, round_to: int = 1) -> Selection:
    """`select` on normalized costs, with no producer slot losing more than `max_layer_ratio`.

    The cap is a constraint per slot, priced by Lagrangian relaxation: every channel of a slot
    over its cap gets an importance surcharge ``mu_s`` (first 1, a mean channel's normalized
    importance, so one round usually settles it), doubled while the slot stays over, and
    the same budget is solved again — so the optimizer itself moves the removals elsewhere,
    coupled classes included (a residual stream can still die with all its writers). If a few
    slots are still over after the rounds, their excess classes are held (`_over_cap`). The
    selection is then solved again for `round_to` (`_rounded_in_advance`), each time within the
    caps.
    """
    live = costs["prod"] > 0
    mean_macs = costs["macs"][live].mean() if live.any() and costs["macs"][live].mean() > 0 else 1.0
    macs = (costs["macs"] - costs["adapter"]) / mean_macs
    soft = {pair: c / mean_macs for pair, c in costs["soft"].items()}
    imp = costs["imp"]
    sets = [set(g) for g in groups]

    def solve(surcharge: np.ndarray, held: np.ndarray) -> Selection:
        return select(macs, imp + surcharge, costs["prod"], blocked | held, cg.precedence, sets, ratio, scope,
                      soft, counted=~blocked)

    no_surcharge = np.zeros(len(imp))
    slots = _capped_slots(cg, max_layer_ratio) if max_layer_ratio < 1 else []

    def capped(held: np.ndarray) -> Selection:
        """The selection with `held` classes kept, every slot within its cap."""
        sel = solve(no_surcharge, held)
        if not slots:
            return sel
        mu = np.zeros(len(slots))
        surcharge = no_surcharge
        for _ in range(CAP_PRICING_ROUNDS):
            over = np.array([int(sel.dead[pos].sum()) > allowed for pos, allowed in slots])
            if not over.any():
                return sel
            mu[over] = np.where(mu[over] > 0, 2 * mu[over], 1.0)
            surcharge = np.zeros(len(imp))
            for (pos, _), m in zip(slots, mu):
                if m:
                    np.add.at(surcharge, np.unique(pos), m)
            sel = solve(surcharge, held)
        held = held.copy()
        for _ in range(8):  # the fallback: hold what is still over, solve the rest again
            over = _over_cap(cg, sel.dead, imp, max_layer_ratio)
            if not over.any():
                break
            held |= over
            sel = solve(surcharge, held)
        return sel

    # rounding only gives channels back, so no re-solve it asks for breaks a cap
    return _rounded_in_advance(cg, capped(np.zeros_like(blocked)), costs, blocked, round_to, capped)


#: Selections `_rounded_in_advance` compares at most (the first, and the ones solved again).
ROUNDING_SOLVES = 9


def _rounded_in_advance(cg: ChannelGraph, sel: Selection, costs: dict, blocked: np.ndarray, round_to: int,
                        solve: Callable[[np.ndarray], Selection]) -> Selection:
    """Of `sel` and the selections solved again with the classes `_round_slots` would give
    back held, the one that keeps the most channels removed once rounded. Rounding only
    revives: every layer width up to a multiple of `round_to`, and a value that must keep a
    channel back to one. After the fact, the budget those classes were chosen for is lost: a
    ShuffleNet's shuffled groups at scope=global lost no channel at all (prune tester), and a
    RegNet's grouped convs (groups of 46, so 4 classes at least at round_to=8) thinned to 1
    class went back to 4 in every block, 69% of the MACs kept against 26% at round_to=1.
    Solved again, the budget goes to channels that stay removed; where holding more loses to an
    earlier selection (a Res2Net at scope=local: 296 removed against 320; adversary), the
    earlier one is kept."""
    prod = costs["prod"]
    held = np.zeros(len(costs["imp"]), dtype=bool)
    first, best, best_removed = sel, sel, -1
    for attempt in range(ROUNDING_SOLVES):
        rounded = close_free_junctions(sel.dead.copy(), prod, blocked, cg.precedence)
        _round_slots(cg, rounded, costs["imp"], round_to)
        removed = int(prod[rounded].sum())
        if removed > best_removed:
            best, best_removed = sel, removed
        given_back = sel.dead & ~rounded
        if not given_back.any() or attempt == ROUNDING_SOLVES - 1:
            break
        held |= given_back
        sel = solve(held)
    best.first_removed = None if best is first else first.removed
    return best


def _capped_slots(cg: ChannelGraph, cap: float) -> list[tuple[np.ndarray, int]]:
    """(class positions, channels it may lose) per producer slot. Channels no reader takes
    (`ChannelGraph.unread_classes`) are left out: losing them costs the layer nothing, and a
    surcharge on them made the selection keep them and remove read ones instead."""
    out = []
    for rule in cg.rules.values():
        if rule.category in ("producer", "param", "gather"):
            slot = cg.slots[rule.outputs[0]]
            pos = cg.positions(slot.id)
            out.append((pos[~cg.unread_classes[pos]], int(np.floor(cap * slot.size + 1e-9))))
    return out


def _over_cap(cg: ChannelGraph, dead: np.ndarray, imp: np.ndarray, cap: float) -> np.ndarray:
    """Classes to keep alive so no producer slot loses more than `cap` of its channels: in a slot
    over the cap, the most important dead classes come back, then its live classes are held."""
    hold = np.zeros(len(dead), dtype=bool)
    if cap >= 1:
        return hold
    for pos, allowed in _capped_slots(cg, cap):
        excess = int(dead[pos].sum()) - allowed
        if excess <= 0:
            continue
        hold[pos[~dead[pos]]] = True
        gone, count = np.unique(pos[dead[pos]], return_counts=True)
        for i in np.argsort(-imp[gone], kind="stable"):  # a class may hold several positions
            hold[gone[i]] = True
            excess -= int(count[i])
            if excess <= 0:
                break
    return hold


def _round_slots(cg: ChannelGraph, dead: np.ndarray, imp: np.ndarray, round_to: int) -> None:
    """Each producer slot (depthwise convs too), and each value a producer reads, keeps a
    multiple of round_to channels (or all of them; and at least one). A value a conv reads is
    not always some producer's output: a residual stream is the union of its writers' channels,
    a slice of a concat cuts one writer's part; rounding the writers alone leaves those odd.
    Reviving only ever adds channels, so the rounds stop."""
    # a stored tensor read directly (a position embedding, Swin's per-head bias table) is no
    # layer width: its channels are a layer's or a stream's, rounded there; rounding a table's
    # 4-entry head axis on its own gave every pruned head back
    rounded = _rounded_slots(cg)
    may_empty = _emptiable(cg, rounded)
    requirers = required_by(cg.precedence)
    for _ in range(len(cg.slots) + 8):
        changed = False
        for slot in cg.slots:
            sid = slot.id
            if sid in may_empty:
                continue
            pos = cg.positions(sid)
            size = slot.size
            alive = int((~dead[pos]).sum())
            step = round_to if sid in rounded else 1
            want = min(max(step, -(-alive // step) * step), size)
            if alive >= want:
                continue
            # Channels whose return brings back the fewest others first: a residual add's second
            # writer then takes back the channels its first writer's return kept in the sum,
            # not its own most important ones (the sum kept both sets, and each writer
            # needed an adapter scattering it in: 12 on a RegNet at round_to=8)
            dead_classes = list(dict.fromkeys(pos[dead[pos]].tolist()))
            dead_classes.sort(key=lambda k: (_revived_with(k, dead, requirers), -imp[k]))
            need = want - alive
            back = []
            for k in dead_classes:
                if need <= 0:
                    break
                back.append(k)
                need -= int((pos == k).sum())
            revive(dead, back, requirers)
            changed = True
        if not changed:
            break


def _revived_with(k: int, dead: np.ndarray, required_by: dict[int, list[int]]) -> int:
    """How many other dead classes `revive` would bring back with class `k`."""
    seen, stack = {k}, [k]
    while stack:
        for u in required_by.get(stack.pop(), ()):
            if dead[u] and u not in seen:
                seen.add(u)
                stack.append(u)
    return len(seen) - 1


#: Channelwise ops torch runs on a value with no channels (an empty axis): pooling, interpolation,
#: reflect padding and a reshape with -1 refuse one, so their inputs keep a channel.
_EMPTY_SAFE = ZERO_PRESERVING | frozenset({
    "sigmoid", "hardsigmoid", "mul", "div", "softmax", "log_softmax", "permute", "transpose", "movedim", "cat",
    "split", "chunk", "tensor_split", "stack", "unbind", "layer_norm", "rms_norm", "where", "masked_fill", "clamp",
    "exp", "cos", "sdpa", "matmul", "expand", "expand_as", "unsqueeze", "squeeze", "fill_like", "pow", "rsqrt", "reciprocal", "softplus"})


def _rounded_slots(cg: ChannelGraph) -> set[int]:
    """Layer widths `round_to` rounds: producer slots (depthwise convs too) and the values
    producers read."""
    rounded = {r.outputs[0] for r in cg.rules.values()
               if r.category in ("producer", "gather") or r.info.get("depthwise")}
    return rounded | {sid for r in cg.rules.values() for _, sid in r.consumed}


def _emptied_slots(cg: ChannelGraph, dead: np.ndarray) -> list:
    """The slots `dead` removes every channel of that must keep one (not `_emptiable`: a
    layer's width, a conv read by a cat alone)."""
    emptiable = _emptiable(cg, _rounded_slots(cg))
    return [slot for slot in cg.slots if slot.id not in emptiable
            and len(pos := cg.positions(slot.id)) and dead[pos].all()]


def _emptiable(cg: ChannelGraph, rounded: set[int]) -> set[int]:
    """Slots that may lose every channel (`_may_empty`), less the layer widths (`rounded`:
    `_rounded_slots`)."""
    return _may_empty(cg) - rounded


def _may_empty(cg: ChannelGraph) -> set[int]:
    """Slots that may lose every channel: each reader maps them into its own output channel by
    channel, with an op that runs on an empty axis (a split piece of one head, normed and
    concatenated back: StableLM's per-head q/k norms), so the reader's output is empty too."""
    readers: dict[int, list[Rule]] = {}
    for rule in cg.rules.values():
        for _, sid, *_ in rule.inputs:
            readers.setdefault(sid, []).append(rule)
    return {sid for sid, rules in readers.items()
            if all(r.category in ("pass", "split") and r.kind in _EMPTY_SAFE for r in rules)}


def _annotate(gm: torch.fx.GraphModule, plan: PrunePlan) -> None:
    cg = plan.channel_graph
    nodes = {n.name: n for n in gm.graph.nodes}
    group_of = plan.slot_groups()
    full = plan.boundary.full
    for s in cg.slots:
        node = nodes.get(s.node)
        if node is None:
            continue
        annotate(node, "prune.group", group_of.get(s.id))
        if s.id in full:
            annotate(node, "prune.reexpanded", True)
    for name, reason in cg.pinned_nodes.items():
        if name in nodes:
            annotate(nodes[name], "prune.pinned", reason)
    for u, v in plan.boundary.cut_edges:
        target = nodes.get(v.split(":", 1)[1] if v.startswith(("pin:", "use:")) else v.split(":")[0])
        if target is not None:
            annotate(target, "prune.cut_from", u)
