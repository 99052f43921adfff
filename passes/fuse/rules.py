"""The built-in fusion patterns, as tables written with fxopt.patterns.

Each table is a `PatternSet`; `fuse` applies them in order:

- `NOOPS`: eval-mode dropout and identities disappear;
- `REDUCTIONS`, `STACK_SUMS`: a max/min whose indices nobody reads as amax/amin, a sum over the
  axis a stack made as the pieces added;
- `NORMS`, `CHANNEL_LAYER_NORMS`: an instance norm by input statistics as the group norm of one
  channel per group; a layer norm over an image's channels spelled out as one call;
- `FOLDS`: conv/linear + batchnorm folding, consecutive linear merging, spelled-out attention
  (also with a same-dtype softmax and cast, Hugging Face's eager spelling) to
  `F.scaled_dot_product_attention` — rewrites that compute new weights;
- `EPILOGUES`: conv/linear + activation, conv + residual add (+ relu), add + relu — these
  only *annotate* (see below); `lower-cpu` turns them into fused oneDNN kernels.

Annotation contract (consumed by quantization and lowering): every node of a fused group gets
`node.meta["fxopt.annotations"]` with

    {"fused": "conv+relu",          # the group, ops joined by "+", in dataflow order
     "fusion_role": "anchor",       # "anchor" = the conv/linear/add that starts the group,
                                    # "output" = the node whose value leaves the group
     "fusion_anchor": "conv2d",     # name of the anchor node
     "fusion_output": "relu"}       # name of the output node

so a pass can find each group from either end. A conv-bn-relu chain becomes conv (new
weights) + relu annotated "conv+relu".
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F

from fxopt import frontend_of
from fxopt.ir import (aten_op_of, bind_arguments, get_attr_value, is_effectful, leaf_function, names_a_dtype, op_view,
                      size_read, spec_for, symbolic_sizes, tensor_meta, written_base)
from fxopt.patterns import Const, Match, Op, Pattern, PatternSet, Rewriter, Var, annotate, annotations

from ..cleanup import evaluate_constant, reads_trainable

ACTIVATIONS = ("relu", "hardtanh", "hardswish", "silu", "gelu", "leaky_relu", "sigmoid", "tanh", "hardsigmoid")


# ----- helpers ------------------------------------------------------------------------------------

def _not_fused(m: Match) -> bool | str:
    for node in m.ops:
        if "fused" in annotations(node):
            return f"'{node.name}' already belongs to the fused group '{annotations(node)['fused']}'"
    return True


def _computed_bias(view) -> bool:
    """A conv/linear bias the graph computes (``b * 1.0``, ``b.to(x.device)``): folds rewrite
    stored tensors, and one that took no bias for this one would drop it."""
    return isinstance(view.attrs.get("bias"), torch.fx.Node)


def output_size_at_call(view) -> bool:
    """Whether a transposed conv module is called with an output size (``self.up(x,
    output_size=skip.shape)``): the output padding is then computed per call from it, and a
    conv call rebuilt from the module's attributes would drop it (the output one row short)."""
    node = view.node
    return node.op == "call_module" and bool(view.attrs.get("transposed")) \
        and (len(node.args) > 1 or node.kwargs.get("output_size") is not None)


def _conv_ok(view) -> bool | str:
    if "weight" not in view.params:
        weight = view.computed("weight")
        if weight is not None and _stored_cone(weight) is not None:
            # PixelCNN's ``conv2d(x, self.weight * self.mask)`` (fuse tester): one tensor after fold-constants
            return (f"its weight is computed in the graph ('{weight.name}') from stored tensors alone: run "
                    "fold-constants first ('fold-constants,fuse') to make it one tensor that folds")
        return "its weight is not a parameter (a computed weight cannot be folded)"
    if output_size_at_call(view):
        return "a transposed conv called with an output_size (its output padding is computed per call)"
    if _computed_bias(view):
        return "its bias is computed in the graph (a computed bias cannot be folded)"
    meta = tensor_meta(view.node)
    if meta is None or len(meta[0]) != view.param("weight").dim():
        # an unbatched conv ((C, L) in, (C', L) out) has its channels on axis 0, where the
        # folds read axis 1: a norm or factor over L of the same size would pass for them
        return "an unbatched conv (or one without shape metadata): its channels are not on axis 1"
    if view.attrs.get("padding_mode", "zeros") != "zeros" and isinstance(view.attrs.get("padding"), str):
        return f"padding_mode '{view.attrs['padding_mode']}' with padding='{view.attrs['padding']}' is not folded"
    return True


def _linear_ok(view) -> bool | str:
    if _computed_bias(view):
        return "its bias is computed in the graph (a computed bias cannot be folded)"
    return True if "weight" in view.params else "its weight is not a parameter"


def _bn_eval(view) -> bool | str:
    if view.attrs.get("training"):
        return "batchnorm is in training mode (batch statistics cannot be folded)"
    if "running_mean" not in view.params or "running_var" not in view.params:
        return "batchnorm has no running statistics"
    for name in ("weight", "bias"):  # a fold bakes them into the layer: they must be stored
        if (value := view.computed(name)) is not None:
            return f"batchnorm's {name} is computed in the graph ('{value.name}'), not a stored tensor"
    # in the statistics' own dtype, as the batchnorm adds them (eps=1e-50 is 0 in float32)
    if not torch.all(view.param("running_var") + float(view.attrs.get("eps", 1e-5)) > 0):
        # a zero denominator: eager gives ±inf or NaN per element, an infinite folded weight
        # gives NaN wherever the layer's sum mixes signs
        return "batchnorm has a channel whose running_var + eps is not positive"
    return True


def _bn_scale_shift(view, channels: int, dtype: torch.dtype):
    """(scale, shift) of an eval batchnorm in float64: y = x * scale + shift."""
    mean = view.param("running_mean").double()
    var = view.param("running_var").double()
    gamma = view.param("weight")
    beta = view.param("bias")
    gamma = torch.ones(channels, dtype=torch.float64) if gamma is None else gamma.double()
    beta = torch.zeros(channels, dtype=torch.float64) if beta is None else beta.double()
    scale = gamma / torch.sqrt(var + float(view.attrs.get("eps", 1e-5)))
    return scale, beta - mean * scale


def _cancels(view) -> bool:
    """Whether a batchnorm's input sits far from zero against its spread (raw features:
    years, prices, sensor readings): folded into the layer after it, ``W s x`` and ``W t``
    are large terms that cancel in float32, where eager subtracts the mean first (mean 1e6
    at unit variance: 0.2 of the output off, eager 3e-3). Past `_MAX_CANCELLATION` the
    batchnorm stays."""
    mean = view.param("running_mean").double()
    spread = torch.sqrt(view.param("running_var").double() + float(view.attrs.get("eps", 1e-5)))
    return bool((mean.abs() / spread).max() > _MAX_CANCELLATION)


#: |mean| / std of a batchnorm's input beyond which folding it into the next layer loses more
#: than ~1e-4 of the output (float32's 6e-8 times this factor).
_MAX_CANCELLATION = 1e3


def in_dtype(dtype: torch.dtype, *values: torch.Tensor | None) -> list[torch.Tensor | None] | None:
    """Fold results (float64) cast to the layer's `dtype`, or None where the cast loses more
    than one rounding: a merged float16 weight ``W2 @ W1`` of 300s overflows to inf where
    ``W2 (W1 x)`` stays finite (the folded layer gave inf everywhere), and a batchnorm scale of
    1e-6 / sqrt(1e4) flushes the folded weights to 0 or to float16's imprecise subnormals.
    A value already infinite in float64 is left as it is (the unfolded layers meet it too)."""
    eps = torch.finfo(dtype).eps
    cast = [None if v is None else v.to(dtype) for v in values]
    for v, c in zip(values, cast):
        if v is None or v.numel() == 0:
            continue
        # against the size of its row (an output channel's weights; a whole bias): one tiny
        # entry beside large ones may flush, a row that is all tiny may not
        size = v.abs().amax(dim=tuple(range(1, v.dim())), keepdim=True) if v.dim() > 1 else v.abs().max()
        lost = (c.double() - v).abs() > eps * size  # a normal number's rounding is within eps / 2
        if (lost & torch.isfinite(v)).any():
            return None
    return cast


def conv_call(r: Rewriter, x, weight, bias, attrs) -> torch.fx.Node:
    """A call_function conv node (F.convNd / F.conv_transposeNd) valid in both IRs. A
    padding_mode other than zeros (reflect, replicate, circular) pads the input first and
    convolves it unpadded, as nn.Conv does."""
    dim = attrs["dim"]
    mode = attrs.get("padding_mode", "zeros")
    if mode != "zeros" and not attrs.get("transposed"):
        pad = [p for size in reversed(attrs["padding"]) for p in (size, size)]
        x = r.call(F.pad, x, pad, mode=mode)
        attrs = {**attrs, "padding": (0,) * dim}
    if attrs.get("transposed"):
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dim - 1]
        return r.call(fn, x, weight, bias, stride=attrs["stride"], padding=attrs["padding"],
                      output_padding=attrs["output_padding"], groups=attrs["groups"],
                      dilation=attrs["dilation"])
    fn = (F.conv1d, F.conv2d, F.conv3d)[dim - 1]
    return r.call(fn, x, weight, bias, stride=attrs["stride"], padding=attrs["padding"],
                  dilation=attrs["dilation"], groups=attrs["groups"])


def conv_attrs(view) -> dict:
    attrs = dict(view.attrs)
    dim = attrs.get("dim") or (view.param("weight").dim() - 2)
    attrs["dim"] = dim
    for key in ("stride", "padding", "dilation", "output_padding"):
        value = attrs.get(key, 0 if key in ("padding", "output_padding") else 1)
        if not isinstance(value, str):
            value = tuple(value) if isinstance(value, (list, tuple)) else (value,) * dim
            if len(value) == 1 and dim > 1:
                value = value * dim
        attrs[key] = value
    attrs["groups"] = attrs.get("groups", 1)
    attrs["transposed"] = bool(attrs.get("transposed", False))
    return attrs


# ----- no-ops -------------------------------------------------------------------------------------

def _is_noop(view) -> bool | str:
    if view.kind == "identity":
        return True
    if not view.attrs.get("training", True) or view.attrs.get("p", 0.5) == 0:
        return True
    return "dropout is in training mode"


NOOPS = PatternSet([
    Pattern("remove-noop", Op(("dropout", "identity"), Var("x"), check=_is_noop), rewrite=lambda r: r["x"]),
])


# ----- reductions ---------------------------------------------------------------------------------

def _over_an_axis(view) -> bool | str:
    if len(view.inputs) != 1 or isinstance(view.attrs.get("dim"), bool) or not isinstance(view.attrs.get("dim"), int):
        return "not a max/min over one axis (of two tensors, or of every element)"
    return True


def _indices_unread(m: Match) -> bool | str:
    """Every other reader of the max/min is an item nobody reads (export keeps the indices'
    `getitem` with no users)."""
    extremum = m.nodes["extremum"]
    read = [u.name for u in extremum.users if u is not m.root and (u.users or u.target is not operator.getitem)]
    return f"its indices are read by {', '.join(read)}" if read else True


