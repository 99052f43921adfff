"""What to quantize: int8 groups (patterns as data) and the int8 region (a minimum cut).

A *group* is a run of nodes that becomes one int8 kernel: an anchor (conv, linear, add,
matmul, cat, hardswish, leaky_relu, a batchnorm no layer precedes) optionally followed by a batchnorm
(after a conv, or BatchNorm1d after a linear's (N, features) output; folded into the weights)
and an activation (relu, relu6, or any
hardtanh / clamp with numeric bounds, whose clamp the group's output grid implies)::

    conv -> batch_norm -> relu      ==>  quantized.conv2d_relu(q(x), packed(w folded), s, zp)

A transposed conv is a conv anchor when its stride equals its kernel, with no padding and one
group (a U-Net's up-sampler; `transposed_reason`): lowering makes it a 1x1 int8 conv and a
depth-to-space of the int8 bytes.

*Pass-through* ops (pooling, flatten/reshape/(un)squeeze/permute/transpose, relu, relu6 (a hardtanh or
clamp from 0), eval dropout, basic
slicing: `x[:, :, :-pad]`, `x[..., 1:]`, `x.narrow`, `x.select`, and padding with zeros or by
copying edges: `F.pad(x, (0, 1, 0, 1))`, reflect, replicate, circular) run on int8 values as
they are, on their input's grid, so a chain conv -> maxpool -> flatten -> linear, a TCN's causal
pad -> conv -> relu -> pad -> conv, or TF-style 'same' padding before each conv, needs no
dequantize/quantize pair. Every other op stays float, with its reason in `float_ops`.

Which pass-through ops run in int8 is a trade-off: each int8<->float boundary costs a
quantize or dequantize of the tensor crossing it. `int8_region` decides it on the whole
graph with a minimum s-t cut (networkx): int8 groups hang from the source, float ops from the
sink, every dataflow edge costs the bytes it carries, and the cheapest cut puts the
boundaries where the fewest bytes cross. Inside the region, the values an int8 cat alone reads
take the cat's grid (`shared_grids`), so the cat copies instead of requantizing.

Only float32 values are quantized: the int8 kernels quantize float32 (`quantize_per_tensor`
refuses float16/bfloat16, and the reference form dequantizes to float32), so ops on float16,
bfloat16 or float64 values stay as they are (`float_reason`). Values calibration saw an
infinity in (a -inf attention mask) have no int8 grid either: `int8_region` keeps them, and
every op that would read them quantized, float.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx

from fxopt.ir import aten_op_of, metadata_read, op_name, op_view, size_read, tensor_meta, value_nbytes, written_in_place

#: What may follow each anchor kind inside one group, in order.
FOLLOWERS: dict[str, tuple[tuple[str, ...], ...]] = {
    "conv": (("batch_norm",), ("relu", "hardtanh", "clamp")),
    "linear": (("batch_norm",), ("relu", "hardtanh", "clamp")),
    "add": (("relu", "hardtanh", "clamp"),),  # from 0 only: the add_relu kernel (`_follower_ok`)
    "matmul": (),
    "cat": (),
    "hardswish": (),
    # YOLOv3/CSPDarknet's activation: quantized.leaky_relu onto a grid of its own (oneDNN's int8
    # conv takes no leaky_relu post-op: "Unsupported post op", torch 2.13); float, each was a
    # dequantize, a float op and a quantize between two int8 convs
    "leaky_relu": (),
    # a batchnorm no conv/linear precedes (pre-activation ResNets, DenseNet's BN-ReLU-conv):
    # quantized.batch_norm2d(_relu), 2-3x faster than its dequantize/float/quantize on the
    # channels-last int8 values convs write (32 channels at 32x32: 31 vs 66 us, batch 16: 246 vs 752)
    "batch_norm": (("relu", "hardtanh", "clamp"),),  # from 0 only: the _relu kernel (`_follower_ok`)
}
#: Followers that act elementwise, so they commute with slicing (see `_grow`).
ACTIVATIONS = frozenset({"relu", "hardtanh", "clamp"})
#: Basic indexing (slices, integers, `...`, None) picks elements of its input without computing:
#: on an int8 value it gives those elements, on the input's grid. `slicing_reason` says which
#: spellings qualify (a tensor index, or a getitem of a tuple, does not).
SLICING = frozenset({"getitem", "slice", "narrow", "select"})
#: Pad modes whose every new element is 0.0 (the zero point: on every int8 grid) or a copy of
#: an input element: on an int8 value they give int8 values on its grid (`pad_reason`).
PAD_MODES = ("constant", "reflect", "replicate", "circular")
#: Ops that compute on int8 values directly, keeping the input's scale and zero point.
PASS_THROUGH = frozenset({
    "max_pool", "adaptive_avg_pool", "avg_pool", "flatten", "reshape", "unsqueeze", "squeeze", "permute", "transpose",
    "contiguous", "relu", "hardtanh", "clamp", "dropout", "identity", "detach", "pad", "pixel_shuffle", "pixel_unshuffle",
    *SLICING,
})
#: Group kinds that do no arithmetic worth speeding up (no weights): int8 only pays when it spares
#: conversions, so the minimum cut decides them like pass-through ops. A residual add between
#: two convs stays int8; one between float layer norms (a transformer's) stays float.
CUT_DECIDES = frozenset({"add", "cat", "hardswish", "leaky_relu", "batch_norm"})
#: Groups that stay float where int8 saves no conversion: in int8 they round their output once
#: more (a leaky_relu between a LayerNorm and a linear: 37.8 -> 35.1 dB and 1.25x the time, a
#: quantize moved before it and the linear's own input quantize kept; adversary).
FLOAT_ON_A_TIE = frozenset({"leaky_relu"})
#: Pass-through ops whose int8 kernel rounds (averages): the reference backend re-quantizes.
AVERAGING = frozenset({"adaptive_avg_pool", "avg_pool"})


@dataclass
class Group:
    """One future int8 kernel."""

    kind: str
    anchor: torch.fx.Node
    nodes: list[torch.fx.Node]
    inputs: list[torch.fx.Node]
    bn: torch.fx.Node | None = None
    act: torch.fx.Node | None = None
    view: object = None
    #: basic slicing (and `contiguous`) between the anchor (or its batchnorm) and the
    #: activation, applied to the kernel's output in this order
    views: list[torch.fx.Node] = field(default_factory=list)

    @property
    def output(self) -> torch.fx.Node:
        return self.nodes[-1]

    @property
    def name(self) -> str:
        return self.anchor.name


@dataclass
class Plan:
    groups: dict[str, Group] = field(default_factory=dict)       # output node name -> group
    pass_through: set[str] = field(default_factory=set)          # node names
    unsupported: dict[str, str] = field(default_factory=dict)    # node name -> reason / kind
    member_of: dict[str, Group] = field(default_factory=dict)    # every group node -> group


def float_reason(node) -> str | None:
    """None when `node` is a value int8 kernels can quantize, a float32 tensor; else why not.

    The one place that decides which dtypes are quantized: `quantize_per_tensor` takes float32
    only, and an int8 value dequantizes to float32, so a float16/bfloat16 (or float64) value
    keeps its dtype only by staying float.
    """
    meta = tensor_meta(node)
    if meta is None or not meta[1].is_floating_point:
        return "not a float value"
    if meta[1] != torch.float32:
        return f"{str(meta[1]).removeprefix('torch.')} value: int8 kernels take float32"
    return None


def is_float_value(node) -> bool:
    """Whether `node` is a float32 tensor value, the only kind int8 lowering quantizes."""
    return float_reason(node) is None


def _holds_floats(node) -> bool:
    """Whether `node` gives a floating tensor, or a (nested) tuple holding one: what a user
    reads as a float op when it stays float."""
    def floating(meta) -> bool:
        if hasattr(meta, "dtype"):  # a TensorMetadata (itself a named tuple)
            return meta.dtype.is_floating_point
        return isinstance(meta, (tuple, list)) and any(floating(m) for m in meta)
    return floating(node.meta.get("tensor_meta"))


def _other_float_dtype(node) -> str | None:
    """The reason for a float value of another dtype than float32 (float16, ...), else None."""
    meta = tensor_meta(node)
    return float_reason(node) if meta is not None and meta[1].is_floating_point else None


def _single_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _anchor_ok(gm, view) -> str | None:
    """None when the anchor can become an int8 kernel, else why not."""
    node = view.node
    reason = float_reason(node)
    if reason is not None:
        return reason
    for i in view.inputs:
        reason = _other_float_dtype(i)
        if reason is not None:  # e.g. a cat or add that promotes a float16 operand
            return f"operand '{i.name}' is a {reason}"
    if view.kind in ("conv", "linear") and isinstance(view.attrs.get("bias"), torch.fx.Node):
        # (``b.to(x.device)``, ``b * s``): the kernel takes a stored bias, and read as none it was dropped
        return "bias is computed in the graph"
    if view.kind == "conv":
        a = view.attrs
        if view.param("weight") is None:  # computed (weight_norm): attributes read off it are unknown too
            return "weight is not a parameter"
        if a.get("dim") not in (1, 2, 3):
            return "only conv1d/2d/3d have int8 kernels"
        if a.get("transposed"):
            return transposed_reason(view)
        if isinstance(a.get("padding"), str):
            # the op view turns every symmetric string padding into numbers: this one is uneven
            return f"padding='{a['padding']}' pads unevenly here (an even kernel): no int8 kernel"
        if a.get("padding_mode", "zeros") not in ("zeros", *PAD_MODES):
            return f"padding_mode='{a['padding_mode']}' has no int8 kernel"
        if view.param("weight") is None:
            return "weight is not a parameter"
        return None
    if view.kind == "linear":
        return None if view.param("weight") is not None else "weight is not a parameter"
    if view.kind == "add":
        if len(view.inputs) != 2 or view.attrs.get("alpha", 1) != 1:
            return "add of a scalar or with alpha"
        a, b = (tensor_meta(i) for i in view.inputs)
        if a is None or b is None or tuple(a[0]) != tuple(b[0]):
            return "broadcasting add"
        held = next((i.name for i in view.inputs if i.op == "get_attr"), None)
        if held is not None:  # a position table read directly: observers watch activations only
            return f"adds the parameter '{held}' (no int8 grid for it)"
        return None if all(is_float_value(i) for i in view.inputs) else "non-float operand"
    if view.kind == "matmul":
        if len(view.inputs) != 2 or any(i.op == "get_attr" for i in view.inputs):
            return "matmul with a constant operand"
        a, b = (tensor_meta(i) for i in view.inputs)
        if a is None or b is None or len(a[0]) != len(b[0]) or len(a[0]) < 2:
            return "matmul operands of different rank"
        return None
    if view.kind == "cat":
        if not view.inputs or any(not is_float_value(i) for i in view.inputs):
            return "cat of non-float values"
        return None
    if view.kind == "hardswish":  # MobileNetV3's activation, with a grid of its own
        return None if view.inputs and is_float_value(view.inputs[0]) else "non-float operand"
    if view.kind == "leaky_relu":
        return _leaky_relu_reason(view)
    if view.kind == "batch_norm":
        return _int8_batch_norm_reason(view)
    return "no int8 kernel"


def leaky_slope(view) -> float | None:
    """The negative slope of a leaky_relu view as a float, or None when it is no number."""
    slope = view.attrs.get("negative_slope", 0.01)
    return None if isinstance(slope, bool) or not isinstance(slope, (int, float)) else float(slope)


def _leaky_relu_reason(view) -> str | None:
    """None when a leaky_relu has x86's int8 kernel (`quantized.leaky_relu`), else why not."""
    if not view.inputs or not is_float_value(view.inputs[0]):
        return "non-float operand"
    if leaky_slope(view) is None:
        return f"negative_slope {view.attrs.get('negative_slope')!r} is no number: no int8 kernel"
    return None


