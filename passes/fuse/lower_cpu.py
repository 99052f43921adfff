"""`lower-cpu` — lower convs and linears to prepacked oneDNN kernels with fused post-ops.

Rewrites (float32, CPU, `torch.backends.mkldnn.is_available()`):

- conv1d/conv2d/conv3d [+ relu | hardtanh(relu6) | hardswish | silu | gelu | leaky_relu | sigmoid | tanh | hardsigmoid] →
  `mkldnn._convolution_pointwise(x, W_packed, b, ..., attr, scalars, algorithm)`;
- conv2d + residual add [+ relu] (same shapes) →
  `mkldnn._convolution_pointwise.binary(x, other, W_packed, b, ..., "add", None, "relu"|None, ...)`;
  a residual read from a graph input with no conv or linear in between, or computed from other
  graph inputs than the conv's input, goes through a `ConvByBatch` call instead, which checks it
  per call: oneDNN's add takes the conv's dtype and shape, where eager's promotes and broadcasts
  (a float64 residual crashed the kernel, a larger one gave a conv-shaped result);
- conv_transpose2d [+ a per-channel shift, `fuse`'s folded batchnorm] [+ activation] →
  `mkldnn._convolution_transpose_pointwise(x, W_packed, b + shift, ..., attr, ...)` (the
  shift, (C, 1, 1) or (1, C, 1, 1), read per call) where its output size is a multiple of its
  stride, it writes 8 channels or more and does `MIN_TRANSPOSED_MACS` per sample (0.54-0.88x
  aten's time at batch 1, 0.08-0.9x at 16, per layer; otherwise, k=3 stride 2 padding 1
  without output padding, oneDNN is 5-16x slower, and a small layer pays its fixed cost);
  grouped ones and conv_transpose1d/3d stay on aten (`_conv_transpose_check`);
- linear [+ relu | gelu | silu] → `mkldnn._linear_pointwise(x, W_packed, b, attr, ...)`
  only with the option `linear=true`: on the zoo's BERT-style encoder it measured *slower*
  than aten.linear (1.05x and 1.19x eager at batch 1 and 16, against 0.90x and 0.97x for
  `fuse` alone), so it is off by default. With it, a weight read in pieces (cross-attention's
  q/k/v rows of `in_proj_weight`) is first split into one parameter per piece
  (`fxopt.ir.split_packed_parameters`), so each projection is prepacked too.
- a channel shuffle spelled out (ShuffleNet's ``x.view(n, g, c // g, h, w).transpose(1, 2)
  .contiguous().view(n, -1, h, w)``, or with a permute; `rules.CHANNEL_SHUFFLE`) ->
  `torch.channel_shuffle(x, g)`, which keeps the channels-last layout of the convs around it
  and copies once, where the reshapes copied to row-major and back (16x116x28x28: 0.34 vs
  12 ms, one thread);
- a 2-D max/avg pool or nearest/bilinear resize of a row-major 4-D float32 value of 8
  channels or more -> the same op on a channels-last copy (`_faster_channels_last`): torch's
  row-major kernels for them run 10-40x slower than its channels-last ones (4x64x48x48
  max_pool2d k2: 13.3 vs 0.34 ms, one thread);
- a group norm of one channel per group (`fuse`'s instance norm) of a 4-D float32 value ->
  `instance_norm_any_layout`, which picks torch's kernel by the value's layout at run time:
  on a channels-last value of fewer than `MIN_GROUP_NORM_PIXELS` pixels or 8 channels its
  instance_norm (torch's channels-last group_norm is 1.2-5x slower there), its group_norm
  otherwise;
- ``index_add(y, 1, idx, x)`` of 4-D values (where prune writes a narrowed block output into a
  residual stream) -> `index_add_channels`, the same scatter over the (N*H*W, C) view of the
  channels-last tensors lowered convs return: torch's kernel is 4x slower on the 4-D
  channels-last tensor (a pruned ResNet-18 with `fuse,lower-cpu`: 30.7 -> 29.3 ms at batch 16).
  Where `y` is a lowered conv's result read by nothing else, the scatter writes into it instead
  of a copy, and a ReLU right after runs in place too (what `_convolution_pointwise.binary`
  does for an unpruned block's add + relu; 3.5% of a pruned ResNet-18 at batch 16).

Which convs: grouped (depthwise too), dilated and k>1 3-D convs always, dense convs from
`min_macs` multiply-adds per sample
(default 4 M; `min_macs=0` lowers every conv). A smaller dense conv becomes
a `ConvByBatch` call, a switch on the batch size at run time: the aten conv + activation of
the `fuse` path at batch 1 (where a oneDNN call, which builds a primitive descriptor each
time, ~45 us, costs more than it saves), oneDNN from the batch where it pays (2 for a k x k
conv, whose aten kernel loops over samples; 2 x `min_macs` MACs per call for a 1x1). See
`lowering_batch` for the per-layer measurements; `by_batch=false` turns the switch off. The
switch's aten branch runs in the layout fastest for its layer (`ConvByBatch._aten_layout`):
channels-last for a k x k conv reading and writing 32 channels or more, so what follows it is
channels-last at every batch size.

Weights stay dense graph tensors; a call of a `WeightPacks` submodule, ``packs(weight, x)``,
hands oneDNN the weight reordered into its blocked layout (`mkldnn._reorder_convolution_weight`
/ `mkldnn._reorder_linear_weight`), cached per (threads, input shape): the layout oneDNN
expects depends on both, and a weight packed for another thread count is reordered again
inside every call (see `WeightPacks`). Activations entering a lowered conv are made
channels-last (oneDNN's fast layout for these kernels; every elementwise op and pooling
keeps it). Because `view` needs a contiguous input, a
`contiguous()` is inserted before every reshape of a 4-D value or of a value computed from a
channels-last one (a select of a conv's output keeps its strides), and before 4-D graph
outputs (a no-op when the value already is contiguous). Measured on ResNet-18 and MobileNetV2 at
batch 1 and 16 with one thread (docs/benchmarks.md, "Fusion (issue 5)"): channels-last +
packed weights + fused post-ops beat every plain eager variant; plain channels-last without
packing, or packing without channels-last, did not.

Before / after::

    %conv2d = conv2d(%x, %w, %b, stride, padding)    %x_cl = contiguous(%x, memory_format=channels_last)
    %relu = relu(%conv2d)                       ->    %w_p = relu_packs(%w, %x_cl)      (a WeightPacks)
                                                      %conv = mkldnn._convolution_pointwise(%x_cl, %w_p,
                                                              %b, padding, stride, dilation, groups, "relu", [], "")

Run `fuse` first so batchnorms are folded into the convs. Tolerance "float". The result
runs on CPU only (oneDNN tensors cannot move to CUDA).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from math import prod

import torch
import torch.fx
import torch.nn.functional as F

from fxopt import InputMismatchError, Pass, PassContext, PassResult
from fxopt.ir import (bind_arguments, contiguous_outputs, downstream, functionalize_writes, get_attr_value,
                      leaf_function, mutated_input, op_view, reads_memory_order, spec_for, split_packed_parameters,
                      tensor_meta, upstream, written_in_place)
from fxopt.ir.effects import is_view
from fxopt.patterns import Op, Pattern, PatternSet, Rewriter, Var, apply_patterns, annotate

from . import rules

_CONV_ACTS = ("relu", "hardtanh", "hardswish", "silu", "gelu", "leaky_relu", "sigmoid", "tanh", "hardsigmoid")
_LINEAR_ACTS = ("relu", "gelu", "silu")

#: Default of the `min_macs` option; see `lowering_batch` for the measurements behind it.
MIN_MACS = 4_000_000
#: A transposed conv below this many MACs per sample stays on aten: oneDNN's call costs more
#: than it saves (a 16-channel k=3 layer at 8x8, 0.15 M: 1.6-2x `fuse` at batch 1; 8 channels
#: at 32x32, 0.6 M: 0.66x; adversary and per-layer runs, one thread).
MIN_TRANSPOSED_MACS = 500_000


def mkldnn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


_SAVE_ADVICE = ("save before lower-cpu, whose kernels are packed for this machine, and run lower-cpu "
                "again after load")


def values_key(weight: torch.Tensor) -> tuple[int, int]:
    """(version, storage address) of `weight`: what names its values for a cache of data derived
    from it (see `WeightPacks.get`). Inference tensors have no version counter: -1."""
    return (-1 if weight.is_inference() else weight._version), weight.data_ptr()


class WeightPacks(torch.nn.Module):
    """The oneDNN-packed copies of one conv/linear weight, one per (threads, input shape).

    Why not pack once at lowering time: oneDNN chooses the blocked weight layout from the whole
    problem — the input shape *and* the number of threads (e.g. `Acdb16a` under 2 threads,
    `Acdb24a` under 1 for the same conv). A weight packed for one (threads, shape) and run under
    another is reordered again inside every call (`ONEDNN_VERBOSE` shows a `reorder` primitive
    per conv, 1.3 ms for one 64x32x3x3 weight), which made models lowered under 2 threads and
    timed under 1 3-4x slower than not lowering them (tools/bench_quantize.py). So the pack is made on the first
    call with a new key, like oneDNN's own primitive cache. The dense weight stays a graph
    tensor (`get_attr`), so state_dict, saving and parameter counts see a plain tensor; the
    packs are derived data and are neither saved nor copied.
    """

    max_packs = 8  # distinct (threads, shape, version, storage) keys kept; the oldest goes first
    # why fxopt.save refuses it (read by serialize._save_module)
    save_advice = _SAVE_ADVICE
    inference_only = True  # oneDNN kernels have no backward: `distill` refuses to train through it

    def __init__(self, kind: str, conv_args: tuple = ()) -> None:
        super().__init__()
        if kind not in ("conv", "conv_transpose", "linear"):
            raise ValueError(f"WeightPacks: kind must be 'conv', 'conv_transpose' or 'linear', got {kind!r}")
        self.kind = kind
        # (padding, stride, dilation, groups) for a conv; (padding, output_padding, stride,
        # dilation, groups) for a transposed one
        self.conv_args = conv_args
        self.packs: dict[tuple, torch.Tensor] = {}
        self._packed_from: torch.Tensor | None = None

    def get(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`weight` packed for input `x` under the current thread count (cached).

        The key names the weight's values: its version counter (an in-place update:
        `load_state_dict`, ``p.copy_`` under no_grad; inference tensors have none and cannot be
        updated in place outside inference mode) and its storage (a Parameter assigned anew,
        ``p.data = ...``, `vector_to_parameters`: the old pack computed the old weights, fuse
        tester). A write through ``p.data`` in place bumps neither, as for any cache of
        torch's own. The storage packed from is held, so its address names no other tensor
        while a pack keyed by it is kept."""
        version, storage = values_key(weight)
        key = (torch.get_num_threads(), x.shape, version, storage)
        packed = self.packs.get(key)
        if packed is None:
            if self._packed_from is None or self._packed_from.data_ptr() != storage:
                self.packs = {}  # other weights: their packs are stale
                self._packed_from = weight.detach()
            packed = self._pack(weight, x.shape)
            if len(self.packs) >= self.max_packs:
                self.packs.pop(next(iter(self.packs)))
            self.packs[key] = packed
        return packed

    def forward(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The graph calls the packs as a module (a leaf, also when fx re-traces the graph
        on torch.load): `get`."""
        return self.get(weight, x)

    def _pack(self, weight: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if self.kind == "conv":
            padding, stride, dilation, groups = self.conv_args
            if weight.dim() == len(shape) - 1:  # a conv1d run as a conv2d of height 1 (`lift_1d`)
                weight = weight.unsqueeze(2)
            return torch.ops.mkldnn._reorder_convolution_weight(weight, padding, stride, dilation, groups,
                                                                list(shape))
        if self.kind == "conv_transpose":
            return torch.ops.mkldnn._reorder_convolution_transpose_weight(weight, *self.conv_args, list(shape))
        return torch.ops.mkldnn._reorder_linear_weight(weight, prod(shape[:-1]))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["packs"] = {}  # oneDNN tensors do not pickle or deepcopy; they are rebuilt on use
        state["_packed_from"] = None
        return state

    def extra_repr(self) -> str:
        return f"kind={self.kind}, conv_args={self.conv_args}, packs={len(self.packs)}"


def conv_macs_per_sample(view) -> int | None:
    """Multiply-adds of one sample through a conv, from recorded shapes; None when unknown."""
    out = tensor_meta(view.node)
    if out is None or len(out[0]) < 3:
        return None
    w = view.param("weight")
    return int(prod(out[0][1:])) * int(prod(w.shape[1:]))


def lowering_batch(view, min_macs: int, by_batch: bool = True) -> int | str:
    """The cost rule: from which batch size is a oneDNN call cheaper than the aten conv +
    activation it replaces? 1 = always; a larger N = a switch on the batch at run time.

    Measured per layer, 1 thread (docs/benchmarks.md, "Fusion"): `mkldnn._convolution_pointwise`
    builds its oneDNN primitive descriptor on every call, ~45 us more fixed cost than aten's
    conv, against ~30% more MACs per second once the conv is big; aten's depthwise kernel is
    slow at every size; and aten's k x k conv (im2col) loops over the samples of a batch.
    Lowered / aten time:

    - depthwise: 0.42-0.82 at batch 1 -> always lowered; so is any grouped conv (ResNeXt, RegNet:
      0.50-0.63 at batch 1 from 0.1 M to 7 M MACs per sample, 0.31-0.32 at batch 16);
    - dense, from `min_macs` (4 M) MACs per sample: 0.49-0.97 at batch 1 -> always lowered;
    - dense k x k (or strided/padded 1x1) below that: 1.25-3.8 at batch 1, 0.66-0.88 from
      batch 2 -> lowered from batch 2;
    - dense stride-1 1x1 below that (a plain GEMM on aten too): 1.03-1.9 at batch 1, about even near
      5 M MACs per call, 0.63-0.96 from 8-10 M -> lowered once a call reaches 2 x `min_macs`;
    - conv1d (lowered as a conv2d of height 1, `lift_1d`): k > 1 at batch 1 2.85x at 0.15 M MACs,
      1.80x at 1 M, 0.64x at 6 M, from batch 2 0.55x alone; a 1x1 1.17x at 4 M; but in a network
      (a TCN's residual blocks) the layout copies each switch makes cost more than that: a dense
      conv1d below `min_macs` stays on aten at every batch size;
    - a dilated conv -> always lowered: aten runs it as `slow_conv_dilated`, a loop that also
      fills the bias channel by channel (a TCN's 64-channel conv1d at dilation 2 over 128 steps,
      1.6 M MACs: 0.64x at batch 1; 128 channels at dilation 8: 0.27x; a dilated conv2d 0.71x);
    - conv3d with a kernel over 1 -> always lowered: aten's kernel is slow at every size
      (0.39-0.96 at batch 1 from 0.44 M MACs; 0.04-0.3 for 3.5-87 M); a 1x1x1 is a GEMM there,
      as for conv2d (2.6-3.1x at batch 1 below 0.3 M).

    `min_macs=0` lowers every conv always. With `by_batch=false` there is no switch: a dense
    conv below `min_macs` per sample is left exactly on the `fuse` path.
    """
    w, a = view.param("weight"), _attrs(view)
    if a["groups"] > 1:  # depthwise or grouped: aten loops over the groups
        return 1
    if w.dim() == 5 and set(w.shape[2:]) != {1}:  # aten has no fast conv3d kernel on CPU
        return 1
    if any(d > 1 for d in a["dilation"]):  # aten's dilated conv is a slow generic loop
        return 1
    macs = conv_macs_per_sample(view)
    if macs is None:
        return "the conv output has no recorded shape (the cost rule needs it)"
    if macs >= min_macs:
        return 1
    if w.dim() == 3:  # in a network the layout copies around a small dense conv1d outweigh the
        # kernel: a 4-block TCN, 32-64 channels, 1.03-1.72x `fuse` with the batch switch
        return f"a conv1d of {macs} MACs per sample < min_macs={min_macs}: cheaper on the aten path"
    if not by_batch:
        return f"{macs} MACs per sample < min_macs={min_macs}: cheaper on the aten path"
    plain_gemm = set(w.shape[2:]) == {1} and set(a["stride"]) == {1} and set(a["padding"]) == {0}
    if not plain_gemm:  # aten runs it as im2col + GEMM, sample by sample
        return 2
    return max(2, -(-2 * min_macs // max(macs, 1)))


class ConvByBatch(torch.nn.Module):
    """conv1d/2d/3d (+ `other`) + post-op: oneDNN from `min_batch` samples, aten below (see
    `lowering_batch`). Both paths compute what the `fuse` graph does, the aten one with the
    same aten kernels, in the layout fastest for the layer (`_aten_layout`). A module, not a
    function: fx keeps a module call a leaf when it re-traces the graph (torch.load does), and
    this forward branches on the batch size. `packs.conv_args` are oneDNN's (a conv1d's lifted
    to 2-D, `lift_1d`); `weight_shape` is the weight's, (out, in / groups, *kernel)."""

    inference_only = True  # the oneDNN branch has no backward: `distill` refuses to train through it
    # why fxopt.save refuses it (read by serialize._save_module)
    save_advice = _SAVE_ADVICE

    def __init__(self, packs: "WeightPacks", attr: str, scalars: list, algorithm: str, min_batch: int,
                 weight_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.packs = packs
        self.padding, self.stride, self.dilation, self.groups = packs.conv_args
        self.attr, self.scalars, self.algorithm, self.min_batch = attr, scalars, algorithm, min_batch
        self._channels_last_weight: tuple | None = None  # (source, values_key, copy): `_channels_last`
        #: the input layout of the aten branch (`_aten_layout`): "channels_last", "row_major" or "any"
        self.input_layout = "any" if set(weight_shape[2:]) == {1} else \
            "channels_last" if min(weight_shape[0], weight_shape[1] * self.groups) >= MIN_CHANNELS_LAST_CONV else "row_major"

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                other: torch.Tensor | None = None) -> torch.Tensor:
        lifted = x.dim() == 3
        if x.shape[0] >= self.min_batch and (other is None or (other.dtype == x.dtype and other.dim() == x.dim())):
            xl = to_onednn_layout(x)
            w = self.packs.get(weight, xl)
            args = (self.padding, self.stride, self.dilation, self.groups)
            if other is None:
                y = torch.ops.mkldnn._convolution_pointwise.default(xl, w, bias, *args, self.attr, self.scalars,
                                                                    self.algorithm)
                return y.squeeze(2) if lifted else y
            unary = None if self.attr == "none" else self.attr
            other_l = to_onednn_layout(other)
            y = torch.ops.mkldnn._convolution_pointwise.binary(xl, other_l, w, bias, *args, "add", None, unary, [],
                                                               None)
            # oneDNN broadcasts `other` into the conv's shape but not the other way: a larger
            # `other` (eager's result takes its shape) gave a conv-shaped result, wrong
            if other_l.shape == y.shape or torch.broadcast_shapes(y.shape, other_l.shape) == y.shape:
                return y.squeeze(2) if lifted else y
        drop = 1 if lifted else 0  # aten's conv1d takes the 1-D arguments
        if x.dim() == 4 and not (torch.is_grad_enabled() and weight.requires_grad):
            x, weight = self._aten_layout(x, weight)
        conv = (torch.conv1d, torch.conv2d, torch.conv3d)[x.dim() - 3]
        y = conv(x, weight, bias, self.stride[drop:], self.padding[drop:], self.dilation[drop:], self.groups)
        if other is not None:  # out of place where eager's add promotes the dtype or broadcasts
            y = y.add_(other) if other.shape == y.shape and other.dtype == y.dtype else y + other
        return _eager_post_op(y, self.attr, self.scalars, self.algorithm)

    def _aten_layout(self, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, weight) in the layout aten's conv runs this layer fastest in, at batch 1, one
        thread: a k x k conv reading and writing `MIN_CHANNELS_LAST_CONV` channels or more
        channels-last (32->32 at 8x8 to 32x32 and 64->64: 0.54-0.77x the row-major time), fewer
        row-major (3->16 at 64x64: 3.9x slower channels-last, 8->8 at 32x32: 2x, 16->2: 1.7x;
        16->16 0.69-1.24x by size); a 1x1 in the layout it gets (0.93-1.27x). The weight follows a channels-last input: aten copies a row-major one
        inside every call there."""
        if self.input_layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif self.input_layout == "row_major":
            x = x.contiguous()
        if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            return x, weight
        return x, self._channels_last(weight)

    def _channels_last(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` channels-last, kept while its values are the same (`WeightPacks.get`'s key,
        with its limit: a write through ``p.data`` in place is not seen, as by the oneDNN
        branch's packs): 256x256x3x3 at 7x7 runs in 0.90 ms with aten's copy inside the call,
        0.55 ms without."""
        key = values_key(weight)
        held = self._channels_last_weight
        if held is None or held[1] != key:
            # the source is held, so its address names no other tensor while the copy is kept
            held = (weight.detach(), key, weight.detach().contiguous(memory_format=torch.channels_last))
            self._channels_last_weight = held
        return held[2]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_channels_last_weight"] = None  # derived data, rebuilt on use
        return state

    def extra_repr(self) -> str:
        return f"attr={self.attr}, min_batch={self.min_batch}"


def to_onednn_layout(x: torch.Tensor) -> torch.Tensor:
    """`x` in the layout oneDNN's convs run fastest on: channels-last (a 3-D value is first
    lifted to a 4-D one of height 1, `lift_1d`; a 5-D one is channels-last-3d). A no-op copy
    when it already is (a lowered conv's result)."""
    if x.dim() == 3:
        x = x.unsqueeze(2)
    return x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)