def _extremum_values(r: Rewriter) -> torch.fx.Node:
    view = r.view("extremum")
    reduce = torch.amax if view.kind == "max" else torch.amin
    return r.call(reduce, r["x"], view.attrs["dim"], view.attrs.get("keepdim", False))


# ``torch.max(x, 2)[0]`` computes the indices nobody reads: its kernel is 5-20x slower than
# amax's on the same values (PointNet's global max over 512 points at batch 1: 0.30 vs 0.023 ms,
# one thread); a tie's gradient is shared by amax where max gives it to one index
REDUCTIONS = PatternSet([
    Pattern("extremum-values", Op("getitem", Op(("max", "min"), Var("x"), name="extremum", check=_over_an_axis,
                                                single_use=False), attrs={"index": 0}),
            rewrite=_extremum_values, check=_indices_unread),
])


def _stacked_axis(m: Match) -> int | str:
    """The axis of the stacked value the sum reduces, when it is the one the stack made (and
    the sum keeps the pieces' dtype); else why not."""
    stack, total = m.views["stack"], m.views["sum"]
    out = tensor_meta(m.nodes["stack"])
    if out is None or total.attrs.get("dtype") is not None or out[1] not in (torch.float32, torch.float64):
        # an integer or bool sum is int64 (the pieces added keep their dtype); a float16 or
        # bfloat16 sum accumulates in float32 and rounds once, the pieces added at every add
        return "a stack of unknown shape or other than float32/float64, or a sum that casts"
    rank = len(out[0])
    dims, axis = total.attrs.get("dim"), stack.attrs.get("dim", 0)
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    if len(dims) != 1 or not isinstance(dims[0], int) or not isinstance(axis, int) \
            or dims[0] % rank != axis % rank:
        return "the sum does not reduce the stacked axis alone"
    return axis % rank


def _added(r: Rewriter, terms: list) -> torch.fx.Node:
    """``terms[0] + terms[1] + ...``, with the sum's size-1 axis back where it kept one."""
    total = terms[0]
    for term in terms[1:]:
        total = r.call(torch.add, total, term)
    if r.view("sum").attrs.get("keepdim"):
        total = r.call(torch.unsqueeze, total, _stacked_axis(r.match))
    return total


def _sum_of_stack(r: Rewriter) -> torch.fx.Node:
    return _added(r, list(r.view("stack").inputs))


def _weights_fit(m: Match) -> bool | str:
    """The factor broadcasts into the stacked value without widening it, so each piece's term
    reads the factor's slice at its index (or all of it, where it has no stacked axis)."""
    axis = _stacked_axis(m)
    if isinstance(axis, str):
        return axis
    stacked, product, weights = (tensor_meta(m.nodes[k]) for k in ("stack", "mul", "w"))
    if weights is None or product is None or tuple(product[0]) != tuple(stacked[0]):
        return "the factor widens the stacked value, or has no shape"
    at = axis - (len(stacked[0]) - len(weights[0]))
    return at < 0 or weights[0][at] in (1, stacked[0][axis]) or "the factor's stacked axis does not fit"


def _weighted_sum_of_stack(r: Rewriter) -> torch.fx.Node:
    """``(stack(xs, d) * w).sum(d)``: a sum of ``xs[i] * w[i]`` (SKNet's selective-kernel
    attention), with no stacked copy or product of every piece."""
    axis, w = _stacked_axis(r.match), r["w"]
    stacked, weights = tensor_meta(r.match.nodes["stack"]), tensor_meta(w)
    at = axis - (len(stacked[0]) - len(weights[0]))
    terms = []
    for i, piece in enumerate(r.view("stack").inputs):
        factor = w if at < 0 else r.call(torch.select, w, at, i if weights[0][at] > 1 else 0)
        terms.append(r.call(torch.mul, piece, factor))
    return _added(r, terms)


def _stack_sums(n: int) -> list[Pattern]:
    stack = Op("stack", *(Var(f"piece{i}") for i in range(n)), name="stack", single_use=False)
    return [Pattern(f"sum-of-stack/{n}", Op("sum", stack, name="sum"), rewrite=_sum_of_stack, check=_stacked_axis),
            Pattern(f"weighted-sum-of-stack/{n}", Op("sum", Op("mul", stack, Var("w"), name="mul", commutative=True),
                                                       name="sum"),
                    rewrite=_weighted_sum_of_stack, check=_weights_fit)]


# ``stack(xs, d).sum(d)`` is ``xs[0] + xs[1] + ...`` without the stacked copy, and torch's sum
# over that axis of the channels-last values lowered convs write is 4-18x slower than over
# row-major ones (SKNet's branches: `fuse,lower-cpu` ran 1.2-1.3x eager's time; fuse tester)
STACK_SUMS = PatternSet([p for n in range(2, 9) for p in _stack_sums(n)])


# ----- norms ---------------------------------------------------------------------------------------

def _input_stats_only(view) -> bool | str:
    """An instance norm that normalizes by each sample's own statistics and keeps no running
    ones (`track_running_stats=False`, the default), of known channel count, with stored (or
    no) affine tensors."""
    if not view.attrs.get("use_input_stats", True):
        return "it reads running statistics (eval with track_running_stats)"
    if "running_mean" in view.params or "running_var" in view.params:
        return "it updates running statistics as it runs"
    for name in ("weight", "bias"):
        if (value := view.computed(name)) is not None:
            return f"its {name} is computed in the graph ('{value.name}')"
    meta = tensor_meta(view.input) if isinstance(view.input, torch.fx.Node) else None
    if meta is None or len(meta[0]) < 3 or meta[1] != torch.float32:
        # (torch's float16 group_norm ran 2.2-2.8x its instance_norm's time; adversary)
        return "an input of unknown shape, of rank below 3, or not float32"
    if view.module is not None and len(meta[0]) != view.module._get_no_batch_dim() + 1:
        # a module called on one sample ((C, H, W) for InstanceNorm2d) has its channels on axis 0
        return "an unbatched input (its channels are on axis 0)"
    if math.prod(meta[0][2:]) < _MIN_NORMED:
        # (torch's group_norm over 2x2 maps ran 2-2.5x its instance_norm's time, 16 x 256 of
        # them; and eager refuses one element, which a group norm would turn into its bias)
        return f"fewer than {_MIN_NORMED} elements per channel"
    return True


_MIN_NORMED = 8


def _as_group_norm(r: Rewriter) -> torch.fx.Node:
    view = r.view("norm")
    channels = tensor_meta(r["x"])[0][1]
    return r.call(F.group_norm, r["x"], channels, r.param("norm", "weight"), r.param("norm", "bias"),
                  float(view.attrs.get("eps", 1e-5)))


# An instance norm is the group norm with one channel per group. torch's CPU instance_norm runs
# batch_norm over a (1, N*C, ...) reshape of its input; its group_norm kernel is 4-50x faster on
# the same row-major values (1x32x64x64: 3.6 vs 0.07 ms; 16x32x56x56: 36 vs 14 ms, one thread)
NORMS = PatternSet([
    Pattern("instance-norm-as-group-norm", Op("instance_norm", Var("x"), name="norm", check=_input_stats_only),
            rewrite=_as_group_norm),
])


def _channel_mean(view) -> bool | str:
    """A mean over axis 1 alone of a 4-D float32 value, keeping the axis."""
    meta = tensor_meta(view.input) if isinstance(view.input, torch.fx.Node) else None
    dim = view.attrs.get("dim")
    dim = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    if meta is None or len(meta[0]) != 4 or meta[1] != torch.float32:
        return "not a 4-D float32 value"
    if len(dim) != 1 or not isinstance(dim[0], int) or dim[0] % 4 != 1 or not view.attrs.get("keepdim"):
        return "not a mean over the channels (axis 1) that keeps the axis"
    return True


def _channel_affine(value: Any) -> bool | str:
    """A stored per-channel factor or shift of a channels-first layer norm (``w[:, None, None]``)."""
    if not isinstance(value, torch.fx.Node) or _stored_cone(value) is None:
        return "not computed from stored tensors alone"
    meta = tensor_meta(value)
    return meta is not None and len(meta[0]) in (3, 4) and all(n == 1 for n in meta[0][-2:]) \
        and (len(meta[0]) == 3 or meta[0][0] == 1) or "not a (C, 1, 1) per-channel value"


def _channel_layer_norm(r: Rewriter) -> torch.fx.Node | None:
    """A layer norm over the channels of an (N, C, H, W) value spelled out (ConvNeXt's and
    NAFNet's LayerNorm2d) as one `channel_layer_norm` call."""
    x, eps = r["x"], r["eps"]
    if not _plain_number(eps) or eps < 0:
        return None
    channels = tensor_meta(x)[0][1]
    affine = []
    for name in ("w", "b"):
        value = _stored_cone_value(r.gm, r[name]) if name in r.match.nodes else None
        if value is not None and (not isinstance(value, torch.Tensor) or value.numel() != channels
                                  or value.dtype != torch.float32):
            return None
        # the graph's own value, reshaped per call: it trains and loads as the user's parameter
        # (a stored copy did neither; adversary)
        affine.append(None if value is None else r.call(torch.reshape, r[name], (channels,)))
    r.match.hold_rank(x)  # (the call permutes a 4-D value; a symbolic graph may run at another rank)
    return r.call(channel_layer_norm, x, *affine, float(eps))