#: The int8 batchnorm kernels by input rank (torch's quantized.batch_norm1d takes (N, C, L)).
BATCH_NORM_KERNELS = {3: "batch_norm1d", 4: "batch_norm2d", 5: "batch_norm3d"}


def _int8_batch_norm_reason(view) -> str | None:
    """None when a batchnorm no layer precedes has an int8 kernel, else why not."""
    if view.attrs.get("training", False) or view.param("running_mean") is None \
            or view.param("running_var") is None:
        return "uses batch statistics (training mode): no int8 kernel"
    computed = next((name for name in ("weight", "bias") if view.computed(name) is not None), None)
    if computed is not None:
        return f"its {computed} is computed in the graph ('{view.computed(computed).name}'): no int8 kernel"
    meta = tensor_meta(view.input) if isinstance(view.input, torch.fx.Node) else None
    if meta is None or len(meta[0]) not in BATCH_NORM_KERNELS or not is_float_value(view.input):
        return "its input is not a float32 tensor of rank 3-5: no int8 kernel"
    return None


def transposed_reason(view) -> str | None:
    """None when a transposed conv (`view`) has fxopt's int8 form, else why it stays float.

    The int8 form is exact and faster than float for one family only: stride equal to the
    kernel, no padding, one group (a U-Net's ``ConvTranspose2d(c, c // 2, 2, stride=2)``).
    There every output pixel comes from one input pixel and one kernel tap, so the transposed
    conv is a 1x1 int8 conv with ``prod(kernel) * C_out`` output channels (per-channel weights)
    whose taps `kernels.depth_to_space` interleaves. torch's own int8 transposed convs are no
    option (measured, torch 2.13; docs/benchmarks.md): oneDNN's (what the x86 engine picks) is
    off by up to 255 output steps; fbgemm's takes a direct path for a (2, k) kernel with no
    padding and channel counts that are multiples of 8 that is as wrong, and its other path,
    exact, ran slower than the float op; and both refuse per-channel weights.
    """
    node, a = view.node, view.attrs
    if node.op == "call_module" and (len(node.args) > 1 or "output_size" in node.kwargs):
        return "transposed conv called with output_size: no int8 kernel"
    kernel = tuple(view.param("weight").shape[2:])
    geometry = {"stride": tuple(a.get("stride", ())), "padding": tuple(a.get("padding", ())),
                "output_padding": tuple(a.get("output_padding", ())), "groups": a.get("groups", 1),
                "dilation": tuple(a.get("dilation", ()))}
    off = [name for name, bad in (
        ("stride", geometry["stride"] != kernel), ("padding", any(geometry["padding"])),
        ("output_padding", any(geometry["output_padding"])), ("groups", geometry["groups"] != 1),
        ("dilation", any(d != 1 for d in geometry["dilation"]) and any(k > 1 for k in kernel))) if bad]
    if off:  # name what breaks the rule (an output_size call shows up here as its output_padding)
        here = ", ".join(f"{name} {geometry[name]}" for name in off)
        return ("transposed conv: only stride == kernel, padding 0, output_padding 0, groups 1, dilation 1 has "
                f"an int8 kernel (a 1x1 conv and a depth-to-space); here kernel {kernel}, {here}; runs in float")
    if a.get("padding_mode", "zeros") != "zeros":
        return f"transposed conv with padding_mode='{a['padding_mode']}': no int8 kernel"
    return None


