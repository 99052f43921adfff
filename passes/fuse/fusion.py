"""`fuse` — operator fusion on the semantic op view, with the pattern tables of `rules.py`.

What it rewrites (each step can be switched off by an option):

- `remove_noops`: eval-mode dropout and identities vanish;
- `reductions`: a max or min over an axis whose indices nobody reads (``torch.max(x, 2)[0]``)
  becomes `amax`/`amin`, 5-20x faster (its kernel computes no indices), and a sum over the
  axis a stack made (``stack(xs, d).sum(d)``, ``(stack(xs, d) * w).sum(d)``: SKNet's
  selective-kernel attention) becomes the sum of the pieces (times their slices of `w`);
- `norms`: an instance norm that normalizes by its input's own statistics (no running ones)
  becomes the group norm of one channel per group, the same values from a kernel 4-50x faster
  on CPU (torch's instance_norm runs batch_norm over a reshaped copy); and a layer norm over an
  image's channels spelled out (ConvNeXt's, NAFNet's LayerNorm2d) becomes one
  `channel_layer_norm` call, a `layer_norm` over the (N, H, W, C) view of a channels-last value;
- `fold_bn`: conv (1d/2d/3d, transposed) + batchnorm and linear + batchnorm fold into one
  conv/linear with new weights, and so does a batchnorm right before a conv that pads no zeros
  or a linear (`bn+conv`, `bn+pad+conv`, `bn+linear`) (computed in float64, stored as new `get_attr` tensors; the
  originals are never written to, so shared modules and tied weights stay intact);
- `fold_bias`: a bias parameter added after a bias-less linear (`x @ self.weight.T + self.bias`,
  Falcon-style layers) becomes that linear's bias, and a stored per-channel value added after a
  conv (`conv(x) + b.view(1, -1, 1, 1)`) joins the conv's bias (`conv+bias`);
- `fold_scale`: a stored per-channel factor multiplied after a conv or linear (a layer scale:
  CaiT's and DeiT III's ``gamma * fc(x)``, ConvNeXt's ``gamma * pwconv2(x)``,
  ``gamma[:, None, None] * conv(x)``) is folded into its weights and bias, and so is a number
  multiplying or dividing their output (EDSR's residual scaling ``body(x) * 0.1``);
- `merge_linears`: linear(linear(x)) with nothing between becomes one linear, when that does
  not cost more multiply-adds;
- `attention`: softmax(Q Kᵀ / c [+ mask]) V and softmax(Q Kᵀ * s [+ mask]) V become
  `F.scaled_dot_product_attention(Q, K, V, attn_mask=mask, scale=...)`; a boolean mask filled
  with −inf (`s.masked_fill(m, -inf)`) becomes `attn_mask=~m`. The scale may be a number the
  graph computes from shapes (`/ hd ** 0.5`, `* k.size(-1) ** -0.5`, symbolic traces): SDPA
  then reads it at run time. A softmax given its input's dtype and a cast after it that
  changes nothing — Hugging Face's eager `softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)`
  on float32 scores, `.float()`, `type_as`, export's `aten.to.dtype`/`_to_copy` — are taken too
  (patterns `.../cast`), and so is such a cast before the softmax (`softmax(s.float(), dim=-1)`,
  `attention/cast-into-softmax`); a float32 softmax of float16/bfloat16 scores is not SDPA's and stays;
- `activations`: activations spelled out in elementwise ops (``x * sigmoid(x)``,
  ``x * relu6(x + 3) / 6``, the erf and tanh GELUs) become the one op they compute
  (`activations.py`), so the epilogues below can group them with their conv or linear;
- `annotate`: conv/linear + activation (relu, relu6/hardtanh, hardswish, silu, gelu, leaky_relu,
  sigmoid, tanh, hardsigmoid),
  conv + residual add (+ relu) and add + relu are *annotated* as fused groups in
  `node.meta["fxopt.annotations"]` (see `rules.py` for the contract). In eager PyTorch a
  conv followed by a relu is already as fast as it gets; only a kernel with fused post-ops
  gains, so the ops stay as they are and `lower-cpu` turns each group into one oneDNN call.
  Quantization reads the same annotations to treat conv-bn-relu as one conv+relu.

Before / after (symbolic front end)::

    %conv = call_module conv(%x)           %w = get_attr conv_bn_folded_weight
    %bn = call_module bn(%conv)       ->   %b = get_attr bn_folded_bias
    %relu = call_function relu(%bn)        %conv2d = conv2d(%x, %w, %b, ...)   {fused: conv+relu}
                                           %relu = call_function relu(%conv2d) {fused: conv+relu}

Preconditions: eval mode. `capture` puts a copy of the model in eval mode, and warns
(`fxopt.TrainingModeWarning`) when the model had a batchnorm or dropout in training mode: what
`fuse` folds are then the running statistics of the eval copy, and verification compares against
that copy. A batchnorm still in training mode in a graph the user captured is left unfolded, with
the same warning naming its node: it normalizes each batch with that batch's statistics, which
no folded weight holds. Tolerance "float": folding reorders float arithmetic. Works on symbolic
and export graphs.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch.fx

from fxopt import Pass, PassContext, PassResult, PassWarning, TrainingModeWarning
from fxopt.distillation import inference_kernels
from fxopt.errors import node_label, user_source_line, user_stacklevel
from fxopt.ir import functionalize_writes, op_view
from fxopt.patterns import PatternSet, apply_patterns

from . import rules
from .activations import ACTIVATION_FORMS


def _warn_lowered_kernels(gm: torch.fx.GraphModule) -> None:
    """`lower-cpu` before `fuse` leaves batchnorms and activations next to oneDNN kernels that
    nothing folds into (the numbers are right, the speed lost, silently; api tester): say so,
    with the order that works, as `quantize` does."""
    lowered = [name for name, target in inference_kernels(gm) if "quantize" not in target]
    if lowered:
        warnings.warn(f"fuse: the graph holds kernels lower-cpu wrote (e.g. '{lowered[0]}'), which fuse cannot "
                      "fold batchnorms or activations into: run fuse before lower-cpu", PassWarning,
                      stacklevel=user_stacklevel())


@dataclass
class Fuse(Pass):
    """Fold, merge, recognize and annotate fusable op groups; see the module docstring."""

    name = "fuse"
    tolerance = "float"
    remove_noops: bool = True
    reductions: bool = True
    norms: bool = True
    fold_bn: bool = True
    fold_bias: bool = True
    fold_scale: bool = True
    merge_linears: bool = True
    attention: bool = True
    activations: bool = True
    annotate: bool = True
    #: A node name: the stats then say, per pattern, why it did not match rooted there.
    debug: str = ""

    def patterns(self) -> PatternSet:
        table = PatternSet()
        if self.remove_noops:
            table = table + rules.NOOPS
        if self.reductions:
            table = table + rules.REDUCTIONS + rules.STACK_SUMS
        if self.norms:
            table = table + rules.NORMS + rules.CHANNEL_LAYER_NORMS
        wanted = set()
        if self.fold_bn:
            wanted |= {"bn-before-slice", *rules.BN_INTO_CAT, "conv+bn", "linear+bn", "linear+swap+bn",
                       "bn+conv", "bn+pad+conv", "bn+linear"}
        if self.fold_bias:
            wanted |= {"linear+bias", "conv+bias"}
        if self.fold_scale:
            wanted |= {"conv+scale", "linear+scale", "conv+scale/number", "linear+scale/number"}
        if self.merge_linears:
            wanted.add("linear+linear")
        if self.attention:
            wanted |= set(rules.ATTENTION)
        if self.activations:
            table = table + ACTIVATION_FORMS
        table = table + rules.FOLDS.select(wanted)
        if self.annotate:
            table = table + rules.EPILOGUES
        return table

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        from fxopt.passes.cleanup import DeadCodeElimination

        if self.fold_bn:
            _warn_training_batchnorms(gm)
        _warn_lowered_kernels(gm)
        # ``y.mul_(sigmoid(y))`` then y read again: as the out-of-place op its readers read, the
        # swish it spells matches (the pattern matcher refuses a write others would miss)
        functionalized = functionalize_writes(gm)
        report = apply_patterns(gm, self.patterns(), debug=self.debug or None)
        changed_graph = any(n for name, n in report.counts.items()
                            if name not in {p.name for p in rules.EPILOGUES})
        stats = {"matches": dict(report.counts), "locations": dict(report.locations)}
        if report.why_not:
            stats["why_not"] = dict(report.why_not)
        if changed_graph:
            dce = DeadCodeElimination().run(gm, ctx)
            stats["nodes_removed"] = dce.stats["nodes_removed"]
        if functionalized:
            stats["writes_functionalized"] = functionalized
        return PassResult(gm, modified=bool(report.counts or functionalized), stats=stats)


def _warn_training_batchnorms(gm: torch.fx.GraphModule) -> None:
    """Warn about each batchnorm in training mode that follows a conv or linear: `fold_bn` keeps
    it (a graph the user captured in training mode; `capture` itself captures in eval mode)."""
    for node in gm.graph.nodes:
        view = op_view(gm, node)
        if view is None or view.kind != "batch_norm" or not view.attrs.get("training"):
            continue
        source = op_view(gm, view.input) if isinstance(view.input, torch.fx.Node) else None
        reader = op_view(gm, next(iter(node.users))) if len(node.users) == 1 else None
        if source is None or source.kind not in ("conv", "linear"):
            source = reader if reader is not None and reader.kind in ("conv", "linear") else None  # bn+conv
        if "running_mean" not in view.params or source is None:
            continue  # without running statistics, eval mode would not fold it either
        line = user_source_line(node.meta.get("stack_trace"))
        where = f" (at {line})" if line else ""
        what = (f"normalizes each batch with that batch's statistics, which no folded weight holds, so it is "
                f"not folded into its {source.kind} '{source.node.name}'")
        if _in_a_batchnorm_module(node):  # an nn.BatchNorm left in training mode: eval() is the fix
            warnings.warn(f"fuse: {node_label(node)} is a batchnorm in training mode: it {what}; call "
                          f"model.eval() before capturing the model to fold its running statistics{where}",
                          TrainingModeWarning, stacklevel=user_stacklevel())
        else:  # the forward asks for batch statistics itself: model.eval() changes nothing
            warnings.warn(f"fuse: {node_label(node)} is called with training=True by the model's forward: it "
                          f"{what}{where}", PassWarning, stacklevel=user_stacklevel())


def _in_a_batchnorm_module(node: torch.fx.Node) -> bool:
    """Whether the node is an nn.BatchNorm's call (a module call, or the op export recorded
    inside one), not a functional batch_norm the model's own forward makes."""
    if node.op == "call_module":
        return True
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return False
    _, kind = list(stack.values())[-1]
    name = kind if isinstance(kind, str) else getattr(kind, "__qualname__", "")
    return "BatchNorm" in name.rsplit(".", 1)[-1]