def lift_1d(attrs: dict) -> dict:
    """A conv1d's arguments as those of the conv2d of height 1 that computes it: oneDNN's
    weight reorder takes conv2d and conv3d only, and its 2-D kernel on a channels-last input
    beat aten's conv1d by 0.46-0.99x at batch 1 and 0.11-0.78x at batch 16 (measured per layer,
    1 thread: 64->64 channels over 1000 steps, 128->128 over 250, 80->256 over 100)."""
    return {"padding": [0, *attrs["padding"]], "stride": [1, *attrs["stride"]],
            "dilation": [1, *attrs["dilation"]], "groups": attrs["groups"]}


def _eager_post_op(y: torch.Tensor, attr: str, scalars: list, algorithm: str) -> torch.Tensor:
    """The activation a oneDNN post-op `attr` stands for, in place on a fresh conv output."""
    if attr == "relu":
        return torch.relu_(y)
    if attr == "hardtanh":
        return torch.nn.functional.hardtanh_(y, scalars[0], scalars[1])
    if attr == "hardswish":
        return torch.nn.functional.hardswish(y, inplace=True)
    if attr == "swish":
        return torch.nn.functional.silu(y, inplace=True)
    if attr == "gelu":
        return torch.nn.functional.gelu(y, approximate=algorithm or "none")
    if attr == "leaky_relu":
        return torch.nn.functional.leaky_relu_(y, scalars[0])
    if attr == "sigmoid":
        return torch.sigmoid_(y)
    if attr == "tanh":
        return torch.tanh_(y)
    if attr == "hardsigmoid":
        return torch.nn.functional.hardsigmoid(y, inplace=True)
    if attr != "none":
        raise ValueError(f"no eager form of the oneDNN post-op {attr!r}")
    return y


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
    if view.kind == "leaky_relu":
        return "leaky_relu", [float(view.attrs.get("negative_slope", 0.01))], ""
    if view.kind in ("sigmoid", "tanh", "hardsigmoid"):
        return view.kind, [], ""
    return None


