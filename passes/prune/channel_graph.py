"""The channel-dependency graph: which channels of which values must be pruned together.

Every tensor value whose channels fxopt can follow gets a *slot*: (node, channel axis, size).
The slots are the nodes of a networkx ``MultiDiGraph``; an op that ties channels adds an edge
with the index map it implies (identity, a concat offset, a flatten block, a head split, ...).
Underneath, every channel *position* of every slot lives in one union-find: positions that must
disappear together (a conv's output channel, its batchnorm channel, the next conv's input
column, the matching concat position) fall into one *class*. A class is the unit of pruning.

Rules, by op kind (both the symbolic and the export front end, through `op_view`):

- conv / linear / embedding, and the weight-bearing matmuls ``addmm(b, x, W)``, ``mm(x, W)``,
  ``matmul(x, W)`` / ``x @ W`` with W a 2-D parameter (Hugging Face GPT-2's Conv1D): *producers*
  — their output channels are fresh classes (weight rows); their input channels are *consumed*
  (weight columns drop with the class). Where rows and columns sit in the weight is the
  producer's `WeightLayout` (`WEIGHT_LAYOUTS`): linear/conv ``[out, in]``, the matmuls
  ``[in, out]``, embedding ``[index, out]``; importance, apply and masking all read it from
  there. Grouped conv couples input position r of every group (and output position r of every
  group) so groups stay uniform; depthwise conv ties input channel c to its output block like a
  batchnorm.
- batch_norm, instance_norm, zero-preserving activations (relu, gelu, leaky_relu, elu, mish, abs,
  sqrt, erf, ``pow`` with a positive exponent, ...), PReLU (a slope per channel is sliced with
  them), pooling, dropout, interpolate, reductions over other axes (mean, sum, p-norm, amax,
  var, max with indices), F.normalize, roll/pad/cumsum/cumprod of other axes, scalar mul/div, division by a
  value known positive (`_sign`): identity maps. where / masked_fill / elementwise max, stack
  and einsum align their operands' channels like a product (einsum keeps the channel letter,
  or contracts it between two operands that carry it).
- ops with f(0) ≠ 0 (``x + const``, sigmoid, exp, softmax over another axis, a fill of -inf) are identity maps too,
  but their value is
  *dirty*: it is not zero on removed channels. That is harmless while every path from it ends in
  a product with a zero-preserving factor (``x * sigmoid(x)``, the tanh GELU spelled out as
  ``0.5 * x * (1 + tanh(...))``, attention's ``softmax(q @ k.T) @ v`` over a head axis) — the
  product is zero there either way. If a dirty value reaches
  anything else (a layer, an add, a norm, the output), its source is pinned and the graph is
  built again.
- shape queries (``x.size()``, ``x.shape``, ``x.size(d)``, ``sym_size``) read no channels: free.
  A read of the channel axis used as the channel-axis entry of a reshape's size is rewritten
  to the new count by apply; used as a number (``q.size(-1) ** -0.5``) apply writes the
  original count in its place, a constant, so the value keeps computing what it did.
- mul of two channel tensors, cat (with offsets along the channel axis), split/chunk + getitem,
  flatten/reshape/unflatten (identity, merge into a block, or a head split — on a later axis of
  the split when an op reduces or indexes the first, `split_axes`; heads folded into the batch,
  ``view(T, B * heads, d)``, put the slot on each head's features, `_digit_map`),
  permute/transpose/expand/
  select/slice and indexing by index tensors or lists on other axes (``xf[tok]``, export's
  ``aten.index``: following the axis by torch's indexing rules), a slice *of* the channel
  axis with constant bounds and
  step 1 (``x[:, a:b]`` or export's ``aten.slice``: channel j is input channel a + j, like a
  split piece; a full-range one such as GhostNet's ``cat([x1, x2], 1)[:, :oup]`` is the
  identity; apply rewrites the bounds), matmul/sdpa over a head axis (an attention mask must
  broadcast over the heads): index maps (unions). ``q @ kᵀ`` over both operands' channels
  (features of folded heads) links them and yields scores without channels.
- add/sub are *junctions*, not unions: ``y = a + b`` keeps channel c alive if any input keeps it,
  so "y_c dead" implies "a_c dead and b_c dead" — a precedence edge between classes that the
  min-cut selection uses (``prune.select``). Inputs are re-indexed to the output's channels.
- parameters used directly (class token, position embedding) become producer slots; integer
  and bool buffers (position ids, masks) hold no channels.
- layer/group norm mix channels (mean and variance over them): with ``exact_norms=True``
  (the default) a norm with an affine weight is *gathered*: it reads its input at full width
  (re-expanded with zeros, so its statistics are the original ones) and its output channels are
  fresh classes, kept by one gather after it (category ``gather``; a removed channel is what the
  norm gives with its affine zeroed); without an affine weight it is pinned. With
  ``exact_norms=False`` their affine channels are coupled like a batchnorm's (group norm:
  position r of every group is one class), as Torch-Pruning does — not exact, the statistics
  are then taken over the kept channels only.
- an RMS norm is exact without either: removed channels are zero, so only its mean's divisor
  changes, which apply rescales (`rule_rms_norm`). A mean or p-norm over the channel axis —
  a spelled-out RMSNorm's ``x.pow(2).mean(-1, keepdim=True)`` — is a *reduction* of the
  narrower value, exact with a mean's result multiplied by C'/C (`channel_reduction`).
- anything else — unknown ops, the graph output, ignored layers — is *pinned*: its output
  classes cannot die; its inputs are read at full width, so classes that reach it are
  re-expanded (``prune.boundary``). Pinned nodes are listed by name.

Preconditions: shape metadata on every node (capture records it; the analysis reruns shapes
when example inputs are known).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import networkx as nx
import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
import torch
import torch.fx

from fxopt.analysis import Analysis, ShapeAnalysis
from fxopt.ir import (PRIVATE_OF, ParamRef, attribute_use_counts, bind_arguments, is_shared,
                      metadata_read, op_view, ref_for_get_attr, size_read, spec_for, tensor_meta,
                      transposed_parameter, value_nbytes, written_in_place)

ZERO_PRESERVING = frozenset({"relu", "hardtanh", "hardswish", "silu", "gelu", "tanh", "neg", "leaky_relu", "elu",
                             "selu", "celu", "mish", "dropout", "identity", "contiguous", "to", "abs", "sqrt",
                             "square", "erf", "sin", "sign", "softsign", "shrink"})
SPATIAL = frozenset({"max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "interpolate"})
# ops that act on each channel on its own: a value whose removed channels are not zero ("dirty")
# may flow through them (the result is dirty too; a product with a clean factor is clean)
CHANNELWISE = ZERO_PRESERVING | SPATIAL | frozenset({
    "softmax", "mean", "reshape", "flatten", "permute", "transpose", "expand", "select", "slice", "getitem",
    "cat", "split", "chunk", "mul", "div", "add", "sub", "sigmoid", "hardsigmoid", "pow", "unsqueeze", "squeeze",
    "pad", "roll", "vector_norm", "prelu", "pixel_shuffle", "pixel_unshuffle", "glu", "matmul",
    "narrow", "index_select", "expand_as", "clamp", "softplus", "flip", "exp", "cos", "rsqrt", "reciprocal",
    "sum", "amax", "amin", "var", "std", "normalize", "where", "masked_fill", "gt", "ge", "lt", "le", "eq", "ne",
    "fill_like", "stack", "unbind", "einsum", "max", "min", "maximum", "minimum", "layer_norm", "rms_norm",
    "log_softmax", "var_mean", "std_mean", "repeat", "repeat_interleave", "reshape_as", "cumsum", "cumprod",
    "index"})
# ops whose result is a tuple of values (taken apart by getitem)
TUPLE_RESULTS = frozenset({"split", "chunk", "unbind", "max", "min", "var_mean", "std_mean", "adaptive_max_pool"})
# products: zero on a removed channel where any factor is (a matmul or einsum here keeps
# channels on an axis it does not contract; one contracting them is pinned)
GATING = frozenset({"mul", "matmul", "einsum"})


@dataclass(frozen=True)
class WeightLayout:
    """Where a producer keeps its parameters and which weight axes are its channels.

    `weight` / `bias`: argument names (the op view's parameter names; for a matmul the second
    operand, `other`); `out_axis`: the weight axis of the output channels (what importance
    reads and apply slices as rows); `in_axis`: the axis of the input channels (columns),
    None when the input is not a channel tensor (embedding indices).
    """

    weight: str
    bias: str | None
    out_axis: int
    in_axis: int | None


WEIGHT_LAYOUTS = {
    "conv": WeightLayout("weight", "bias", 0, 1),
    "conv_transpose": WeightLayout("weight", "bias", 1, 0),  # [in, out / groups, *kernel]
    "linear": WeightLayout("weight", "bias", 0, 1),
    "embedding": WeightLayout("weight", None, 1, None),
    "addmm": WeightLayout("mat2", "input", 1, 0),   # bias + x @ W, W: [in, out]
    "matmul": WeightLayout("other", None, 1, 0),    # x @ W, W: [in, out]
}


@dataclass(frozen=True)
class ProducerWeights:
    """A producer's parameter handles (`ParamRef`) with its `WeightLayout` axes."""

    weight: ParamRef
    bias: ParamRef | None
    out_axis: int
    in_axis: int | None


def param_arg(gm: torch.fx.GraphModule, view, name: str) -> ParamRef | None:
    """The parameter passed as argument `name` of the viewed op, in either front end: the op
    view's own parameter handles, or a `get_attr` operand (the second operand of ``x @ W``)."""
    ref = view.params.get(name)
    if ref is not None or view.node.op not in ("call_function", "call_method"):
        return ref
    spec = spec_for(gm, view.node)
    bound = bind_arguments(view.node, spec) if spec is not None else {}
    value = bound.get(name)
    if isinstance(value, torch.fx.Node) and value.op == "get_attr":
        return ref_for_get_attr(gm, value)
    return None


def producer_weights(gm: torch.fx.GraphModule, node: torch.fx.Node, rule: "Rule") -> ProducerWeights:
    """The weight and bias handles of a producer rule's node, in the rule's weight layout."""
    layout = WEIGHT_LAYOUTS[rule.kind]
    view = op_view(gm, node)
    bias = param_arg(gm, view, layout.bias) if layout.bias else None
    return ProducerWeights(param_arg(gm, view, layout.weight), bias, layout.out_axis, layout.in_axis)


@dataclass
class Slot:
    """One value's channel axis: positions ``base .. base+size`` in the union-find."""

    id: int
    node: str
    axis: int
    size: int
    base: int
    role: str  # producer | param | pinned | pass | junction
    bytes: int = 0
    ndim: int = 0  # the value's rank

    @property
    def label(self) -> str:
        return f"{self.node}:{self.axis}"


@dataclass
class Rule:
    """How one node touches channels; `apply` replays it to rewrite the node.

    - `category`: producer (conv/linear/embedding/addmm/matmul with a parameter weight; its
      `kind` keys `WEIGHT_LAYOUTS`), pass (index maps only, maybe with params:
      batch_norm, depthwise conv), junction (add/sub), param (a get_attr producer), pinned.
    - `inputs`: (input node name, slot id, in_pos, out_pos, out slot id) for each mapped input;
      `consumed`: (input node name, slot id) for inputs whose channels are weight columns.
    - `outputs`: slot ids this node defines (several for split, keyed by getitem node).
    """

    node: str
    kind: str
    category: str
    inputs: list = field(default_factory=list)
    consumed: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


def _component_labels(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """Connected-component label per index 0..n-1 of the undirected links a[i] -- b[i]."""
    links = sp.coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
    return connected_components(links, directed=False)[1]


class _ChannelUnions:
    """Channel positions and the "same channel" links between them, solved once at the end.

    Links are only recorded while the graph is walked (nothing reads a class before `finish`),
    then one sparse connected-components call numbers the classes; a per-link Python
    union-find was the largest part of the analysis time on 200-layer CNNs.
    """

    def __init__(self) -> None:
        self.size = 0
        self.links: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, n: int) -> int:
        start, self.size = self.size, self.size + n
        return start

    def union_many(self, a: np.ndarray, b: np.ndarray) -> None:
        self.links.append((np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)))

    def classes(self) -> np.ndarray:
        """Class id per position, numbered 0.. in order of each class's first position."""
        if self.size == 0:
            return np.zeros(0, dtype=np.int64)
        a = np.concatenate([x for x, _ in self.links] + [np.zeros(0, dtype=np.int64)])
        b = np.concatenate([y for _, y in self.links] + [np.zeros(0, dtype=np.int64)])
        labels = _component_labels(a, b, self.size)
        # number classes by their first position (stable ids, as a min-root union-find gave)
        _, first = np.unique(labels, return_index=True)
        order = np.argsort(first)
        rank = np.empty(len(first), dtype=np.int64)
        rank[order] = np.arange(len(first))
        return rank[labels]


@dataclass
class ChannelGraph:
    """Result of the analysis; see the module docstring.

    - `graph`: networkx MultiDiGraph over slot labels (``node:axis``), edges carry `op` and `map`;
    - `slots`, `rules` (by node name), `value_slot` (node name -> slot id or None);
    - `cls`: array position -> class id (dense 0..n_classes-1);
    - `precedence`: set of (class y, class x) pairs: y dead requires x dead;
    - `pinned_nodes`: node name -> reason, for everything the analysis would not reason about;
    - `output_classes`: classes that reach the graph output (pinned).
    """

    graph: nx.MultiDiGraph
    slots: list[Slot]
    rules: dict[str, Rule]
    value_slot: dict[str, int | None]
    cls: np.ndarray
    n_classes: int
    precedence: set
    pinned_nodes: dict[str, str]
    pinned_classes: np.ndarray
    output_classes: np.ndarray
    module_names: dict[str, str]

    def positions(self, slot_id: int) -> np.ndarray:
        s = self.slots[slot_id]
        return self.cls[s.base: s.base + s.size]

    def groups(self) -> list[set[int]]:
        """Pruning groups: classes that share a value or a junction precedence (a layer family,
        a residual stage, a dense block). `scope=local` prunes `ratio` of each group."""
        pairs = [np.array(list(self.precedence), dtype=np.int64).reshape(-1, 2)]
        for s in self.slots:  # chain the classes of each slot
            ids = np.unique(self.positions(s.id))
            pairs.append(np.stack([ids[:-1], ids[1:]], 1))
        pairs = np.concatenate(pairs)
        n = self.n_classes
        labels = _component_labels(pairs[:, 0], pairs[:, 1], n)
        order = np.argsort(labels, kind="stable")
        bounds = np.flatnonzero(np.diff(labels[order])) + 1
        return [set(part.tolist()) for part in np.split(order, bounds)] if n else []


class ChannelGraphAnalysis(Analysis):
    """Builds the `ChannelGraph` of a GraphModule (cached by the analysis manager)."""

    name: ClassVar[str] = "channel-graph"

    def run(self, gm: torch.fx.GraphModule, am) -> ChannelGraph:
        if am.example_inputs or am.example_kwargs:
            am.get(ShapeAnalysis)
        return build_channel_graph(gm)


