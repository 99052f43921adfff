"""Per-class costs for the selection: importance lost and MACs saved by removing a class.

Importance is measured where information is destroyed — at the *producers* of a class
(conv/linear/embedding/addmm/``x @ W`` output rows, parameters used directly, the affine of an
exact norm whose output is gathered) plus the affine of the norms and depthwise convs inside
it. Consumer columns are not counted: they read a channel that is gone. A producer's rows lie
along its weight layout's output axis
(`channel_model.WEIGHT_LAYOUTS`: axis 0 of a linear/conv weight, axis 1 of an addmm/matmul
weight stored [in, out] or of an embedding table).

- ``l1`` / ``l2``: norm of each producer row (weight and bias, plus norm affine);
- ``bn_scale``: |gamma| of the batchnorms in the class (classes without one fall back to l1);
- ``taylor``: |sum(activation * gradient)| at the producer outputs over `ctx.calibration`
  batches, with the loss ``sum(output**2)`` (no labels needed).

Each producer slot's scores are divided by their mean, so layers of different scale compete
fairly; a class that spans several producers and norms gets the *mean* of their normalized
scores (as Torch-Pruning's group importance does) — a sum would make a channel look more important
the more norms read it (every dense layer's batchnorm over a DenseNet concat). MACs count what
removing one channel saves: its producer row, every consumer column, depthwise and attention
work in between.
With `prune{cost=latency}` the timed producers' rows and columns save their measured time
instead, in MAC equivalents (`timed_macs`, from `latency.LayerTimer`).
"""
from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np
import torch
import torch.fx

from fxopt.errors import FxoptError
from fxopt.ir import op_view, run_graph, tensor_meta

from .apply import is_plain_add
from .channel_model import ChannelGraph, producer_weights
from .latency import LayerCost

IMPORTANCES = ("l1", "l2", "bn_scale", "taylor")

# What one adapter costs, in MACs of a dense layer (~31 GMAC/s, 1 thread), measured on CPU
# against a conv/linear of the same tensors: ~16 µs of fixed overhead, then per element of the
# re-expanded value: a re-expansion (index_select from cat([x, zeros])) ~8-30 MACs on a leading
# channel axis and ~90 on the last axis (a strided gather is much slower than a GEMM per
# element); a block output scattered into a live stream by a plain add is folded into one
# index_add (`apply.fold_scatters_into_adds`), which costs ~6-13 and ~14-19 over the add.
ADAPTER_FIXED_MACS = 500_000
ADAPTER_ELEMENT_MACS = {"leading": 8, "last": 90}
SCATTER_ADD_ELEMENT_MACS = {"leading": 6, "last": 18}
# An exact layer/RMS norm pads its input with zeros at the end (a copy: ~6 µs on 64x256 where
# the re-expansion above takes ~57) and gathers its kept output channels (index_select, ~19 µs).
PAD_ELEMENT_MACS = {"leading": 8, "last": 12}
GATHER_ELEMENT_MACS = {"leading": 8, "last": 36}


def _affine_scores(view, p: int) -> np.ndarray:
    """Per channel: the p-norm of a norm's affine weight plus its bias (if any)."""
    b = view.param("bias")
    return _row_norm(view.param("weight"), 0, p) + (_row_norm(b, 0, p) if b is not None else 0)


def _shape(gm_node) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor_meta(gm_node)[0])


def _row_norm(t: torch.Tensor, axis: int, p: int) -> np.ndarray:
    t = t.detach().float().movedim(axis, 0).reshape(t.shape[axis], -1)
    norm = torch.linalg.vector_norm(t, ord=p, dim=1)  # one fused pass, no |t| temporary
    return (norm if p == 1 else norm.pow(2)).numpy().astype(np.float64)