def _conv_check(view) -> bool | str:
    """Can this conv be lowered at all (cost aside)?"""
    if "weight" not in view.params:
        return "weight is not a parameter"
    w = view.param("weight")
    if w.dim() not in (3, 4, 5) or w.dtype != torch.float32 or w.device.type != "cpu":
        return "only float32 CPU conv1d/conv2d/conv3d is lowered"
    meta = tensor_meta(view.input)
    if meta is not None and len(meta[0]) != w.dim():
        return "unbatched conv (no batch axis for the layout)"
    if view.attrs.get("transposed"):
        return "transposed conv is not lowered"
    if isinstance(view.attrs.get("padding"), str) or view.attrs.get("padding_mode", "zeros") != "zeros":
        return "string padding or a non-zero padding mode"
    b = view.param("bias")
    if b is None and view.node.op != "call_module" and _bias_is_node(view):
        return "bias is computed"
    return True


def _conv_transpose_check(view, min_macs: int = MIN_TRANSPOSED_MACS) -> bool | str:
    """Can this transposed conv be lowered? oneDNN's transposed conv (with the weight packed
    for it) beat aten's where its output size is a multiple of its stride, 0.54-0.88x at batch 1
    and 0.08-0.9x at batch 16 per layer (`mkldnn._reorder_convolution_transpose_weight` takes
    2-D convs only; a grouped one stays on aten, where it is no slower)."""
    if not view.attrs.get("transposed"):
        return "not a transposed conv"
    if "weight" not in view.params:
        return "weight is not a parameter"
    w = view.param("weight")
    if w.dim() != 4 or w.dtype != torch.float32 or w.device.type != "cpu":
        return "only a float32 CPU conv_transpose2d is lowered"
    meta = tensor_meta(view.input)
    if meta is None or len(meta[0]) != 4:
        return "the input is not a batched 4-D tensor of known shape"
    a = rules.conv_attrs(view)
    if a["groups"] != 1:
        return "a grouped transposed conv stays on aten"
    if rules.output_size_at_call(view):
        return "an output_size given at the call (its output padding is computed per call)"
    if isinstance(a["padding"], str) or view.attrs.get("padding_mode", "zeros") != "zeros":
        return "string padding or a non-zero padding mode"
    if not all(isinstance(v, int) for key in ("padding", "output_padding", "stride", "dilation") for v in a[key]):
        return "its geometry is computed per call (export's output padding from a dynamic size)"
    # An output size that is no multiple of the stride (k=3, stride 2, padding 1, no output
    # padding: 2n - 1) takes a oneDNN path 5-16x slower than aten's (per layer, batch 1 and 16;
    # decoder tester); one that is (output_padding=1, k=4 or 2) 0.1-0.7x. The remainder is the
    # same at every input size: out = (in - 1) * s + d * (k - 1) - 2 * p + op + 1.
    if any(op >= st for op, st in zip(a["output_padding"], a["stride"])):
        return "an output padding of its stride or more (torch takes it below the dilation; oneDNN does not)"
    if any((d * (k - 1) - 2 * pad + op + 1) % st for k, st, pad, op, d in
           zip(w.shape[2:], a["stride"], a["padding"], a["output_padding"], a["dilation"])):
        return "its output size is no multiple of its stride (oneDNN's kernel for it is slower than aten's)"
    if w.shape[1] < 8:  # an RGB output layer: oneDNN pads the channels to its blocks of 8 or 16
        return (f"{w.shape[1]} output channels: oneDNN's kernel for fewer than 8 was slower than aten's "
                "(a DCGAN's last layer, 64 -> 3, 1.16-1.69x at batch 16)")
    macs = prod(meta[0][1:]) * prod(w.shape[1:])  # per sample: each input element meets C_out * k taps
    if macs < min_macs:
        return (f"{macs} MACs per sample < {min_macs}: oneDNN's fixed cost per call outweighs the kernel "
                "(cheaper on the aten path)")
    if view.param("bias") is None and view.node.op != "call_module" and _bias_is_node(view):
        return "bias is computed"
    return True