def build_channel_graph(gm: torch.fx.GraphModule, exact_norms: bool = True) -> ChannelGraph:
    """The channel graph of `gm`; `exact_norms=False` lets layer/group norm channels be pruned.

    Dirty values and channel-axis shape queries are followed optimistically; where one turns out
    to be used in a way that is not exact (see the module docstring), its source is pinned and
    the graph is walked again (each round pins more, so this ends; in practice one extra round).
    Likewise a reshape that splits the channels over several axes moves its slot to the next of
    them when an op reduces or indexes the one it had (bounded by its axes).
    """
    # a value written in place where another reader sees the write (``h.add_(x)`` then h read
    # again, in a symbolic graph) cannot be narrowed or copied by an adapter: the write would
    # miss the readers. The value, its views and their readers keep every channel.
    forced: dict[str, str] = dict(written_in_place(gm))
    split_axes: dict[str, int] = {}
    while True:
        builder = _Builder(gm, exact_norms, forced, split_axes)
        builder.walk()
        if builder.split_axes != split_axes:  # a reshape moves its slot: its readers change too
            split_axes = builder.split_axes
            continue
        new = {k: v for k, v in builder.violations().items() if k not in forced}
        if not new:
            return builder.finish()
        forced.update(new)


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = tensor_meta(node)
    if meta is None:
        return None
    try:
        return tuple(int(d) for d in meta[0])
    except (TypeError, ValueError):
        return None



def _holds_features(node: torch.fx.Node) -> bool:
    """Whether a tensor attribute can carry channels: floating point. An integer or bool buffer
    holds indices or a mask (Hugging Face BERT's ``position_ids``, sliced to the sequence length
    before the position embedding): removing its "channels" would change what is looked up."""
    meta = tensor_meta(node)
    return meta is not None and meta[1].is_floating_point