@leaf_function
def channel_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       eps: float) -> torch.Tensor:
    """The layer norm over axis 1 of 4-D `x` (``(x - mean) / sqrt(var + eps) * w + b`` per pixel):
    on a channels-last value, torch's `layer_norm` over its row-major (N, H, W, C) view, 5-13x
    faster than the spelled-out ops there (16x64x16x16: 0.63 vs 5.0 ms; 1x96x56x56: 0.64 vs 8.4
    ms, one thread); on a row-major value the spelled-out ops, which are fast there.

        >>> x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
        >>> u = x.mean(1, keepdim=True)
        >>> torch.allclose(channel_layer_norm(x, None, None, 1e-6), (x - u) / ((x - u).pow(2).mean(1, keepdim=True) + 1e-6).sqrt(), atol=1e-5)
        True
    """
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last) \
            and all(t is None or t.dtype == x.dtype for t in (weight, bias)):
        # (affine tensors of another dtype: layer_norm refuses them, the ops below promote)
        return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, eps).permute(0, 3, 1, 2)
    centered = x - x.mean(1, keepdim=True)
    y = centered / torch.sqrt(centered.pow(2).mean(1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight[:, None, None]
    return y if bias is None else y + bias[:, None, None]


def _layer_norm_patterns() -> list[Pattern]:
    x = Var("x")
    centered = Op("sub", x, Op("mean", x, check=_channel_mean))  # (unnamed: ConvNeXt computes it twice)
    square = Op("pow", centered, scalar=Const("two", check=lambda p: p == 2), name="square")
    variance = Op("mean", square, name="variance", check=_channel_mean)
    shifted = Op("add", variance, scalar=Const("eps"), name="shifted")
    forms = [Op("div", centered, Op("sqrt", shifted, name="root"), name="normed"),
             Op("mul", centered, Op("rsqrt", shifted, name="root"), name="normed", commutative=True)]
    patterns = []
    for i, normed in enumerate(forms):
        scaled = Op("mul", normed, Var("w", check=_channel_affine), commutative=True, name="scaled")
        for suffix, root in (("affine", Op("add", scaled, Var("b", check=_channel_affine), commutative=True)),
                             ("scale", scaled), ("", normed)):
            name = "channel-layer-norm" + ("/rsqrt" if i else "") + (f"/{suffix}" if suffix else "")
            patterns.append(Pattern(name, root, rewrite=_channel_layer_norm))
    return patterns


# A layer norm over the channels of an image, spelled out (ConvNeXt's channels-first LayerNorm,
# NAFNet's LayerNorm2d): on the channels-last values `lower-cpu` writes, its five reductions and
# elementwise ops over axis 1 run 5-13x the time of one layer_norm over the (N, H, W, C) view
CHANNEL_LAYER_NORMS = PatternSet(_layer_norm_patterns())


# ----- channel shuffle ----------------------------------------------------------------------------

def _size_of(arg: Any) -> tuple[torch.fx.Node, int] | None:
    """(tensor, axis) when `arg` reads one size of a tensor: ``x.size(1)``, ``sym_size(x, 1)``,
    ``x.size()[1]``, ``x.shape[1]``."""
    if not isinstance(arg, torch.fx.Node):
        return None
    read = size_read(arg)
    if read is not None and isinstance(read[1], int):
        return read
    if arg.target is operator.getitem and isinstance(arg.args[1], int) and isinstance(arg.args[0], torch.fx.Node):
        whole = size_read(arg.args[0])
        if whole is not None and whole[1] is None:
            return whole[0], arg.args[1]
    return None


def _is_size(arg: Any, x: torch.fx.Node, axis: int) -> bool:
    """Whether `arg` is `x`'s size along `axis` at every size the graph runs at: a read of it,
    a read of a size export gave the same symbol, or, in an export graph, the number itself
    where export fixed it (a symbolic graph runs at other sizes, where a number written in the
    model no longer is x's size: eager's view then reads the pixels otherwise)."""
    shape = tensor_meta(x)[0]
    if isinstance(arg, _WholeSize):
        return arg.x is x and arg.axis == axis
    if isinstance(arg, int) and not isinstance(arg, bool):
        return arg == shape[axis] and axis not in symbolic_sizes(x) and frontend_of(x.graph.owning_module) == "export"
    read = _size_of(arg)
    if read is None:
        return False
    tensor, dim = read
    if tensor is x:
        return dim % len(shape) == axis
    symbol = symbolic_sizes(x).get(axis)
    return symbol is not None and symbolic_sizes(tensor).get(dim % max(len(tensor_meta(tensor)[0]), 1)) == symbol


def _reshape_sizes(view, x: torch.fx.Node, rank: int) -> list | None:
    """The sizes a reshape is given, one per axis; ``x.size()`` / ``x.shape`` (all of `x`'s
    sizes) as a list of its reads; None for sizes in any other form."""
    sizes = view.attrs.get("shape", ())
    if isinstance(sizes, (list, tuple)):
        return list(sizes)
    whole = size_read(sizes) if isinstance(sizes, torch.fx.Node) else None
    if whole is not None and whole[0] is x and whole[1] is None:
        return [_WholeSize(x, axis) for axis in range(rank)]
    return None


class _WholeSize:
    """One size of a whole ``x.size()`` a reshape was given."""

    def __init__(self, x: torch.fx.Node, axis: int) -> None:
        self.x, self.axis = x, axis


def _shuffle_groups(m: Match) -> int | str:
    """The group count g of a spelled-out channel shuffle of `x` (N, C, *rest): reshaped to
    (N, g, C/g, *rest), axes 1 and 2 swapped, reshaped back to (N, C, *rest); or why not."""
    x, split, merge = m.nodes["x"], m.views["split"], m.views["merge"]
    meta = tensor_meta(x)
    if meta is None or len(meta[0]) < 3:
        return "not a value of rank 3 or more"
    shape = meta[0]
    into, back = _reshape_sizes(split, x, len(shape)), _reshape_sizes(merge, x, len(shape))
    if into is None or back is None or len(into) != len(shape) + 1 or len(back) != len(shape):
        return "the reshapes do not split the channel axis in two and merge it back"
    groups = into[1]
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 2 or shape[1] % groups:
        return "the group count is no number dividing the channels"
    if shape[1] == groups:  # (the swap then moves no element: eager's reshapes return views)
        return "one channel per group: the shuffle moves nothing"
    if tuple(tensor_meta(m.nodes["split"])[0][1:3]) != (groups, shape[1] // groups):
        return "the first reshape does not split the channels into groups"
    rest = [(into[0], 0)] + [(a, axis) for a, axis in zip(into[3:], range(2, len(shape)))]
    rest += [(back[0], 0)] + [(a, axis) for a, axis in zip(back[2:], range(2, len(shape)))]
    if not all(_is_size(a, x, axis) for a, axis in rest):
        return "a reshape changes an axis besides the channels"
    if not (back[1] == -1 or _is_size(back[1], x, 1)):
        return "the second reshape does not merge the channels back"
    swap = m.views["swap"]
    swapped = {swap.attrs.get("dim0"), swap.attrs.get("dim1")} if swap.kind == "transpose" else \
        tuple(swap.attrs.get("dims", ()))
    if swapped not in ({1, 2}, (0, 2, 1, *range(3, len(shape) + 1))):
        return "the axes swapped are not the group and channel axes"
    return groups


def _to_channel_shuffle(r: Rewriter) -> torch.fx.Node:
    return r.call(torch.channel_shuffle, r["x"], _shuffle_groups(r.match))


def _shuffle(copy: bool) -> Pattern:
    swap = Op(("transpose", "permute"), Op("reshape", Var("x"), name="split"), name="swap")
    if copy:
        swap = Op("contiguous", swap, name="copy")
    return Pattern("channel-shuffle" + ("/contiguous" if copy else ""), Op("reshape", swap, name="merge"),
                   rewrite=_to_channel_shuffle,
                   check=lambda m: True if isinstance(g := _shuffle_groups(m), int) else g)


# ShuffleNet's channel shuffle spelled out (``x.view(n, g, c // g, h, w).transpose(1, 2)
# .contiguous().view(n, -1, h, w)``) copies the value, and on a channels-last one (lower-cpu's
# conv outputs) twice more around the reshapes: torch.channel_shuffle keeps the layout and
# copies once (16x116x28x28 channels-last, one thread: 0.34 vs 12 ms)
CHANNEL_SHUFFLE = PatternSet([_shuffle(copy=True), _shuffle(copy=False)])


# ----- folds --------------------------------------------------------------------------------------

_CUTS = ("getitem", "slice", "narrow")


def _cuts_other_axes(view) -> bool | str:
    """A slice that keeps every channel (axis 1) and the rank: ``y[..., :-pad]`` (a TCN's
    chomp), ``y.narrow(2, 0, n)``, export's ``aten.slice(y, 2, ...)``. An eval batchnorm is a
    per-channel affine, so it gives the same values before such a slice as after it."""
    src, out = tensor_meta(view.input), tensor_meta(view.node)
    if src is None or out is None or len(src[0]) != len(out[0]) or len(src[0]) < 2:
        return "a slice of unknown shape, or one that drops an axis"
    rank = len(src[0])
    if view.kind in ("slice", "narrow"):
        dim = view.attrs.get("dim")
        if isinstance(dim, int) and dim % rank == 1 and tuple(src[0]) == tuple(out[0]) \
                and view.attrs.get("step", 1) == 1:
            return True  # export's full slice ``aten.slice(y, 1, 0, 2**63 - 1)`` keeps every channel
        return (isinstance(dim, int) and dim % rank != 1) or "the slice cuts the channel axis"
    index = view.attrs.get("index")
    index = list(index) if isinstance(index, tuple) else [index]
    if not all(i is Ellipsis or isinstance(i, slice) for i in index) or index.count(Ellipsis) > 1:
        return "an index other than slices (an int, None or a tensor)"
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index[at:at + 1] = [slice(None)] * (rank - len(index) + 1)
    full = index + [slice(None)] * (rank - len(index))
    return full[1] == slice(None) or "the index cuts the channel axis"


def _conv_under_cuts(value: Any) -> bool | str:
    """A conv, or slices of one that keep its channels (export spells ``y[:, :, :-2]`` as two
    slices, a full one of axis 0 first), each read by the next alone."""
    for _ in range(4):
        view = op_view(value.graph.owning_module, value) if isinstance(value, torch.fx.Node) else None
        if view is not None and view.kind == "conv":
            return _conv_ok(view)
        if view is None or view.kind not in _CUTS or len(value.users) != 1 or _cuts_other_axes(view) is not True:
            break
        value = view.input
    return "not a conv (or a slice of one that keeps its channels)"


def _bn_before_cut(r: Rewriter) -> torch.fx.Node:
    """``bn(conv(x)[..., :n])`` as ``bn(conv(x))[..., :n]``, one slice at a time, until
    `conv+bn` folds it."""
    bn, cut, conv = r.match.root, r.match.nodes["cut"], r.match.nodes["src"]
    normed = r.copy(bn, {cut: conv})
    # the normalized value has the conv's shape (`val` in export graphs, `tensor_meta` in both)
    normed.meta.update({k: conv.meta[k] for k in ("val", "tensor_meta") if k in conv.meta})
    recut = r.copy(cut, {conv: normed})
    recut.meta = dict(bn.meta)
    return recut


def _channel_cat(view) -> bool | str:
    """A concatenation along the channel axis (1) of distinct values."""
    out = tensor_meta(view.node)
    dim = view.attrs.get("dim", 0)
    if out is None or not isinstance(dim, int) or dim % len(out[0]) != 1:
        return "not a concatenation along the channel axis"
    return len(set(view.inputs)) == len(view.inputs) or "a value concatenated twice"


def _foldable_piece(value: torch.fx.Node) -> bool | str:
    """A conv (or a slice of one that keeps its channels) read by the concatenation alone, of
    known shape: a batchnorm slice put after it folds into it."""
    if len(value.users) != 1 or tensor_meta(value) is None:
        return "read elsewhere too, or of unknown shape"
    return _conv_under_cuts(value)


def _bn_into_cat(r: Rewriter) -> torch.fx.Node:
    """``bn(cat(a, b))`` (a CSP block's merge, an Inception-style branch merge) as
    ``cat(bn_a(a), bn_b(b))``, each piece normalized by its own slice of the batchnorm's
    statistics and affine (the same arithmetic per channel), so that `conv+bn` folds every
    piece into the conv that makes it and no batchnorm is left."""
    bn, name = r.view("bn"), r.match.root.name
    eps = float(bn.attrs.get("eps", 1e-5))
    pieces, start = [], 0
    for i, piece in enumerate(r.view("cat").inputs):
        channels = tensor_meta(piece)[0][1]
        stats = {}
        for key in ("running_mean", "running_var", "weight", "bias"):
            value = bn.param(key)
            stats[key] = None if value is None else r.tensor(
                f"{name}_{key}_{i}", value.detach()[start:start + channels].clone(),
                parameter=key in ("weight", "bias"), shared=True)
        normed = r.call(F.batch_norm, piece, stats["running_mean"], stats["running_var"], stats["weight"],
                        stats["bias"], training=False, momentum=0.0, eps=eps)
        normed.meta.update({k: piece.meta[k] for k in ("val", "tensor_meta") if k in piece.meta})
        pieces.append(normed)
        start += channels
    joined = r.call(torch.cat, pieces, 1)
    joined.meta = dict(r.match.root.meta)
    return joined


# a pattern matches a fixed number of operands: one per width, up to an ASPP's five branches and more
_BN_INTO_CAT = [
    Pattern(f"bn-into-cat/{n}", Op("batch_norm", Op("cat", *(Var(f"piece{i}", check=_foldable_piece) for i in range(n)),
                                                     name="cat", check=_channel_cat), name="bn", check=_bn_eval),
            rewrite=_bn_into_cat)
    for n in range(2, 9)]
BN_INTO_CAT = tuple(p.name for p in _BN_INTO_CAT)


def _fold_conv_bn(r: Rewriter) -> torch.fx.Node | None:
    conv, bn = r.view("conv"), r.view("bn")
    if bn.param("running_mean").shape[0] != _conv_out_channels(conv):
        return None
    return _affine_conv(r, conv, *_bn_scale_shift(bn, _conv_out_channels(conv), conv.param("weight").dtype))


def _fold_linear_bn(r: Rewriter) -> torch.fx.Node | None:
    lin, bn = r.view("linear"), r.view("bn")
    meta = tensor_meta(r.match.nodes["linear"])
    if meta is None or len(meta[0]) != 2:
        return None  # BatchNorm1d on (N, C, L) normalizes dim 1, not the features
    w = lin.param("weight")
    if bn.param("running_mean").shape[0] != w.shape[0]:
        return None
    r.match.hold_rank(_rank_source(r, r["x"]))  # at another rank the batchnorm normalizes dim 1
    return _affine_linear(r, lin, *_bn_scale_shift(bn, w.shape[0], w.dtype))


def _rank_source(r: Rewriter, value: torch.fx.Node) -> torch.fx.Node:
    """The value whose rank a guard on `value` reads: `value`, or above the batchnorms that
    make it (they keep the rank). A guard reading a batchnorm's output made it a value of two
    readers, which the next fold (that batchnorm into this linear) refuses (adversary)."""
    while (view := op_view(r.gm, value)) is not None and view.kind == "batch_norm" and view.input is not None:
        value = view.input
    return value


def _features_to_channels(view) -> bool | str:
    """A transpose or permute that puts a linear's features (its last axis) on axis 1, where a
    batchnorm normalizes: ``bn(linear(x).transpose(1, 2))`` on (N, L, C), a speech or
    Conformer head's spelling."""
    src = tensor_meta(view.input)
    if src is None or len(src[0]) < 3:
        return "a swap of a value of unknown or too small rank"
    rank = len(src[0])
    if view.kind == "transpose":
        dims = {view.attrs.get("dim0"), view.attrs.get("dim1")}
        ok = all(isinstance(d, int) for d in dims) and {d % rank for d in dims} == {1, rank - 1}
    else:
        order = list(view.attrs.get("dims") or ())
        ok = len(order) == rank and all(isinstance(d, int) for d in order) and order[1] % rank == rank - 1
    return ok or "the swap does not put the linear's features on axis 1"


def _fold_linear_swap_bn(r: Rewriter) -> torch.fx.Node | None:
    """``bn(linear(x).transpose(1, 2))``: the batchnorm scales the linear's features, so it
    folds into the linear's rows, and the swap follows the folded linear."""
    lin, bn = r.view("linear"), r.view("bn")
    w = lin.param("weight")
    if bn.param("running_mean").shape[0] != w.shape[0]:
        return None
    folded = _affine_linear(r, lin, *_bn_scale_shift(bn, w.shape[0], w.dtype))
    moved = r.copy(r.match.nodes["swap"], {r.match.nodes["linear"]: folded})
    moved.meta = dict(r.match.root.meta)
    return moved


def _fold_bn_conv(r: Rewriter) -> torch.fx.Node | None:
    """A batchnorm right before a conv (pre-activation nets, a normalized input):
    ``conv(x * s + t)`` is a conv with weights ``W * s`` (per input channel) and bias
    ``b + Σ W · t``. Exact where the conv pads nothing or pads with copies of its input
    (reflect, replicate, circular: the copies are normalized values too); a zero border of the
    normalized input is not ``t`` at the border of ``x``."""
    bn, conv = r.view("bn"), r.view("conv")
    attrs = conv_attrs(conv)
    padding = attrs["padding"]
    pads = padding != "valid" if isinstance(padding, str) else any(padding)
    if attrs["transposed"] or pads and attrs.get("padding_mode", "zeros") == "zeros":
        return None
    w, b, groups = conv.param("weight"), conv.param("bias"), attrs["groups"]
    channels = w.shape[1] * groups
    if bn.param("running_mean").shape[0] != channels or _cancels(bn):
        return None
    scale, shift = _bn_scale_shift(bn, channels, w.dtype)
    # output channel o reads input channels of its group: the per-input factor as a (O, C/g) grid
    per_group = w.shape[0] // groups
    grid = [v.reshape(groups, 1, w.shape[1]).expand(groups, per_group, w.shape[1]).reshape(w.shape[:2])
            for v in (scale, shift)]
    spatial = (1,) * (w.dim() - 2)
    new_w = w.double() * grid[0].reshape(*w.shape[:2], *spatial)
    new_b = (w.double() * grid[1].reshape(*w.shape[:2], *spatial)).flatten(1).sum(1)
    if b is not None:
        new_b = new_b + b.double()
    folded = in_dtype(w.dtype, new_w, new_b)
    if folded is None:
        return None
    name = r.match.root.name
    source = r["x"]
    if "pad" in r.match.nodes:  # export's copying pad between them: the same pad, of x
        source = r.copy(r.match.nodes["pad"], {r.match.nodes["bn"]: r["x"]})
    return conv_call(r, source, r.tensor(f"{name}_folded_weight", folded[0], shared=True),
                     r.tensor(f"{name}_folded_bias", folded[1], shared=True), attrs)


def _copying_pad(view) -> bool | str:
    """A pad whose border copies its input (reflect, replicate, circular): a batchnorm before
    it commutes with it, channel by channel."""
    mode = view.attrs.get("mode", "constant")
    return True if mode in ("reflect", "replicate", "circular") else f"a pad of mode '{mode}' adds values of its own"


def _fold_bn_linear(r: Rewriter) -> torch.fx.Node | None:
    """A BatchNorm1d on (N, C) features right before a linear (a tabular model's input, a
    classifier head): ``linear(x * s + t)`` has weights ``W * s`` and bias ``b + W t``."""
    bn, lin = r.view("bn"), r.view("linear")
    meta = tensor_meta(r.match.nodes["x"])
    w, b = lin.param("weight"), lin.param("bias")
    if meta is None or len(meta[0]) != 2 or bn.param("running_mean").shape[0] != w.shape[1]:
        return None  # BatchNorm1d on (N, C, L) normalizes dim 1, which the linear does not read
    if _cancels(bn):
        return None
    scale, shift = _bn_scale_shift(bn, w.shape[1], w.dtype)
    folded = in_dtype(w.dtype, w.double() * scale, w.double() @ shift + (0 if b is None else b.double()))
    if folded is None:
        return None
    name = r.match.root.name
    r.match.hold_rank(_rank_source(r, r["x"]))  # at another rank the batchnorm normalizes dim 1
    return r.call(F.linear, r["x"], r.tensor(f"{name}_folded_weight", folded[0], shared=True),
                  r.tensor(f"{name}_folded_bias", folded[1], shared=True))


def _fold_conv_scale(r: Rewriter) -> torch.fx.Node | None:
    """A per-channel factor after a conv (a layer scale ``gamma[:, None, None] * conv(x)``)."""
    conv = r.view("conv")
    out = tensor_meta(r.match.nodes["conv"])
    scale = _per_channel(r, out, 1, _conv_out_channels(conv), conv.param("weight").dtype)
    return None if scale is None else _affine_conv(r, conv, scale, None)


def _fold_conv_shift(r: Rewriter) -> torch.fx.Node | None:
    """A stored per-channel value added after a conv (a bias kept apart,
    ``conv(x) + b.view(1, -1, 1, 1)``): the conv's bias, so the add rides in its kernel."""
    if r.view("add").attrs.get("alpha", 1) != 1:
        return None
    conv = r.view("conv")
    out, dtype = tensor_meta(r.match.nodes["conv"]), conv.param("weight").dtype
    if out is None or _shift_after(conv):
        return None  # (`_affine_conv` keeps such a transposed conv's shift as this very add)
    channels = _conv_out_channels(conv)
    shift = _per_channel(r, out, 1, channels, dtype)
    if shift is None:  # one stored number added to every channel
        g = _stored_cone_value(r.gm, r["g"])
        if not isinstance(g, torch.Tensor) or g.numel() != 1 or g.dtype != dtype or g.dim() > len(out[0]) \
                or not torch.isfinite(g).all():
            return None
        shift = torch.full((channels,), float(g), dtype=torch.float64)
    return _affine_conv(r, conv, torch.ones_like(shift), shift)


def _fold_linear_scale(r: Rewriter) -> torch.fx.Node | None:
    """A per-feature factor after a linear (CaiT's, ConvNeXt's and DeiT III's layer scale
    ``gamma * fc(x)``)."""
    lin = r.view("linear")
    out, w = tensor_meta(r.match.nodes["linear"]), lin.param("weight")
    scale = _per_channel(r, out, -1, w.shape[0], w.dtype)
    return None if scale is None else _affine_linear(r, lin, scale, None)


def _fold_number_scale(r: Rewriter) -> torch.fx.Node | None:
    """A conv or linear output times (or over) a number (EDSR's residual scaling
    ``body(x) * 0.1``, a ``res_scale`` of 1): that number in every output channel's weights
    and bias, so the conv's kernel (and an int8 one) computes the scaled value itself."""
    c = r["c"]
    if not _plain_number(c) or c == 0:
        return None  # a zero factor would turn eager's inf * 0 = NaN into a zero weight's 0
    factor = 1.0 / c if r.view("scale_op").kind == "div" else float(c)
    if "conv" in r.match.views:
        conv = r.view("conv")
        return _affine_conv(r, conv, torch.full((_conv_out_channels(conv),), factor, dtype=torch.float64), None)
    lin = r.view("linear")
    return _affine_linear(r, lin, torch.full((lin.param("weight").shape[0],), factor, dtype=torch.float64), None)


def _per_channel(r: Rewriter, out, axis: int, channels: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The factor `r["g"]` (a stored tensor) as one float64 value per channel, when it
    broadcasts over the output `out` (tensor metadata) along `axis` alone and keeps its dtype."""
    g = _stored_cone_value(r.gm, r["g"])
    if out is None or not isinstance(g, torch.Tensor) or g.dtype != dtype or g.dim() > len(out[0]):
        return None
    if not torch.isfinite(g).all():
        return None  # an infinite factor times a weight row of mixed signs gives ±inf, then NaN sums
    shape = [1] * (len(out[0]) - g.dim()) + list(g.shape)
    axis %= len(shape)
    if shape[axis] != channels or any(n != 1 for i, n in enumerate(shape) if i != axis):
        return None
    return g.detach().double().reshape(channels)


def _conv_out_channels(conv) -> int:
    w, attrs = conv.param("weight"), conv_attrs(conv)
    return w.shape[1] * attrs["groups"] if attrs["transposed"] else w.shape[0]


def _affine_conv(r: Rewriter, conv, scale: torch.Tensor, shift: torch.Tensor | None) -> torch.fx.Node:
    """`conv` with its output multiplied by `scale` and `shift` added, per output channel,
    folded into its weight and bias."""
    attrs = conv_attrs(conv)
    w, b = conv.param("weight"), conv.param("bias")
    groups, out_channels = attrs["groups"], _conv_out_channels(conv)
    if attrs["transposed"]:
        # weight (in, out/groups, k...): out channel c = g * (out/groups) + j
        wg = w.double().reshape(groups, w.shape[0] // groups, w.shape[1], *w.shape[2:])
        s = scale.reshape(groups, 1, w.shape[1], *([1] * (w.dim() - 2)))
        new_w = (wg * s).reshape(w.shape)
    else:
        new_w = w.double() * scale.reshape(-1, *([1] * (w.dim() - 1)))
    new_b = None
    if b is not None or shift is not None:
        base = torch.zeros(out_channels, dtype=torch.float64) if b is None else b.double()
        new_b = base * scale + (0 if shift is None else shift)
    folded = in_dtype(w.dtype, new_w, new_b)
    if folded is None:
        return None
    name = r.match.root.name
    wn = r.tensor(f"{name}_folded_weight", folded[0], shared=True)
    if new_b is None:
        return conv_call(r, r["x"], wn, None, attrs)
    if _shift_after(conv):
        shift_map = folded[1].reshape(1, -1, *([1] * attrs["dim"]))
        shift_node = r.tensor(f"{name}_folded_shift", shift_map, shared=True)
        return r.call(torch.add, conv_call(r, r["x"], wn, None, attrs), shift_node)
    return conv_call(r, r["x"], wn, r.tensor(f"{name}_folded_bias", folded[1], shared=True), attrs)


def _shift_after(conv) -> bool:
    """Whether a folded shift goes in an add after the conv, not in its bias: torch's CPU
    conv_transpose takes a slower path with a bias than without, ~10x grouped (4.0 vs 0.35 ms
    at 16x16x16x16, groups=2), 1.3-2x at groups=1 with a 3-wide kernel (1-D to 3-D, stride 1 or
    2), where the add after costs about nothing: a decoder's folded ConvTranspose + BatchNorm
    ran 0.65-0.86x of eager's speed (fuse tester). A transposed conv whose stride is its kernel,
    unpadded (a U-Net's up-sampler), keeps its bias: quantize makes it an int8 1x1 conv, whose
    kernel adds it, and its bias path measured even."""
    attrs = conv_attrs(conv)
    if not attrs["transposed"]:
        return False
    kernel = tuple(conv.param("weight").shape[2:])
    upsampler = attrs["groups"] == 1 and attrs["stride"] == kernel and set(attrs["padding"]) == {0} \
        and set(attrs["output_padding"]) == {0} and set(attrs["dilation"]) == {1}
    return not upsampler


def _affine_linear(r: Rewriter, lin, scale: torch.Tensor, shift: torch.Tensor | None) -> torch.fx.Node:
    """`lin` with its output features multiplied by `scale` and `shift` added, folded."""
    w, b = lin.param("weight"), lin.param("bias")
    new_b = None
    if b is not None or shift is not None:
        base = torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b.double()
        new_b = base * scale + (0 if shift is None else shift)
    folded = in_dtype(w.dtype, w.double() * scale[:, None], new_b)
    if folded is None:
        return None
    name = r.match.root.name
    wn = r.tensor(f"{name}_folded_weight", folded[0], shared=True)
    bn = None if new_b is None else r.tensor(f"{name}_folded_bias", folded[1], shared=True)
    return r.call(F.linear, r["x"], wn, bn)


def _no_bias(view) -> bool | str:
    if "weight" not in view.params:
        return "its weight is not a parameter"
    node = view.node
    has_bias = "bias" in view.params or "bias" in node.kwargs or (
        node.op != "call_module" and view.kind == "linear" and len(node.args) > 2 and node.args[2] is not None)
    return "it has a bias" if has_bias else True


#: How many ops may compute a stored factor from its tensors (``gamma[:, None, None]``,
#: ``gamma.view(1, C, 1, 1)``, ``gamma.unsqueeze(-1).unsqueeze(-1)``).
_MAX_CONE = 4


def _stored_cone(node: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The nodes that compute `node` from stored tensors alone (get_attrs the graph never writes
    in place, and side-effect-free calls of them), or None: a value that depends on the input."""
    cone, stack = [], [node]
    while stack:
        n = stack.pop()
        if n in cone:
            continue
        if n.op != "get_attr" and (n.op not in ("call_function", "call_method") or is_effectful(n)
                                   or not n.all_input_nodes):
            return None
        cone.append(n)
        if len(cone) > _MAX_CONE + 1:
            return None
        stack.extend(n.all_input_nodes)
    gm = node.graph.owning_module
    written = {base.target for n in gm.graph.nodes
               if (base := written_base(gm, n)) is not None and base.op == "get_attr"}
    if any(n.op == "get_attr" and n.target in written for n in cone):
        return None  # state the forward updates in place (also through a view of it) is no constant
    return cone


def _stored_value(node: torch.fx.Node) -> bool | str:
    """A value computed from stored tensors alone: a per-channel factor a fold can precompute."""
    return _stored_cone(node) is not None or "not computed from stored tensors alone"


def _stored_scalar(node: torch.fx.Node) -> bool | str:
    """A one-element floating tensor computed from stored tensors alone (an attention scale)."""
    meta = tensor_meta(node)
    if meta is None or math.prod(meta[0]) != 1 or not meta[1].is_floating_point:
        return "not a one-element floating tensor"
    return _stored_value(node)


def _stored_cone_value(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Any:
    if node.op == "get_attr":
        return get_attr_value(gm, node.target)
    return evaluate_constant(gm, node)


def _bias_vector(node: torch.fx.Node) -> bool:
    return node.op == "get_attr"


def _fold_bias(r: Rewriter) -> torch.fx.Node | None:
    """`x @ W.T + b` (a bias-less linear, then a parameter added): one linear with that bias,
    which lowering and int8 kernels run in one call."""
    lin = r.view("linear")
    weight, bias = lin.params["weight"], get_attr_value(r.gm, r["b"].target)
    w = weight.get()
    if not isinstance(bias, torch.Tensor) or bias.shape != (w.shape[0],) or bias.dtype != w.dtype:
        return None  # a broadcast bias of another shape is no linear's bias
    with r.graph.inserting_before(r.match.root):
        w_node = r.graph.get_attr(weight.qualname)
    r.new_nodes.append(w_node)
    return r.call(F.linear, r["x"], w_node, r["b"])


def _merge_linears(r: Rewriter) -> torch.fx.Node | None:
    first, second = r.view("first"), r.view("second")
    w1, b1 = first.param("weight"), first.param("bias")
    w2, b2 = second.param("weight"), second.param("bias")
    n_in, mid, n_out = w1.shape[1], w1.shape[0], w2.shape[0]
    if n_in * n_out > mid * (n_in + n_out):
        return None  # merged would cost more multiply-adds than the two linears
    bias = None
    if b1 is not None:
        bias = w2.double() @ b1.double()
    if b2 is not None:
        bias = b2.double() if bias is None else bias + b2.double()
    merged = in_dtype(w1.dtype, w2.double() @ w1.double(), bias)
    if merged is None:
        return None
    name = r.match.root.name
    wn = r.tensor(f"{name}_merged_weight", merged[0], shared=True)
    bn = r.tensor(f"{name}_merged_bias", merged[1], shared=True) if bias is not None else None
    return r.call(F.linear, r["x"], wn, bn)


def _key_order(view) -> list[int] | str:
    """The axis order of k that SDPA reads as its key, where `view` (a transpose or permute of
    k) is kᵀ: the view's own order with its last two axes swapped back. ``k.transpose(-2, -1)``
    and ``k.permute(0, 1, 3, 2)`` give k itself; ``k.permute(0, 2, 3, 1)`` of a (B, N, H, D) k
    (DETR's keys, transposed in one step) gives ``k.permute(0, 2, 1, 3)``."""
    meta = tensor_meta(view.input)
    n = len(meta[0]) if meta else None
    if n is None or n < 2:
        return "a transpose/permute of unknown rank"
    if view.kind == "permute":
        order = list(view.attrs.get("dims") or ())
    else:
        order = list(range(n))
        d0, d1 = view.attrs.get("dim0"), view.attrs.get("dim1")
        if not isinstance(d0, int) or not isinstance(d1, int):
            return "a transpose of computed axes"
        order[d0 % n], order[d1 % n] = order[d1 % n], order[d0 % n]
    if len(order) != n or not all(isinstance(d, int) for d in order):
        return f"a permute to {order} of a {n}-D value"
    order = [d % n for d in order]
    return order[:-2] + [order[-1], order[-2]]


def _last_dims(view) -> bool | str:
    """kᵀ: a transpose or permute of k (`_key_order` says which key SDPA reads)."""
    order = _key_order(view)
    return order if isinstance(order, str) else True


def _sdpa_key(r: Rewriter) -> torch.fx.Node:
    """k as SDPA reads it: k itself, or k permuted when kᵀ moved other axes too."""
    order = _key_order(r.view("k_t"))
    return r["k"] if order == sorted(order) else r.call(torch.permute, r["k"], order)


def _softmax_last(view) -> bool | str:
    """A softmax over the last axis computed in its input's dtype: `softmax(s, dim=-1)`, and
    Hugging Face's `softmax(s, dim=-1, dtype=torch.float32)` on float32 scores (that dtype
    changes nothing there; on float16 scores it is a float32 softmax, which SDPA is not)."""
    dim = view.attrs.get("dim")
    meta, out = tensor_meta(view.input), tensor_meta(view.node)
    dtype = view.attrs.get("dtype")
    if dtype is not None and (meta is None or dtype != meta[1]):
        return f"softmax computes in {dtype}, its input is {meta[1] if meta else 'of unknown dtype'}"
    if view.attrs.get("half_to_float") or (meta is not None and out is not None and out[1] != meta[1]):
        return f"softmax casts its {meta[1] if meta else 'input'} scores to {out[1] if out else 'another dtype'}"
    if dim == -1 or (meta is not None and dim == len(meta[0]) - 1):
        return True
    return f"softmax over dim {dim}, not the last one"


_CAST_METHODS = ("to", "float", "double", "half", "bfloat16", "type_as")
_KEEPS_STORAGE = {"device": (None,), "layout": (None, torch.strided), "pin_memory": (None, False),
                  "memory_format": (None, torch.preserve_format)}


def _noop_cast(view) -> bool | str:
    """A dtype cast that changes nothing: its value has its input's dtype (`.to(query.dtype)`
    after Hugging Face's float32 softmax of float32 scores, `.float()`, `type_as`, export's
    `aten.to.dtype` and `aten._to_copy`), and it asks for no device, layout or memory format."""
    node = view.node
    src, out = tensor_meta(view.input), tensor_meta(node)
    if src is None or out is None:
        return "the cast has no dtype metadata"
    if src[1] != out[1]:
        return f"a cast from {src[1]} to {out[1]}"
    overload = aten_op_of(node)
    if overload is not None:
        args = bind_arguments(node, spec_for(node.graph.owning_module, node))
        if overload == torch.ops.aten.to.other:  # `x.to(y)` takes y's device too
            return "a cast to another tensor's dtype and device"
    elif node.op == "call_method" and node.target in _CAST_METHODS:
        if node.target == "type_as":
            return True
        extra = [a for a in node.args[1:] if not isinstance(a, bool)]  # non_blocking, copy
        if node.target != "to" and extra or not all(names_a_dtype(a) for a in extra):
            return f"a cast with the arguments {node.args[1:]!r}, not a dtype"
        args = dict(node.kwargs)
        if "dtype" in args and not names_a_dtype(args["dtype"]):
            return f"a cast to {args['dtype']!r}, not a dtype"
    else:
        return "not a dtype cast fxopt reads"
    for key, allowed in _KEEPS_STORAGE.items():
        if not any(args.get(key) is a or args.get(key) == a for a in allowed):
            return f"the cast also sets {key}={args.get(key)!r}"
    return True


# Reads of a number about a tensor beside its sizes (`size_read`): `x.dim()`, `x.numel()`,
# `x.ndim`, and ATen's `sym_numel` where export keeps it symbolic.
_NUMBER_METHODS = ("dim", "numel")
_NUMBER_ATTRS = ("ndim",)
_NUMBER_ATEN = (torch.ops.aten.sym_numel.default,)
# Arithmetic that maps Python numbers to Python numbers (on a tensor operand it gives a tensor,
# hence every operand must be a number); `math.*` and `torch.sym_*` only return numbers.
_NUMBER_OPS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
               operator.pow, operator.neg, torch.sym_float, torch.sym_int, torch.sym_max, torch.sym_min,
               torch._sym_sqrt}


def _shape_value(value: object) -> str | None:
    """"number" when `value` is a Python int/float computed only from tensor shapes and Python
    numbers (`C // n_head`, `k.size(-1) ** -0.5`, `1.0 / math.sqrt(hd)`), "shape" for a shape
    tuple, None for anything else: a tensor, a parameter, a graph input.

    Decided from how the graph computes it, not from the example run, so it holds for every
    input: a number derived from shapes is a number at any size, and a tensor (a learned
    temperature, `torch.tensor(d).sqrt()`) never is one.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"
    if not isinstance(value, torch.fx.Node) or tensor_meta(value) is not None:
        return None
    read = size_read(value)
    if read is not None:
        return "shape" if read[1] is None else "number"
    args, target = value.args, value.target
    if value.op == "call_method":
        return "number" if target in _NUMBER_METHODS else None
    if value.op != "call_function":
        return None
    if target is getattr and len(args) == 2:
        return "number" if args[1] in _NUMBER_ATTRS else None
    if target in _NUMBER_ATEN:
        return "number"
    if target is operator.getitem and len(args) == 2 and _shape_value(args[0]) == "shape":
        return "number" if isinstance(args[1], int) else "shape" if isinstance(args[1], slice) else None
    if target in _NUMBER_OPS or getattr(target, "__module__", None) == "math":
        operands = [*args, *value.kwargs.values()]
        return "number" if all(_shape_value(a) == "number" for a in operands) else None
    return None


def _is_shape_number(node: torch.fx.Node) -> bool:
    return _shape_value(node) == "number"


def _shape_scale(node: torch.fx.Node) -> bool | str:
    """A scale computed from sizes that is not 0 at the example's (``/ (d - 8)`` with d = 8
    divides by zero: the SDPA form's ``1 / n`` would raise where eager gives inf)."""
    if not _is_shape_number(node):
        return "not a number computed from sizes"
    recorded = node.meta.get("tensor_meta")
    return not (isinstance(recorded, (int, float)) and recorded == 0) or "the scale is 0 at the example's sizes"


#: A finite fill at most this large (Hugging Face's ``torch.finfo(dtype).min`` of float32 and
#: bfloat16) swallows any score added to it: ``s + fill == fill`` for every |s| below half the
#: float32 spacing there (~5e30), far beyond any attention score.
_SWALLOWING_FILL = -1e38


def _hides_the_score(value: object) -> bool:
    """A `masked_fill` value that takes the score out of the softmax: −inf, or a finite fill so
    large (``torch.finfo(torch.float32).min``) that adding it to any score gives the fill itself,
    so an additive mask of it is the same scores. A smaller fill (``-1e4``) replaces scores in a
    way no additive mask says (a fully masked row is uniform, not the row's softmax)."""
    return isinstance(value, (int, float)) and (value == -math.inf or value <= _SWALLOWING_FILL)


_hides_the_score.description = (f"-inf or a fill at most {_SWALLOWING_FILL:g} (torch.finfo(float32).min; a fill "
                                "nearer zero, such as -1e4, replaces the scores in a way no attention mask says)")


def _scores(mask: str | None, scale: str = "const") -> Op:
    """QKᵀ scaled, then an additive float mask (`mask="add"`), a boolean mask filled with −inf
    (`mask="fill"`: `s.masked_fill(m, -inf)`, nanoGPT's causal mask, or a fill that swallows
    the score, Hugging Face's `torch.finfo(dtype).min`), or none.

    `scale`: "const" (`/ 8.0`, `* 0.125`), "q-const" (the same on q before the product),
    "none" (scale 1), or a number computed in the graph from shapes (`/ hd ** 0.5` is "div",
    `* k.size(-1) ** -0.5` is "mul"), as symbolic traces keep it.
    """
    k_t = Op(("transpose", "permute"), Var("k"), check=_last_dims, name="k_t")
    qk = Op("matmul", Var("q"), k_t)
    if scale == "const":
        scaled = Op(("div", "mul"), qk, scalar=Const("c"), name="scale_op")
    elif scale == "q-const":  # timm's ``q = q * self.scale`` before ``q @ k.transpose(-2, -1)``
        scaled = Op("matmul", Op(("div", "mul"), Var("q"), scalar=Const("c"), name="scale_op"), k_t)
    elif scale == "none":  # no scale at all (folded into the q projection)
        scaled = qk
    elif scale == "stored":  # a one-element tensor of stored values: ``* torch.rsqrt(torch.tensor(d))``
        scaled = Op(("div", "mul"), qk, Var("t", check=_stored_scalar), name="scale_op")
    else:  # the scale node stays: it may feed other ops, and SDPA reads it
        scaled = Op(scale, qk, Var("s", check=_shape_scale), name="scale_op", commutative=scale == "mul")
    if mask == "add":
        return Op("add", scaled, Var("mask"), commutative=True)
    if mask == "fill":
        return Op("masked_fill", scaled, Var("mask"), attrs={"value": _hides_the_score}, name="fill")
    return scaled


def _checks_only(m: Match) -> list[torch.fx.Node] | str:
    """The users of the softmax besides the cast after it, which must all be export's
    `_assert_tensor_metadata` checks (export writes one before `.to`): they check a value the
    rewrite removes, so they go with it."""
    probs, cast = m.nodes["probs"], m.nodes["cast"]
    others = [u for u in probs.users if u is not cast]
    if any((v := op_view(m.gm, u)) is None or v.kind != "assert_metadata" for u in others):
        return f"the softmax '{probs.name}' has other users ({', '.join(u.name for u in others)})"
    return others


def _attention_check(m: Match) -> bool | str:
    metas = [tensor_meta(m.nodes[k]) for k in ("q", "k", "v")]
    if any(mt is None for mt in metas):
        return "q, k or v has no shape metadata"
    order = _key_order(m.views["k_t"])
    metas[1] = (tuple(metas[1][0][d] for d in order), metas[1][1])  # the key SDPA reads
    if len({len(mt[0]) for mt in metas}) != 1 or len(metas[0][0]) not in (3, 4):
        return "q, k and v must be 3-D or 4-D alike"
    if len({mt[1] for mt in metas}) != 1 or not metas[0][1].is_floating_point:
        return "q, k and v must share a floating dtype"
    if "mask" in m.nodes:
        mm = tensor_meta(m.nodes["mask"])
        filled = "fill" in m.views
        if filled and (mm is None or mm[1] != torch.bool):
            return "the masked_fill mask must be boolean"
        if not filled and (mm is None or mm[1] != metas[0][1]):
            return "the additive mask must have the dtype of q"
        scores = (*metas[0][0][:-1], metas[1][0][-2])
        if len(mm[0]) > len(scores) or any(a not in (1, b) for a, b in zip(reversed(mm[0]), reversed(scores))):
            # a mask that broadcasts the scores to a larger shape (a per-sample mask over one
            # sample's q, k, v): SDPA's output keeps q's shape
            return f"the mask {list(mm[0])} is larger than the scores {list(scores)}"
    if "cast" in m.nodes:
        checks = _checks_only(m)
        if isinstance(checks, str):
            return checks
    return True


def _to_sdpa(r: Rewriter) -> torch.fx.Node | None:
    divides = "scale_op" in r.match.views and r.view("scale_op").kind == "div"
    q = r["q"]
    if "scale_op" not in r.match.views:
        scale = 1.0
    elif "t" in r.match.nodes and reads_trainable(r.gm, r["t"]):
        # a learned temperature: SDPA's scale= is a float, read once it would stop training
        # (fuse tester); applied to q it trains as before: (q / t) @ k.T == (q @ k.T) / t
        t = r.call(torch.reshape, r["t"], ())
        q, scale = r.call(operator.truediv if divides else operator.mul, q, t), 1.0
    elif "c" in r.match.values or "t" in r.match.nodes:
        c = float(r["c"]) if "c" in r.match.values else float(_stored_cone_value(r.gm, r["t"]))
        scale = (1.0 / c if c != 0 else math.inf) if divides else c
        if not math.isfinite(scale):  # `/ 0.0` (or an inf scale): nothing SDPA's scale= can say
            return None
    else:  # a number known at run time only: SDPA's scale= takes it as a float then
        scale = r.call(operator.truediv, 1.0, r["s"]) if divides else r["s"]
    mask = r.match.nodes.get("mask")
    for _ in range(2 - len(tensor_meta(mask)[0]) if mask is not None else 0):
        mask = r.call(torch.unsqueeze, mask, 0)  # a (keys,) or 0-D mask broadcasts; SDPA takes 2-D and up
    fill = r.view("fill").attrs.get("value") if "fill" in r.match.views else None
    if fill == -math.inf:  # SDPA's boolean mask says which scores take part
        mask = r.call(torch.logical_not, mask)
    elif fill is not None:  # the fill as an additive mask: each filled score becomes the fill
        q_meta = tensor_meta(r.match.nodes["q"])
        mask = r.call(torch.masked_fill, r.call(torch.zeros_like, mask, dtype=q_meta[1]), mask, fill)
    sdpa = r.call(F.scaled_dot_product_attention, q, _sdpa_key(r), r["v"], attn_mask=mask, scale=scale)
    if "cast" in r.match.nodes:
        for check in _checks_only(r.match):
            r.graph.erase_node(check)
    return sdpa


def _attention(name: str, mask: str | None) -> list[Pattern]:
    """The attention patterns for `mask`: a constant scale (`name`), a scale computed from
    shapes that divides (`name/div-shape`) or multiplies (`name/mul-shape`) the scores, a
    constant scale of q (`name/scaled-q`), none (`name/unscaled`) and a one-element tensor of
    stored values, evaluated once (`name/stored-scale`: ``* torch.rsqrt(torch.tensor(d))``); each also with a cast between softmax and `@ v` that changes nothing (`/cast`: Hugging Face's
    eager `softmax(s, dim=-1, dtype=torch.float32).to(query.dtype)` on float32 scores)."""
    patterns = []
    for suffix, scale in (("", "const"), ("/div-shape", "div"), ("/mul-shape", "mul"), ("/scaled-q", "q-const"),
                          ("/unscaled", "none"), ("/stored-scale", "stored")):
        probs = Op("softmax", _scores(mask, scale), check=_softmax_last)
        patterns.append(Pattern(name + suffix, Op("matmul", probs, Var("v")), rewrite=_to_sdpa,
                                check=_attention_check))
        # the softmax may also feed export's metadata checks before the cast (see _checks_only)
        probs = Op("softmax", _scores(mask, scale), check=_softmax_last, name="probs", single_use=False)
        patterns.append(Pattern(name + suffix + "/cast", Op("matmul", Op("to", probs, name="cast", check=_noop_cast),
                                                            Var("v")), rewrite=_to_sdpa, check=_attention_check))
    return patterns


def _matmul_form(equation: str) -> str | None:
    """How a two-operand einsum is a batched matrix product: "ab" (``a @ b``), "abT"
    (``a @ bᵀ``), or None. The batch letters (or an ellipsis) lead every term, in one order.

        >>> _matmul_form("bhqd,bhkd->bhqk"), _matmul_form("bhqk,bhkd->bhqd"), _matmul_form("bij,bjk->bki")
        ('abT', 'ab', None)
    """
    terms = equation.replace(" ", "").replace("...", "*")
    if terms.count("->") != 1:
        return None
    inputs, out = terms.split("->")
    if inputs.count(",") != 1:
        return None
    a, b = inputs.split(",")
    if len({len(a), len(b), len(out)}) != 1 or len(a) < 2 or "*" in a[-2:] + b[-2:] + out[-2:]:
        return None
    batch, (i, k), j = a[:-2], a[-2:], out[-1]
    if b[:-2] != batch or out[:-1] != batch + i or len(set(a + j)) != len(a) + 1:
        return None
    return "ab" if b[-2:] == k + j else "abT" if b[-2:] == j + k else None


def _softmax_reader_or_operand(m: Match) -> bool | str:
    """An einsum of attention: its first operand is a softmax (``p @ v``), or a softmax reads
    its value through at most a scale and a mask (the scores). Other einsums stay as written."""
    if _matmul_form(m.views["einsum"].attrs.get("equation", "")) is None:
        return "not a batched matrix product"
    first = op_view(m.gm, m.nodes["a"])
    if first is not None and (first.kind == "softmax" or first.kind == "to" and isinstance(first.input, torch.fx.Node)
                              and (v := op_view(m.gm, first.input)) is not None and v.kind == "softmax"):
        return True
    return _read_by_softmax(m) is True or "not read by a softmax, nor reading one"


def _einsum_as_matmul(r: Rewriter) -> torch.fx.Node:
    b = r["b"]
    if _matmul_form(r.view("einsum").attrs["equation"]) == "abT":
        b = r.call(torch.transpose, b, -2, -1)
    return r.call(torch.matmul, r["a"], b)


def _is_qk(gm: torch.fx.GraphModule, value: Any) -> bool:
    """``q @ kᵀ``, or it scaled by a number (a constant, or one computed from shapes: ``/ sqrt(d)``);
    kᵀ a transpose or permute of the last two axes."""
    view = op_view(gm, value) if isinstance(value, torch.fx.Node) else None
    if view is not None and view.kind in ("div", "mul") and view.input is not None \
            and all(_is_shape_number(i) for i in view.inputs[1:]) \
            and (view.kind == "mul" or (view.node.args and view.node.args[0] is view.input)):  # not ``2 / qk``
        view = op_view(gm, view.input)
    if view is None or view.kind != "matmul" or len(view.inputs) != 2:
        return False
    k = op_view(gm, view.inputs[1])
    return k is not None and k.kind in ("transpose", "permute") and _last_dims(k) is True


def _is_plain_scores(value: Any) -> bool | str:
    """``q @ kᵀ`` unscaled: a mask added to it before a scale (scaled twice, no SDPA follows)."""
    view = op_view(value.graph.owning_module, value) if isinstance(value, torch.fx.Node) else None
    return (view is not None and view.kind == "matmul" and _is_qk(value.graph.owning_module, value)) \
        or "not q @ kᵀ"


def _is_scores(value: Any) -> bool | str:
    """``q @ kᵀ``, or it scaled by a number: the scores a mask is added to."""
    return (isinstance(value, torch.fx.Node) and _is_qk(value.graph.owning_module, value)) or "not q @ kᵀ (scaled)"


def _is_masked_scores(value: Any) -> bool | str:
    """Attention scores with up to two masks added or filled in (what a softmax of attention
    reads): ``q @ kᵀ`` scaled, then ``+ position_bias``, ``+ mask`` or ``.masked_fill(m, -inf)``."""
    gm = value.graph.owning_module if isinstance(value, torch.fx.Node) else None
    for _ in range(3):
        if gm is None or _is_qk(gm, value):
            break
        view = op_view(gm, value)
        if view is None or view.kind not in ("add", "masked_fill") or not view.inputs:
            return "not q @ kᵀ (scaled, masked)"
        terms = view.inputs if view.kind == "add" else view.inputs[:1]
        value = next((t for t in terms if isinstance(t, torch.fx.Node) and _is_qk(gm, t)), terms[0])
    return (gm is not None and _is_qk(gm, value)) or "not q @ kᵀ (scaled, masked)"


def _softmax_of_cast(r: Rewriter) -> torch.fx.Node:
    # export checks the cast's input with `_assert_tensor_metadata` before `.to`: the check
    # goes with the cast (it would hold the scores as read twice, which no pattern rewrites)
    for user in list(r["x"].users):
        if (view := op_view(r.gm, user)) is not None and view.kind == "assert_metadata":
            r.graph.erase_node(user)
    # T5's ``.type_as(scores)`` after it reads the scores' dtype (or the cast's, in export),
    # which is the softmax's: that cast goes too, or the scores would keep a second reader
    scores = {r["x"], r.match.nodes["cast"]}
    for user in list(r.match.root.users):
        view = op_view(r.gm, user)
        if view is not None and view.kind == "to" and scores & set(user.args[1:]) and _noop_cast(view) is True:
            user.replace_all_uses_with(r.match.root)
            r.graph.erase_node(user)
    return r.call(torch.softmax, r["x"], dim=r.view("probs").attrs.get("dim"))


def _masks_read_by_softmax(m: Match) -> bool | str:
    """The two added terms are tensors (a position bias, a mask) and the sum reaches a softmax
    (through at most a cast that changes nothing: T5's ``softmax(scores.float())``)."""
    if any(tensor_meta(m.nodes[k]) is None for k in ("a", "b")):
        return "an added term is not a tensor"
    value = m.root
    for _ in range(2):
        if len(value.users) != 1:
            return "the masked scores have other readers"
        value = next(iter(value.users))
        view = op_view(m.gm, value)
        if view is not None and view.kind == "softmax":
            return True
        if view is None or view.kind != "to" or _noop_cast(view) is not True:
            break  # a cast that changes the dtype: a softmax SDPA does not compute
    return "not read by a softmax"


def _subtracted_mask(m: Match) -> bool | str:
    """``scores - penalty`` read by a softmax: a tensor of the scores' dtype, taken as the
    additive mask ``-penalty`` (a distance or ALiBi-style penalty is often subtracted)."""
    if m.views["masked"].attrs.get("alpha", 1) != 1:
        return "sub with alpha != 1"
    mask, scores = tensor_meta(m.nodes["mask"]), tensor_meta(m.nodes["s"])
    if mask is None or scores is None or mask[1] != scores[1]:
        return "the subtracted term is not a tensor of the scores' dtype"
    return _read_by_softmax(m, steps=2)


def _mask_as_added(r: Rewriter) -> torch.fx.Node:
    return r.call(torch.add, r["s"], r.call(torch.neg, r["mask"]))


def _one_mask(r: Rewriter) -> torch.fx.Node:
    return r.call(torch.add, r["s"], r.call(torch.add, r["a"], r["b"]))


def _is_key_t(value: Any) -> bool | str:
    """kᵀ: a transpose or permute of k that swaps its last two axes (`_key_order`)."""
    view = op_view(value.graph.owning_module, value) if isinstance(value, torch.fx.Node) else None
    if view is None or view.kind not in ("transpose", "permute"):
        return "not a transpose or permute of k"
    return _last_dims(view)


def _read_by_softmax(m: Match, steps: int = 3) -> bool | str:
    """The pattern's value reaches a softmax through at most `steps` single-reader masks,
    scales and casts that change nothing (the scores of attention, not any product)."""
    value = m.root
    for _ in range(steps):
        if len(value.users) != 1:
            return f"'{value.name}' has other readers than the softmax"
        value = next(iter(value.users))
        view = op_view(m.gm, value)
        if view is not None and view.kind == "softmax":
            return True
        if view is None or view.kind not in ("add", "masked_fill", "mul", "div", "to") \
                or (view.kind == "to" and _noop_cast(view) is not True):
            break
    return "not read by a softmax"


def _plain_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _baddbmm_scores(m: Match) -> bool | str:
    """Bloom-style scores, ``baddbmm(bias, q, kᵀ, beta=β, alpha=α)``: α and β numbers, the
    bias of the scores' dtype, and a softmax reading the result."""
    attrs = m.views["scores"].attrs
    if not (_plain_number(attrs.get("alpha", 1)) and _plain_number(attrs.get("beta", 1))):
        return "alpha or beta is not a finite number known when fusing"
    bias, scores = tensor_meta(m.nodes["bias"]), tensor_meta(m.root)
    if bias is None or scores is None or bias[1] != scores[1]:
        return "the added term has no metadata or another dtype than the scores"
    return _read_by_softmax(m)


def _baddbmm_as_matmul(r: Rewriter) -> torch.fx.Node:
    """``α (q @ kᵀ) + β bias``, spelled as the attention patterns read it: a scaled product
    and an additive mask. With β = 0 baddbmm ignores the bias (NaN and inf in it too)."""
    attrs = r.view("scores").attrs
    alpha, beta = attrs.get("alpha", 1), attrs.get("beta", 1)
    scores = r.call(torch.matmul, r["q"], r["k_t"])
    if alpha != 1:
        scores = r.call(torch.mul, scores, alpha)
    if beta == 0:
        return scores
    return r.call(torch.add, scores, r["bias"] if beta == 1 else r.call(torch.mul, r["bias"], beta))


def _scale_after_mask(m: Match) -> bool | str:
    """``(q @ kᵀ + mask) * c`` or ``q @ kᵀ .masked_fill(m, fill) / c`` read by a softmax: the
    same scores as ``q @ kᵀ * c + mask * c`` (``fill * c``), which SDPA computes. A fill moves
    past a scale only when c > 0 (−inf stays −inf) and a fill that hid the score still does."""
    c = m.values.get("c")
    if "c" in m.values and (not _plain_number(c) or c == 0):
        return f"the scale {c!r} is not a finite non-zero number"
    if "fill" in m.views:
        fill = m.views["fill"].attrs.get("value")
        if not _plain_number(fill) and fill != -math.inf:
            return "the fill is not a number"
        if c is None or c < 0:
            return "a fill moves past a positive constant scale only"
        dtype = tensor_meta(m.nodes["s"])[1] if tensor_meta(m.nodes["s"]) is not None else None
        if dtype is None or not dtype.is_floating_point:
            return "the scores have no floating dtype recorded"
        if not _hides_the_score(_scaled_fill(fill, c, m.views["scale_op"].kind, dtype)):
            return "the scaled fill no longer hides the score"
    else:
        mask, scores = tensor_meta(m.nodes["mask"]), tensor_meta(m.nodes["masked"])
        if mask is None or scores is None or mask[1] != scores[1]:
            return "the mask is not a tensor of the scores' dtype"
    return _read_by_softmax(m, steps=2)


def _scaled_fill(fill: float, c: float, kind: str, dtype: torch.dtype) -> float:
    """The fill after the scale, computed in the scores' dtype as eager computes it:
    ``finfo(float32).min * 4`` overflows to −inf there (and is −inf in the scores eager
    softmaxes), where Python's float would give a fill float32 cannot hold."""
    value = torch.tensor(fill, dtype=dtype)
    return float(value / c if kind == "div" else value * c)


def _scale_before_mask(r: Rewriter) -> torch.fx.Node:
    kind = r.view("scale_op").kind
    c = r["c"] if "c" in r.match.values else r["n"]
    scale = operator.truediv if kind == "div" else operator.mul
    scores = r.call(scale, r["s"], c)
    if "fill" in r.match.views:
        dtype = tensor_meta(r.match.nodes["s"])[1]
        return r.call(torch.masked_fill, scores, r["mask"], _scaled_fill(r.view("fill").attrs["value"], c, kind, dtype))
    return r.call(operator.add, scores, r.call(scale, r["mask"], c))


def _mask_before_scale() -> list[Pattern]:
    """A mask added (or filled in) before the scale: ``(q @ kᵀ + mask) / c``, also ``/ n`` of
    a number computed from shapes (additive masks only: its sign is unknown when fusing)."""
    qk = Var("s", check=_is_plain_scores)
    added = Op("add", qk, Var("mask"), commutative=True, name="masked")
    filled = Op("masked_fill", qk, Var("mask"), name="fill")
    name = "attention/mask-before-scale"
    patterns = [Pattern(name, Op(("div", "mul"), added, scalar=Const("c"), name="scale_op"),
                        rewrite=_scale_before_mask, check=_scale_after_mask),
                Pattern(name + "/fill", Op(("div", "mul"), filled, scalar=Const("c"), name="scale_op"),
                        rewrite=_scale_before_mask, check=_scale_after_mask)]
    for kind in ("div", "mul"):
        patterns.append(Pattern(f"{name}/{kind}-shape", Op(kind, added, Var("n", check=_shape_scale),
                                                           name="scale_op", commutative=kind == "mul"),
                                rewrite=_scale_before_mask, check=_scale_after_mask))
    return patterns


_ATTENTION = [
    # two terms added to the scores (T5: a position bias, then the mask): one mask, the sum of
    # both, which the patterns below take as SDPA's attn_mask
    # a cast that changes nothing before the softmax (Meta's LLaMA and T5's
    # ``softmax(scores.float(), dim=-1).type_as(q)`` on float32 scores): dropped, so the
    # patterns below see the softmax of the scores (the cast stays for any other reader)
    Pattern("attention/cast-into-softmax", Op("softmax", Op("to", Var("x", check=_is_masked_scores), name="cast",
                                                             check=_noop_cast, single_use=False),
                                        name="probs", check=_softmax_last),
            rewrite=_softmax_of_cast),
    Pattern("attention/subtracted-mask", Op("sub", Var("s", check=_is_scores), Var("mask"), name="masked"),
            rewrite=_mask_as_added, check=_subtracted_mask),
    Pattern("attention/one-mask", Op("add", Op("add", Var("s", check=_is_scores), Var("a"), name="inner",
                                               commutative=True), Var("b"), name="outer", commutative=True),
            rewrite=_one_mask, check=_masks_read_by_softmax),
    # attention spelled with einsum (``einsum("bhqd,bhkd->bhqk", q, k)``): as the matmuls it
    # computes, the patterns below find it
    Pattern("attention/einsum-as-matmul", Op("einsum", Var("a"), Var("b"), name="einsum"), rewrite=_einsum_as_matmul,
            check=_softmax_reader_or_operand),
    # ``baddbmm(alibi, q, kᵀ, beta=1, alpha=1/√d)`` scores and a mask added before the scale:
    # respelled as a scaled product plus a mask, which the patterns below find
    Pattern("attention/baddbmm-as-matmul", Op("baddbmm", Var("bias"), Var("q"), Var("k_t", check=_is_key_t),
                                              name="scores"), rewrite=_baddbmm_as_matmul, check=_baddbmm_scores),
    *_mask_before_scale(),
    *_attention("attention+mask", "add"), *_attention("attention+masked_fill", "fill"), *_attention("attention", None)]
#: The names of the attention patterns, for passes that switch them on and off together.
ATTENTION = tuple(p.name for p in _ATTENTION)


FOLDS = PatternSet([
    Pattern("bn-before-slice", Op("batch_norm", Op(_CUTS, Var("src", check=_conv_under_cuts), name="cut",
                                                   check=_cuts_other_axes), name="bn", check=_bn_eval),
            rewrite=_bn_before_cut),
    *_BN_INTO_CAT,
    Pattern("conv+bn", Op("batch_norm", Op("conv", Var("x"), name="conv", check=_conv_ok), name="bn",
                          check=_bn_eval), rewrite=_fold_conv_bn),
    Pattern("linear+bn", Op("batch_norm", Op("linear", Var("x"), name="linear", check=_linear_ok), name="bn",
                            check=_bn_eval), rewrite=_fold_linear_bn),
    Pattern("linear+swap+bn", Op("batch_norm", Op(("transpose", "permute"), Op("linear", Var("x"), name="linear",
                                                                              check=_linear_ok),
                                                  name="swap", check=_features_to_channels),
                                 name="bn", check=_bn_eval), rewrite=_fold_linear_swap_bn),
    Pattern("bn+conv", Op("conv", Op("batch_norm", Var("x"), name="bn", check=_bn_eval), name="conv",
                          check=_conv_ok), rewrite=_fold_bn_conv),
    Pattern("bn+pad+conv", Op("conv", Op("pad", Op("batch_norm", Var("x"), name="bn", check=_bn_eval), name="pad",
                                         check=_copying_pad), name="conv", check=_conv_ok), rewrite=_fold_bn_conv),
    Pattern("bn+linear", Op("linear", Op("batch_norm", Var("x"), name="bn", check=_bn_eval), name="linear",
                            check=_linear_ok), rewrite=_fold_bn_linear),
    Pattern("conv+scale", Op("mul", Op("conv", Var("x"), name="conv", check=_conv_ok), Var("g", check=_stored_value),
                             commutative=True), rewrite=_fold_conv_scale),
    Pattern("conv+bias", Op("add", Op("conv", Var("x"), name="conv", check=_conv_ok), Var("g", check=_stored_value),
                            name="add", commutative=True), rewrite=_fold_conv_shift),
    Pattern("linear+scale", Op("mul", Op("linear", Var("x"), name="linear", check=_linear_ok),
                               Var("g", check=_stored_value), commutative=True), rewrite=_fold_linear_scale),
    Pattern("conv+scale/number", Op(("mul", "div"), Op("conv", Var("x"), name="conv", check=_conv_ok),
                                    scalar=Const("c"), name="scale_op"), rewrite=_fold_number_scale),
    Pattern("linear+scale/number", Op(("mul", "div"), Op("linear", Var("x"), name="linear", check=_linear_ok),
                                      scalar=Const("c"), name="scale_op"), rewrite=_fold_number_scale),
    Pattern("linear+linear", Op("linear", Op("linear", Var("x"), name="first", check=_linear_ok), name="second",
                                check=_linear_ok), rewrite=_merge_linears),
    Pattern("linear+bias", Op("add", Op("linear", Var("x"), name="linear", check=_no_bias),
                              Var("b", ndim=1, check=_bias_vector), commutative=True), rewrite=_fold_bias),
    *_ATTENTION,
])


# ----- epilogues (annotations) -------------------------------------------------------------------

def mark_group(nodes: list[torch.fx.Node], label: str) -> None:
    """Annotate a fused group; `nodes` in dataflow order, first the anchor, last the output."""
    anchor, output = nodes[0], nodes[-1]
    for node in nodes:
        role = "anchor" if node is anchor else "output" if node is output else "member"
        annotate(node, fused=label, fusion_role=role, fusion_anchor=anchor.name, fusion_output=output.name)


def _annotator(label_of):
    def rewrite(r: Rewriter) -> torch.fx.Node:
        mark_group(list(r.match.ops), label_of(r))
        return r.match.root
    return rewrite


def _same_shape(m: Match) -> bool | str:
    verdict = _not_fused(m)
    return verdict if verdict is not True else residual_fits_conv(m)


def residual_fits_conv(m: Match) -> bool | str:
    """A residual add a conv kernel can absorb: same shape and dtype as the conv output, alpha 1."""
    if m.nodes["other"] is m.nodes["conv"]:  # conv(x) + conv(x): a fused call would run the conv twice
        return "the residual is the conv's own output"
    a, b = tensor_meta(m.nodes["conv"]), tensor_meta(m.nodes["other"])
    if a is None or b is None or tuple(a[0]) != tuple(b[0]) or a[1] != b[1]:
        return "the residual has another shape or dtype than the conv output (a broadcast add)"
    if m.views["add"].attrs.get("alpha", 1) != 1:
        return "add with alpha != 1"
    return True


EPILOGUES = PatternSet([
    Pattern("conv+add+relu", Op("relu", Op("add", Op("conv", Var("x"), name="conv"), Var("other"),
                                           name="add", commutative=True), name="act"),
            rewrite=_annotator(lambda r: "conv+add+relu"), check=_same_shape),
    Pattern("conv+act", Op(ACTIVATIONS, Op("conv", Var("x"), name="conv"), name="act"),
            rewrite=_annotator(lambda r: f"conv+{r.view('act').kind}"), check=_not_fused),
    Pattern("linear+act", Op(ACTIVATIONS, Op("linear", Var("x"), name="linear"), name="act"),
            rewrite=_annotator(lambda r: f"linear+{r.view('act').kind}"), check=_not_fused),
    Pattern("conv+add", Op("add", Op("conv", Var("x"), name="conv"), Var("other"), name="add",
                           commutative=True),
            rewrite=_annotator(lambda r: "conv+add"), check=_same_shape),
    Pattern("add+relu", Op("relu", Op("add", Var("a"), Var("b"), name="add"), name="act"),
            rewrite=_annotator(lambda r: "add+relu"), check=_not_fused),
])

ALL = NOOPS + REDUCTIONS + STACK_SUMS + NORMS + CHANNEL_LAYER_NORMS + FOLDS + EPILOGUES