def _per_channel_shift(m) -> bool | str:
    """The add after a transposed conv is `fuse`'s folded batchnorm shift (or any stored
    tensor of one value per output channel, shaped (C, 1, 1) or (1, C, 1, 1)): oneDNN takes it
    as the conv's bias. A (C,), (1, C) or (C, 1) tensor adds along the width or height."""
    shift, conv = m.nodes["shift"], m.views["conv"]
    if shift.op != "get_attr":
        return "the added value is not a stored tensor"
    value = get_attr_value(m.gm, str(shift.target))
    out = conv.param("weight").shape[1]
    if not isinstance(value, torch.Tensor) or value.dtype != torch.float32 \
            or tuple(value.shape) not in ((out, 1, 1), (1, out, 1, 1)):
        return "the added tensor is not one float32 value per output channel, shaped (C, 1, 1)"
    if m.views["add"].attrs.get("alpha", 1) != 1:
        return "add with alpha != 1"
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


def _act_check(view) -> bool | str:
    return True if _post_op(view) is not None else f"{view.kind} has no oneDNN post-op here"


def _conv_rule(min_macs: int, by_batch: bool):
    """`_conv_check` then the cost rule, as one Op check (so `debug` reports either reason)."""
    def check(view) -> bool | str:
        verdict = _conv_check(view)
        if verdict is not True:
            return verdict
        batch = lowering_batch(view, min_macs, by_batch)
        return True if isinstance(batch, int) else batch
    return check


