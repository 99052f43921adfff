"""`lower-cpu` — lower convs and linears to prepacked oneDNN kernels with fused post-ops.

Rewrites (float32, CPU, `torch.backends.mkldnn.is_available()`):

- conv2d [+ relu | hardtanh(relu6) | hardswish | silu | gelu] →
  `mkldnn._convolution_pointwise(x, W_packed, b, ..., attr, scalars, algorithm)`;
- conv2d + residual add [+ relu] (same shapes) →
  `mkldnn._convolution_pointwise.binary(x, other, W_packed, b, ..., "add", None, "relu"|None, ...)`;
- linear [+ relu | gelu | silu] → `mkldnn._linear_pointwise(x, W_packed, b, attr, ...)`
  only with the option `linear=true`: on the zoo's BERT-style encoder it measured *slower*
  than aten.linear (1.05x and 1.19x eager at batch 1 and 16, against 0.90x and 0.97x for
  `fuse` alone), so it is off by default.

Weights are reordered once (`mkldnn._reorder_convolution_weight` /
`mkldnn._reorder_linear_weight`) into oneDNN's blocked layout and stored as new buffers;
activations entering a lowered conv are made channels-last (oneDNN's fast layout for these
kernels; every elementwise op and pooling keeps it). Because `view` needs a contiguous
input, a `contiguous()` is inserted before every reshape of a 4-D value and before 4-D
graph outputs (a no-op when the value already is contiguous). Measured on ResNet-18 and
MobileNetV2 at batch 1 and 16 with one thread (docs/benchmarks.md, "Fusion (issue 5)"):
channels-last + packed weights + fused post-ops beat every plain eager variant; plain
channels-last without packing, or packing without channels-last, did not.

Before / after::

    %conv2d = conv2d(%x, %w, %b, stride, padding)    %x_cl = contiguous(%x, memory_format=channels_last)
    %relu = relu(%conv2d)                       ->    %w_packed = get_attr relu_packed_weight
                                                      %conv = mkldnn._convolution_pointwise(%x_cl, %w_packed,
                                                              %b, padding, stride, dilation, groups, "relu", [], "")

Run `fuse` first so batchnorms are folded into the convs. Tolerance "float". The result
runs on CPU only (oneDNN tensors cannot move to CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from fxopt import Pass, PassContext, PassResult
from fxopt.ir import op_view, tensor_meta
from fxopt.patterns import Op, Pattern, PatternSet, Rewriter, Var, apply_patterns, annotate

from . import rules

_CONV_ACTS = ("relu", "hardtanh", "hardswish", "silu", "gelu")
_LINEAR_ACTS = ("relu", "gelu", "silu")


def mkldnn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _post_op(view) -> tuple[str, list, str] | None:
    """(attr, scalars, algorithm) of an activation for oneDNN, or None when unsupported."""
    if view is None:
        return "none", [], ""
    if view.kind == "relu":
        return "relu", [], ""
    if view.kind == "hardtanh":
        return "hardtanh", [float(view.attrs.get("min_val", -1.0)), float(view.attrs.get("max_val", 1.0))], ""
    if view.kind == "hardswish":
        return "hardswish", [], ""
    if view.kind == "silu":
        return "swish", [], ""
    if view.kind == "gelu":
        approx = view.attrs.get("approximate", "none")
        return ("gelu", [], approx) if approx in ("none", "tanh") else None
    return None


def _conv_check(view) -> bool | str:
    if "weight" not in view.params:
        return "weight is not a parameter"
    w = view.param("weight")
    if w.dim() != 4 or w.dtype != torch.float32 or w.device.type != "cpu":
        return "only float32 CPU conv2d is lowered"
    if view.attrs.get("transposed"):
        return "transposed conv is not lowered"
    if isinstance(view.attrs.get("padding"), str) or view.attrs.get("padding_mode", "zeros") != "zeros":
        return "string padding or a non-zero padding mode"
    b = view.param("bias")
    if b is None and view.node.op != "call_module" and _bias_is_node(view):
        return "bias is computed"
    return True


def _bias_is_node(view) -> bool:
    args = view.node.args
    return len(args) > 2 and isinstance(args[2], torch.fx.Node) and args[2].op != "get_attr"


def _linear_check(view) -> bool | str:
    if "weight" not in view.params:
        return "weight is not a parameter"
    w = view.param("weight")
    if w.dtype != torch.float32 or w.device.type != "cpu":
        return "only float32 CPU linear is lowered"
    if view.param("bias") is None and _bias_is_node(view):
        return "bias is computed"
    meta = tensor_meta(view.input)
    if meta is None or len(meta[0]) < 2 or meta[1] != torch.float32:
        return "input is not a float32 tensor of 2 or more dims with known shape"
    return True


def _act_check(kinds):
    def check(view) -> bool | str:
        return True if _post_op(view) is not None else f"{view.kind} has no oneDNN post-op here"
    return check


class _Lowering:
    """Shared state of one run: the channels-last copies already made per value."""

    def __init__(self) -> None:
        self.cl: dict[torch.fx.Node, torch.fx.Node] = {}

    def channels_last(self, r: Rewriter, node: torch.fx.Node) -> torch.fx.Node:
        if node in self.cl and not getattr(self.cl[node], "_erased", False):
            return self.cl[node]
        if node.target == "contiguous" or _is_lowered_conv(node):
            return node
        with r.graph.inserting_after(node):
            new = r.graph.call_method("contiguous", (node,), {"memory_format": torch.channels_last})
        new.meta["tensor_meta"] = node.meta.get("tensor_meta")
        self.cl[node] = new
        return new

    def conv(self, r: Rewriter) -> torch.fx.Node | None:
        view = r.view("conv")
        act = r.match.views.get("act")
        post = _post_op(act)
        if post is None:
            return None
        meta = tensor_meta(r["x"])
        if meta is None or len(meta[0]) != 4:
            return None
        w = view.param("weight")
        a = _attrs(view)
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            w, a["padding"], a["stride"], a["dilation"], a["groups"], [1, *meta[0][1:]])
        wn = r.tensor(f"{r.match.root.name}_packed_weight", packed, parameter=False)
        bias = _bias_node(r, view)
        x = self.channels_last(r, r["x"])
        if "other" in r.match.nodes:
            other = self.channels_last(r, r["other"])
            unary = None if act is None else "relu"
            out = r.call(torch.ops.mkldnn._convolution_pointwise.binary, x, other, wn, bias, a["padding"],
                         a["stride"], a["dilation"], a["groups"], "add", None, unary, [], None)
            label = "conv+add" + ("+relu" if act is not None else "")
        else:
            attr, scalars, algo = post
            out = r.call(torch.ops.mkldnn._convolution_pointwise.default, x, wn, bias, a["padding"], a["stride"],
                         a["dilation"], a["groups"], attr, scalars, algo)
            label = "conv" + ("" if act is None else f"+{act.kind}")
        annotate(out, fused=label, lowered="mkldnn")
        return out

    def linear(self, r: Rewriter) -> torch.fx.Node | None:
        view = r.view("linear")
        act = r.match.views.get("act")
        post = _post_op(act)
        if post is None:
            return None
        shape = tensor_meta(view.input)[0]
        rows = 1
        for s in shape[:-1]:
            rows *= int(s)
        packed = torch.ops.mkldnn._reorder_linear_weight(view.param("weight"), rows)
        wn = r.tensor(f"{r.match.root.name}_packed_weight", packed, parameter=False)
        bias = _bias_node(r, view)
        attr, scalars, algo = post
        out = r.call(torch.ops.mkldnn._linear_pointwise.default, r["x"], wn, bias, attr, scalars, algo)
        annotate(out, fused="linear" + ("" if act is None else f"+{act.kind}"), lowered="mkldnn")
        return out


def _is_lowered_conv(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in (
        torch.ops.mkldnn._convolution_pointwise.default, torch.ops.mkldnn._convolution_pointwise.binary)


def _attrs(view) -> dict:
    a = rules.conv_attrs(view)
    return {k: list(a[k]) for k in ("padding", "stride", "dilation")} | {"groups": int(a["groups"])}


def _bias_node(r: Rewriter, view) -> torch.fx.Node | None:
    name = next(k for k, v in r.match.views.items() if v is view)
    return r.param(name, "bias") if "bias" in view.params else None


def lowering_patterns(state: _Lowering, conv: bool = True, linear: bool = False) -> PatternSet:
    conv_op = lambda: Op("conv", Var("x"), name="conv", check=_conv_check)  # noqa: E731
    lin_op = lambda: Op("linear", Var("x"), name="linear", check=_linear_check)  # noqa: E731
    table = []
    if conv:
        table += [
            Pattern("conv+add+relu", Op("relu", Op("add", conv_op(), Var("other"), name="add", commutative=True),
                                        name="act"), rewrite=state.conv, check=rules.residual_fits_conv),
            Pattern("conv+act", Op(_CONV_ACTS, conv_op(), name="act", check=_act_check(_CONV_ACTS)),
                    rewrite=state.conv),
            Pattern("conv+add", Op("add", conv_op(), Var("other"), name="add", commutative=True),
                    rewrite=state.conv, check=rules.residual_fits_conv),
            Pattern("conv", conv_op(), rewrite=state.conv),
        ]
    if linear:
        table += [
            Pattern("linear+act", Op(_LINEAR_ACTS, lin_op(), name="act"), rewrite=state.linear),
            Pattern("linear", lin_op(), rewrite=state.linear),
        ]
    return PatternSet(table)


@dataclass
class LowerCPU(Pass):
    """Lower conv2d/linear (+ post-ops) to prepacked oneDNN kernels; see the module docstring."""

    name = "lower-cpu"
    tolerance = "float"
    conv: bool = True
    linear: bool = False

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        if not mkldnn_available():
            return PassResult(gm, modified=False, stats={"skipped": "oneDNN (mkldnn) is not available"})
        state = _Lowering()
        report = apply_patterns(gm, lowering_patterns(state, self.conv, self.linear))
        guards = _guard_layouts(gm, set(state.cl.values())) if report.total else 0
        if report.total:
            from fxopt.passes.cleanup import DeadCodeElimination

            DeadCodeElimination().run(gm, ctx)
        return PassResult(gm, modified=bool(report.total),
                          stats={"lowered": dict(report.counts), "contiguous_inserted": guards})


def _guard_layouts(gm: torch.fx.GraphModule, cl_nodes: set) -> int:
    """Insert contiguous() before reshapes (`view` needs it) and 4-D outputs of the graph."""
    if not cl_nodes:
        return 0
    for node in cl_nodes:  # a lowered conv already yields channels-last: drop its copy
        if not getattr(node, "_erased", False) and _is_lowered_conv(node.args[0]):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "output":
            continue
        view = op_view(gm, node)
        if view is None or view.kind != "reshape" or not view.inputs:
            continue
        src = view.inputs[0]
        meta = tensor_meta(src)
        if meta is None or len(meta[0]) != 4:
            continue
        with gm.graph.inserting_before(node):
            fixed = gm.graph.call_method("contiguous", (src,))
        node.replace_input_with(src, fixed)
        count += 1
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")

    def wrap(value):
        nonlocal count
        meta = tensor_meta(value)
        if meta is None or len(meta[0]) != 4:
            return value
        with gm.graph.inserting_before(output):
            fixed = gm.graph.call_method("contiguous", (value,))
        count += 1
        return fixed

    output.args = torch.fx.node.map_arg(output.args, wrap)
    return count