def _follower_ok(view, anchor) -> bool:
    if view.kind == "batch_norm":
        if view.attrs.get("training", False) or "running_mean" not in view.params \
                or any(view.computed(name) is not None for name in ("weight", "bias")):
            return False
        if anchor.kind == "linear":
            # BatchNorm1d normalizes dim 1: the linear's features only on an (N, features) output
            # (on (N, L, features) it would normalize L, which no weight fold can express)
            meta = tensor_meta(anchor.node)
            weight = anchor.param("weight")
            return (meta is not None and len(meta[0]) == 2 and weight is not None
                    and view.param("running_mean").shape[0] == weight.shape[0])
        return True
    if view.kind in ACTIVATIONS:
        if anchor.kind in ("add", "batch_norm"):  # the kernels' relu, on the activation's grid: relu, relu6
            bounds = activation_bounds(view)
            return bounds is not None and bounds[0] == 0.0
        return fusable_activation(view)
    return True


def activation_bounds(view) -> tuple[float | None, float | None] | None:
    """(min, max) of a relu/hardtanh/clamp view (None: unbounded), or None when a bound is
    not a number (`clamp(x, min=t)` with a tensor `t`)."""
    if view.kind == "relu":
        return 0.0, None
    names = ("min_val", "max_val") if view.kind == "hardtanh" else ("min", "max")
    defaults = (-1.0, 1.0) if view.kind == "hardtanh" else (None, None)
    bounds = tuple(view.attrs.get(n, d) for n, d in zip(names, defaults))
    if any(b is not None and (isinstance(b, bool) or not isinstance(b, (int, float))) for b in bounds):
        return None
    return tuple(None if b is None else float(b) for b in bounds)