class _Lowering:
    """Shared state of one run: the channels-last copies already made per value."""

    def __init__(self, min_macs: int = MIN_MACS, by_batch: bool = True,
                 written: dict[str, str] | None = None) -> None:
        self.cl: dict[torch.fx.Node, torch.fx.Node] = {}
        self.min_macs, self.by_batch = min_macs, by_batch
        self.written = written or {}  # values a write reaches (through a view too): `written_in_place`

    def channels_last(self, r: Rewriter, node: torch.fx.Node) -> torch.fx.Node:
        """`node` in oneDNN's layout (`to_onednn_layout`: a 3-D value lifted to height 1)."""
        if node in self.cl and not getattr(self.cl[node], "_erased", False):
            return self.cl[node]
        if node.target == "contiguous" or _is_lowered_conv(node):
            return node
        # One copy right after the value serves every conv reading it, unless something writes
        # into the value in place (``x.sub_(mean)``): then each conv copies it where it reads it.
        # (export's `_guards_fn(x)` call is effectful and reads the input: no write)
        written = node.name in self.written or any(mutated_input(r.gm, user) is node for user in node.users)
        meta = tensor_meta(node)
        rank = len(meta[0]) if meta is not None else 4
        with r.graph.inserting_before(r.match.root) if written else r.graph.inserting_after(node):
            source = r.graph.call_method("unsqueeze", (node, 2)) if rank == 3 else node
        if rank == 3:
            source.meta[_LIFT] = True
        fmt = torch.channels_last_3d if rank == 5 else torch.channels_last
        with r.graph.inserting_before(r.match.root) if written else r.graph.inserting_after(source):
            new = r.graph.call_method("contiguous", (source,), {"memory_format": fmt})
        if rank != 3:  # (the lifted copy has another shape; nothing reads its metadata)
            new.meta["tensor_meta"] = node.meta.get("tensor_meta")
        new.meta[_LAYOUT_COPY] = True
        if not written:
            self.cl[node] = new
            if rank == 3:
                self._share_lifted_copy(r, node, new)
        return new

    @staticmethod
    def _share_lifted_copy(r: Rewriter, node: torch.fx.Node, lifted: torch.fx.Node) -> None:
        """Let the elementwise readers of a conv1d's input read its channels-last copy too (as
        a 3-D view of it). A TCN block's ``x + relu(conv(x))`` otherwise added a row-major `x`
        to the channels-last conv output: a strided add whose row-major result the next conv
        copied again, every block (lowered 1.1-1.5x slower than `fuse`, fuse tester)."""
        readers = [u for u in node.users if u is not lifted.args[0] and u.op != "output"
                   and (view := op_view(r.gm, u)) is not None and view.kind in _SAME_VALUES_ANY_LAYOUT]
        if not readers:
            return
        with r.graph.inserting_after(lifted):
            flat = r.graph.call_method("squeeze", (lifted, 2))
        flat.meta["tensor_meta"] = node.meta.get("tensor_meta")
        for user in readers:
            user.replace_input_with(node, flat)

    def conv(self, r: Rewriter) -> torch.fx.Node | None:
        view = r.view("conv")
        act = r.match.views.get("act")
        post = _post_op(act)
        if post is None:
            return None
        if r.match.root is not r.match.nodes["conv"] and r["x"].name in self.written:
            return None  # the fused call runs where the add/act was: a write in between would reach it
        meta = tensor_meta(r["x"])
        if meta is None:  # (`_conv_check` refused a rank other than the weight's)
            return None
        lifted = len(meta[0]) == 3
        a = lift_1d(_attrs(view)) if lifted else _attrs(view)
        bias = _bias_node(r, view)
        packs = WeightPacks("conv", (a["padding"], a["stride"], a["dilation"], a["groups"]))
        min_batch = lowering_batch(view, self.min_macs, self.by_batch)
        if min_batch > 1 or ("other" in r.match.nodes and _may_not_fit(r.gm, r["other"], r["x"])):
            # a residual that may come at another dtype, rank or shape than the example's:
            # `ConvByBatch` checks it per call and adds it as eager does
            return self.conv_switch(r, view, act, post, a, bias, packs, min_batch)
        x = self.channels_last(r, r["x"])
        wn = _packed_weight_node(r, view, packs, x)
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
        if lifted:  # back to the conv1d's rank; a lowered conv reading it takes `out` itself
            lifted_out, out = out, r.call(torch.squeeze, out, 2)
            out.meta[_LIFTED_FROM] = lifted_out
        return out

    def conv_transpose(self, r: Rewriter) -> torch.fx.Node | None:
        """A transposed conv2d [+ per-channel shift] [+ activation] -> oneDNN's transposed conv
        with the shift as its bias and the activation as its post-op."""
        view, act = r.view("conv"), r.match.views.get("act")
        post = _post_op(act)
        if post is None:
            return None
        if r.match.root is not r.match.nodes["conv"] and r["x"].name in self.written:
            return None  # the fused call runs where the add/act was: a write in between would reach it
        a = rules.conv_attrs(view)
        args = (list(a["padding"]), list(a["output_padding"]), list(a["stride"]), list(a["dilation"]), 1)
        bias = _bias_node(r, view)
        if "shift" in r.match.nodes:  # read per call: the graph keeps its tensors (state_dict, loads)
            shift = r.call(torch.Tensor.reshape, r["shift"], (-1,))
            bias = shift if bias is None else r.call(torch.add, bias, shift)
        x = self.channels_last(r, r["x"])
        wn = _packed_weight_node(r, view, WeightPacks("conv_transpose", args), x)
        attr, scalars, algo = post
        out = r.call(torch.ops.mkldnn._convolution_transpose_pointwise.default, x, wn, bias, *args, attr, scalars,
                     algo)
        annotate(out, fused="conv_transpose" + ("+shift" if "shift" in r.match.nodes else "")
                 + ("" if act is None else f"+{act.kind}"), lowered="mkldnn")
        return out

    def conv_switch(self, r: Rewriter, view, act, post, a: dict, bias, packs: "WeightPacks",
                    min_batch: int) -> torch.fx.Node:
        """A `ConvByBatch` call: the input keeps its layout; oneDNN from `min_batch` samples."""
        weight = r.param(_view_name(r, view), "weight")
        other = r["other"] if "other" in r.match.nodes else None
        attr, scalars, algo = ("none" if act is None else "relu", [], "") if other is not None else post
        switch = ConvByBatch(packs, attr, scalars, algo, min_batch, tuple(view.param("weight").shape))
        name = _add_submodule(r.gm, f"{r.match.root.name}_by_batch", switch)
        with r.graph.inserting_before(r.match.root):
            out = r.graph.call_module(name, (r["x"], weight, bias, other))
        r.new_nodes.append(out)
        label = ("conv+add" if other is not None else "conv") + ("" if act is None else f"+{act.kind}")
        annotate(out, fused=label, lowered=f"mkldnn from batch {min_batch}")
        return out

    def spatial_channels_last(self, r: Rewriter) -> torch.fx.Node:
        """The pool or upsample reading its input's channels-last copy (`_faster_channels_last`)."""
        return r.copy(r.match.root, {r["x"]: self.channels_last(r, r["x"])})

    def linear(self, r: Rewriter) -> torch.fx.Node | None:
        view = r.view("linear")
        act = r.match.views.get("act")
        post = _post_op(act)
        if post is None:
            return None
        bias = _bias_node(r, view)
        wn = _packed_weight_node(r, view, WeightPacks("linear"), r["x"])
        attr, scalars, algo = post
        out = r.call(torch.ops.mkldnn._linear_pointwise.default, r["x"], wn, bias, attr, scalars, algo)
        annotate(out, fused="linear" + ("" if act is None else f"+{act.kind}"), lowered="mkldnn")
        return out


def _may_not_fit(gm: torch.fx.GraphModule, other: torch.fx.Node, x: torch.fx.Node) -> bool:
    """Whether a conv's residual `other` may, at some call, not fit oneDNN's fused add (the conv
    output's dtype and shape): it follows a graph input's dtype (`_follows_an_input`), or it
    is computed from other graph inputs than the conv's input `x`, whose sizes the caller pairs
    (``c1(x) + c2(z)`` with x of batch 1 and z of 4: eager broadcasts to 4)."""
    return _follows_an_input(gm, other) or _graph_inputs(other) != _graph_inputs(x)


def _graph_inputs(node: torch.fx.Node) -> set[torch.fx.Node]:
    """The placeholders `node`'s value is computed from."""
    return {n for n in upstream([node]) if n.op == "placeholder"}