def class_costs(gm: torch.fx.GraphModule, cg: ChannelGraph, importance: str = "l1",
                calibration: list | None = None, timed: Collection[str] = ()) -> dict[str, np.ndarray]:
    """Arrays per class: `imp` (normalized), `macs`, `prod` (producer channels).

    Producers named in `timed` add no MACs: their savings come from `timed_macs`.
    """
    if importance not in IMPORTANCES:
        raise ValueError(f"unknown importance '{importance}'; valid: {', '.join(IMPORTANCES)}")
    n = cg.n_classes
    imp = np.zeros(n)
    contributions = np.zeros(n)
    bn = np.zeros(n)
    has_bn = np.zeros(n, dtype=bool)
    macs = np.zeros(n)
    prod = np.zeros(n, dtype=np.int64)
    param_prod = np.zeros(n, dtype=np.int64)  # entries of parameters read as values (see the end)
    nodes = {node.name: node for node in gm.graph.nodes}
    p = 2 if importance == "l2" else 1
    taylor = _taylor_scores(gm, cg, calibration) if importance == "taylor" else {}

    def add_scores(sid: int, scores: np.ndarray, target: np.ndarray) -> None:
        mean = scores.mean() if scores.size and scores.mean() > 0 else 1.0
        np.add.at(target, cg.positions(sid), scores / mean)
        if target is imp:  # counted for the mean over a class's contributors
            np.add.at(contributions, cg.positions(sid), 1)

    for name, rule in cg.rules.items():
        node = nodes.get(name)
        if node is None:
            continue
        if rule.category == "param":
            sid = rule.outputs[0]
            val = getattr_value(gm, node)
            add_scores(sid, _row_norm(val, cg.slots[sid].axis, p), imp)
            np.add.at(param_prod, cg.positions(sid), 1)
            continue
        if rule.category == "gather":  # an exact norm's output: its affine is what is lost
            sid = rule.outputs[0]
            scores = taylor[name] if name in taylor else _affine_scores(op_view(gm, node), p)
            add_scores(sid, scores, imp)
            np.add.at(prod, cg.positions(sid), 1)
            continue
        if rule.category not in ("producer", "norm", "pass"):
            continue
        view = op_view(gm, node)
        out = _shape(node)
        if rule.category == "producer":
            sid = rule.outputs[0]
            pw = producer_weights(gm, node, rule)
            w = pw.weight.get()
            scores = _row_norm(pw.rows(w), 0, p)
            b = pw.bias.get() if pw.bias is not None else None
            if b is not None:
                scores = scores + (b.detach().double().abs().numpy() if p == 1 else b.detach().double().pow(2).numpy())
            if importance == "taylor" and name in taylor:
                scores = taylor[name]
            add_scores(sid, scores, imp)
            np.add.at(prod, cg.positions(sid), 1)
            if name in timed:  # its channels save measured time instead (`timed_macs`)
                continue
            if rule.kind == "conv":
                k = math.prod(w.shape[2:])
                groups = rule.info["groups"]
                spatial = math.prod(out) // out[1]
                cin_g, cout_g = w.shape[1], w.shape[0] // groups
                np.add.at(macs, cg.positions(sid), spatial * cin_g * k)
                for _, src_sid in rule.consumed:
                    np.add.at(macs, cg.positions(src_sid), spatial * cout_g * k)
            elif rule.kind == "conv_transpose":  # each input position scatters a kernel window per output channel
                x_shape = _shape(view.input)
                spatial, k = math.prod(x_shape) // x_shape[1], math.prod(w.shape[2:])
                np.add.at(macs, cg.positions(sid), spatial * (w.shape[0] // pw.groups) * k)
                for _, src_sid in rule.consumed:
                    np.add.at(macs, cg.positions(src_sid), spatial * w.shape[1] * k)
            elif pw.in_axis is not None:  # linear, addmm, x @ W: one dot product per row and output
                rows = math.prod(out) // out[-1]
                np.add.at(macs, cg.positions(sid), rows * w.shape[pw.in_axis])
                for _, src_sid in rule.consumed:
                    np.add.at(macs, cg.positions(src_sid), rows * w.shape[pw.out_axis])
        elif rule.category == "norm":
            sid = rule.outputs[0]
            if rule.kind in ("batch_norm", "layer_norm", "rms_norm", "group_norm"):
                g = view.param("weight")
                if g is not None:
                    add_scores(sid, _affine_scores(view, p), imp)
                    if rule.kind == "batch_norm":
                        add_scores(sid, g.detach().double().abs().numpy(), bn)  # numpy has no bfloat16
                        has_bn[cg.positions(sid)] = True
            elif rule.info.get("depthwise"):
                w = view.param("weight")
                add_scores(sid, _row_norm(w, 0, p), imp)
                spatial = math.prod(out) // out[1]
                np.add.at(macs, cg.positions(sid), spatial * math.prod(w.shape[2:]))
        elif rule.kind == "sdpa" and rule.consumed:  # over one head's features: q.k per q/k
            (q, sq), (k, _) = rule.consumed[:2]      # feature, probs @ v per v feature
            per_feature = math.prod(_shape(nodes[q])[:-1]) * _shape(nodes[k])[-2]
            np.add.at(macs, cg.positions(sq), per_feature)
            np.add.at(macs, cg.positions(rule.outputs[0]), per_feature)
        elif rule.kind == "matmul" and not rule.outputs:  # contracted features: one MAC per score each
            np.add.at(macs, cg.positions(rule.consumed[0][1]), math.prod(out))
        elif rule.kind in ("matmul", "sdpa"):
            sid = rule.outputs[0]
            size = cg.slots[sid].size
            if rule.kind == "matmul":
                a = nodes[rule.inputs[0][0]]
                total = math.prod(out) * _shape(a)[-1]
            else:
                q, k = (nodes[r[0]] for r in rule.inputs[:2])
                total = 2 * math.prod(_shape(q)) * _shape(k)[-2]
            np.add.at(macs, cg.positions(sid), total / size)
    if importance == "bn_scale":
        imp = np.where(has_bn, bn, imp)
    imp = imp / np.maximum(contributions, 1)
    imp[cg.unread_classes] = 0.0  # no reader needs them: removing them loses nothing
    prod += np.where(_parameter_channels(cg, prod, macs), param_prod, 0)
    return {"imp": imp, "macs": macs, "prod": prod}


def _parameter_channels(cg: ChannelGraph, prod: np.ndarray, macs: np.ndarray) -> np.ndarray:
    """Classes whose parameter entries count as channels: those no layer produces but a layer
    reads (DETR's learned queries), or where parameters alone make a sum's channels (an affine
    spelled out, ``w * y + b`` of a normalized y). A parameter on a channel a layer produces (a
    layer scale) is that channel, counted once; one added to a produced stream (MobileBERT's
    NoNorm offset) saves nothing, and a zero one, at no importance, would meet the ratio on
    paper while the layers kept their channels."""
    counted = (prod == 0) & (macs > 0)
    made_of: dict[int, list[int]] = {}
    for y, x in cg.precedence:  # y (a sum's channel) dies only with every x it adds up
        made_of.setdefault(y, []).append(x)
    for y, parts in made_of.items():
        if prod[y] == 0 and not any(prod[x] > 0 for x in parts):
            counted[parts] = True
    return counted


def timed_macs(cg: ChannelGraph, layer_costs: dict[str, LayerCost]) -> np.ndarray:
    """What removing each class saves in the timed producers (`latency.LayerTimer.costs`), in
    MAC equivalents: measured seconds per channel times the timed layers' overall MACs/s."""
    macs = np.zeros(cg.n_classes)
    total_s = sum(c.full_s for c in layer_costs.values())
    if total_s <= 0:
        return macs
    macs_per_s = sum(c.macs for c in layer_costs.values()) / total_s
    for name, cost in layer_costs.items():
        rule = cg.rules[name]
        np.add.at(macs, cg.positions(rule.outputs[0]), cost.per_out_s * macs_per_s)
        for _, src_sid in rule.consumed:
            np.add.at(macs, cg.positions(src_sid), cost.per_in_s * macs_per_s)
    return macs


def getattr_value(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    value = gm
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value


def _taylor_scores(gm: torch.fx.GraphModule, cg: ChannelGraph, calibration: list | None) -> dict[str, np.ndarray]:
    """|sum(a * dL/da)| per producer output channel over the calibration batches."""
    if not calibration:
        raise ValueError("importance 'taylor' needs calibration batches (it scores channels by their "
                         "gradients on them): fxopt.optimize(..., calibration=batches), or "
                         "fxopt.passes.prune.prune_pass.analyze(..., calibration=batches)")
    producers = {name: cg.slots[r.outputs[0]] for name, r in cg.rules.items()
                 if r.category in ("producer", "gather")}  # a gathered norm's output is probed too
    scores: dict[str, np.ndarray] = {}
    if not producers:  # nothing to probe (e.g. a lone batchnorm): no taylor scores to give
        return scores

    for i, batch in enumerate(calibration):
        args, kwargs = batch if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[1], dict) \
            else ((batch,) if isinstance(batch, torch.Tensor) else tuple(batch), {})
        probes: dict[str, tuple] = {}

        def add_probe(node, value):
            slot = producers.get(node.name)
            if slot is None or not isinstance(value, torch.Tensor) or not value.is_floating_point():
                return None
            probe = torch.zeros_like(value, requires_grad=True)
            probes[node.name] = (probe, value.detach(), slot.axis)
            return value + probe

        with torch.enable_grad():
            # private buffers: stateful modules in the graph (observers, batchnorm in training
            # mode) run as copies, so scoring never writes into the model being pruned
            try:
                out = run_graph(gm, args, kwargs, add_probe, private_buffers=True)
            except Exception as exc:  # a batch of the wrong shape fails deep inside a layer
                raise _batch_failed(i, args, kwargs, exc) from exc
            leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
            if not leaves or not probes:  # the output does not depend on any producer
                continue
            # finite outputs only: masked logits (-inf by design) have no gradient there anyway
            loss = sum(torch.where(torch.isfinite(t), t, 0).double().pow(2).sum() for t in leaves)
            if not torch.isfinite(loss):
                raise _not_finite(i, args, kwargs, "the model's output on it")
            grads = torch.autograd.grad(loss, [v[0] for v in probes.values()], allow_unused=True)
        for (name, (_, act, axis)), grad in zip(probes.items(), grads):
            if grad is None:
                continue
            contrib = (act * grad).movedim(axis, -1)
            per_sample = contrib.reshape(contrib.shape[0] if contrib.dim() > 1 else 1, -1, contrib.shape[-1]).sum(1)
            s = per_sample.abs().sum(0).double().numpy()
            if not np.isfinite(s).all():
                raise _not_finite(i, args, kwargs, f"the activation x gradient of '{name}'")
            scores[name] = scores.get(name, 0) + s
    return scores


def _not_finite(i: int, args: tuple, kwargs: dict, what: str) -> FxoptError:
    """A batch whose scores would be NaN: one NaN input pixel spread to whole layers' scores
    (normalized by their mean), which then steered the selection silently (prune tester)."""
    bad_input = any(isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all()
                    for t in torch.utils._pytree.tree_leaves((args, kwargs)))
    why = "it holds NaN or inf" if bad_input else "its values overflow in the model"
    return FxoptError(f"importance='taylor': calibration batch {i}: {what} is not finite ({why}), so its "
                      "scores would be NaN; fix or drop that batch (importance=l1 needs no data)")


def _batch_failed(i: int, args: tuple, kwargs: dict, exc: Exception) -> FxoptError:
    shapes = [str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor)]
    shapes += [f"{k}={tuple(v.shape)}" for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return FxoptError(f"importance='taylor': calibration batch {i} (tensor shapes [{', '.join(shapes)}]) does not "
                      f"run through the model: {type(exc).__name__}: {first_line}; give batches shaped like the "
                      "example inputs")


def adapter_costs(gm: torch.fx.GraphModule, cg: ChannelGraph, blocked: np.ndarray, ignored: set[str],
                  ratio: float, scale: float = 1.0) -> tuple[np.ndarray, dict[tuple[int, int], float]]:
    """What removing a class costs in adapters, in MACs: `(charge per class, soft charges)`.

    Adapters appear where a value loses channels its reader still needs: before a pinned or
    ignored reader or an exact norm (re-expansion), after an exact norm (the gather of its kept
    channels) and at a junction input whose output channel lives (the block
    output is scattered back into the stream). Cutting where the junction output cannot die is
    a plain charge on the input class; otherwise it is a *soft* charge ``(x, y) -> c``, paid only
    when x dies and y lives. An adapter is shared by the channels expected to leave its value
    (ratio × size), so each pays that share of it. `scale` multiplies every charge (the pass
    option `adapter_cost`; 0 charges nothing).
    """
    nodes = {node.name: node for node in gm.graph.nodes}
    charge = np.zeros(cg.n_classes)
    soft: dict[tuple[int, int], float] = {}
    if scale == 0:
        return charge, soft
    for name, rule in cg.rules.items():
        if rule.category == "gather" and name not in ignored:  # padded before the norm, gathered after
            pad = PAD_ELEMENT_MACS if rule.kind != "group_norm" else None
            for _, sid in rule.consumed:
                charge[np.unique(cg.positions(sid))] += scale * _adapter_share(nodes, cg, sid, ratio, pad)
            sid = rule.outputs[0]
            charge[np.unique(cg.positions(sid))] += scale * _adapter_share(nodes, cg, sid, ratio,
                                                                           GATHER_ELEMENT_MACS)
        elif rule.category == "pinned" or name in ignored:
            for _, sid in rule.consumed + [(r[0], r[1]) for r in rule.inputs]:
                charge[np.unique(cg.positions(sid))] += scale * _adapter_share(nodes, cg, sid, ratio)
        elif rule.category == "junction":
            per_element = SCATTER_ADD_ELEMENT_MACS if name in nodes and is_plain_add(nodes[name]) else None
            for _, sid, in_pos, out_pos, out in rule.inputs:
                share = scale * _adapter_share(nodes, cg, sid, ratio, per_element)
                xs, ys = cg.positions(sid)[in_pos], cg.positions(out)[out_pos]
                keys = np.unique(xs[xs != ys] * cg.n_classes + ys[xs != ys])  # each class pair once
                for x, y in zip((keys // cg.n_classes).tolist(), (keys % cg.n_classes).tolist()):
                    if blocked[y]:
                        charge[x] += share
                    else:
                        soft[(x, y)] = soft.get((x, y), 0.0) + share
    charge[blocked] = 0.0
    return charge, soft


def _adapter_share(nodes: dict, cg: ChannelGraph, sid: int, ratio: float, per_element: dict | None = None) -> float:
    slot = cg.slots[sid]
    shape = _shape(nodes[slot.node])
    where = "last" if slot.axis == len(shape) - 1 else "leading"
    total = ADAPTER_FIXED_MACS + (per_element or ADAPTER_ELEMENT_MACS)[where] * math.prod(shape)
    return total / max(1.0, ratio * slot.size)