def fusable_activation(view) -> bool:
    """Whether an int8 conv/linear kernel fuses this relu/hardtanh/clamp: the group's output
    grid is the activation's, so the kernel writes straight onto the clamped range. A lower
    bound of 0 is the kernel's own relu (relu, relu6, clamp(min=0)); any other bound is what the
    grid's ends imply or one clamp on the int8 output (hardtanh(-0.5, 0.5): all 256 levels
    inside the bounds instead of the few the conv's wider grid has there). Bounds must be
    numbers, lo < hi."""
    bounds = activation_bounds(view)
    if bounds is None or bounds == (None, None):
        return False
    lo, hi = bounds
    return lo is None or hi is None or lo < hi


def build_plan(gm: torch.fx.GraphModule) -> Plan:
    """Find int8 groups and pass-through ops in `gm` (observer nodes are seen through)."""
    plan = Plan()
    written = written_in_place(gm)
    for node in gm.graph.nodes:
        if node.name in plan.member_of or node.op not in ("call_function", "call_module", "call_method"):
            continue
        if node.name in written:
            # A quantize/dequantize pair copies the value: a later in-place write would be lost.
            plan.unsupported[node.name] = written[node.name]
            continue
        if getattr(_module_of(gm, node), "is_fxopt_observer", False):
            continue
        other_dtype = _other_float_dtype(node)
        if other_dtype is not None:
            plan.unsupported[node.name] = other_dtype
            continue
        view = op_view(gm, node)
        if view is None:
            if _holds_floats(node):  # a float value, or a tuple with one (an LSTM's)
                plan.unsupported[node.name] = _no_view_reason(gm, node)
            continue
        if view.kind in FOLLOWERS:
            reason = _anchor_ok(gm, view)
            if reason is None:
                group = _grow(gm, view)
                touched = next((n.name for n in group.nodes if n.name in written), None)
                if touched is not None:
                    plan.unsupported[node.name] = f"{view.kind}: its group reaches '{touched}', {written[touched]}"
                    continue
                plan.groups[group.output.name] = group
                for n in group.nodes:
                    plan.member_of[n.name] = group
                continue
            if _holds_floats(node):  # an add of shape tuples or integers is no float op
                plan.unsupported[node.name] = _runs_in_float(view.kind, reason)
            continue
        if view.kind == "avg_pool" and view.attrs.get("divisor_override") is not None:
            # not an average: the sum over the window divided by another count can leave the
            # input's range, which an int8 pass-through (the input's scale) would clip
            plan.unsupported[node.name] = _runs_in_float("avg_pool", "divisor_override leaves its input's range")
        elif view.kind in SLICING and (reason := slicing_reason(view)) is not None:
            if is_float_value(node):
                plan.unsupported[node.name] = _runs_in_float(view.kind, reason)
        elif view.kind == "pad" and (reason := pad_reason(view)) is not None:
            if is_float_value(node):
                plan.unsupported[node.name] = _runs_in_float("pad", reason)
        elif view.kind in ("hardtanh", "clamp", "dropout") and (reason := _not_passed_through(view)) is not None:
            if is_float_value(node):
                plan.unsupported[node.name] = _runs_in_float(view.kind, reason)
        elif (view.kind in PASS_THROUGH or _copies_nearest(view)) and view.input is not None:
            plan.pass_through.add(node.name)
        elif _holds_floats(node):
            plan.unsupported[node.name] = _runs_in_float(view.kind, _float_op_reason(gm, view))
    return plan


#: upsampling that copies elements (torch's quantized tensors have these kernels)
_NEAREST_MODES = ("nearest", "nearest-exact")


def _copies_nearest(view) -> bool:
    """Whether `view` is a nearest(-exact) upsample of a 4-D or 5-D value: every output element
    a copy of an input one, so int8 in and out on one grid (an FPN's or U-Net's upsampling
    between int8 convs and cats). The aten spelling names the mode in the op; torch's
    quantized tensors have no 1-D kernel (a PassError on an audio net, adversary)."""
    if view.kind != "interpolate":
        return False
    meta = tensor_meta(view.input)
    if meta is None or len(meta[0]) not in (4, 5):  # torch has no quantized upsample_nearest1d
        return False
    overload = aten_op_of(view.node)
    if overload is not None:
        return overload._opname.lstrip("_").startswith("upsample_nearest")
    return view.attrs.get("mode", "nearest") in _NEAREST_MODES