def _follows_an_input(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether `node`'s value reaches back to a graph input without a conv or linear in between:
    its dtype, rank and shape are then the caller's to choose (a conv's or linear's output has
    its weight's dtype, or eager fails)."""
    def before_a_layer(n: torch.fx.Node) -> bool:
        view = op_view(gm, n)
        return not _is_lowered_conv(n) and (view is None or view.kind not in ("conv", "linear"))
    return any(n.op == "placeholder" for n in upstream([node], through=before_a_layer))


def _is_lowered_conv(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in (
        torch.ops.mkldnn._convolution_pointwise.default, torch.ops.mkldnn._convolution_pointwise.binary,
        torch.ops.mkldnn._convolution_transpose_pointwise.default)


def _is_conv_switch(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether `node` calls a `ConvByBatch` (a conv lowered from some batch size on)."""
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), ConvByBatch)


def _attrs(view) -> dict:
    a = rules.conv_attrs(view)
    return {k: list(a[k]) for k in ("padding", "stride", "dilation")} | {"groups": int(a["groups"])}


def _view_name(r: Rewriter, view) -> str:
    return next(k for k, v in r.match.views.items() if v is view)


def _bias_node(r: Rewriter, view) -> torch.fx.Node | None:
    return r.param(_view_name(r, view), "bias") if "bias" in view.params else None


def _packed_weight_node(r: Rewriter, view, packs: WeightPacks, x: torch.fx.Node) -> torch.fx.Node:
    """``packs(weight, x)``, a call of the `WeightPacks` submodule: the dense weight stays shared."""
    weight = r.param(_view_name(r, view), "weight")
    name = _add_submodule(r.gm, f"{r.match.root.name}_packs", packs)
    with r.graph.inserting_before(r.match.root):
        node = r.graph.call_module(name, (weight, x))
    r.new_nodes.append(node)
    return node


def _add_submodule(gm: torch.fx.GraphModule, base: str, module: torch.nn.Module) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.add_submodule(name, module)
    return name


def lowering_patterns(state: _Lowering, conv: bool = True, linear: bool = False) -> PatternSet:
    conv_op = lambda: Op("conv", Var("x"), name="conv", check=_conv_rule(state.min_macs, state.by_batch))  # noqa: E731
    lin_op = lambda: Op("linear", Var("x"), name="linear", check=_linear_check)  # noqa: E731
    table = []
    if conv:
        floor = min(state.min_macs, MIN_TRANSPOSED_MACS)  # (`min_macs=0` lowers them all too)
        tconv = lambda: Op("conv", Var("x"), name="conv",  # noqa: E731
                           check=lambda view: _conv_transpose_check(view, floor))
        shifted = lambda: Op("add", tconv(), Var("shift"), name="add", commutative=True)  # noqa: E731
        table += [
            Pattern("conv_transpose+shift+act", Op(_CONV_ACTS, shifted(), name="act", check=_act_check),
                    rewrite=state.conv_transpose, check=_per_channel_shift),
            Pattern("conv_transpose+act", Op(_CONV_ACTS, tconv(), name="act", check=_act_check),
                    rewrite=state.conv_transpose),
            Pattern("conv_transpose+shift", shifted(), rewrite=state.conv_transpose, check=_per_channel_shift),
            Pattern("conv_transpose", tconv(), rewrite=state.conv_transpose),
        ]
        table += [
            Pattern("conv+add+relu", Op("relu", Op("add", conv_op(), Var("other"), name="add", commutative=True),
                                        name="act"), rewrite=state.conv, check=rules.residual_fits_conv),
            Pattern("conv+act", Op(_CONV_ACTS, conv_op(), name="act", check=_act_check),
                    rewrite=state.conv),
            Pattern("conv+add", Op("add", conv_op(), Var("other"), name="add", commutative=True),
                    rewrite=state.conv, check=rules.residual_fits_conv),
            Pattern("conv", conv_op(), rewrite=state.conv),
        ]
    table += list(rules.CHANNEL_SHUFFLE)  # (one copy that keeps the lowered convs' channels-last layout)
    table.append(Pattern("spatial-channels-last", Op(_FASTER_CHANNELS_LAST, Var("x"), name="spatial",
                                                     check=_faster_channels_last),
                         rewrite=state.spatial_channels_last))
    table.append(Pattern("instance-norm-any-layout", Op("group_norm", Var("x"), name="norm",
                                                        check=_one_channel_per_group), rewrite=_norm_any_layout))
    table.append(Pattern("extremum-any-layout", Op(("amax", "amin"), Var("x"), name="reduce", check=_one_spatial_axis),
                         rewrite=_extremum_any_layout))
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
    #: Dense convs with fewer multiply-adds per sample run on aten at batch 1 and switch to
    #: oneDNN from a batch size where it pays (see `lowering_batch`); 0 lowers every conv.
    #: Depthwise convs are always lowered.
    min_macs: int = MIN_MACS
    #: false: no run-time switch; a dense conv below `min_macs` per sample stays on aten.
    by_batch: bool = True

    def __post_init__(self) -> None:
        if self.min_macs < 0:
            raise ValueError(f"option 'min_macs' must be >= 0, got {self.min_macs}")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        if not mkldnn_available():
            return PassResult(gm, modified=False, stats={"skipped": "oneDNN (mkldnn) is not available"})
        functionalized = functionalize_writes(gm)  # an in-place write nothing else sees, out of place
        state = _Lowering(self.min_macs, self.by_batch, written_in_place(gm))
        # cross-attention's q/k/v weights are rows of one packed parameter: one each, to prepack
        unpacked = split_packed_parameters(gm) if self.linear else 0
        report = apply_patterns(gm, lowering_patterns(state, self.conv, self.linear))
        guards = _guard_layouts(gm, set(state.cl.values())) if report.total else 0
        rank_checks = _check_input_ranks(gm) if report.total else 0
        scatters = _channel_scatters_over_rows(gm) if report.total else 0
        if report.total:
            from fxopt.passes.cleanup import DeadCodeElimination

            DeadCodeElimination().run(gm, ctx)
        return PassResult(gm, modified=bool(report.total or unpacked or functionalized),
                          stats={"lowered": dict(report.counts), "contiguous_inserted": guards,
                                 "unpacked_parameters": unpacked, "channel_scatters": scatters,
                                 "input_rank_checks": rank_checks})


@leaf_function  # (one node when fx traces the code again, as torch.load does)
def require_rank(x: torch.Tensor, rank: int, name: str) -> None:
    """Raise `InputMismatchError` unless graph input `name` has `rank` dims: the rank lower-cpu
    specialized the graph to. Eager's convs take an unbatched (C, H, W) input too, but a lowered
    graph's channels-last copies, weight packs and conv1d lifting are built for the batched rank
    (an unbatched conv2d input read as a lifted conv1d one takes C for the batch).

        >>> import torch
        >>> require_rank(torch.zeros(1, 3, 8, 8), 4, "x")
        >>> try:
        ...     require_rank(torch.zeros(3, 8, 8), 4, "x")
        ... except InputMismatchError as exc:
        ...     print(str(exc).split(":")[0])
        input 'x' has 3 dims where the graph lower-cpu made takes 4
    """
    if isinstance(x, torch.Tensor) and x.dim() != rank:
        raise InputMismatchError(
            f"input {name!r} has {x.dim()} dims where the graph lower-cpu made takes {rank}: its oneDNN "
            f"kernels are specialized to the rank the model was captured with (an unbatched input: add the "
            f"batch dim, x.unsqueeze(0)), or optimize without lower-cpu")


torch.fx.node.has_side_effect(require_rank)  # no users: dead-code removal must keep it


#: Ops whose output rank their arguments set, not their input's: a call of another rank before
#: them (MNIST's ``x.view(-1, 1, 28, 28)`` of a (N, 784) input) is the model's to take.
_SETS_ITS_RANK = frozenset({"reshape", "flatten", "unflatten", "expand", "expand_as"})


def _check_input_ranks(gm: torch.fx.GraphModule) -> int:
    """A `require_rank` call for each tensor input (a placeholder, or a tensor a placeholder's
    dict/list/tuple/dataclass holds) that reaches a lowered conv's input (or its fused add's channels-last
    residual) through ops that keep its rank; returns how many. An input reshaped first, or a
    residual `ConvByBatch` checks per call, keeps taking what eager takes."""
    layout_inputs = set()  # the values a lowered conv reads in the layout it was built for
    for node in gm.graph.nodes:
        if _is_lowered_conv(node):
            layout_inputs.update(node.args[:2] if node.target is torch.ops.mkldnn._convolution_pointwise.binary
                                 else node.args[:1])
        elif _is_conv_switch(gm, node):
            layout_inputs.add(node.args[0])
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    checked = 0
    for node, label in _tensor_inputs(placeholders):
        meta = tensor_meta(node)
        if meta is None or _rank_checked(node):
            continue
        rank = len(meta[0])

        def keeps_rank(user: torch.fx.Node) -> bool:
            if _LAYOUT_COPY in user.meta or _LIFT in user.meta:
                return True
            seen, view = tensor_meta(user), op_view(gm, user)
            return (seen is not None and len(seen[0]) == rank and not _is_lowered_conv(user)
                    and (view is None or view.kind not in _SETS_ITS_RANK))
        if layout_inputs.isdisjoint(downstream([node], through=keeps_rank)):
            continue
        with gm.graph.inserting_after(placeholders[-1] if node.op == "placeholder" else node):
            gm.graph.call_function(require_rank, (node, rank, label))
        checked += 1
    if checked:
        gm.recompile()
    return checked


def _tensor_inputs(placeholders: list[torch.fx.Node]) -> list[tuple[torch.fx.Node, str]]:
    """(node, label) of the graph's tensor inputs: the placeholders, the items a placeholder's
    dict, list or tuple holds (``batch["image"]``) and the fields of a dataclass or namedtuple
    input (``batch.x``)."""
    found, stack = [], [(p, str(p.target)) for p in placeholders]
    while stack:
        node, label = stack.pop()
        if tensor_meta(node) is not None:
            found.append((node, label))
            continue
        for user in node.users:  # an item (dict, list, tuple) or a field (dataclass, namedtuple)
            if user.op == "call_function" and user.target is operator.getitem:
                stack.append((user, f"{label}[{user.args[1]!r}]"))
            elif user.op == "call_function" and user.target is getattr and isinstance(user.args[1], str):
                stack.append((user, f"{label}.{user.args[1]}"))
    return found


def _rank_checked(node: torch.fx.Node) -> bool:
    """Whether `node` already has a `require_rank` call (lower-cpu run twice)."""
    return any(u.op == "call_function" and u.target is require_rank for u in node.users)


#: Ops whose aten kernels run several times faster on channels-last values than on row-major
#: ones, a copy to channels-last included (one thread, 4x64x48x48: max_pool2d k2 13.3 vs
#: 0.34 ms, avg_pool2d k3 s1 26.4 vs 0.73, nearest x2 10.0 vs 1.2, bilinear x2 11.9 vs 1.2;
#: 2x256x7x7 0.17-0.50x with the copy). Not adaptive pools (1.2-5x slower with the copy),
#: bicubic (even) nor antialiased resizes (1.3x slower).
_FASTER_CHANNELS_LAST = ("max_pool", "avg_pool", "interpolate")
#: A batch switch's k x k conv runs aten channels-last from this many input and output
#: channels (`ConvByBatch._aten_layout`); at 16 it ranged from 0.69x to 1.24x by image size.
MIN_CHANNELS_LAST_CONV = 32
#: Fewer channels than this gain nothing from channels-last: an RGB image's 3 run 1.2-6.7x
#: slower there (1x3x224x224, copy included); 8 channels at 32x32 0.38-0.94x.
MIN_CHANNELS_LAST_CHANNELS = 8
#: The interpolate modes of `_FASTER_CHANNELS_LAST`, and export's ATen ops for them.
_RESIZES_FASTER_CHANNELS_LAST = frozenset({"nearest", "nearest-exact", "bilinear"})
_ATEN_RESIZE_MODES = {"upsample_nearest2d": "nearest", "_upsample_nearest_exact2d": "nearest-exact",
                      "upsample_bilinear2d": "bilinear"}


def _resize_mode(view) -> str | None:
    """The mode of an interpolate (F.interpolate, nn.Upsample, export's ATen upsample op)."""
    node = view.node
    if view.attrs.get("antialias"):
        return None
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(str(node.target))
        return getattr(module, "mode", None)
    if "mode" in view.attrs:
        return view.attrs["mode"]
    name = getattr(getattr(node.target, "overloadpacket", None), "__name__", None)
    return _ATEN_RESIZE_MODES.get(name)


def _faster_channels_last(view) -> bool | str:
    """A 2-D pool or nearest/bilinear resize of a 4-D float32 value of `MIN_CHANNELS_LAST_CHANNELS`
    channels or more that the lowering does not already make channels-last."""
    x = view.input
    meta = tensor_meta(x) if isinstance(x, torch.fx.Node) else None
    if meta is None or len(meta[0]) != 4 or meta[1] != torch.float32:
        return "not a 4-D float32 value"
    if meta[0][1] < MIN_CHANNELS_LAST_CHANNELS:
        return f"{meta[0][1]} channels: row-major is as fast"
    if view.kind == "interpolate" and _resize_mode(view) not in _RESIZES_FASTER_CHANNELS_LAST:
        return "a resize mode with no faster channels-last kernel"
    if view.kind == "max_pool" and view.node.kwargs.get("return_indices"):
        return "returns indices"
    # (a batch switch's result may be either layout at run time: its copy costs nothing where it
    # is channels-last; a `contiguous` call is left as it is, a layout copy or the user's)
    if (x.op == "call_method" and x.target == "contiguous") or _is_lowered_conv(x):
        return "its input is a lowered conv's result or a contiguous() copy"
    return True


def _reduced_axis(view) -> int | None:
    """The one axis an amax/amin reduces, counted from 0; None for several or all."""
    dim = view.attrs.get("dim")
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    meta = tensor_meta(view.input) if isinstance(view.input, torch.fx.Node) else None
    if not isinstance(dim, int) or isinstance(dim, bool) or meta is None or not -len(meta[0]) <= dim < len(meta[0]):
        return None
    return dim % len(meta[0])


def _one_spatial_axis(view) -> bool | str:
    axis = _reduced_axis(view)
    if axis is None or axis < 2 or len(tensor_meta(view.input)[0]) < 3:
        return "not one axis after the channels of a value of rank 3 or more"
    return True


def _extremum_any_layout(r: Rewriter) -> torch.fx.Node:
    view = r.view("reduce")
    return r.call(extremum_any_layout, r["x"], _reduced_axis(view), bool(view.attrs.get("keepdim", False)),
                  view.kind == "amax")


@leaf_function
def extremum_any_layout(x: torch.Tensor, dim: int, keepdim: bool, largest: bool) -> torch.Tensor:
    """``torch.amax`` (`largest`) or ``torch.amin`` of `x` over axis `dim`; on a channels-last
    value (channels innermost in memory, as lowered convs write them) over its row-major
    permutation, where torch's kernel runs 10-30x faster than on the channels-last strides
    (16x32x112x112 over W: 2.7 vs 28 ms; 1x256x8x64: 0.03 vs 0.49 ms, one thread; adversary: a
    `torch.max(h, 3)[0]` that `fuse` made an amax ran 1.3-1.5x slower than the max there).

        >>> x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
        >>> torch.equal(extremum_any_layout(x, 3, False, True), x.amax(3))
        True
    """
    reduce = torch.amax if largest else torch.amin
    rank = x.dim()
    order = (0, *range(2, rank), 1)  # (N, *spatial, C): row-major for a channels-last value
    if rank < 3 or x.is_contiguous() or not x.permute(order).is_contiguous():
        return reduce(x, dim, keepdim=keepdim)
    back = [order.index(axis) for axis in range(rank)]
    y = reduce(x.permute(order), order.index(dim), keepdim=True).permute(back)
    return y if keepdim else y.squeeze(dim)


#: A channels-last value with fewer pixels per channel or fewer channels than these is
#: instance-normalized by torch's instance_norm, else by its group_norm (see
#: `instance_norm_any_layout`).
MIN_GROUP_NORM_PIXELS = 1024
MIN_GROUP_NORM_CHANNELS = 8


def _one_channel_per_group(view) -> bool | str:
    """A group norm of one channel per group (`fuse`'s instance norm) of a 4-D float32 value,
    with stored (or no) affine tensors."""
    meta = tensor_meta(view.input) if isinstance(view.input, torch.fx.Node) else None
    if meta is None or len(meta[0]) != 4 or meta[1] != torch.float32:
        return "not a 4-D float32 value"
    if view.attrs.get("num_groups") != meta[0][1]:
        return "not one channel per group"
    computed = [name for name in ("weight", "bias") if view.computed(name) is not None]
    return not computed or f"its {computed[0]} is computed in the graph"


def _norm_any_layout(r: Rewriter) -> torch.fx.Node:
    view = r.view("norm")
    return r.call(instance_norm_any_layout, r["x"], r.param("norm", "weight"), r.param("norm", "bias"),
                  float(view.attrs.get("eps", 1e-5)))


@leaf_function
def instance_norm_any_layout(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                             eps: float) -> torch.Tensor:
    """The instance norm of 4-D `x` by torch's fastest kernel for its layout: the group norm of
    one channel per group, except on a channels-last value of fewer than
    `MIN_GROUP_NORM_PIXELS` pixels, where torch's channels-last group_norm runs 2-2.3x its
    instance_norm's time (1x256x16x16: 0.69 vs 0.30 ms; 32x32 and more: 5-15x the other way),
    or of 2 to 7 channels (1.2-5x slower there; adversary); row-major, group_norm is 4-50x
    faster at every size (one thread).

        >>> x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
        >>> torch.allclose(instance_norm_any_layout(x, None, None, 1e-5), F.instance_norm(x), atol=1e-5)
        True
    """
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last) \
            and (x.shape[2] * x.shape[3] < MIN_GROUP_NORM_PIXELS or x.shape[1] < MIN_GROUP_NORM_CHANNELS):
        return F.instance_norm(x, weight=weight, bias=bias, eps=eps)
    return F.group_norm(x, x.shape[1], weight, bias, eps)


@leaf_function
def index_add_channels(y: torch.Tensor, index: torch.Tensor, source: torch.Tensor, *,
                       in_place: bool = False, relu: bool = False) -> torch.Tensor:
    """``torch.index_add(y, 1, index, source)`` on (N, C, H, W) values, as fast on the
    channels-last tensors lowered convs return as on contiguous ones: their (N*H*W, C) matrix
    view takes the scatter (torch's kernel on the 4-D channels-last tensor: 3.4 ms for
    16x128x28x28 gaining 100 channels, 0.86 ms contiguous, 1.4 ms over the matrix view).
    Pruning writes such scatters where a block's output joins a residual stream.

    `in_place` writes into `y` (the caller owns it: nothing else reads it); `relu` applies
    ReLU to the sum, in place on the result.

    >>> y, s = torch.zeros(1, 4, 2, 2), torch.tensor([1.0, -1.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    >>> index_add_channels(y, torch.tensor([0, 3]), s, relu=True)[0, :, 0, 0]
    tensor([1., 0., 0., 0.])
    """
    cl = torch.channels_last
    if y.dim() == 4 and y.is_contiguous(memory_format=cl) and source.is_contiguous(memory_format=cl) \
            and not y.is_contiguous():
        rows = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])  # a view of y: channels-last is (N*H*W, C)
        add = rows.index_add_ if in_place else rows.index_add
        n, c, h, w = y.shape
        out = add(1, index, source.permute(0, 2, 3, 1).reshape(-1, source.shape[1])).view(n, h, w, c).permute(0, 3, 1, 2)
    else:
        out = y.index_add_(1, index, source) if in_place else torch.index_add(y, 1, index, source)
    return out.relu_() if relu else out