def _is_parameter(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether a `get_attr` reads a learned parameter (not a buffer or a folded constant)."""
    return isinstance(ref_for_get_attr(gm, node).get(), torch.nn.Parameter)


_INT_ARITHMETIC = (operator.floordiv, operator.mul, operator.add, operator.sub)


# What a weight computed in the graph usually is, so the pin says what to do about it.
_COMPUTED = (" (computed in the graph: a weight_norm or other parametrization? remove_parametrizations "
             "before capture)")


def _size_entries(reshape: torch.fx.Node) -> tuple:
    """The size arguments of a reshape/view/expand call: one sequence or spread over the call."""
    args = reshape.args
    return args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]


def _opaque_layer(module: torch.nn.Module) -> str | None:
    """Why a layer fxopt would prune must be called whole: a parametrization computes its
    weight (weight_norm, spectral_norm), or hooks run around its forward."""
    if torch.nn.utils.parametrize.is_parametrized(module):
        name, chain = next(iter(module.parametrizations.items()))
        how = ", ".join(type(p).__name__.lstrip("_") for p in chain)
        return (f"{type(module).__name__} computes its {name} with a parametrization ({how}): call "
                f"torch.nn.utils.parametrize.remove_parametrizations(module, {name!r}) before pruning")
    if module._forward_hooks or module._forward_pre_hooks:
        return f"{type(module).__name__} has forward hooks, which a pruned layer would not run"
    return None


def _is_number(node: Any) -> bool:
    """A Python number computed in the graph (shape arithmetic): recorded as itself."""
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return isinstance(meta, (int, float)) and not isinstance(meta, bool)


def _channelwise(rule: "Rule") -> bool:
    """Whether `rule` computes each output channel from the same channel of its inputs, so a
    dirty value may pass through it (`info["mixes_channels"]`: it also reads the others)."""
    return (rule.category in ("pass", "split") and (rule.kind in CHANNELWISE or rule.info.get("channelwise"))
            and not rule.info.get("mixes_channels"))


def _norm_axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


def _norm_axes(dims: Any, ndim: int) -> list[int]:
    """An axis argument — one int or a sequence (`mean(dim=(1, 2))`, `roll(dims=...)`) — as
    non-negative axes."""
    return [_norm_axis(int(d), ndim) for d in ([dims] if isinstance(dims, int) else dims)]


class _Pin(Exception):
    """Raised inside a rule: the node is pinned, with the reason. `hold`: slots whose channels
    must all stay, because the pinned op is not finite on the zeros a re-expansion would give
    it (a divisor, the input of an rsqrt)."""

    def __init__(self, reason: str, hold: tuple[int, ...] = (), conflict: int | None = None) -> None:
        super().__init__(reason)
        self.hold = hold
        self.conflict = conflict  # the slot whose channel axis the op reduces or indexes


class _Builder:
    def __init__(self, gm: torch.fx.GraphModule, exact_norms: bool = True,
                 forced: dict[str, str] | None = None, split_axes: dict[str, int] | None = None) -> None:
        self.gm = gm
        self.exact_norms = exact_norms
        self.forced = dict(forced or {})  # node name -> reason: pinned from an earlier round
        # reshape splitting the channels into several axes -> which of them carries the slot
        # (`_reshape_like`); `split_origin`: slot -> (that reshape, its choice, how many it had),
        # for the next round
        self.split_axes = dict(split_axes or {})
        self.split_origin: dict[int, tuple[str, int, int]] = {}
        self.dirty: dict[int, frozenset] = {}  # slot id -> dirty source nodes (see module docstring)
        self._use_counts = None
        self._counted: set[str] | None = None  # size-read values that count channels (`_counts_only`)
        self.uf = _ChannelUnions()
        self.slots: list[Slot] = []
        self.value_slot: dict[str, int | None] = {}
        self.lazy_pins: dict[tuple[str, int], int] = {}
        self.rules: dict[str, Rule] = {}
        self.graph = nx.MultiDiGraph()
        self.prec_pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self.pinned_nodes: dict[str, str] = {}
        self.pinned_positions: list[int] = []
        self.output_positions: list[int] = []
        self.module_names: dict[str, str] = {}
        self.nodes = {n.name: n for n in gm.graph.nodes}

    # ----- slots ----------------------------------------------------------------------
    def new_slot(self, node: torch.fx.Node, axis: int, role: str) -> int:
        shape = _shape(node)
        size = shape[axis]
        slot = Slot(len(self.slots), node.name, axis, size, self.uf.add(size), role, value_nbytes(node), len(shape))
        self.slots.append(slot)
        self.graph.add_node(slot.label, slot=slot.id, size=size, role=role, bytes=slot.bytes)
        if role == "pinned":
            self.pinned_positions.extend(range(slot.base, slot.base + size))
        return slot.id

    def slot_on(self, node: Any, axis: int) -> int | None:
        """The slot of `node` on `axis`; a free value gets a pinned slot there on demand."""
        if not isinstance(node, torch.fx.Node):
            return None
        shape = _shape(node)
        if shape is None or axis >= len(shape) or axis < 0:
            return None
        sid = self.value_slot.get(node.name)
        if sid is not None:
            return sid if self.slots[sid].axis == axis else None
        if node.op == "get_attr" and node.name not in self.value_slot and _holds_features(node):
            # a buffer is a constant (a mask, a rotary table): it is sliced with channels that
            # learned weights give up, never chosen on its own (`finish`)
            sid = self.new_slot(node, axis, "param" if _is_parameter(self.gm, node) else "buffer")
            self.value_slot[node.name] = sid
            self.rules[node.name] = Rule(node.name, "param", "param", outputs=[sid])
            return sid
        key = (node.name, axis)
        if key not in self.lazy_pins:
            self.lazy_pins[key] = self.new_slot(node, axis, "pinned")
        return self.lazy_pins[key]

    def link(self, a: int, b: int, in_pos: np.ndarray, out_pos: np.ndarray, op: str, how: str) -> None:
        sa, sb = self.slots[a], self.slots[b]
        if a in self.split_origin:
            self.split_origin.setdefault(b, self.split_origin[a])
        self.uf.union_many(sa.base + in_pos, sb.base + out_pos)
        self.graph.add_edge(sa.label, sb.label, op=op, map=how, bytes=sa.bytes)

    # ----- build ----------------------------------------------------------------------
    def walk(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "output":
                self.visit_output(node)
                continue
            if node.op in ("placeholder", "get_attr"):
                continue
            try:
                if node.name in self.forced:
                    raise _Pin(self.forced[node.name])
                self.visit(node)
                self.note_dirty(node)
            except _Pin as pin:
                self.pin(node, str(pin))
                origin = self.split_origin.get(pin.conflict)
                if origin is not None:  # next round: the reshape puts the slot on its next axis
                    self.split_axes[origin[0]] = max(self.split_axes.get(origin[0], 0), origin[1] + 1)
                for sid in pin.hold:
                    slot = self.slots[sid]
                    self.pinned_positions.extend(range(slot.base, slot.base + slot.size))

    def note_dirty(self, node: torch.fx.Node) -> None:
        """Mark the outputs of a channelwise op dirty when it makes or forwards a dirty value."""
        rule = self.rules.get(node.name)
        if rule is None or not _channelwise(rule):
            return
        per_out: dict[int, list] = {out: [] for out in rule.outputs}
        # inputs read for their zeros only (a condition, a divisor, a shape) pass no dirt on
        clean_reads = rule.info.get("clean_reads", ())
        for name, sid, _, _, out in rule.inputs:
            if name not in clean_reads:
                per_out.setdefault(out, []).append(self.dirty.get(sid))
        for out, marks in per_out.items():
            if rule.kind in GATING and any(m is None for m in marks):
                continue  # a zero-preserving factor: the product is zero on removed channels
            sources = frozenset().union(*(m for m in marks if m))
            if rule.info.get("dirty_source") and not sources:
                sources = frozenset({node.name})  # a root: pinning it makes everything after it free
            if sources:
                self.dirty[out] = sources

    def violations(self) -> dict[str, str]:
        """Nodes to pin in another round: sources of dirty values read by anything but a
        channelwise op. (Channel-axis size reads used other than as a reshape size are noted
        on their rule as `constants`, which apply writes in.)"""
        bad: dict[str, str] = {}
        for name, rule in self.rules.items():
            reads = [sid for _, sid in rule.consumed] + [r[1] for r in rule.inputs]
            marks = [self.dirty[sid] for sid in reads if sid in self.dirty]
            if not marks or _channelwise(rule):
                continue
            for source in sorted(frozenset().union(*marks)):
                kind = self.rules[source].kind
                bad.setdefault(source, f"{kind} is not zero-preserving (f(0) != 0) and its value reaches "
                                       f"'{name}', not only a product with a zero-preserving factor")
        for rule in self.rules.values():  # size reads of a channel count (`counts`: value -> slot)
            for value, sid in rule.info.get("counts", {}).items():
                # a count read as a number (``q.size(-1) ** -0.5``, ``math.sqrt(x.shape[-1])``) is
                # the ORIGINAL count there: apply writes that constant in, so nothing is pinned
                numeric = [user.name for user in self.nodes[value].users
                           if not self._is_size_entry(user, self.nodes[value])]
                if numeric:
                    rule.info.setdefault("constants", {})[value] = (self.slots[sid].size, numeric)
        return bad

    def _is_size_entry(self, user: torch.fx.Node, value: torch.fx.Node) -> bool:
        """`value` is the size entry of `user`, a reshape/expand, exactly at its channel axis —
        or integer arithmetic on it (ShuffleNet's ``c // groups``) used only that way: apply
        writes the new count into the entry whatever computed it."""
        if user.op == "call_function" and user.target in _INT_ARITHMETIC and _is_number(user):
            return bool(user.users) and all(self._is_size_entry(u, user) for u in user.users)
        rule = self.rules.get(user.name)
        if rule is not None and rule.category in ("gather", "norm") and rule.kind in ("layer_norm", "rms_norm"):
            # ``F.layer_norm(x, (x.shape[-1],), ...)``: apply writes the width it normalizes
            norm_shape = op_view(self.gm, user).attrs.get("normalized_shape")
            return isinstance(norm_shape, (list, tuple)) and any(e is value for e in norm_shape)
        index = rule.info.get("size_index") if rule is not None and rule.category == "pass" else None
        if rule is not None and rule.category == "free" and rule.kind == "reshape" and user.args:
            # a reshape of a value without channels (a pinned op's output) keeps its full shape:
            # an entry computed from counts alone (``D`` read off the stream) is written as it
            return any(a is value for a in _size_entries(user)) and self._counts_only(value)
        if index is None or not user.args or user.args[0] is value or value in user.kwargs.values():
            return False
        at = [i for i, a in enumerate(_size_entries(user)) if a is value]
        if at == [index]:
            return True
        # another entry computed from channel counts alone (timm's ``C // num_heads`` as the head
        # size): pruning changes only the channel axis, so apply writes that entry's constant
        return bool(at) and index not in at and self._counts_only(value)

    def _counts_only(self, value: Any) -> bool:
        """Whether the number `value` is computed from channel-count reads and constants alone,
        so that it does not vary with the input (a batch or sequence size would)."""
        if self._counted is None:  # the walk is over when size entries are judged
            self._counted = {v for rule in self.rules.values() for v in rule.info.get("counts", ())}
        stack = [value]
        while stack:
            v = stack.pop()
            if not isinstance(v, torch.fx.Node) or v.name in self._counted:
                continue
            if not (v.op == "call_function" and v.target in _INT_ARITHMETIC and _is_number(v)):
                return False
            stack.extend(v.all_input_nodes)
        return True

    def pin(self, node: torch.fx.Node, reason: str) -> None:
        """Inputs read at full width; the output is a free value (its classes cannot die)."""
        self.pinned_nodes[node.name] = reason
        rule = Rule(node.name, "pinned", "pinned", info={"reason": reason})
        for arg in node.all_input_nodes:
            sid = self.value_slot.get(arg.name)
            if sid is not None:
                rule.consumed.append((arg.name, sid))
        self.rules[node.name] = rule
        self.value_slot[node.name] = None

    def visit_output(self, node: torch.fx.Node) -> None:
        rule = Rule(node.name, "output", "pinned", info={"reason": "graph output"})
        for arg in node.all_input_nodes:
            sid = self.value_slot.get(arg.name)
            if sid is not None:
                rule.consumed.append((arg.name, sid))
                s = self.slots[sid]
                self.output_positions.extend(range(s.base, s.base + s.size))
        self.rules[node.name] = rule

    def visit(self, node: torch.fx.Node) -> None:
        if node.name in self.rules:  # a piece of a tuple, handled with the op that made it
            return
        query = size_read(node)
        if query is not None:
            return self.visit_shape_query(node, *query)
        if metadata_read(node) is not None:  # ``h.device``, ``h.dtype``: the same at any width
            self.value_slot[node.name] = None
            self.rules[node.name] = Rule(node.name, "metadata", "free")
            return
        view = op_view(self.gm, node)
        shape = _shape(node)
        inputs = node.all_input_nodes
        # a module with weights and no rule (a GRU), or a region export wraps in a submodule of its
        # own, holds channels fxopt cannot follow: pinned by name
        region = view is None and _wrapped_region(self.gm, node)
        layer = view is None and (region or node.op == "call_module"
                                  and next(self.gm.get_submodule(node.target).parameters(), None) is not None)
        if shape is None and not layer and not any(self.value_slot.get(a.name) is not None for a in inputs) and (
                view is None or not any(_shape(a) is not None for a in inputs)):
            self.value_slot[node.name] = None  # shape arithmetic (``x.size()[:-1] + (n,)``), guards
            return
        if view is None:
            if node.op == "call_module":
                opaque = _opaque_layer(self.gm.get_submodule(node.target))
                if opaque:
                    raise _Pin(opaque)
            if not layer and not any(self.in_slot(a) is not None for a in inputs):
                # no input carries channels (rotary's cos/sin, mask arithmetic): nothing to pin
                return self.free_output(node, view)
            if node.op == "call_module":  # a torch.nn module symbolic capture kept whole (an RNN)
                module = self.gm.get_submodule(node.target)
                # export decomposes most such modules into ops with rules; an RNN stays one op there too
                hint = "" if isinstance(module, torch.nn.RNNBase) else " (mode='export' decomposes it)"
                raise _Pin(f"no channel rule for {type(module).__name__}{hint}")
            if region:
                raise _Pin("a region export keeps as one call of a submodule graph (a torch.no_grad() or "
                           "autocast block); fxopt does not prune inside it (mode='symbolic' traces through it)")
            raise _Pin("no channel rule for this op")
        kind = view.kind
        if view.module is not None or view.params:
            self.module_names[node.name] = _module_name(node, view)
        handler = getattr(self, f"rule_{kind}", None)
        if handler is None:
            if kind in ZERO_PRESERVING or kind in SPATIAL:
                handler = self.rule_unary
            else:
                raise _Pin(f"no channel rule for '{kind}'")
        if shape is None and kind not in TUPLE_RESULTS and kind != "assert_metadata":
            if not any(self.in_slot(a) is not None or a.op == "get_attr" for a in inputs):
                return self.free_output(node, view)  # ``torch.where(topi == e)`` of a router: no channels
            raise _Pin("no shape metadata")
        handler(node, view, shape)

    def visit_shape_query(self, node: torch.fx.Node, src: Any, dim: Any) -> None:
        """``x.size()``, ``x.size(d)``, ``x.shape``: free. A read of the channel count is
        noted (`counts`): as the channel entry of a reshape size apply writes the new count
        there; read as a number (an attention scale) apply writes the original count
        (`violations`)."""
        self.value_slot[node.name] = None
        self.rules[node.name] = Rule(node.name, "size", "free")
        sid = self.in_slot(src)
        if sid is None:
            return
        axis, nd = self.slots[sid].axis, len(_shape(src))
        if dim is not None:
            if not isinstance(dim, int):
                raise _Pin("size query of a computed axis")
            if _norm_axis(dim, nd) == axis:
                self.rules[node.name].info["counts"] = {node.name: sid}
            return
        for user in node.users:  # the whole size: follow how its entries are used
            index = _getitem_index(user)
            if isinstance(index, int):
                if _norm_axis(index, nd) == axis:
                    self.rules[node.name].info.setdefault("counts", {})[user.name] = sid
            elif not (isinstance(index, slice) and axis not in range(nd)[index]):
                raise _Pin("the size of the channel axis is read")

    # ----- helpers for rules ------------------------------------------------------------
    def in_slot(self, node: Any) -> int | None:
        if not isinstance(node, torch.fx.Node):
            return None
        return self.value_slot.get(node.name)

    def passthrough(self, node, view, src: torch.fx.Node, out_axis: int, in_pos=None, out_pos=None,
                    how: str = "identity", category: str = "pass", info: dict | None = None,
                    sid: int | None = None) -> int:
        # `sid`: the input's slot when the caller got it from slot_on (a free value, such as the
        # model input, has only a lazily pinned slot there, not a value_slot entry)
        sid = self.in_slot(src) if sid is None else sid
        out = self.new_slot(node, out_axis, "pass")
        s_in = self.slots[sid]
        if in_pos is None:
            in_pos = out_pos = np.arange(s_in.size)
        self.link(sid, out, in_pos, out_pos, view.kind, how)
        self.value_slot[node.name] = out
        self.rules[node.name] = Rule(node.name, view.kind, category, inputs=[(src.name, sid, in_pos, out_pos, out)],
                                     outputs=[out], info=info or {})
        return out

    def free_output(self, node, view) -> None:
        """All inputs free: the output is free too (no channels to follow)."""
        self.value_slot[node.name] = None
        self.rules[node.name] = Rule(node.name, view.kind if view is not None else str(node.target), "free")

    def single_input(self, node, view) -> tuple[torch.fx.Node | None, int | None]:
        src = next((a for a in view.inputs if not _is_number(a)), None)
        sid = self.in_slot(src)
        if sid is None and isinstance(src, torch.fx.Node) and src.op == "get_attr" and _shape(src) \
                and _holds_features(src) and _is_parameter(self.gm, src):
            # a parameter used directly: its last axis that is not a broadcast one (a class token
            # [1, 1, d] holds d channels, a learned constant [1, c, 1] c); a buffer read by a
            # unary op (``1.0 - mask``) is a constant, free
            shape = _shape(src)
            sid = self.slot_on(src, max((i for i, n in enumerate(shape) if n > 1), default=len(shape) - 1))
        return src, sid

    # ----- rules ------------------------------------------------------------------------
    def rule_unary(self, node, view, shape) -> None:
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        axis = self.slots[sid].axis
        if view.kind in SPATIAL:
            spatial = {"interpolate": len(shape) - 2}.get(view.kind)
            if spatial is None:
                spatial = len(shape) - 2 if len(shape) >= 3 else len(shape) - 1
            if axis >= len(shape) - spatial and view.kind != "interpolate":
                raise _Pin(f"{view.kind} over the channel axis")
            if axis >= len(shape) - spatial:
                raise _Pin("interpolate over the channel axis")
        if view.kind == "hardtanh" and not (view.attrs.get("min_val", -1) <= 0 <= view.attrs.get("max_val", 1)):
            raise _Pin("hardtanh range excludes 0 (not zero-preserving)")
        if shape[axis] != self.slots[sid].size:
            raise _Pin("channel size changed")
        self.passthrough(node, view, src, axis)

    def rule_assert_metadata(self, node, view, shape) -> None:
        """export's `_assert_tensor_metadata` before a cast: free while it checks dtype, device
        and layout only; sizes or strides it asserts would no longer hold after pruning."""
        if view.attrs.get("size") is not None or view.attrs.get("stride") is not None:
            raise _Pin("asserts the sizes or strides of a value")
        self.value_slot[node.name] = None
        self.rules[node.name] = Rule(node.name, view.kind, "free")

    def rule_softmax(self, node, view, shape) -> None:
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        axis = self.slots[sid].axis
        if _norm_axis(int(view.attrs.get("dim", -1)), len(shape)) == axis:
            raise _Pin(f"{view.kind} over the channel axis", conflict=sid)
        # a removed channel's slice is all zeros, whose softmax is uniform (1/n), not zero (its
        # log_softmax -log n): exact only where a clean factor gates it (attention's P @ V), like
        # sigmoid's gate
        self.passthrough(node, view, src, axis, info={"dirty_source": True})

    rule_log_softmax = rule_softmax

    def rule_mean(self, node, view, shape) -> None:
        """A mean, sum or p-norm over axes: zero on removed channels it does not reduce; over
        the channel axis a `channel_reduction`."""
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        out_axis = self._reduced_axis(src, sid, view)
        if out_axis is None:
            return self.channel_reduction(node, view, src, sid)
        self.passthrough(node, view, src, out_axis)

    rule_vector_norm = rule_sum = rule_mean

    def rule_amax(self, node, view, shape) -> None:
        """amax/amin, var/std over other axes: per channel, and 0 over a removed (zero) channel;
        over the channel axis the removed zeros would count (a max of negatives, a variance)."""
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        out_axis = self._reduced_axis(src, sid, view)
        if out_axis is None:
            raise _Pin(f"{view.kind} over the channel axis (the removed zeros would count)", conflict=sid)
        self.passthrough(node, view, src, out_axis)

    rule_amin = rule_var = rule_std = rule_amax

    def rule_var_mean(self, node, view, shape) -> None:
        """(var, mean) or (std, mean) over other axes than the channels: both per channel, and 0
        over a removed (zero) channel; over the channel axis the removed zeros would count."""
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        out_axis = self._reduced_axis(src, sid, view)
        if out_axis is None:
            raise _Pin(f"{view.kind} over the channel axis (the removed zeros would count)", conflict=sid)
        dims = view.attrs.get("dim")
        reduced = _norm_axes(dims, len(_shape(src)))[0] if dims not in (None, []) else None
        self._tuple_pieces(node, view, src, sid, reduced, out_axis, 2)

    rule_std_mean = rule_var_mean

    def rule_adaptive_max_pool(self, node, view, shape) -> None:
        """Each channel's maximum over windows of its own (0 over a removed, all-zero channel);
        ATen's op and `return_indices=True` give (values, indices), both per channel."""
        if shape is not None:
            return self.rule_unary(node, view, shape)
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        in_shape, axis = _shape(src), self.slots[sid].axis
        size = view.attrs.get("output_size")
        spatial = len(size) if isinstance(size, (list, tuple)) else max(len(in_shape) - 2, 1)
        if axis >= len(in_shape) - spatial:
            raise _Pin(f"{view.kind} over the channel axis")
        self._tuple_pieces(node, view, src, sid, len(in_shape) - 1, axis, 2)

    def rule_repeat_interleave(self, node, view, shape) -> None:
        """Copies of each channel: after ``repeat_interleave(x, r, dim)`` over the channel axis,
        channel j is x's channel j // r (GQA's key/value heads, each shared by r query heads);
        after ``x.repeat(...)`` tiling it r times, x's channel j % c. A channel and its copies
        are one class: removing it removes them all, and the op needs no rewrite."""
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        in_shape, axis = _shape(src), self.slots[sid].axis
        if view.kind == "repeat":
            counts = list(view.attrs.get("repeats") or ())
            out_axis = axis + len(counts) - len(in_shape)
            r, copies = counts[out_axis], np.tile
        else:
            dim = view.attrs.get("dim")
            if dim is None:
                raise _Pin("repeat_interleave of the flattened value")
            if _norm_axis(int(dim), len(in_shape)) != axis:
                return self.passthrough(node, view, src, axis)
            out_axis, r, copies = axis, view.attrs.get("repeats"), np.repeat
        if isinstance(r, bool) or not isinstance(r, int) or shape[out_axis] != r * in_shape[axis]:
            raise _Pin(f"{view.kind} count of the channel axis computed in the graph")
        c = in_shape[axis]
        self.passthrough(node, view, src, out_axis, copies(np.arange(c), r), np.arange(c * r), how=f"copies x{r}")

    rule_repeat = rule_repeat_interleave

    def _reduced_axis(self, src, sid: int, view) -> int | None:
        """Where the channel axis lands after reducing `view.attrs["dim"]` (None: every axis)
        with `keepdim`; None when the channel axis is one of those reduced."""
        in_shape = _shape(src)
        axis = self.slots[sid].axis
        dims = view.attrs.get("dim")
        dims = list(range(len(in_shape))) if dims is None or dims == [] else _norm_axes(dims, len(in_shape))
        if axis in dims:
            return None
        return axis if view.attrs.get("keepdim", False) else axis - sum(d < axis for d in dims)

    def rule_normalize(self, node, view, shape) -> None:
        """F.normalize: x / max(‖x‖_p, eps) over `dim`. A removed channel is 0 / (something
        positive); over the channel axis its zeros add nothing to a p-norm of order ≥ 0, so the
        kept channels' norm is the original one — if the input is clean there."""
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        p = view.attrs.get("p", 2.0)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not p >= 0:
            raise _Pin(f"normalize with p={p!r}")
        axis = self.slots[sid].axis
        over_channels = _norm_axis(int(view.attrs.get("dim", 1)), len(shape)) == axis
        self.passthrough(node, view, src, axis, info={"mixes_channels": True} if over_channels else None)

    def channel_reduction(self, node, view, src, sid: int) -> None:
        """A mean or p-norm over the channel axis (a spelled-out RMSNorm's
        ``x.pow(2).mean(-1, keepdim=True)``): the removed channels are zero, so they add nothing
        to the sum, and the reduction of the narrower value is exact once a mean is divided by
        the original count (apply rescales it). The value it reads must be clean, so it is a
        read that `violations` checks; its result holds no channels."""
        if view.kind == "vector_norm":
            order = view.attrs.get("ord", view.attrs.get("p", 2))
            order = 2 if order == "fro" else order
            if isinstance(order, bool) or not isinstance(order, (int, float)) or not order >= 0:
                raise _Pin(f"vector_norm of order {order!r} over the channel axis (zero channels change it)")
        self.value_slot[node.name] = None
        self.rules[node.name] = Rule(node.name, view.kind, "reduce", inputs=[(src.name, sid, None, None, None)])

    def rule_batch_norm(self, node, view, shape) -> None:
        src, sid = self.single_input(node, view)
        if sid is None:
            raise _Pin("batch_norm on a value without channel tracking")
        if self.slots[sid].axis != 1:
            raise _Pin("batch_norm input channel axis is not 1")
        if view.attrs.get("training"):
            if view.param("running_mean") is None:  # nothing else to normalize with
                raise _Pin("batch_norm without running statistics (track_running_stats=False) normalizes "
                           "with each batch's statistics")
            raise _Pin("batch_norm in training mode")
        if view.param("weight") is None:  # a removed channel would leave -mean/std, not zero
            raise _Pin("batch_norm without an affine weight (a removed channel is not zero after it)")
        self.passthrough(node, view, src, 1, category="norm")

    def rule_instance_norm(self, node, view, shape) -> None:
        """Per sample and channel statistics: a removed (zero) channel normalizes to 0, then
        its affine bias (removed with it). With running statistics it is a batch_norm."""
        if not view.attrs.get("use_input_stats", True):
            return self.rule_batch_norm(node, view, shape)
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        if self.slots[sid].axis != 1:
            raise _Pin("instance_norm input channel axis is not 1")
        self.passthrough(node, view, src, 1, category="norm")

    def rule_conv(self, node, view, shape) -> None:
        src = view.input
        w = view.param("weight")
        if w is None:
            raise _Pin("conv weight is not a parameter" + _COMPUTED)
        if isinstance(view.attrs.get("bias"), torch.fx.Node):
            raise _Pin("conv bias is computed in the graph (not a parameter to slice)")
        transposed = bool(view.attrs.get("transposed"))
        groups = view.attrs.get("groups", 1) or 1
        if not isinstance(groups, int):  # `groups=x.shape[1]` (BlurPool): a count read in the graph
            raise _Pin("conv whose groups are computed in the graph")
        if transposed and groups > 1:
            raise _Pin("grouped transposed conv (no rule yet)")
        in_shape = _shape(src)
        cin, cout = in_shape[1], shape[1]
        cig = cin // groups
        held = self.in_slot(src)
        if held is not None and self.slots[held].axis != 1:  # channels on a length axis (token mixing)
            raise _Pin("conv over a value whose channels are not on axis 1")
        sid = self.slot_on(src, 1)
        if not transposed and groups > 1 and cig == 1:  # depthwise (channel multiplier m = cout // cin)
            if sid is None:
                raise _Pin("depthwise conv input has no channel axis to follow")
            m = cout // cin
            in_pos = np.repeat(np.arange(cin), m)
            out_pos = np.arange(cout)
            self.passthrough(node, view, src, 1, in_pos, out_pos, how=f"depthwise x{m}", category="norm",
                             info={"depthwise": True, "multiplier": m}, sid=sid)
            return
        out = self.new_slot(node, 1, "producer")
        rule = Rule(node.name, "conv_transpose" if transposed else "conv", "producer", outputs=[out],
                    info={"groups": groups})
        if groups > 1:  # position r of every group is one class, so groups stay the same size
            cog = cout // groups
            pos = np.arange(cout)
            self.uf.union_many(self.slots[out].base + pos, self.slots[out].base + (pos % cog))
            if sid is not None:
                ipos = np.arange(cin)
                base = self.slots[sid].base
                self.uf.union_many(base + ipos, base + (ipos % cig))
        if sid is not None:
            rule.consumed.append((src.name, sid))
            self.graph.add_edge(self.slots[sid].label, self.slots[out].label, op="conv", map="consumes",
                                bytes=self.slots[sid].bytes)
        self.value_slot[node.name] = out
        self.rules[node.name] = rule

    def rule_linear(self, node, view, shape) -> None:
        if view.param("weight") is None:
            weight = view.attrs.get("weight")
            if isinstance(weight, torch.fx.Node) and transposed_parameter(self.gm, weight) is not None:
                raise _Pin("linear weight is a transposed parameter (F.linear(x, W.t())): write it x @ W, "
                           "which prunes as a layer")
            raise _Pin("linear weight is not a parameter" + _COMPUTED)
        if isinstance(view.attrs.get("bias"), torch.fx.Node):  # Swin-V2's cat(q_bias, 0, v_bias)
            raise _Pin("linear bias is computed in the graph (not a parameter to slice)")
        self._dense_producer(node, view, shape, view.input)

    def rule_addmm(self, node, view, shape) -> None:
        """``addmm(b, x, W)``: a linear layer with W stored [in, out] (GPT-2's Conv1D)."""
        layout = WEIGHT_LAYOUTS["addmm"]
        w = param_arg(self.gm, view, layout.weight)
        if w is None or w.get() is None:
            raise _Pin("addmm weight is not a parameter" + _COMPUTED)
        bias = view.attrs.get(layout.bias)
        if isinstance(bias, torch.fx.Node) and layout.bias not in view.params:
            raise _Pin("addmm bias is not a parameter")
        b = view.param(layout.bias)
        if b is not None and tuple(b.shape) != (shape[-1],):
            raise _Pin("addmm bias is not one value per output channel")
        self._check_private(node, w)
        self._dense_producer(node, view, shape, view.input)

    def _matmul_weight(self, view) -> ParamRef | None:
        """W of ``x @ W`` when W is a 2-D floating-point parameter (a `get_attr`), else None."""
        ref = param_arg(self.gm, view, WEIGHT_LAYOUTS["matmul"].weight)
        w = ref.get() if ref is not None else None
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
            return None
        return ref

    def _check_private(self, node: torch.fx.Node, ref: ParamRef, what: str = "weight") -> None:
        if self._use_counts is None:  # one graph walk for every layer asked about
            self._use_counts = attribute_use_counts(self.gm)
        if is_shared(self.gm, node, {what: ref}, self._use_counts):
            raise _Pin(f"{what} '{ref.qualname}' is shared with another op")

    def _dense_producer(self, node, view, shape, src) -> None:
        """A producer over the last axis (linear, addmm, ``x @ W``): output channels are the
        last axis of `node`, input channels (consumed) the last axis of `src`."""
        in_shape = _shape(src)
        if in_shape is None:
            raise _Pin("no shape metadata")
        sid_any = self.in_slot(src)
        if sid_any is not None and self.slots[sid_any].axis != len(in_shape) - 1:
            if view.kind == "addmm":
                raise _Pin(f"{view.kind} over a value whose channel axis is not the last")
            # a layer over another axis (gMLP's and MLP-Mixer's token mixing) maps each channel's
            # row on its own: the identity on the channels, a removed one becoming the bias
            self._channelwise(node, view, shape, dirty=view.param("bias") is not None)
            self.rules[node.name].info["channelwise"] = True
            return
        sid = self.slot_on(src, len(in_shape) - 1)
        out = self.new_slot(node, len(shape) - 1, "producer")
        rule = Rule(node.name, view.kind, "producer", outputs=[out])
        if sid is not None:
            rule.consumed.append((src.name, sid))
            self.graph.add_edge(self.slots[sid].label, self.slots[out].label, op=view.kind, map="consumes",
                                bytes=self.slots[sid].bytes)
        self.module_names[node.name] = _module_name(node, view, producer_weights(self.gm, node, rule).weight)
        self.value_slot[node.name] = out
        self.rules[node.name] = rule

    def rule_embedding(self, node, view, shape) -> None:
        if view.param("weight") is None:
            raise _Pin("embedding weight is not a parameter" + _COMPUTED)
        if self.in_slot(view.input) is not None:  # each index is a row to look up, not a channel
            raise _Pin("embedding indices carry channels")
        out = self.new_slot(node, len(shape) - 1, "producer")
        self.value_slot[node.name] = out
        self.rules[node.name] = Rule(node.name, "embedding", "producer", outputs=[out])

    def _aligned_inputs(self, node, view, shape, allow_broadcast: bool):
        """(input node, slot) per tensor input aligned on the output channel axis; a number
        computed in the graph (``math.sqrt(q.size(-1))``) is a scalar operand."""
        tensor_inputs = [a for a in view.inputs if not _is_number(a)]
        slotted = [(a, self.in_slot(a)) for a in tensor_inputs if self.in_slot(a) is not None]
        if not slotted:
            return None, []
        ref_node, ref_sid = slotted[0]
        out_axis = self.slots[ref_sid].axis + (len(shape) - len(_shape(ref_node)))
        c = shape[out_axis]
        pairs, broadcast = [], []
        for a in tensor_inputs:
            a_shape = _shape(a)
            if a_shape is None:
                raise _Pin(f"input {a.name} has no shape")
            a_axis = out_axis - (len(shape) - len(a_shape))
            own = self.in_slot(a)
            if a_axis < 0 or a_shape[a_axis] == 1 and not (c == 1 and own is not None and self.slots[own].axis == a_axis):
                # (a value with one channel, say pruned down to one, is that channel, not a broadcast)
                if not allow_broadcast:
                    raise _Pin(f"input {a.name} broadcasts over the channel axis")
                if own is not None and self.slots[own].axis != a_axis:
                    # its channels sit on an axis the output does not track: pruning them
                    # would break the broadcast (a gate over the positions times a feature map)
                    raise _Pin(f"input {a.name} carries channels on another axis than the output's")
                broadcast.append(a)
                continue
            if a_shape[a_axis] != c:
                raise _Pin("channel sizes differ")
            sid = self.slot_on(a, a_axis)
            if sid is None:
                raise _Pin(f"input {a.name} tracks channels on another axis")
            pairs.append((a, sid))
        return out_axis, pairs

    def rule_add(self, node, view, shape) -> None:
        constants = [v for k, v in view.attrs.items()
                     if k in ("input", "other") and v is not None and not isinstance(v, torch.fx.Node)]
        constants += [math.nan for a in view.inputs if _is_number(a)]  # a number only the run knows
        if constants:
            # x + c: channelwise but not zero-preserving — a dirty value (see `note_dirty`)
            if len(view.inputs) - sum(map(_is_number, view.inputs)) != 1 \
                    or not all(isinstance(v, (int, float)) for v in constants):
                raise _Pin("adds a constant (not zero-preserving)")
            return self._channelwise(node, view, shape, dirty=any(v != 0 for v in constants))
        out_axis, pairs = self._aligned_inputs(node, view, shape, allow_broadcast=True)
        if out_axis is None:
            return self.free_output(node, view)
        spread = [a for a in view.inputs if not _is_number(a) and all(a is not p for p, _ in pairs)]
        if spread:
            # a value without channels spread over them (an additive attention mask over the
            # heads): like x + c, per channel and dirty
            if len(pairs) != 1 or any(self.in_slot(a) is not None for a in spread):
                raise _Pin(f"input {spread[0].name} broadcasts over the channel axis")
            return self._aligned_op(node, view, shape, out_axis, pairs, {"dirty_source": True})
        out = self.new_slot(node, out_axis, "junction")
        rule = Rule(node.name, view.kind, "junction", outputs=[out])
        pos = np.arange(shape[out_axis])
        for a, sid in pairs:
            self._junction_input(rule, a.name, sid, pos, pos, out)
        self.value_slot[node.name] = out
        self.rules[node.name] = rule

    rule_sub = rule_add

    def _junction_input(self, rule: Rule, name: str, sid: int, in_pos: np.ndarray, out_pos: np.ndarray,
                        out: int) -> None:
        """Input `name` of a junction: output channel out_pos[k] dead requires its in_pos[k] dead."""
        rule.inputs.append((name, sid, in_pos, out_pos, out))
        self.prec_pairs.append((self.slots[out].base + out_pos, self.slots[sid].base + in_pos))
        self.graph.add_edge(self.slots[sid].label, self.slots[out].label, op=rule.kind, map="junction",
                            bytes=self.slots[sid].bytes)

    def _channelwise(self, node, view, shape, dirty: bool) -> None:
        """A pointwise op of one tensor: the identity map; `dirty` when f(0) != 0."""
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        axis = self.slots[sid].axis + len(shape) - len(_shape(src))
        if axis < 0 or shape[axis] != self.slots[sid].size:
            raise _Pin("channel size changed")
        self.passthrough(node, view, src, axis, info={"dirty_source": True} if dirty else None)

    def rule_sigmoid(self, node, view, shape) -> None:
        self._channelwise(node, view, shape, dirty=True)

    rule_hardsigmoid = rule_sigmoid  # hardsigmoid(0) = 0.5: dirty, like sigmoid (MobileNetV3's SE gate)
    rule_softplus = rule_exp = rule_cos = rule_sigmoid  # softplus(0) = log 2, exp(0) = cos(0) = 1

    def rule_rsqrt(self, node, view, shape) -> None:
        """rsqrt/reciprocal: infinite at 0, so only of a value that is positive everywhere
        (``rsqrt(var + eps)``); then finite, and dirty."""
        self._finite_if_positive(node, view, shape, view.kind)

    rule_reciprocal = rule_rsqrt

    def _finite_if_positive(self, node, view, shape, what: str) -> None:
        """An op infinite at 0 (rsqrt, a negative power): of a value known positive it is a
        finite, dirty channelwise op; else pinned, and its input's channels all stay (zeros
        re-expanded into it would give inf)."""
        if _sign(self.gm, view.input) == "pos":
            return self._channelwise(node, view, shape, dirty=True)
        sid = self.in_slot(view.input)
        raise _Pin(f"{what} of a value that may be 0 (its channels all stay)", hold=() if sid is None else (sid,))

    def rule_clamp(self, node, view, shape) -> None:
        """clamp/clip: zero-preserving when its range holds 0 (`clamp(min=0)` is a relu), else dirty."""
        low, high = view.attrs.get("min"), view.attrs.get("max")
        if isinstance(low, torch.fx.Node) or isinstance(high, torch.fx.Node):
            raise _Pin("clamp with tensor bounds")
        holds_zero = (low is None or low <= 0) and (high is None or high >= 0)
        self._channelwise(node, view, shape, dirty=not holds_zero)

    def rule_flip(self, node, view, shape) -> None:
        """flip: along the channel axis output channel j is input channel c - 1 - j (the kept
        ones flip into the same order), along other axes the identity."""
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        axis, size = self.slots[sid].axis, self.slots[sid].size
        if axis not in _norm_axes(view.attrs.get("dims", ()), len(shape)):
            return self.passthrough(node, view, src, axis)
        self.passthrough(node, view, src, axis, np.arange(size)[::-1].copy(), np.arange(size), how="reversed")

    def rule_prelu(self, node, view, shape) -> None:
        """A slope per channel (axis 1) is sliced with them, like a batchnorm's affine; one
        slope for all is a zero-preserving activation."""
        weight = view.param("weight")
        if weight is None:
            raise _Pin("prelu slope is not a parameter")
        if weight.numel() == 1:
            return self._channelwise(node, view, shape, dirty=False)
        src, sid = self.single_input(node, view)
        if sid is None or self.slots[sid].axis != 1 or len(shape) < 2:
            raise _Pin("prelu with a slope per channel on a value whose channels are not axis 1")
        self.passthrough(node, view, src, 1, category="norm")

    def rule_pixel_shuffle(self, node, view, shape) -> None:
        """Output channel c is made of input channels c·r² … c·r² + r² − 1: a block of r² goes
        (or stays) together, so the factor keeps holding."""
        self._pixel_blocks(node, view, shape, int(view.attrs["upscale_factor"]) ** 2, shuffle=True)

    def rule_pixel_unshuffle(self, node, view, shape) -> None:
        """Input channel c becomes output channels c·r² … c·r² + r² − 1."""
        self._pixel_blocks(node, view, shape, int(view.attrs["downscale_factor"]) ** 2, shuffle=False)

    def _pixel_blocks(self, node, view, shape, block: int, shuffle: bool) -> None:
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        axis = self.slots[sid].axis
        if axis != len(shape) - 3:
            raise _Pin(f"{view.kind} of a value whose channels are not its channel axis")
        wide = np.arange(self.slots[sid].size if shuffle else shape[axis])
        in_pos, out_pos = (wide, wide // block) if shuffle else (wide // block, wide)
        self.passthrough(node, view, src, axis, in_pos, out_pos, how=f"blocks of {block}")

    def rule_roll(self, node, view, shape) -> None:
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        dims = view.attrs.get("dims")
        axes = _norm_axes(dims, len(shape)) if dims is not None else []
        if not axes:
            raise _Pin("roll of the flattened tensor")
        axis = self.slots[sid].axis
        if axis in axes:
            raise _Pin("roll of the channel axis")
        self.passthrough(node, view, src, axis)

    def rule_cumsum(self, node, view, shape) -> None:
        """A running sum or product along another axis than the channels acts on each channel
        on its own, and a zero channel stays zero."""
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        if _norm_axis(int(view.attrs.get("dim")), len(shape)) == self.slots[sid].axis:
            raise _Pin(f"{view.kind} along the channel axis")
        self.passthrough(node, view, src, self.slots[sid].axis)

    rule_cumprod = rule_cumsum

    def rule_pow(self, node, view, shape) -> None:
        exponent = view.attrs.get("exponent")
        if isinstance(exponent, bool) or not isinstance(exponent, (int, float)) or len(view.inputs) != 1:
            raise _Pin("pow with a tensor exponent or base")
        if not exponent > 0:  # (var + eps) ** -0.5
            return self._finite_if_positive(node, view, shape, "pow with an exponent <= 0")
        self._channelwise(node, view, shape, dirty=False)

    def rule_mul(self, node, view, shape) -> None:
        out_axis, pairs = self._aligned_inputs(node, view, shape, allow_broadcast=True)
        if out_axis is None:
            return self.free_output(node, view)
        info = {}
        if view.kind == "div":
            args = self.named_args(node)
            divisor = args.get("other")
            held = [sid for a, sid in pairs if a is divisor and self.slots[sid].role != "pinned"]
            if held:
                # a removed channel divides 0 by the divisor there: 0 only if that is not 0
                if _sign(self.gm, divisor) != "pos":
                    raise _Pin("division by a channel tensor that may be 0 (its channels all stay)",
                               hold=tuple(held))
                numerator = args.get("input")
                if any(a is numerator for a, _ in pairs) and numerator is not divisor:
                    info["clean_reads"] = {divisor.name}  # 0 / d is 0 whatever d is
                else:  # a number or a broadcast value over d: n / d on a removed channel, not 0
                    info["dirty_source"] = True
        self._aligned_op(node, view, shape, out_axis, pairs, info)

    rule_div = rule_mul

    def named_args(self, node: torch.fx.Node) -> dict[str, Any]:
        """A call's arguments under the op table's canonical names (tensors included)."""
        return bind_arguments(node, spec_for(self.gm, node))

    def _aligned_op(self, node, view, shape, out_axis: int, pairs, info: dict | None = None) -> None:
        """An output slot whose channel c is channel c of every aligned input (`pairs`)."""
        out = self.new_slot(node, out_axis, "pass")
        rule = Rule(node.name, view.kind, "pass", outputs=[out], info=info or {})
        pos = np.arange(shape[out_axis])
        for a, sid in pairs:
            rule.inputs.append((a.name, sid, pos, pos, out))
            self.link(sid, out, pos, pos, view.kind, "identity")
        self.value_slot[node.name] = out
        self.rules[node.name] = rule

    def rule_where(self, node, view, shape) -> None:
        """where(cond, a, b): channel c of the output is channel c of a or b, so it is zero on a
        removed channel when both are (a clean input, or the number 0), whatever the condition."""
        args = self.named_args(node)
        if args.get("input") is None or args.get("other") is None:
            raise _Pin("where with one argument (a tuple of indices)")
        self._selecting(node, view, shape, (args["input"], args["other"]), args.get("condition"))

    def rule_masked_fill(self, node, view, shape) -> None:
        """masked_fill(x, mask, v): x where the mask is false, v where true."""
        args = self.named_args(node)
        self._selecting(node, view, shape, (args.get("input"), args.get("value")), args.get("mask"))

    def _selecting(self, node, view, shape, branches, condition) -> None:
        out_axis, pairs = self._aligned_inputs(node, view, shape, allow_broadcast=True)
        if out_axis is None:
            return self.free_output(node, view)
        aligned = {a for a, _ in pairs}
        clean = all((b in aligned) if isinstance(b, torch.fx.Node) else b == 0 for b in branches)
        info = {"clean_reads": {condition.name}} if isinstance(condition, torch.fx.Node) else {}
        if not clean:
            info["dirty_source"] = True
        self._aligned_op(node, view, shape, out_axis, pairs, info)

    def rule_gt(self, node, view, shape) -> None:
        """A comparison: per channel, and on a removed channel ``op(0, other)`` (a bool tensor)."""
        out_axis, pairs = self._aligned_inputs(node, view, shape, allow_broadcast=True)
        if out_axis is None:
            return self.free_output(node, view)
        aligned = {a for a, _ in pairs}
        args = self.named_args(node)
        at_removed = [0 if v in aligned else None if isinstance(v, torch.fx.Node) else v
                      for v in (args.get("input"), args.get("other"))]
        dirty = None in at_removed or bool(getattr(operator, view.kind)(*at_removed))
        self._aligned_op(node, view, shape, out_axis, pairs, {"dirty_source": True} if dirty else None)

    rule_ge = rule_lt = rule_le = rule_eq = rule_ne = rule_gt

    def rule_fill_like(self, node, view, shape) -> None:
        """zeros_like / ones_like / full_like: the input's shape (its channels shrink with it),
        none of its values."""
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        fill = view.attrs.get("fill_value", 0)
        info = {"clean_reads": {src.name}}
        if isinstance(fill, torch.fx.Node) or fill != 0:
            info["dirty_source"] = True
        self.passthrough(node, view, src, self.slots[sid].axis, info=info)

    def rule_new_fill(self, node, view, shape) -> None:
        """``x.new_zeros(sizes)`` (a mask, a pad): reads only x's dtype and device. Sizes read
        off x's channel count are size queries, judged where they are read."""
        self.free_output(node, view)

    def rule_glu(self, node, view, shape) -> None:
        """``glu(x, dim) = a * sigmoid(b)`` with ``a, b`` the halves of ``x`` along `dim`: over the
        channel axis, output channel c is input channels c and c + n/2 together (the halves keep
        the same positions, so the pruned input still splits in two); over another axis a unary."""
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        axis, in_shape = self.slots[sid].axis, _shape(src)
        if _norm_axis(int(view.attrs.get("dim", -1)), len(in_shape)) != axis:
            return self.passthrough(node, view, src, axis)
        pos = np.arange(shape[axis])
        # the gated half and its gate map to the same output channel: one entry reads both
        self.passthrough(node, view, src, axis, np.concatenate([pos, pos + len(pos)]), np.concatenate([pos, pos]),
                         how="halves")

    def rule_cat(self, node, view, shape) -> None:
        tensors = [a for a in view.inputs]
        dim = _norm_axis(int(view.attrs.get("dim", 0)), len(shape))
        slotted = [(a, self.in_slot(a)) for a in tensors if self.in_slot(a) is not None]
        if not slotted:
            return self.free_output(node, view)
        axis = self.slots[slotted[0][1]].axis
        out = self.new_slot(node, axis, "pass")
        rule = Rule(node.name, "cat", "pass", outputs=[out], info={"dim": dim})
        offset = 0
        for a in tensors:
            a_shape = _shape(a)
            sid = self.slot_on(a, axis)
            if sid is None:
                raise _Pin(f"cat input {a.name} tracks channels on another axis")
            n = a_shape[axis]
            in_pos = np.arange(n)
            out_pos = in_pos + offset if dim == axis else in_pos
            rule.inputs.append((a.name, sid, in_pos, out_pos, out))
            self.link(sid, out, in_pos, out_pos, "cat", f"offset {offset}" if dim == axis else "identity")
            if dim == axis:
                offset += n
        self.value_slot[node.name] = out
        self.rules[node.name] = rule

    def _along(self, node, view):
        """(input, its slot, its shape, its channel axis, the op's `dim`) of an op that cuts its
        one input along `dim` (split, chunk, unbind); None when the input carries no channels."""
        src, sid = self.single_input(node, view)
        if sid is None:
            return None
        in_shape = _shape(src)
        return src, sid, in_shape, self.slots[sid].axis, _norm_axis(int(view.attrs.get("dim", 0)), len(in_shape))

    def rule_split(self, node, view, shape) -> None:
        along = self._along(node, view)
        if along is None:
            return self.free_output(node, view)
        src, sid, in_shape, axis, dim = along
        n = in_shape[dim]
        if view.kind == "chunk":
            chunks = int(view.attrs.get("chunks"))
            step = -(-n // chunks)
            sizes = [min(step, n - i) for i in range(0, n, step)]
        else:
            spec = view.attrs.get("split_size", view.attrs.get("split_sizes"))
            if isinstance(spec, torch.fx.Node) or (isinstance(spec, (list, tuple))
                                                   and any(isinstance(v, torch.fx.Node) for v in spec)):
                sizes = _piece_sizes(node, dim, n)  # computed in the graph (``x.split(x.shape[-1])``)
            else:
                sizes = list(spec) if isinstance(spec, (list, tuple)) \
                    else [min(int(spec), n - i) for i in range(0, n, int(spec))]
        starts = np.cumsum([0] + sizes[:-1])
        rule = Rule(node.name, view.kind, "split", info={"dim": dim, "sizes": sizes, "pieces": {}})
        for user in node.users:
            uview = op_view(self.gm, user)
            if uview is None or uview.kind != "getitem" or not isinstance(uview.attrs.get("index"), int):
                raise _Pin("split result used other than by getitem")
            i = uview.attrs["index"]
            if dim == axis:
                in_pos, out_pos = np.arange(sizes[i]) + starts[i], np.arange(sizes[i])
            else:
                in_pos = out_pos = np.arange(in_shape[axis])
            self._piece(rule, src, sid, user, i, axis, in_pos, out_pos)
        self.value_slot[node.name] = None
        self.rules[node.name] = rule

    rule_chunk = rule_split

    def rule_stack(self, node, view, shape) -> None:
        """stack along a new axis: channel c of every input is channel c of the output."""
        slotted = [(a, self.in_slot(a)) for a in view.inputs if self.in_slot(a) is not None]
        if not slotted:
            return self.free_output(node, view)
        axis = self.slots[slotted[0][1]].axis
        dim = _norm_axis(int(view.attrs.get("dim", 0)), len(shape))
        pairs = []
        for a in view.inputs:
            sid = self.slot_on(a, axis)
            if sid is None:
                raise _Pin(f"stack input {a.name} tracks channels on another axis")
            pairs.append((a, sid))
        self._aligned_op(node, view, shape, axis + (dim <= axis), pairs)

    def rule_unbind(self, node, view, shape) -> None:
        """unbind of another axis than the channels: every piece keeps them (like split's)."""
        along = self._along(node, view)
        if along is None:
            return self.free_output(node, view)
        src, sid, in_shape, axis, dim = along
        if dim == axis:
            raise _Pin("unbind of the channel axis", conflict=sid)
        self._tuple_pieces(node, view, src, sid, dim, axis - (dim < axis), in_shape[dim])

    def _tuple_pieces(self, node, view, src, sid: int, dim: int, out_axis: int, count: int) -> None:
        """A tuple of values that all keep `src`'s channels (on `out_axis`): a slot for each
        piece taken out of it (like a split's along another axis than the channels)."""
        if not all(isinstance(_piece_index(user), int) for user in node.users):
            raise _Pin(f"{view.kind} result used other than by taking its pieces")
        rule = Rule(node.name, view.kind, "split", info={"dim": dim, "sizes": [1] * count, "pieces": {}})
        pos = np.arange(self.slots[sid].size)
        for user in node.users:
            self._piece(rule, src, sid, user, _piece_index(user), out_axis, pos, pos)
        self.value_slot[node.name] = None
        self.rules[node.name] = rule

    def _piece(self, rule: Rule, src, sid: int, user, index: int, axis: int, in_pos, out_pos) -> None:
        """Piece `index` of a split-like op, taken by `user`: a slot on `axis` whose channel
        out_pos[k] is the input's in_pos[k]."""
        out = self.new_slot(user, axis, "pass")
        rule.inputs.append((src.name, sid, in_pos, out_pos, out))
        rule.info["pieces"][user.name] = index
        self.link(sid, out, in_pos, out_pos, rule.kind, f"piece {index}")
        self.value_slot[user.name] = out
        self.rules[user.name] = Rule(user.name, "getitem", "split-piece", outputs=[out])

    def rule_max(self, node, view, shape) -> None:
        """max/min of two tensors: elementwise, 0 on a removed channel where both are 0. Over
        another axis than the channels: (values, indices), both per channel (the max of a
        removed, all-zero channel is 0); over the channel axis the removed zeros would count."""
        args = self.named_args(node)
        other = args.get("other", args.get("dim"))
        if isinstance(other, torch.fx.Node) and not _is_number(other):
            return self._selecting(node, view, shape, (args.get("input"), other), None)
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        in_shape, axis, dim = _shape(src), self.slots[sid].axis, args.get("dim")
        if not isinstance(dim, int) or _norm_axis(dim, len(in_shape)) == axis:
            raise _Pin(f"{view.kind} over the channel axis (the removed zeros would count)", conflict=sid)
        dim = _norm_axis(dim, len(in_shape))
        out_axis = axis if args.get("keepdim") else axis - (dim < axis)
        self._tuple_pieces(node, view, src, sid, dim, out_axis, 2)

    rule_min = rule_max

    def rule_maximum(self, node, view, shape) -> None:
        args = self.named_args(node)
        self._selecting(node, view, shape, (args.get("input"), args.get("other")), None)

    rule_minimum = rule_maximum

    def rule_einsum(self, node, view, shape) -> None:
        """einsum: every operand with the channel axis's index letter is aligned on it, as in
        a product; a contraction of it between two operands that both carry it links them
        (`_contracted_einsum`), other contractions are pinned."""
        equation = str(view.attrs.get("equation", "")).replace(" ", "")
        operands = view.inputs
        if "." in equation or len(operands) != len(equation.split("->")[0].split(",")):
            raise _Pin("einsum with an ellipsis or non-tensor operands")
        lhs, _, rhs = equation.partition("->")
        terms = lhs.split(",")
        if "->" not in equation:  # implicit output: the letters used once, in order
            rhs = "".join(sorted(c for c in set(lhs) if c.isalpha() and lhs.count(c) == 1))
        letters = {terms[i][self.slots[sid].axis] for i, a in enumerate(operands)
                   if (sid := self.in_slot(a)) is not None}
        if not letters:
            return self.free_output(node, view)
        if len(letters) > 1:
            raise _Pin("einsum operands carry channels on different indices")
        letter = letters.pop()
        if letter not in rhs:
            return self._contracted_einsum(node, operands, terms, letter)
        pairs = []
        for a, term in zip(operands, terms):
            if term.count(letter) > 1:
                raise _Pin("einsum takes a diagonal of the channel axis")
            at = term.find(letter)
            if at < 0 or _shape(a)[at] == 1:
                if at < 0 and self.in_slot(a) is not None:
                    raise _Pin(f"einsum operand {a.name} carries channels on an index the output drops")
                continue  # broadcast over the channels
            sid = self.slot_on(a, at)
            if sid is None:
                raise _Pin(f"einsum operand {a.name} tracks channels on another axis")
            pairs.append((a, sid))
        self._aligned_op(node, view, shape, rhs.index(letter), pairs)

    def _contracted_einsum(self, node, operands, terms, letter: str) -> None:
        """``einsum("bnd,bmd->bnm", q, k)``: two operands whose channels are the contracted
        letter, as `_contracted_matmul`."""
        tracked = [(a, self.in_slot(a)) for a, term in zip(operands, terms) if letter in term]
        if len(operands) != 2 or len(tracked) != 2 or any(sid is None for _, sid in tracked):
            raise _Pin("einsum contracts the channel axis")
        (a, sa), (b, sb) = tracked
        self._contracted_matmul(node, a, sa, b, sb)

    def rule_getitem(self, node, view, shape) -> None:
        """``x[...]`` with ints, slices, None, one Ellipsis and index tensors or lists (advanced
        indexing, ``xf[tok]`` of a sparse MoE): the channel axis follows (`_indexed_axis`); a
        slice of the channel axis itself is an index map (`_slice_channels`), an int or an index
        tensor on it is pinned."""
        if node.name in self.rules:  # a split piece, handled by the split
            return
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        index = view.attrs.get("index")
        if isinstance(index, list) and any(isinstance(i, (list, tuple, slice)) or i is None or i is Ellipsis
                                           for i in index):
            raise _Pin("getitem with a list of index sequences (ambiguous: write x[tuple(...)])")
        items = index if isinstance(index, tuple) else (index,)
        out_axis, item, at = self._indexed_axis(sid, self._index_items(items, len(_shape(src))), shape)
        where = at if isinstance(index, tuple) else None
        self._slice_channels(node, view, src, sid, out_axis, item if item is not None else slice(None),
                             {"slice_item": where})

    def rule_index(self, node, view, shape) -> None:
        """export's ``aten.index.Tensor(x, [i0, None, i2, ...])``: advanced indexing by a list
        of optional index tensors (None: the whole axis; the axes after the list are whole
        too), followed as `rule_getitem` follows ``x[i0, :, i2]``."""
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        entries = [("axis", None, None) if i is None else self._index_tensor(i, aten_index=True)
                   for i in view.attrs.get("indices") or ()]
        used = sum(e[1] if e[0] == "adv" else 1 for e in entries)
        entries += [("axis", None, None)] * (len(_shape(src)) - used)
        out_axis, _, _ = self._indexed_axis(sid, entries, shape)
        self.passthrough(node, view, src, out_axis)

    def _index_tensor(self, item, aten_index: bool = False) -> tuple:
        """An index tensor or list as an entry of `_indexed_axis`: ("adv", k, None) for one
        that indexes k axes (a bool mask as many as it has, an integer tensor or list one),
        ("int", None, None) for a 0-dim integer tensor in a getitem (torch selects with it)."""
        if isinstance(item, torch.fx.Node):
            if self.in_slot(item) is not None:
                raise _Pin("an index tensor computed from channels")
            meta = tensor_meta(item)
            if meta is None:
                raise _Pin("an index tensor without shape metadata")
            ndim, dtype = len(meta[0]), meta[1]
        elif isinstance(item, (list, tuple, torch.Tensor)):
            arr = np.asarray(item.detach().cpu() if isinstance(item, torch.Tensor) else item)
            ndim, dtype = arr.ndim, torch.bool if arr.dtype == np.bool_ else torch.long
        else:
            raise _Pin(f"indexing with {type(item).__name__}")
        if dtype in (torch.bool, torch.uint8):
            if ndim == 0:
                raise _Pin("indexing with a 0-dim mask")
            return ("adv", ndim, None)
        if dtype.is_floating_point or dtype.is_complex:
            raise _Pin("indexing with a floating-point tensor")
        return ("int", None, None) if ndim == 0 and not aten_index else ("adv", 1, None)

    def _index_items(self, items: tuple, ndim: int) -> list:
        """getitem's index items as entries (kind, payload, position in `items`) of
        `_indexed_axis`: ("new",) for None, ("int",), ("axis", slice) for a slice — and
        ("axis", None) for each axis an Ellipsis stands for or no item reaches —, ("adv", k)."""
        entries = []
        for k, item in enumerate(items):
            if item is None:
                entries.append(("new", None, k))
            elif item is Ellipsis:
                entries.append(("ellipsis", None, k))
            elif isinstance(item, slice):
                entries.append(("axis", item, k))
            elif isinstance(item, bool):
                raise _Pin("indexing with a Python bool")
            elif isinstance(item, int) or _is_number(item):
                entries.append(("int", None, k))
            else:
                entries.append(self._index_tensor(item)[:2] + (k,))
        used = sum(e[1] if e[0] == "adv" else e[0] in ("int", "axis") for e in entries)
        spread = [k for k, e in enumerate(entries) if e[0] == "ellipsis"]
        if len(spread) > 1 or used > ndim:
            raise _Pin("indexing with more indices than axes")
        whole = [("axis", None, None)] * (ndim - used)
        if spread:  # the axes an Ellipsis stands for: those no other item indexes
            return entries[:spread[0]] + whole + entries[spread[0] + 1:]
        return entries + whole

    def _indexed_axis(self, sid: int, entries: list, shape) -> tuple[int, Any, int | None]:
        """Where the channel axis of an indexed value lands, by torch's indexing rules: ints
        select (their axes go), None adds an axis, and the index tensors ("adv") are then
        applied together as by ``aten.index``: their broadcast shape replaces the axes they
        index in place when those axes are adjacent, else it goes first (numpy's rule, except
        that numpy counts an int as an index array too, where torch selects with it first:
        ``x[0, :, i]`` keeps the middle axis first). Returns (output axis, the channel axis's
        slice or None, that slice's position among the getitem's items)."""
        axis = self.slots[sid].axis
        dim_in = dim_mid = 0
        adv: list[int] = []
        mid_axis, item, at = None, None, None
        for kind, payload, pos in entries:
            if kind == "new":
                dim_mid += 1
                continue
            width = payload if kind == "adv" else 1
            if dim_in <= axis < dim_in + width:
                if kind != "axis":
                    raise _Pin("indexing on the channel axis" if kind == "int"
                               else "advanced indexing of the channel axis (an index tensor or list on it)",
                               conflict=sid)
                mid_axis, item, at = dim_mid, payload, pos
            if kind == "adv":
                adv.extend(range(dim_mid, dim_mid + width))
            dim_in += width
            dim_mid += 0 if kind == "int" else width
        out_axis = mid_axis
        if adv:
            n_b = len(shape) - (dim_mid - len(adv))  # the rank of the broadcast index shape
            if adv == list(range(adv[0], adv[0] + len(adv))):
                out_axis = mid_axis if mid_axis < adv[0] else mid_axis - len(adv) + n_b
            else:
                out_axis = n_b + mid_axis - sum(a < mid_axis for a in adv)
        if mid_axis is None or not 0 <= out_axis < len(shape) or (
                item in (None, slice(None)) and shape[out_axis] != self.slots[sid].size):
            raise _Pin("indexing whose channel axis disagrees with its recorded shape")
        return out_axis, item, at

    def rule_select(self, node, view, shape) -> None:
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        axis = self.slots[sid].axis
        dim = _norm_axis(int(view.attrs.get("dim")), len(_shape(src)))
        if dim == axis:
            raise _Pin("select on the channel axis", conflict=sid)
        self.passthrough(node, view, src, axis - (dim < axis))

    def rule_unsqueeze(self, node, view, shape) -> None:
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        axis = self.slots[sid].axis
        dim = _norm_axis(int(view.attrs.get("dim")), len(shape))
        self.passthrough(node, view, src, axis + (dim <= axis))

    def rule_squeeze(self, node, view, shape) -> None:
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        dims = view.attrs.get("dim")
        if dims is None:  # pruned to one channel, the channel axis itself would go
            raise _Pin("squeeze of every size-1 axis (name the axis: squeeze(dim))")
        in_shape = _shape(src)
        dims = [d for d in _norm_axes(dims, len(in_shape)) if in_shape[d] == 1]
        axis = self.slots[sid].axis
        if axis in dims:
            raise _Pin("squeeze of the channel axis")
        self.passthrough(node, view, src, axis - sum(d < axis for d in dims))

    def rule_pad(self, node, view, shape) -> None:
        """F.pad of other axes than the channels: each channel padded on its own; a constant
        pad other than 0 would put that constant into removed channels too."""
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        axis, pad = self.slots[sid].axis, list(view.attrs.get("pad") or [])
        constant = view.attrs.get("mode", "constant") == "constant"
        if constant and view.attrs.get("value") not in (None, 0, 0.0):
            raise _Pin("constant pad with a value other than 0")
        from_end = len(shape) - 1 - axis
        lo, hi = (pad[2 * from_end:2 * from_end + 2] + [0, 0])[:2]
        if (lo, hi) == (0, 0):
            return self.passthrough(node, view, src, axis)
        if not constant or lo < 0 or hi < 0:
            raise _Pin("pad of the channel axis other than with zeros")
        # zero channels around the input's (a CIFAR ResNet's shortcut, prune's own norm inputs):
        # each is a class of its own with nothing to lose, apply recounts the pads
        in_pos = np.arange(self.slots[sid].size)
        self.passthrough(node, view, src, axis, in_pos, in_pos + lo, how=f"pad {lo}+{hi}",
                         info={"channel_pad": (2 * from_end, lo)})

    def rule_slice(self, node, view, shape) -> None:
        """export's ``aten.slice(x, dim, start, end, step)``: as a getitem slice on `dim`."""
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        axis = self.slots[sid].axis
        dim = _norm_axis(int(view.attrs.get("dim", 0)), len(_shape(src)))
        if dim != axis:
            return self.passthrough(node, view, src, axis)
        item = slice(view.attrs.get("start"), view.attrs.get("end"), view.attrs.get("step", 1))
        self._slice_channels(node, view, src, sid, axis, item, {})

    def rule_narrow(self, node, view, shape) -> None:
        """``narrow(x, dim, start, length)``: the slice ``start:start + length`` of `dim`."""
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        axis = self.slots[sid].axis
        if _norm_axis(int(view.attrs.get("dim", 0)), len(_shape(src))) != axis:
            return self.passthrough(node, view, src, axis)
        start, length = view.attrs.get("start"), view.attrs.get("length")
        if not all(isinstance(v, int) for v in (start, length)):
            raise _Pin("narrow of the channel axis with bounds computed in the graph")
        start = start + self.slots[sid].size if start < 0 else start
        self._slice_channels(node, view, src, sid, axis, slice(start, start + length), {})

    def _channel_index(self, node, view, what: str) -> np.ndarray:
        """The constant 1-D index `view` takes along the channel axis (a private buffer)."""
        ref = view.params.get("index")
        index = ref.get() if ref is not None else None
        if not isinstance(index, torch.Tensor) or index.dim() != 1:
            raise _Pin(f"{what} of the channel axis by an index computed in the graph")
        self._check_private(node, ref, "index")
        return index.numpy().astype(np.int64)

    def rule_index_select(self, node, view, shape) -> None:
        """``index_select(x, dim, index)`` with a constant index along the channel axis: output
        channel j is input channel index[j] (prune's own gathers and re-expansions are these)."""
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        axis = self.slots[sid].axis
        if _norm_axis(int(view.attrs.get("dim", 0)), len(_shape(src))) != axis:
            return self.passthrough(node, view, src, axis)  # rows of another axis
        index = self._channel_index(node, view, "index_select") % self.slots[sid].size
        self.passthrough(node, view, src, axis, index, np.arange(len(index)), how="gather",
                         info={"channel_index": True})

    def rule_index_add(self, node, view, shape) -> None:
        """``index_add(x, dim, index, source)``: a junction like add. Along the channel axis,
        output channel index[k] is x's plus source's channel k and the others are x's alone
        (prune's scatter of a block output into its residual stream is one)."""
        if len(view.inputs) != 2:
            raise _Pin("index_add with a non-tensor operand")
        x, source = view.inputs
        held = next((sid for sid in (self.in_slot(x), self.in_slot(source)) if sid is not None), None)
        if held is None:
            return self.free_output(node, view)
        dim = _norm_axis(int(view.attrs.get("dim", 0)), len(shape))
        axis = self.slots[held].axis
        index, info = np.arange(shape[axis]), {}
        if dim == axis:
            index, info = self._channel_index(node, view, "index_add") % shape[axis], {"channel_index": True}
        elif _shape(source)[axis] != shape[axis]:
            raise _Pin("index_add whose source has another channel count")
        out = self.new_slot(node, axis, "junction")
        rule = Rule(node.name, view.kind, "junction", outputs=[out], info=info)
        for value, in_pos, out_pos in ((x, np.arange(shape[axis]), np.arange(shape[axis])),
                                       (source, np.arange(len(index)), index)):
            sid = self.slot_on(value, axis)
            if sid is None:
                raise _Pin(f"input {value.name} tracks channels on another axis")
            self._junction_input(rule, value.name, sid, in_pos, out_pos, out)
        self.value_slot[node.name] = out
        self.rules[node.name] = rule

    def _slice_channels(self, node, view, src, sid: int, out_axis: int, item: slice, info: dict) -> None:
        """``x[start:end]`` along the channel axis: output channel j is input channel start + j
        (the map of a split piece). A full-range slice is the identity. `info` tells apply
        where the slice sits, so it can rewrite the bounds to the pruned channels."""
        if item == slice(None):
            return self.passthrough(node, view, src, out_axis)
        if any(isinstance(v, torch.fx.Node) for v in (item.start, item.stop, item.step)):
            raise _Pin("slice on the channel axis with bounds computed in the graph")
        size = self.slots[sid].size
        start, stop, step = item.indices(size)
        if step != 1:
            raise _Pin("strided slice on the channel axis (no rule yet)")
        in_pos = np.arange(start, max(start, stop))
        if len(in_pos) == 0:
            raise _Pin("slice on the channel axis keeps no channel")
        if _shape(node)[out_axis] != len(in_pos):
            raise _Pin("slice on the channel axis disagrees with its recorded shape")
        how = "identity" if len(in_pos) == size else f"slice {start}:{stop}"
        self.passthrough(node, view, src, out_axis, in_pos, np.arange(len(in_pos)), how=how,
                         info={**info, "channel_slice": True})

    def rule_expand(self, node, view, shape) -> None:
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        axis = self.slots[sid].axis + len(shape) - len(_shape(src))
        self.passthrough(node, view, src, axis, info={"size_index": axis})

    def rule_expand_as(self, node, view, shape) -> None:
        """``y.expand_as(x)`` (a squeeze-and-excitation gate spread over x): the output has x's
        shape, so y's channels and x's on that axis are one (as a broadcast product ties them)."""
        out_axis, pairs = self._aligned_inputs(node, view, shape, allow_broadcast=True)
        if out_axis is None:
            return self.free_output(node, view)
        src, sid = pairs[0] if pairs[0][0] is view.inputs[0] else (view.inputs[0], None)
        if sid is None:
            # y broadcasts over the channel axis (export's F.normalize: a norm over the channels
            # spread back over them): one value for every channel, not 0 on a removed one, so
            # dirty; narrowed with x, whose shape it takes and whose values it does not read
            other, osid = pairs[0]
            self.passthrough(node, view, other, out_axis, sid=osid, how="shape",
                             info={"dirty_source": True, "clean_reads": {other.name}})
            return
        out = self.passthrough(node, view, src, out_axis, sid=sid)
        for other, osid in pairs[1:]:  # listed as an input too, so apply brings it to the same width
            pos = np.arange(self.slots[osid].size)
            self.link(osid, out, pos, pos, view.kind, "shape")
            self.rules[node.name].inputs.append((other.name, osid, pos, pos, out))

    def rule_permute(self, node, view, shape) -> None:
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        nd = len(shape)
        dims = view.attrs.get("dims")
        if not isinstance(dims, (list, tuple)):
            dims = [a for a in node.args[1:]]
        dims = [_norm_axis(int(d), nd) for d in dims]
        self.passthrough(node, view, src, dims.index(self.slots[sid].axis))

    def rule_transpose(self, node, view, shape) -> None:
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        nd = len(shape)
        d0, d1 = (_norm_axis(int(view.attrs.get(k)), nd) for k in ("dim0", "dim1"))
        axis = self.slots[sid].axis
        self.passthrough(node, view, src, d1 if axis == d0 else d0 if axis == d1 else axis)

    def rule_flatten(self, node, view, shape) -> None:
        self._reshape_like(node, view, shape)

    def rule_reshape_as(self, node, view, shape) -> None:
        """``x.reshape_as(other)``: a reshape to other's shape, which apply writes out (other's
        sizes, the channel entry as many as x keeps) — other may lose channels of its own."""
        x, other = view.inputs[0], view.inputs[-1]
        if self.in_slot(x) is None and self.in_slot(other) is not None:
            raise _Pin("reshape_as to the shape of a value with channels")
        self._reshape_like(node, view, shape)

    def rule_reshape(self, node, view, shape) -> None:
        self._reshape_like(node, view, shape)

    def _reshape_like(self, node, view, shape) -> None:
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        in_shape = _shape(src)
        a = self.slots[sid].axis
        c = in_shape[a]
        prefix = math.prod(in_shape[:a])
        b, acc = 0, 1
        while b < len(shape) and acc < prefix:
            acc *= shape[b]
            b += 1
        if acc != prefix and view.kind in ("reshape", "flatten") and c > 1:
            # part of the channels merged with a leading axis: heads folded into the batch
            # (``view(T, B * h, d)``), or merged back with them (`_digit_map`)
            return self._reshape_by_digits(node, view, src, sid, shape)
        if acc != prefix:  # (ShuffleNet's shuffle merges a group axis back with the channels)
            raise _Pin("reshape mixes the channel axis with leading axes", conflict=sid)
        while b < len(shape) and shape[b] == 1 and c != 1:
            b += 1
        if b >= len(shape):
            raise _Pin("reshape drops the channel axis")
        s = shape[b]
        origin = None
        if s == c:
            in_pos = out_pos = np.arange(c)
            how = "identity"
        elif s > c and s % c == 0 and _prefix_hits(in_shape[a + 1:], s // c):
            r = s // c
            in_pos, out_pos = np.repeat(np.arange(c), r), np.arange(s)
            how = f"block x{r}"
        elif s < c and c % s == 0 and _prefix_hits(shape[b:], c):
            # c split into axes b, b+1, ... (heads x dims, or q/k/v x heads x dims): the slot goes
            # on the first of them with more than one entry, or, when an op reduces or indexes
            # that axis (a softmax over branches, q/k/v unbound), on a later one (`split_axes`)
            factors = list(shape[b:b + next(i for i in range(1, len(shape) - b + 1)
                                            if math.prod(shape[b:b + i]) == c)])
            choices = [i for i, f in enumerate(factors) if f > 1]
            wanted = self.split_axes.get(node.name, 0)
            pick = wanted if wanted < len(choices) else 0  # every axis met a conflict: the first
            t = choices[pick]
            inner = math.prod(factors[t + 1:])
            in_pos, out_pos = np.arange(c), (np.arange(c) // inner) % factors[t]
            how = f"heads {factors[t]}x{c // factors[t]}" if t == 0 else f"axis {t} of {tuple(factors)}"
            b += t
            if len(choices) > 1 and wanted < len(choices):
                origin = (node.name, wanted, len(choices))
        elif view.kind in ("reshape", "flatten"):
            return self._reshape_by_digits(node, view, src, sid, shape)
        else:
            raise _Pin("reshape splits the channel axis in a way fxopt cannot follow")
        info = {"size_index": b} if view.kind in ("reshape", "reshape_as") else {}
        if view.kind == "unflatten":
            dim = _norm_axis(int(view.attrs["dim"]), len(in_shape))
            if dim == a:  # the channel axis is the one split: its entry of `sizes` is rewritten
                info = {"sizes_entry": b - dim}
        out = self.passthrough(node, view, src, b, in_pos, out_pos, how=how, info=info)
        if origin is not None:
            self.split_origin[out] = origin

    rule_unflatten = rule_reshape

    def _reshape_by_digits(self, node, view, src, sid: int, shape) -> None:
        """A reshape whose channel axis does not start an output axis: the slot goes on an
        output axis that lies within the channels (head features ``d`` of ``view(T, B * h, d)``,
        whose heads joined the batch) or that holds them whole with static neighbours (``h``
        and ``d`` merged back into ``h * d`` after attention), see `_digit_map`. Several
        candidates: the first, or a later one after a conflict (`split_axes`)."""
        origin = self.split_origin.get(sid)
        if origin is not None and origin[1] + 1 < origin[2]:
            # the split before it has a finer axis left to try, which may pass whole (a
            # channel shuffle's channels within a group rather than its group axis)
            raise _Pin("reshape mixes the channel axis with leading axes", conflict=sid)
        in_shape = _shape(src)
        a = self.slots[sid].axis
        entries = _size_entries(node) if view.kind == "reshape" else ()
        static = {t for t, e in enumerate(entries) if isinstance(e, int) and len(entries) == len(shape)}
        found = [(t, m) for t in range(len(shape))
                 if (m := _digit_map(in_shape, a, shape, t, t in static)) is not None]
        if not found:
            raise _Pin("reshape mixes the channel axis with other axes in a way fxopt cannot follow",
                       conflict=sid)
        wanted = self.split_axes.get(node.name, 0)
        t, (in_pos, out_pos, how) = found[wanted if wanted < len(found) else 0]
        info = {"size_index": t} if view.kind == "reshape" else {}
        out = self.passthrough(node, view, src, t, in_pos, out_pos, how=how, info=info)
        if len(found) > 1 and wanted < len(found):
            self.split_origin[out] = (node.name, wanted, len(found))

    def rule_matmul(self, node, view, shape) -> None:
        if len(view.inputs) != 2:
            raise _Pin("matmul with a non-tensor operand")
        a, bnode = view.inputs
        sa, sb = self.in_slot(a), self.in_slot(bnode)
        weight = self._matmul_weight(view) if sb is None else None
        a_shape = _shape(a)
        if weight is not None and a_shape is not None and (sa is None or self.slots[sa].axis == len(a_shape) - 1):
            # x @ W with a parameter W [in, out]: a linear layer (contracts x's channel axis)
            self._check_private(node, weight)
            return self._dense_producer(node, view, shape, a)
        if sa is None and sb is None:
            return self.free_output(node, view)
        b_shape = _shape(bnode)
        if sa is not None and sb is not None and len(b_shape) >= 2 \
                and self.slots[sa].axis == len(a_shape) - 1 and self.slots[sb].axis == len(b_shape) - 2:
            return self._contracted_matmul(node, a, sa, bnode, sb)
        nd = len(shape)
        targets = []
        for x, sid, is_a in ((a, sa, True), (bnode, sb, False)):
            if sid is None:
                continue
            xd = len(_shape(x))
            ax = self.slots[sid].axis
            if xd >= 2 and ax < xd - 2:
                targets.append((x, sid, ax + nd - xd))
            elif is_a and ax == xd - 2:
                targets.append((x, sid, nd - 2))
            elif not is_a and ax == xd - 1:
                targets.append((x, sid, nd - 1))
            else:
                raise _Pin("matmul contracts the channel axis")
        if len({t[2] for t in targets}) != 1:
            raise _Pin("matmul inputs carry channels on different axes")
        out_axis = targets[0][2]
        if len(targets) == 1 and out_axis < nd - 2:
            other = bnode if targets[0][0] is a else a
            o_shape = _shape(other)
            o_axis = out_axis - (nd - len(o_shape))
            if o_axis >= 0 and o_shape[o_axis] != 1:
                sid = self.slot_on(other, o_axis)
                targets.append((other, sid, out_axis))
        out = self.new_slot(node, out_axis, "pass")
        rule = Rule(node.name, "matmul", "pass", outputs=[out])
        pos = np.arange(shape[out_axis])
        for x, sid, _ in targets:
            rule.inputs.append((x.name, sid, pos, pos, out))
            self.link(sid, out, pos, pos, "matmul", "identity")
        self.value_slot[node.name] = out
        self.rules[node.name] = rule

    def _contracted_matmul(self, node, a, sa: int, b, sb: int) -> None:
        """``q @ k.transpose(-2, -1)`` over the features of a head whose heads were folded into
        the batch (fairseq's and Bloom's ``bmm``): as for `_sdpa_features`, feature j of q and
        of k go together (a removed one adds 0 to every score), and the scores carry no
        channels. A scale is spelled out in the graph, so it keeps its value."""
        if self.slots[sa].size != self.slots[sb].size:
            raise _Pin("matmul contracts channel axes of different sizes")
        pos = np.arange(self.slots[sa].size)
        self.link(sa, sb, pos, pos, "matmul", "contracted")
        self.value_slot[node.name] = None
        self.rules[node.name] = Rule(node.name, "matmul", "pass", consumed=[(a.name, sa), (b.name, sb)],
                                     info={"mixes_channels": True})  # a dirty feature reaches every score

    def rule_sdpa(self, node, view, shape) -> None:
        q, k, v = view.inputs[:3]
        sq = self.in_slot(q)
        if sq is None:
            raise _Pin("attention query without channel tracking")
        axis = self.slots[sq].axis
        mask = view.inputs[3] if len(view.inputs) > 3 else view.attrs.get("attn_mask")
        if axis == len(shape) - 1 and axis == len(_shape(q)) - 1:
            return self._sdpa_features(node, view, shape, q, k, v, mask)
        if axis >= len(shape) - 2:
            raise _Pin("attention channels on the sequence axis")
        per_head = (q, k, v)
        if mask is not None:
            m_shape = _shape(mask) if isinstance(mask, torch.fx.Node) else None
            if m_shape is None:
                raise _Pin("attention mask without shape metadata")
            m_axis = axis - (len(shape) - len(m_shape))
            if m_axis >= 0 and m_shape[m_axis] != 1:
                # a bias per head (T5's relative positions, Swin's window bias): its head axis
                # goes with q/k/v, back to whatever made it (a pinned slot if nothing did)
                if m_shape[m_axis] != shape[axis]:
                    raise _Pin("attention mask whose head axis does not match the heads")
                per_head = (q, k, v, mask)
            elif self.in_slot(mask) is not None:
                raise _Pin("attention mask carries channels on an axis that is not the heads")
        out = self.new_slot(node, axis, "pass")
        rule = Rule(node.name, "sdpa", "pass", outputs=[out])
        pos = np.arange(shape[axis])
        for x in per_head:
            sid = self.slot_on(x, axis if x is not mask else m_axis)
            if sid is None:
                raise _Pin("attention inputs carry channels on different axes")
            rule.inputs.append((x.name, sid, pos, pos, out))
            self.link(sid, out, pos, pos, "sdpa", "heads")
        self.value_slot[node.name] = out
        self.rules[node.name] = rule

    def _sdpa_features(self, node, view, shape, q, k, v, mask) -> None:
        """Attention over one head's features (a single-head stage, a cross-attention): q and k
        are contracted over them, so feature j of q and of k go together (a removed one adds
        0 to every score), and v's features are the output's. Their count sets the default
        scale 1/sqrt(d): apply writes the original one out."""
        if isinstance(mask, torch.fx.Node) and self.in_slot(mask) is not None:
            raise _Pin("attention mask carries channels")
        last = len(shape) - 1
        sq, sk, sv = (self.slot_on(x, len(_shape(x)) - 1) for x in (q, k, v))
        if None in (sq, sk, sv) or self.slots[sq].size != self.slots[sk].size:
            raise _Pin("attention inputs carry channels on different axes")
        out = self.new_slot(node, last, "pass")
        scale = view.attrs.get("scale")
        rule = Rule(node.name, "sdpa", "pass", outputs=[out], info={
            "mixes_channels": True,  # a dirty q or k feature would reach every score
            "scale": scale if scale is not None else 1 / math.sqrt(self.slots[sq].size)})
        rule.consumed += [(q.name, sq), (k.name, sk)]
        pos = np.arange(self.slots[sv].size)
        rule.inputs.append((v.name, sv, pos, pos, out))
        qk = np.arange(self.slots[sq].size)
        self.link(sq, sk, qk, qk, "sdpa", "contracted")
        self.link(sv, out, pos, pos, "sdpa", "values")
        self.value_slot[node.name] = out
        self.rules[node.name] = rule

    def _private_affine(self, node, view) -> None:
        """A norm's affine read by another op too (``F.layer_norm(h, s, w) * w``) cannot be
        sliced or permuted for the norm alone."""
        for ref in view.params.values():
            self._check_private(node, ref)

    def _last_axis_norm(self, node, view, shape) -> tuple[torch.fx.Node, int | None]:
        """(input, its slot) of a layer/RMS norm, which must normalize the channel axis alone
        (the last one) with an affine of its own."""
        self._private_affine(node, view)
        src, sid = self.single_input(node, view)
        norm_shape = view.attrs.get("normalized_shape")
        dims = tuple(norm_shape) if isinstance(norm_shape, (list, tuple)) else (norm_shape,)
        if len(dims) != 1 or (sid is not None and self.slots[sid].axis != len(shape) - 1):
            raise _Pin(f"{view.kind} over more than the channel axis")
        return src, sid

    def _norm_within_channels(self, node, view, shape) -> bool:
        """A layer/RMS norm over trailing axes that do not hold the channels (timm's q/k norm
        over each head's dims, the channels being the heads): it acts on each channel on its own,
        and a removed (all-zero) channel comes out as the norm's bias — dirty if there is one."""
        src, sid = self.single_input(node, view)
        norm_shape = view.attrs.get("normalized_shape")
        count = len(norm_shape) if isinstance(norm_shape, (list, tuple)) else 1
        if sid is None or self.slots[sid].axis >= len(shape) - count:
            return False
        self._private_affine(node, view)
        dirty = view.kind == "layer_norm" and (view.param("bias") is not None
                                               or isinstance(view.attrs.get("bias"), torch.fx.Node))
        self.passthrough(node, view, src, self.slots[sid].axis, info={"dirty_source": True} if dirty else None)
        return True

    def rule_layer_norm(self, node, view, shape) -> None:
        if self._norm_within_channels(node, view, shape):
            return
        src, sid = self._last_axis_norm(node, view, shape)
        if self.exact_norms:
            return self.gathered_norm(node, view, src, sid, len(shape) - 1)
        if sid is None:
            return self.free_output(node, view)
        self.passthrough(node, view, src, len(shape) - 1, category="norm")

    def rule_rms_norm(self, node, view, shape) -> None:
        """RMS norm needs no re-expansion to stay exact: the removed channels are zero, so the sum
        of squares over the kept ones is the full one and only the mean's divisor changes.
        ``rms_norm`` over C' of C channels with weight·√(C/C') and eps·C/C' is the original norm on
        the kept channels, which apply sets. So the affine is sliced with the channels, in both
        `exact_norms` settings."""
        if self._norm_within_channels(node, view, shape):
            return
        src, sid = self._last_axis_norm(node, view, shape)
        if sid is None:  # no channels come in: its output is gathered (exact) or free, as a layer norm's
            return self.gathered_norm(node, view, src, sid, len(shape) - 1) if self.exact_norms \
                else self.free_output(node, view)
        self.passthrough(node, view, src, len(shape) - 1, category="norm", info={"rms_rescale": True})

    def gathered_norm(self, node, view, src, sid: int | None, axis: int) -> None:
        """An exact norm: it reads its input at full width (re-expanded by the boundary, zeros in
        the removed channels, so its statistics are the original ones) and its output channels are
        fresh classes, taken after it by one gather. A removed output channel is what the norm's
        affine gives with its weight and bias zeroed, which is how a zeroed model matches."""
        if view.param("weight") is None:
            raise _Pin(f"{view.kind} without an affine weight normalizes across channels (read at full width)")
        out = self.new_slot(node, axis, "producer")
        rule = Rule(node.name, view.kind, "gather", outputs=[out])
        if sid is not None:
            rule.consumed.append((src.name, sid))
            self.graph.add_edge(self.slots[sid].label, self.slots[out].label, op=view.kind, map="full width",
                                bytes=self.slots[sid].bytes)
        self.value_slot[node.name] = out
        self.rules[node.name] = rule

    def rule_group_norm(self, node, view, shape) -> None:
        self._private_affine(node, view)
        src, sid = self.single_input(node, view)
        if sid is not None and self.slots[sid].axis != 1:
            raise _Pin("group_norm input channel axis is not 1")
        if self.exact_norms:
            return self.gathered_norm(node, view, src, sid, 1)
        if sid is None:
            return self.free_output(node, view)
        out = self.passthrough(node, view, src, 1, category="norm")
        # position r of every group is one class, so the groups stay equal (num_groups is kept)
        per_group = shape[1] // int(view.attrs.get("num_groups"))
        pos = np.arange(shape[1])
        self.uf.union_many(self.slots[out].base + pos, self.slots[out].base + pos % per_group)

    # ----- finish -----------------------------------------------------------------------
    def couple_tied_layers(self) -> None:
        """A layer called at several places (a module reused, a shared weight export reads twice)
        got a private copy per call; its calls lose the same channels, so the pruned model keeps
        one layer (re-tied by apply) that trains as one, as the original did. Where one call is
        pinned, the others keep every channel too. Ties across kinds (an embedding tied to the
        LM head, in another channel space) stay free, unless one end reads the weight whole (a
        pinned ``F.linear(z, enc.weight.t())`` decoder): a pruned copy at the other end would be
        stored beside the full tensor, and the model would grow."""
        calls: dict[tuple, list[Rule]] = {}
        read_whole = {id(t) for rule in self.rules.values() if rule.category == "pinned"
                      for t in self._weights_read(self.nodes[rule.node])}
        for rule in self.rules.values():
            view = op_view(self.gm, self.nodes[rule.node]) if rule.category in ("producer", "pass", "pinned") else None
            tensors = [ref.get() for _, ref in sorted(view.params.items())] if view is not None else []
            if tensors and all(isinstance(t, torch.Tensor) for t in tensors):
                calls.setdefault((view.kind, *map(id, tensors)), []).append(rule)
        for (_, *ids), rules in calls.items():
            live = [r for r in rules if r.category != "pinned" and r.outputs]
            if not live or (len(rules) < 2 and read_whole.isdisjoint(ids)):
                continue
            slots = [[r.outputs[0], *(sid for _, sid in r.consumed)] for r in live]
            if len(live) < len(rules) or not read_whole.isdisjoint(ids):
                for sid in (sid for row in slots for sid in row):
                    self.pinned_positions.extend(self._positions(sid).tolist())
                for r in live:
                    self.pinned_nodes.setdefault(r.node, "shares its weights with a node that reads them whole "
                                                         "(pruning it would store a second, pruned copy)")
                continue
            for row in slots[1:]:
                for a, b in zip(slots[0], row):
                    if self.slots[a].size == self.slots[b].size:
                        self.uf.union_many(self._positions(a), self._positions(b))

    def _weights_read(self, node: torch.fx.Node) -> list[torch.Tensor]:
        """Parameters `node` reads directly or transposed (``W.t()``, ``W.T``)."""
        found = []
        for arg in node.all_input_nodes:
            arg = transposed_parameter(self.gm, arg) or arg
            if arg.op == "get_attr":
                ref = ref_for_get_attr(self.gm, arg)
                value = ref.get() if ref is not None else None
                if isinstance(value, torch.nn.Parameter):
                    found.append(value)
        return found

    def _positions(self, sid: int) -> np.ndarray:
        slot = self.slots[sid]
        return np.arange(slot.base, slot.base + slot.size)

    def finish(self) -> ChannelGraph:
        self.couple_tied_layers()
        total = self.uf.size
        cls = self.uf.classes()
        n_classes = int(cls.max()) + 1 if total else 0
        precedence = set()
        for ys, xs in self.prec_pairs:
            for y, x in zip(cls[ys].tolist(), cls[xs].tolist()):
                if y != x:
                    precedence.add((y, x))
        pinned = np.zeros(n_classes, dtype=bool)
        pinned[cls[np.array(self.pinned_positions, dtype=np.int64)]] = True
        # a class a constant buffer is in stays unless learned weights (a producer's rows, a
        # parameter) are in it too: removing only a causal mask's positions or a rotary
        # frequency would change the model, not drop a channel of it
        learned = np.zeros(n_classes, dtype=bool)
        in_buffer = np.zeros(n_classes, dtype=bool)
        for slot in self.slots:
            if slot.role in ("producer", "param", "buffer"):
                marks = in_buffer if slot.role == "buffer" else learned
                marks[cls[slot.base:slot.base + slot.size]] = True
        pinned |= in_buffer & ~learned
        out_cls = np.zeros(n_classes, dtype=bool)
        out_cls[cls[np.array(self.output_positions, dtype=np.int64)]] = True
        # Channels of the graph output stay, including every contribution summed into them.
        requires: dict[int, list[int]] = {}
        for y, x in precedence:
            requires.setdefault(y, []).append(x)
        stack = np.nonzero(out_cls)[0].tolist()
        while stack:
            for x in requires.get(stack.pop(), ()):
                if not out_cls[x]:
                    out_cls[x] = True
                    stack.append(x)
        return ChannelGraph(self.graph, self.slots, self.rules, self.value_slot, cls, n_classes, precedence,
                            self.pinned_nodes, pinned, out_cls, self.module_names)


_POSITIVE = frozenset({"sigmoid", "exp", "softplus"})
_NON_NEGATIVE = frozenset({"abs", "square", "relu", "vector_norm", "var", "std"})
# ops whose sign is their input's (values moved, repeated or averaged; sqrt and rsqrt of a positive)
_SAME_SIGN = frozenset({"reshape", "flatten", "unflatten", "permute", "transpose", "expand", "expand_as",
                        "unsqueeze", "squeeze", "to", "contiguous", "getitem", "select", "slice", "mean", "amax",
                        "amin", "sum", "sqrt", "dropout", "identity", "repeat", "repeat_interleave", "reshape_as",
                        "max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool"})


def _sign(gm: torch.fx.GraphModule, value: Any, depth: int = 16) -> str | None:
    """"pos" when every element of `value` is > 0, "nonneg" when ≥ 0, else None (unknown) —
    read off the ops that make it (``clamp_min(norm, eps)``, ``var + eps``, ``sigmoid(g)``), so
    a division by it, or its rsqrt, is known to be finite.

        >>> import torch, torch.fx
        >>> gm = torch.fx.symbolic_trace(lambda x: (x.var(1, keepdim=True) + 1e-5, x.abs(), x - 1))
        >>> {n.name: _sign(gm, n) for n in gm.graph.nodes if n.op.startswith("call")}
        {'var': 'nonneg', 'add': 'pos', 'abs_1': 'nonneg', 'sub': None}
    """
    if isinstance(value, bool) or depth == 0:
        return None
    if isinstance(value, (int, float)):
        return "pos" if value > 0 else "nonneg" if value == 0 else None
    if not isinstance(value, torch.fx.Node):
        return None
    view = op_view(gm, value)
    if view is None:
        return None
    kind, inner = view.kind, (lambda v: _sign(gm, v, depth - 1))
    if kind in _POSITIVE:
        return "pos"
    if kind in _NON_NEGATIVE or (kind == "hardtanh" and view.attrs.get("min_val", -1) >= 0):
        return "nonneg"
    if kind == "pow":
        e = view.attrs.get("exponent")
        if isinstance(e, int) and not isinstance(e, bool) and e % 2 == 0:
            return "pos" if inner(view.input) == "pos" else "nonneg"
        return inner(view.input) if isinstance(e, (int, float)) else None
    if kind == "clamp":
        low = view.attrs.get("min")
        if isinstance(low, (int, float)) and not isinstance(low, bool) and low >= 0:
            return "pos" if low > 0 else "nonneg"
        return inner(view.input) if low is None and view.attrs.get("max") is None else None
    if kind == "rsqrt":
        return "pos" if inner(view.input) == "pos" else None
    if kind == "getitem" and isinstance(view.input, torch.fx.Node) and _piece_index(value) == 0 \
            and getattr(op_view(gm, view.input), "kind", None) in ("var_mean", "std_mean"):
        return "nonneg"
    if kind in _SAME_SIGN:
        return inner(view.input)
    if kind in ("add", "mul"):
        if view.attrs.get("alpha", 1) != 1:
            return None
        args = bind_arguments(value, spec_for(gm, value))
        signs = [inner(args.get("input")), inner(args.get("other"))]
        if None in signs:
            return None
        if kind == "add":
            return "pos" if "pos" in signs else "nonneg"
        return "pos" if signs == ["pos", "pos"] else "nonneg"
    return None


def _piece_index(node: torch.fx.Node) -> int | None:
    """Which piece of a tuple `node` takes: ``t[i]``, or ``t.values`` / ``t.indices`` of
    max/min's named tuple."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
        return {"values": 0, "indices": 1}.get(node.args[1])
    index = _getitem_index(node)
    return index if isinstance(index, int) else None


def _piece_sizes(split: torch.fx.Node, dim: int, n: int) -> list[int]:
    """Split sizes read off the recorded shapes of the pieces (getitem users) when the sizes
    are computed in the graph; every piece must be used so that they add up."""
    sizes: dict[int, int] = {}
    for user in split.users:
        index = _getitem_index(user)
        piece = _shape(user)
        if not isinstance(index, int) or piece is None:
            raise _Pin("split result used other than by getitem")
        sizes[index] = piece[dim]
    if sorted(sizes) != list(range(len(sizes))) or sum(sizes.values()) != n:
        raise _Pin("split sizes computed in the graph and not every piece is used")
    return [sizes[i] for i in range(len(sizes))]


def _getitem_index(node: torch.fx.Node) -> Any:
    """The index of ``value[index]`` when `node` is such a getitem, else None."""
    return node.args[1] if node.op == "call_function" and node.target is operator.getitem else None


def _digit_map(in_shape: tuple, a: int, shape: tuple, t: int, static: bool = False) -> tuple | None:
    """How channel axis `a` of `in_shape` maps onto axis `t` of a reshape to `shape`, read
    off the row-major strides (a reshape keeps the flat order, so an axis of stride I and
    size s owns the flat "digits" [I, I * s)); None when neither axis's digits hold the
    other's. Returns (in_pos, out_pos, how):

    - `t` lies within the channels (stride I_out, a multiple of the channels' I_in, and
      I_out * s dividing I_in * c): channel ch sits at (ch // (I_out / I_in)) % s on t, so
      the channels that share it are one class and the others of its axes keep their sizes;
    - `t` holds the channels whole: position p of t is channel (p // (I_in / I_out)) % c.
      Its other digits are written as constants by apply, so those above the channels must
      come from static axes: whole axes after the leading (batch) one, or any digits when the
      reshape writes `t`'s size as a number (`static`): torch.nn's attention weights path
      merges heads folded into the batch back with their features, ``(T, B * h, d)`` to
      ``(T * B, h * d)``, with ``h * d`` a constant.
    """
    c, s = in_shape[a], shape[t]
    if s == 1:
        return None
    i_in, i_out = math.prod(in_shape[a + 1:]), math.prod(shape[t + 1:])
    if i_out % i_in == 0 and (i_in * c) % (i_out * s) == 0:
        pos = np.arange(c)
        how = "identity" if s == c else f"axis of {s} within {c} channels"
        return pos, (pos // (i_out // i_in)) % s, how
    if i_in % i_out == 0 and (i_out * s) % (i_in * c) == 0:
        above = (i_out * s) // (i_in * c)
        if not static and not any(math.prod(in_shape[k:a]) == above for k in range(1, a + 1)):
            return None
        pos = np.arange(s)
        return (pos // (i_in // i_out)) % c, pos, f"{c} channels within an axis of {s}"
    return None


def _wrapped_region(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether `node` calls a submodule graph (export's ``wrap_with_set_grad_enabled(False,
    body, *operands)`` for a ``torch.no_grad()`` block, ``wrap_with_autocast``)."""
    return node.op == "call_function" and any(
        isinstance(a, torch.fx.Node) and a.op == "get_attr"
        and isinstance(getattr(gm, a.target, None), torch.fx.GraphModule) for a in node.args)


def _prefix_hits(dims: tuple, target: int) -> bool:
    acc = 1
    for d in dims:
        if acc == target:
            return True
        acc *= d
    return acc == target


def _module_name(node: torch.fx.Node, view, ref: ParamRef | None = None) -> str:
    """The dotted module path of a weighted op (`layers.0.fc1`), in either front end; a use
    given its own copy of shared weights (`make_private`) keeps the path it was called by."""
    if PRIVATE_OF in node.meta:
        return str(node.meta[PRIVATE_OF])
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return path.replace("L['self'].", "").replace("L__self___", "")
    ref = ref if ref is not None else view.params.get("weight")
    return ref.qualname.rsplit(".", 1)[0] if ref is not None else node.name


__all__ = ["ChannelGraph", "ChannelGraphAnalysis", "Rule", "Slot", "build_channel_graph", "operator"]