def _runs_in_float(kind: str, why: str) -> str:
    """A float op's reason in the one form `stats["float_ops"]` uses: `<op kind>: <why>; runs in float`."""
    return f"{kind}: {why}" if "runs in float" in why else f"{kind}: {why}; runs in float"


#: The ending of every reason that is just "fxopt has no int8 form of this op".
NO_KERNEL = "no int8 kernel in fxopt's lowering; runs in float"


def _float_op_reason(gm, view) -> str:
    """Why an op fxopt knows (`view.kind`) but does not lower stays float, after '<kind>: '."""
    if view.kind in ("mul", "div", "sub"):
        return f"{NO_KERNEL} (only add has an int8 elementwise kernel)"
    return NO_KERNEL


def unfolded_reason(gm, view) -> str:
    """Why the batchnorm `view` (in eval mode, stored affine) was not folded into the conv or
    linear before it: said where it then stays float."""
    source = view.input
    before = op_view(gm, source) if isinstance(source, torch.fx.Node) else None
    if before is None or before.kind not in ("conv", "linear"):
        what = f"after '{source.name}'" + (f", a {before.kind}" if before is not None else "") \
            if isinstance(source, torch.fx.Node) else "on a constant"
        return f"not behind a conv/linear it could fold into ({what})"
    if before.kind == "conv" and before.attrs.get("transposed") and transposed_reason(before) is not None:
        return (f"after the transposed conv '{source.name}', which has no int8 kernel here: folded into nothing "
                "(run fuse before quantize: it folds the batchnorm into the float conv)")
    if len(source.users) > 1:
        return f"'{source.name}' is read by others too: no weight fold keeps their value"
    if before.kind == "linear":
        return "normalizes dim 1 of the linear's (N, L, features) output, which no weight fold expresses"
    reason = _anchor_ok(gm, before) or "its group does not reach this batchnorm"
    return f"'{source.name}' stays float ({reason}): nothing to fold into"


def _not_passed_through(view) -> str | None:
    """Why a hardtanh, clamp or dropout does not run on int8 values as they are, or None.

    A hardtanh or clamp from 0 (relu6, `clamp(0, 6)`, `clamp(min=0)`) is a relu that may also
    clip at the top: on its input's grid it is exact but for the top bound's rounding (a
    standalone `clamp(0, 6)` ran in float while `hardtanh(0, 6)` passed through: quantize
    tester). Any other lower bound, or a tensor bound, is no pass-through: on its input's grid
    it keeps the few levels inside its bounds (an add's grid and hardtanh(0.2, 0.5): 32.2 dB,
    PT2E 38.9), and one past the grid's ends gives the end (hardtanh(-1, -0.5) after a relu: 0
    everywhere on x86; quantize tester); in float it is quantized after, on its own grid. A
    dropout in training mode draws random numbers, which a quantized tensor does not take
    (`bernoulli_` has no int8 kernel; adversary)."""
    if view.kind == "dropout":
        training, p = view.attrs.get("training", True), view.attrs.get("p", 0.5)
        return "in training mode it draws random numbers" if training and p != 0 else None
    bounds = activation_bounds(view)
    if bounds is None or bounds[0] != 0.0:
        shown = "a tensor" if bounds is None else _shown_bounds(bounds)
        return f"bounds ({shown}): fused only right after a conv/linear, or from 0 (relu6)"
    if view.kind == "clamp" and op_name(view.node).endswith("_"):  # (export keeps `y.clamp_(0, 6)`)
        return "it writes its input in place, which an int8 copy of it would not"
    return None


def _shown_bounds(bounds: tuple) -> str:
    """`activation_bounds` for a reason: ``0, 6`` or ``0.1, none``."""
    return ", ".join("none" if b is None else f"{b:g}" for b in bounds)


def pad_reason(view) -> str | None:
    """None when `view` (a pad) gives an int8 value on its input's grid, else why it stays float.

    Every mode but a constant other than 0 qualifies: the constant 0.0 is the zero point, on
    every int8 grid; reflect, replicate and circular copy input elements."""
    mode, value = view.attrs.get("mode", "constant"), view.attrs.get("value")
    if mode not in PAD_MODES:
        return f"mode '{mode}': {NO_KERNEL}"
    if mode == "constant" and value not in (None, 0):
        return (f"pads with {value}, which need not be on its input's int8 grid (only 0, the zero "
                "point, always is); runs in float")
    return None


def slicing_reason(view) -> str | None:
    """None when `view` (a getitem/slice/narrow/select) is basic indexing of one float32 tensor,
    which an int8 value undergoes as it is; else why it stays float."""
    node, source = view.node, view.input
    if not isinstance(source, torch.fx.Node) or tensor_meta(source) is None:
        what = f"'{source.name}'" if isinstance(source, torch.fx.Node) else "a constant"
        return f"takes an item of {what}, which is no tensor (a tuple or list): nothing to slice"
    if not is_float_value(source):
        return f"indexes '{source.name}', which is no float32 tensor"
    if view.kind == "getitem":
        index = node.args[1] if len(node.args) > 1 else view.attrs.get("index")
        return _basic_index_reason(index)
    tensor_args = [a for a in node.all_input_nodes if a is not source and tensor_meta(a) is not None]
    if tensor_args:
        return f"reads its position from the tensor '{tensor_args[0].name}': no int8 pass-through"
    return None