def _channel_scatters_over_rows(gm: torch.fx.GraphModule) -> int:
    """Route ``index_add(y, 1, idx, x)`` of 4-D values through `index_add_channels`: after
    lowering, activations are channels-last at run time. A `y` that a lowered conv made for this
    scatter alone is written in place, and a ReLU that alone reads the sum is folded in."""
    count = 0
    for node in list(gm.graph.nodes):
        view = op_view(gm, node) if node.op == "call_function" else None
        meta = tensor_meta(node)
        if view is None or view.kind != "index_add" or meta is None or len(meta[0]) != 4 \
                or view.attrs.get("dim") not in (1, -3) or view.attrs.get("alpha", 1) != 1:
            continue
        y, source = view.inputs
        index = bind_arguments(node, spec_for(gm, node))["index"]
        in_place = len(y.users) == 1 and y is not source and _makes_fresh_tensor(gm, y)
        (user,) = node.users if len(node.users) == 1 else (None,)
        relu = in_place and user is not None and user.op != "output" and _is_relu(gm, user)
        node.target, node.args = index_add_channels, (y, index, source)
        node.kwargs = {"in_place": True, "relu": True} if relu else {"in_place": True} if in_place else {}
        if relu:
            user.replace_all_uses_with(node)
            gm.graph.erase_node(user)
        count += 1
    if count:
        gm.recompile()
    return count


def _makes_fresh_tensor(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """A lowered conv's result: a new tensor, never a view of the conv's inputs."""
    return _is_lowered_conv(node) or _is_conv_switch(gm, node)


#: Elementwise ops whose values do not depend on their inputs' layouts (their results take it).
_SAME_VALUES_ANY_LAYOUT = frozenset({"add", "sub", "mul", "div", "relu", "gelu", "silu", "sigmoid", "tanh",
                                     "hardtanh", "hardswish", "leaky_relu"})
#: Marks the channels-last copies the lowering itself inserts (a user's own
#: ``contiguous(memory_format=...)`` is a layout eager has too).
_LAYOUT_COPY = "fxopt.layout_copy"
#: On a lowered conv1d's result (``squeeze(conv, 2)``): the 4-D conv it squeezes (`lift_1d`).
_LIFTED_FROM = "fxopt.lifted_from"
#: Marks the ``unsqueeze(x, 2)`` the lowering inserts to lift a conv1d's input (`lift_1d`).
_LIFT = "fxopt.lift"


def _downstream_of_channels_last(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """The values computed from what the lowering made channels-last (its convs, batch
    switches and layout copies): their strides may be channels-last at any rank. A user's own
    layout request (``clone(memory_format=torch.channels_last)``) ends it: eager has that
    layout too."""
    starts = [n for n in gm.graph.nodes if _is_lowered_conv(n) or _is_conv_switch(gm, n) or n.meta.get(_LAYOUT_COPY)]
    return downstream(starts, through=lambda user: not _requests_a_layout(user))


def _requests_a_layout(node: torch.fx.Node) -> bool:
    """A user's op that sets its result's memory format (not `preserve_format`)."""
    fmt = node.kwargs.get("memory_format")
    return fmt is not None and fmt is not torch.preserve_format and not node.meta.get(_LAYOUT_COPY)


def _is_relu(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    view = op_view(gm, node)
    return view is not None and view.kind == "relu" and len(view.inputs) == 1


def _reads_memory_order(node: torch.fx.Node, view) -> bool:
    """Whether `node` needs its input row-major as eager had it (`fxopt.ir.reads_memory_order`);
    a reshape (`view` needs it) always does."""
    return view is not None and view.kind == "reshape" or reads_memory_order(node)


def _guard_layouts(gm: torch.fx.GraphModule, cl_nodes: set) -> int:
    """Insert contiguous() before reshapes (`view` needs it) and other readers of memory order
    (`_reads_memory_order`) of 4-D values and of any value of rank 2 or more computed from a
    channels-last one (``conv(x)[..., 0].view(n, -1)``: the select keeps the channels-last
    strides), and before 4-D outputs of the graph."""
    for node in cl_nodes:  # a lowered conv already yields channels-last: drop its copy
        if getattr(node, "_erased", False):
            continue
        source = lifted = node.args[0]
        if source.meta.get(_LIFT):  # the lift of a conv1d's input (a user's unsqueeze is no lift)
            source = source.args[0].meta.get(_LIFTED_FROM, source)
        if _is_lowered_conv(source):
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            if lifted is not source and not lifted.users:
                gm.graph.erase_node(lifted)
    downstream = _downstream_of_channels_last(gm)
    written = written_in_place(gm)
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "output":
            continue
        view = op_view(gm, node)
        src = view.inputs[0] if view is not None and view.inputs else \
            node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        # (a flatten or contiguous views a row-major value but copies a channels-last one: a write
        # into either after it was taken must still show through it)
        aliases_a_write = view is not None and view.kind in ("flatten", "contiguous") \
            and (node.name in written or src.name in written)
        if src is None or not (_reads_memory_order(node, view) or aliases_a_write):
            continue
        meta = tensor_meta(src)
        reshape = view is not None and view.kind == "reshape"  # (a contiguous copy is harmless there)
        if meta is None or (len(meta[0]) != 4 or not reshape) and (len(meta[0]) < 2 or src not in downstream):
            continue
        if node.name in written or src.name in written:
            # a view written through (or of a value written): a copy for it alone would take the
            # write away from the other readers, so they all read one row-major copy, of the
            # value under the views (``h[:, :4].flatten(1)`` then ``h.add_(1)``: a copy of the
            # slice, taken before the write, missed it)
            while is_view(gm, src) and src.args and isinstance(src.args[0], torch.fx.Node) \
                    and src.args[0].name in written and not (src.op == "call_method" and src.target == "contiguous"):
                src = src.args[0]
            if src.op == "call_method" and src.target == "contiguous":
                continue
            with gm.graph.inserting_after(src):
                fixed = gm.graph.call_method("contiguous", (src,))
            src.replace_all_uses_with(fixed, delete_user_cb=lambda u, fixed=fixed: u is not fixed)
        else:
            with gm.graph.inserting_before(node):
                fixed = gm.graph.call_method("contiguous", (src,))
            node.replace_input_with(src, fixed)
        if "tensor_meta" in src.meta:  # eager's value, as the source's (outputs viewing both still alias)
            fixed.meta["tensor_meta"] = src.meta["tensor_meta"]
        count += 1
    return count + contiguous_outputs(gm, among=downstream)