def _basic_index_reason(index) -> str | None:
    """None when `index` is basic indexing (ints, slices, `...`, None; sizes computed in the
    graph are ints too), else why not."""
    def is_int(x) -> bool:
        if isinstance(x, torch.fx.Node):  # x.size(2) - pad: a number, unless it is a tensor
            return tensor_meta(x) is None
        return isinstance(x, int) and not isinstance(x, bool)

    for item in index if isinstance(index, tuple) else (index,):
        if item is None or item is Ellipsis or is_int(item):
            continue
        if isinstance(item, slice) and all(b is None or is_int(b) for b in (item.start, item.stop, item.step)):
            continue
        shown = f"'{item.name}'" if isinstance(item, torch.fx.Node) else type(item).__name__
        return f"advanced indexing (index {shown}) gathers a copy: no int8 pass-through"
    return None


def _no_view_reason(gm, node) -> str:
    """Why an op fxopt has no view of stays float, in words a user can act on."""
    module = _module_of(gm, node)
    if module is None:
        return f"{getattr(node.target, '__name__', node.target)}: {NO_KERNEL}"
    if torch.nn.utils.parametrize.is_parametrized(module):  # weight_norm, spectral_norm, ...
        return (f"{type(module).__name__} with parametrized weights (computed each call): no int8 kernel for the "
                "module call; capture with mode='export' to trace the weight's computation into the graph, "
                "where the layer quantizes (or remove the parametrization before quantizing)")
    return f"{type(module).__name__}: {NO_KERNEL}"


def _module_of(gm, node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _grow(gm, view) -> Group:
    nodes, bn, act, views = [view.node], None, None, []
    current = view.node
    for allowed in FOLLOWERS[view.kind]:
        # An activation commutes with slicing: conv -> x[:, :, :-pad] -> relu (a TCN's causal
        # chomp) is the conv+relu kernel, sliced, on the relu's grid (all 8 bits >= 0).
        between = _view_chain(gm, current) if ACTIVATIONS & set(allowed) else []
        last = between[-1] if between else current
        nxt = _single_user(last)
        if nxt is None:
            break
        nview = op_view(gm, nxt)
        if nview is None or nview.kind not in allowed or nview.input is not last or not _follower_ok(nview, view):
            continue
        nodes += [*between, nxt]
        views += between
        if nview.kind == "batch_norm":
            bn = nxt
        else:
            act = nxt
        current = nxt
    return Group(view.kind, view.node, nodes, list(view.inputs), bn, act, view, views)


def _view_chain(gm, node: torch.fx.Node) -> list[torch.fx.Node]:
    """The run of basic slicing ops and `contiguous` calls that reads `node`, each the only
    reader of the one before (a TCN's Chomp1d: `x[:, :, :-pad].contiguous()`)."""
    chain = []
    while (user := _single_user(node)) is not None:
        view = op_view(gm, user)
        if view is None or view.input is not node or not (
                view.kind == "contiguous" or view.kind in SLICING and slicing_reason(view) is None):
            break
        chain.append(user)
        node = user
    return chain


# ----- the int8 region ------------------------------------------------------------------------

def activation_inputs(gm, node: torch.fx.Node, plan: Plan) -> list[torch.fx.Node]:
    """The values `node` (a group output or any op) consumes that int8 lowering would convert.

    A pass-through op converts only its data input: the sizes a `view` reads from
    `sym_size` nodes (export graphs with a dynamic batch) are not activations, and counting
    them would tie the op to the float side. Nor does a size read convert what it reads
    (``x.size(1)``, ``x.shape``: an int8 value has the same sizes): counted as a float reader,
    the sizes a symbolic ShuffleNet's channel shuffle and split read kept its cats float.
    """
    group = plan.groups.get(node.name)
    if group is not None:
        return list(dict.fromkeys(group.inputs))
    if node.name in plan.pass_through:
        return [op_view(gm, node).input]
    if size_read(node) is not None:
        return []
    return [i for i in node.all_input_nodes if i.op != "get_attr"]


def blocked_by(group: Group, float_only) -> str | None:
    """The first value of `group` (an input, or its output) in `float_only`, if any."""
    return next((v.name for v in (*group.inputs, group.output) if v.name in float_only), None)


def int8_region(gm: torch.fx.GraphModule, plan: Plan, enabled: set[str],
                float_only=frozenset()) -> set[str]:
    """Names of the values computed in int8: enabled conv/linear/matmul groups, plus the enabled
    add/cat groups (`CUT_DECIDES`) and pass-through ops the minimum cut puts on their side.
    `enabled` holds group output names. `float_only` names values that have no int8 grid (an
    infinite calibration range): they stay float, and so does every op that would read them
    quantized (a pass-through op on them; groups reading them must not be in `enabled`)."""
    g = nx.DiGraph()
    src, sink = "__int8__", "__float__"
    inf = float("inf")
    enabled = {name for name in enabled if blocked_by(plan.groups[name], float_only) is None}
    for node in gm.graph.nodes:
        if node.op == "get_attr" or node.name in plan.member_of and node.name not in plan.groups:
            continue
        name = node.name
        if name in enabled:
            if plan.groups[name].kind not in CUT_DECIDES:
                g.add_edge(src, name, capacity=inf)
            elif plan.groups[name].kind in FLOAT_ON_A_TIE:
                g.add_edge(name, sink, capacity=0.5)  # (costs are bytes: only a tie turns on half a byte)
        elif name not in plan.pass_through or name in float_only:
            g.add_edge(name, sink, capacity=inf)
        for inp in activation_inputs(gm, node, plan):
            if inp.op == "get_attr":
                if name in plan.pass_through:  # a view of a parameter (``h @ w[0]``): no grid was observed
                    g.add_edge(name, sink, capacity=inf)
                continue
            if name in plan.groups and plan.groups[name].kind in CUT_DECIDES \
                    and _writes_float_when_read_in_float(plan, enabled, inp):
                cost = 1  # an add/cat in float spares the rounding of its sum: its layers write float then
            else:
                cost = max(value_nbytes(inp), 1) if is_float_value(inp) and inp.name not in float_only else inf
            # A pass-through op cannot take an int8 input that is no float value at all, nor
            # one without an int8 grid.
            for a, b in ((inp.name, name), (name, inp.name)):
                old = g.get_edge_data(a, b, {}).get("capacity", 0)
                g.add_edge(a, b, capacity=old + cost)
    _int8_batch_norms_read_int8(gm, plan, enabled, g)
    if src not in g:
        return set()  # nothing that computes faster in int8
    _, (side, _) = nx.minimum_cut(g, src, sink)
    region = {n for n in side if n != src and (n in enabled or n in plan.pass_through)}
    return _without_float_read_views(gm, plan, region)


def _int8_batch_norms_read_int8(gm: torch.fx.GraphModule, plan: Plan, enabled: set[str], g: nx.DiGraph) -> None:
    """An int8 batchnorm reads a value an int8 layer wrote, through int8 views and pads at most:
    a float value quantized for it put the channels it rescales apart onto one grid (raw sensor
    units as a graph input, also behind a transpose: 49 -> 21-27 dB, still a PASS), and its
    kernel is slower than the float one on a row-major value (adversary). Infinite edges from
    the batchnorm up that chain: in int8 only with all of it."""
    for name in enabled:
        group = plan.groups[name]
        if group.kind != "batch_norm":
            continue
        reader, value = name, group.view.input
        while isinstance(value, torch.fx.Node):
            g.add_edge(reader, value.name, capacity=float("inf"))
            if value.name not in plan.pass_through:
                break
            reader, value = value.name, op_view(gm, value).input


def quantized_late(gm: torch.fx.GraphModule, plan: Plan, region: set[str], observed: set[str]) -> set[str]:
    """`region` less the pass-through ops that read a float value, write as many bytes and
    have an observed grid of their own: the cut costs them the same on either side, and in
    float the value is quantized after them, on their grid. A relu after a group norm read
    int8 spent half its input's grid on the negatives it drops (1.4-2.1 dB behind PT2E, which
    observes the relu's output; quantize tester). Walked in order, so a chain after a float op
    leaves the region whole. A conv or linear that writes float (`writes_float`) gives a float
    value too: a relu after one whose value is also returned (an FPN's feature map) takes the
    relu's grid, not the conv's signed one."""
    region = set(region)
    for node in gm.graph.nodes:
        if node.name not in region or node.name not in plan.pass_through or node.name not in observed:
            continue
        source = op_view(gm, node).input
        float_source = source.name not in region or writes_float(plan, region, source)
        if float_source and value_nbytes(node) == value_nbytes(source):
            region.discard(node.name)
    return region


def _without_float_read_views(gm: torch.fx.GraphModule, plan: Plan, region: set[str]) -> set[str]:
    """`region` less the pass-through ops that only float ops read and that do not shrink
    their input (a view, a transpose, a reshape).

    The cut costs such an op the same on either side (its input and output are as large), so
    the cut puts it on either. In int8 it makes its producer write int8 that the float readers
    dequantize; in float, a conv or linear producer writes float (`writes_float`)
    and spares the rounding: attention's q, k and v projections, read by a float
    `scaled_dot_product_attention` through a view and a transpose, were rounded onto 8 bits
    before the softmax (an `nn.MultiheadAttention` with `kdim`/`vdim` lost 1-4 dB).
    Walked from the graph's end, so a chain of views leaves the region whole. Pieces that only
    float ops read (timm's packed ``qkv[0], qkv[1], qkv[2]``) leave it together where they read
    no fewer bytes than the value they are cut from (adversary: 2 dB), or where that value is a
    conv or linear and they are slices of at least half of it, so the layer writes float: a
    head returning ``out[:, :4]`` of 8 channels, or ``y[..., 1:]``, was rounded onto 8 bits for
    the slice's saving on the dequantize (1.6-2.8 dB behind PT2E; quantize tester). A smaller
    slice keeps the layer int8: writing float the whole output no one reads made an LM head
    keeping the last token (``logits[:, -1]``) or a 1x1 conv's ``[:, :3]`` of 256 channels
    5.5-5.8x slower at batch 16 (adversary). A pool stays int8: on the 4x larger float value it
    ran 1.4-1.9x slower at batch 1 (`_writes_float_when_read_in_float`)."""
    region = set(region)
    pieces: set[str] = set()  # smaller than their input, read in float only: they go together
    for node in reversed(gm.graph.nodes):
        readers = value_readers(node)
        read = sum(value_nbytes(u) for u in readers)
        if node.name in region and readers and all(u.name in pieces for u in readers) \
                and (read >= value_nbytes(node)
                     or 2 * read >= value_nbytes(node) and _may_write_float(plan, _under_views(gm, plan, node))
                     and all(op_view(gm, u).kind in SLICING for u in readers)):
            region.difference_update(u.name for u in readers)
        if node.name not in region or node.name not in plan.pass_through \
                or any(reads_int8(plan, region, u) for u in readers):
            continue
        if value_nbytes(node) < value_nbytes(op_view(gm, node).input):
            pieces.add(node.name)
        else:
            region.discard(node.name)
    return region


def _under_views(gm: torch.fx.GraphModule, plan: Plan, value: torch.fx.Node) -> torch.fx.Node:
    """The value `value` views through pass-through ops that keep every byte (export spells
    ``y[:, :3]`` as a full slice of dim 0, then the slice of dim 1)."""
    while value.name in plan.pass_through and value_nbytes(value) == value_nbytes(source := op_view(gm, value).input):
        value = source
    return value


def _may_write_float(plan: Plan, value: torch.fx.Node) -> bool:
    """Whether `value` is the output of a conv or linear group, which writes float where only
    float ops read it (`writes_float`)."""
    group = plan.groups.get(value.name)
    return group is not None and group.kind in ("conv", "linear") and not group.views


def reads_int8(plan: Plan, region: set[str], reader: torch.fx.Node) -> bool:
    """Whether `reader` computes in int8: an op of `region`, or a member of an int8 group."""
    group = plan.member_of.get(reader.name)
    return reader.name in region or group is not None and group.output.name in region


def writes_float(plan: Plan, region: set[str], value: torch.fx.Node) -> bool:
    """Whether the int8 conv or linear group `value` writes its value in float: where float
    ops read it (the graph's output, a layer norm, a sigmoid, a residual add in float) or
    nothing does. It is then not rounded onto an int8 grid, which clips what calibration did
    not see (a classifier's logits, a segmentation head's) and moves every value by up to
    half a step; its int8 readers quantize the float value onto the same grid, at the cost
    of the dequantize the float readers would have paid (a ConvNeXt downsample feeding its
    block's conv and the residual add: 2.8 dB behind PT2E, which does the same; quantize
    tester). x86 has the kernels (int8 input and weight, float output): fbgemm's linear,
    oneDNN's conv (`float_output.py`)."""
    if value.name not in region or not _may_write_float(plan, value):
        return False
    readers = value_readers(value)
    return not readers or not all(reads_int8(plan, region, u) for u in readers)


def _writes_float_when_read_in_float(plan: Plan, enabled: set[str], value: torch.fx.Node) -> bool:
    """Whether `value` is an int8 conv or linear that lowering makes write float when float ops
    read it (`writes_float`): an add of two heads at the graph output then
    costs no dequantize in float, and is more accurate there (an outside tester's two linear
    heads: 34.1 dB in int8; PT2E, which leaves that add float, 37.7). Only adds and cats take
    it (`int8_region`): a pool after the last conv stays int8, reading the int8 value, not the
    4x larger float one (1.4-1.9x slower on small nets at batch 1 when it moved to float)."""
    return value.name in enabled and _may_write_float(plan, value)


def shared_grids(gm: torch.fx.GraphModule, plan: Plan, region: set[str]) -> dict[str, str]:
    """Value name -> the int8 cat whose grid it takes: the values each int8 cat in `region`
    concatenates, where nothing else reads them.

    An int8 cat requantizes every input whose scale or zero point differs from its
    output's: a second rounding, and most of its time (`kernels.int8_cat` copies the others). A cat's output holds exactly its inputs'
    values, so its observer has seen all of them: an input put on the output's grid loses
    nothing it would not lose at the cat (torch.ao shares one observer between a cat's inputs
    and output for the same reason). The value that fixes an input's grid is found by walking
    back through int8 pass-through ops (pooling, slicing, views: they keep their input's grid)
    to a group output or a float value quantized for the cat. Every value on that walk must
    feed only the next one: a value someone else reads keeps its own, tighter grid (those
    readers would otherwise pay for the cat's range), and the cat requantizes it, unless lowering
    makes that grid the cat's output grid (`_Lowering._cat_grid`). Reading a value's size or
    dtype (a U-Net's ``x2.size()[2] - x1.size()[2]`` before the pad) reads no value: such a
    reader does not count. Cats of cats chain: the inner cat's output takes the outer cat's grid,
    and so do its inputs.
    """
    shared: dict[str, str] = {}
    for out, group in plan.groups.items():
        if group.kind != "cat" or out not in region:
            continue
        for value in dict.fromkeys(group.inputs):
            reader = group.anchor
            while value_readers(value) == [reader]:
                if value.name in region and value.name in plan.pass_through:
                    reader, value = value, op_view(gm, value).input
                    continue
                shared[value.name] = out
                break
    return shared


def value_readers(value: torch.fx.Node) -> list[torch.fx.Node]:
    """The users of `value` that read its elements (not only its size, dtype or device)."""
    return [u for u in value.users if size_read(u) is None and metadata_read(u) is None]


def grid_source(gm: torch.fx.GraphModule, plan: Plan, region: set[str], value: torch.fx.Node) -> torch.fx.Node:
    """The value whose grid `value` has in int8: itself, or, through the int8 pass-through ops
    of `region` (pooling, slicing, views, pads: they keep their input's grid), the group output
    or float value they start from."""
    while value.name in region and value.name in plan.pass_through:
        value = op_view(gm, value).input
    return value
