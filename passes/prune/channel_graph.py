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
  value known positive (`_sign`, which follows sums, products, quotients by positives and the
  recorded sign of shape arithmetic): identity maps. A layer whose weight is computed from
  parameters alone (`computed_weights`) is a producer; the computation is left out. where / masked_fill / elementwise max, stack
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
  axis with constant bounds (or bounds computed from channel counts alone, ShiftNet's
  ``h.shape[1] // 4``: the original numbers, written as constants) and
  step 1 (``x[:, a:b]`` or export's ``aten.slice``: channel j is input channel a + j, like a
  split piece; a full-range one such as GhostNet's ``cat([x1, x2], 1)[:, :oup]`` is the
  identity; apply rewrites the bounds), matmul/sdpa over a head axis (an attention mask must
  broadcast over the heads): index maps (unions). ``q @ kᵀ`` over both operands' channels
  (features of folded heads) links them and yields scores without channels.
- a product of channels with a value no slot follows (a pinned op's output, such as a norm
  spelled out over the channels, times its affine; the model input) has the channels' classes:
  it is zero where they are, and apply gathers the other operand to the channels kept.
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

from typing import Any, ClassVar

import networkx as nx
import numpy as np
import scipy.sparse as sp
import torch
import torch.fx
from scipy.sparse.csgraph import breadth_first_order

from fxopt.analysis import Analysis, ShapeAnalysis
from fxopt.ir import (bind_arguments, metadata_read, op_view, ref_for_get_attr, size_read, spec_for,
                      value_nbytes, written_in_place)

from .channel_model import (CHANNELWISE, GATING, SPATIAL, TUPLE_RESULTS, WEIGHT_LAYOUTS, ZERO_PRESERVING,
                            ChannelGraph, Rule, Slot, _ChannelUnions, _Pin, reads_across_channels)
from .computed_weights import weight_computations
from .node_facts import (_INT_ARITHMETIC, _channelwise, _getitem_index, _holds_features, _is_number,
                         _is_parameter, _module_name, _norm_axis, _opaque_layer, _shape, _size_entries,
                         _wrapped_region)
from .rules.contractions import ContractionRules
from .rules.elementwise import ElementwiseRules
from .rules.indexing import IndexRules
from .rules.layers import LayerRules
from .rules.shapes import ShapeRules


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
    # An integer index built in place (BEiT's relative position index) holds no channels.
    forced: dict[str, str] = dict(written_in_place(gm, floating_only=True))
    split_axes: dict[str, int] = {}
    weight_math = weight_computations(gm)  # the same every round: the graph does not change
    while True:
        builder = _Builder(gm, exact_norms, forced, split_axes, weight_math)
        builder.walk()
        if builder.split_axes != split_axes:  # a reshape moves its slot: its readers change too
            split_axes = builder.split_axes
            continue
        new = {k: v for k, v in builder.violations().items() if k not in forced}
        if not new:
            return builder.finish()
        forced.update(new)


class _Builder(ElementwiseRules, LayerRules, ContractionRules, IndexRules, ShapeRules):
    """Walks a graph once, applying the rule of each node's op kind (`rules`)."""

    def __init__(self, gm: torch.fx.GraphModule, exact_norms: bool = True,
                 forced: dict[str, str] | None = None, split_axes: dict[str, int] | None = None,
                 weight_math: set[str] | None = None) -> None:
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
        self.constant = _constant_values(gm)
        self.read_whole: set[str] = set()  # get_attr tensors a pinned node reads (`pin`)
        self.expand_sizes: dict[str, str] = {}  # ``y.expand(x.size())`` -> the size read
        self.norm_shape_reads: dict[str, str] = {}  # ``layer_norm(x, x.shape[-1:])`` -> the size read
        self.held_constants: set[str] = set()  # constant operands whose channels all stay (`_aligned_inputs`)
        # layer weights computed from parameters alone (`computed_weights`)
        self.weight_math = weight_computations(gm) if weight_math is None else weight_math

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
            if node.name in self.read_whole:
                self.pinned_positions.extend(self._positions(sid))
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

    def walk(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "output":
                self.visit_output(node)
                continue
            if node.op in ("placeholder", "get_attr") or node.name in self.weight_math:
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
        if rule is None or not (_channelwise(rule) or rule.category == "junction"):
            return  # (a junction passes dirt on; `violations` judges it once the classes are known)
        per_out: dict[int, list] = {out: [] for out in rule.outputs}
        # inputs read for their zeros only (a condition, a divisor, a shape) pass no dirt on
        clean_reads = rule.info.get("clean_reads", ())
        for name, sid, _, _, out in rule.inputs:
            if name not in clean_reads:
                per_out.setdefault(out, []).append(self.dirty.get(sid))
        for out, marks in per_out.items():
            if rule.kind in GATING and (any(m is None for m in marks) or rule.info.get("zero_product")):
                continue  # a zero-preserving factor: the product is zero on removed channels
            sources = frozenset().union(*(m for m in marks if m))
            if rule.info.get("dirty_source") and not sources:
                sources = frozenset({node.name})  # a root: pinning it makes everything after it free
            if sources:
                self.dirty[out] = sources

    def _adds_within_classes(self, rule: Rule, cls: np.ndarray) -> bool:
        """Whether every input channel of a junction is in its output channel's class: then
        they go together, and a dirty input is as harmless as through a channelwise op."""
        for _, sid, in_pos, out_pos, out in rule.inputs:
            a, b = self.slots[sid], self.slots[out]
            if not np.array_equal(cls[a.base + in_pos], cls[b.base + out_pos]):
                return False
        return True

    def violations(self) -> dict[str, str]:
        """Nodes to pin in another round: sources of dirty values read by anything but a
        channelwise op. (Channel-axis size reads used other than as a reshape size are noted
        on their rule as `constants`, which apply writes in.)"""
        bad: dict[str, str] = {}
        cls = None
        for name, rule in self.rules.items():
            reads = [sid for _, sid in rule.consumed] + [r[1] for r in rule.inputs]
            marks = [self.dirty[sid] for sid in reads if sid in self.dirty]
            if not marks or _channelwise(rule):
                continue
            if rule.category == "junction":
                cls = self.uf.classes() if cls is None else cls
                if self._adds_within_classes(rule, cls):
                    continue  # (the rotary add of q*cos and rot(q)*sin: one head's class throughout)
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
        for expand, size in self.expand_sizes.items():
            if expand in self.pinned_nodes:  # its size must then read the full width, as it does
                bad.setdefault(size, f"the size of the channel axis is read by '{expand}', which cannot follow it")
        for norm, size in self.norm_shape_reads.items():
            rule = self.rules.get(norm)  # a norm that follows the channels gets its shape written by apply
            if norm in self.pinned_nodes or rule is None or rule.category not in ("norm", "gather"):
                bad.setdefault(size, f"the size of the channel axis is read by '{norm}', which cannot follow it")
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

    def _counts_only(self, value: Any, during_walk: bool = False) -> bool:
        """Whether the number `value` is computed from channel-count reads and constants alone,
        so that it does not vary with the input (a batch or sequence size would). `during_walk`:
        asked by a rule, when only the reads before it are known (nothing is cached)."""
        if during_walk:  # and the counts must be of a fixed width (not C*H*W after a flatten)
            counted = {v for rule in self.rules.values() for v, sid in rule.info.get("counts", {}).items()
                       if self._fixed_width(sid)}
        else:
            if self._counted is None:  # the walk is over when size entries are judged
                self._counted = {v for rule in self.rules.values() for v in rule.info.get("counts", ())}
            counted = self._counted
        stack = [value]
        while stack:
            v = stack.pop()
            if not isinstance(v, torch.fx.Node) or v.name in counted:
                continue
            if not (v.op == "call_function" and v.target in _INT_ARITHMETIC and _is_number(v)):
                return False
            stack.extend(v.all_input_nodes)
        return True

    def _fixed_width(self, sid: int) -> bool:
        """Whether slot `sid`'s size is a channel count whatever the input's size: it comes from
        a layer's or a parameter's channels through ops that keep the width (a flatten that
        merges positions into the axis makes its size vary with the image)."""
        for _ in range(len(self.slots)):
            slot = self.slots[sid]
            rule = self.rules.get(slot.node)
            if rule is None:
                return False
            if rule.category in ("producer", "param", "norm", "gather"):
                return True
            inputs = [i for i in rule.inputs if i[4] == sid]
            if rule.category != "pass" or not inputs or any(self.slots[i[1]].size != slot.size for i in inputs):
                return False
            sid = inputs[0][1]
        return False

    def pin(self, node: torch.fx.Node, reason: str) -> None:
        """Inputs read at full width; the output is a free value (its classes cannot die)."""
        self.pinned_nodes[node.name] = reason
        rule = Rule(node.name, "pinned", "pinned", info={"reason": reason})
        for arg in node.all_input_nodes:
            sid = self.value_slot.get(arg.name)
            if sid is not None:
                rule.consumed.append((arg.name, sid))
            elif arg.op == "get_attr":  # a tensor it reads whole: a slot it gets later is held
                self.read_whole.add(arg.name)
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
        for sid in self._read_whole_into(node):
            s = self.slots[sid]
            self.output_positions.extend(range(s.base, s.base + s.size))
        self.rules[node.name] = rule

    def _read_whole_into(self, output: torch.fx.Node) -> set[int]:
        """Slots whose every channel reaches the graph output through ops that read them whole
        (a classifier's logits through a pinned ``log_softmax``): those channels are the output's
        too, and stay, as the output's own do."""
        found, seen = set(), set()
        stack = [a for a in output.all_input_nodes if self.value_slot.get(a.name) is None]
        while stack:
            node = stack.pop()
            if node.name in seen:
                continue
            seen.add(node.name)
            rule = self.rules.get(node.name)
            if rule is None or rule.category not in ("pinned", "free") or rule.kind in ("size", "metadata") \
                    or node.op == "call_module" and next(self.gm.get_submodule(node.target).parameters(), None) is not None:
                continue  # (a layer makes channels of its own: what it reads is not the output's)
            view = op_view(self.gm, node) if node.op != "placeholder" else None
            if view is not None and view.kind not in CHANNELWISE:
                continue
            found.update(sid for _, sid in rule.consumed if self._keeps_axis(node, sid))
            stack.extend(a for a in node.all_input_nodes if self.value_slot.get(a.name) is None)
        return found

    def _keeps_axis(self, node: torch.fx.Node, sid: int) -> bool:
        """Whether `node`'s output has slot `sid`'s channel axis, as many entries, at the same
        place from the end (an op over the channels that keeps them: a softmax, an unknown
        elementwise op)."""
        out, slot = _shape(node), self.slots[sid]
        back = slot.ndim - slot.axis
        return out is not None and len(out) >= back and out[len(out) - back] == slot.size

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
                # export decomposes most such modules into ops with rules; not these
                hint = "" if isinstance(module, _NOT_HELPED_BY_EXPORT) else " (mode='export' decomposes it)"
                raise _Pin(f"no channel rule for {type(module).__name__}{hint}")
            if region:
                # (capture inlines a plain torch.no_grad() block; symbolic tracing drops an autocast)
                raise _Pin("a region export keeps as one call of a submodule graph (an autocast block, or a "
                           "torch.no_grad() block that writes in place); fxopt does not prune inside it")
            if _reads_sign_of_zero(node):
                # the zero-weight model hands it -0.0 after a negation (signbit(-0.0) is True);
                # the +0.0 a re-expansion would write is another input: the channels stay
                raise _Pin("reads the sign of zero, which tells a removed channel from a zero one",
                           hold=tuple(sid for a in inputs if (sid := self.in_slot(a)) is not None))
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
            elif _expands_to(user, node):
                # ``y.expand(x.size())`` is ``y.expand_as(x)``: `rule_expand` ties y to x, or the
                # size is pinned in another round (`violations`) where it cannot
                self.expand_sizes[user.name] = node.name
            elif isinstance(index, slice) and user.users and all(
                    _normalized_shape_of(self.gm, u) is user for u in user.users):
                # ``F.layer_norm(x, x.shape[-1:])``: apply writes the width the norm normalizes,
                # or the size is pinned in another round where the norm cannot follow
                for norm in user.users:
                    self.norm_shape_reads[norm.name] = node.name
            elif isinstance(index, slice) and user.users and all(
                    isinstance(i := _getitem_index(u), int) and -len(range(nd)[index]) <= i < len(range(nd)[index])
                    for u in user.users):
                # ``B, C = x.shape[:2]``: entries of a slice of the size, each read as a number
                kept = range(nd)[index]
                for entry in user.users:
                    if kept[_getitem_index(entry)] == axis:
                        self.rules[node.name].info.setdefault("counts", {})[entry.name] = sid
            elif not (isinstance(index, slice) and axis not in range(nd)[index]):
                raise _Pin("the size of the channel axis is read")

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
        """All inputs free: the output is free too (no channels to follow). A parameter it reads
        is read whole (``logsumexp(p)``): a slot another reader gives it later is held."""
        self.read_whole.update(a.name for a in node.all_input_nodes if a.op == "get_attr")
        self.value_slot[node.name] = None
        self.rules[node.name] = Rule(node.name, view.kind if view is not None else str(node.target), "free")

    def single_input(self, node, view) -> tuple[torch.fx.Node | None, int | None]:
        src = next((a for a in view.inputs if not _is_number(a)), None)
        sid = self.in_slot(src)
        return src, self.parameter_slot(src) if sid is None else sid

    def parameter_slot(self, src: Any) -> int | None:
        """The slot of a parameter used directly (None for anything else): its last axis that is
        not a broadcast one (a class token [1, 1, d] holds d channels, a learned constant
        [1, c, 1] c), or the one before it when an op reduces or indexes that one (`split_axes`,
        as for a reshape: LeViT's bias table [heads, offsets] read as ``table[:, idx]`` holds
        heads). A buffer read by an op of its own (``1.0 - mask``) is a constant, free."""
        if not (isinstance(src, torch.fx.Node) and src.op == "get_attr" and _shape(src)
                and _holds_features(src) and _is_parameter(self.gm, src)):
            return None
        shape = _shape(src)
        axes = [i for i in reversed(range(len(shape))) if shape[i] > 1] or [len(shape) - 1]
        pick = self.split_axes.get(src.name, 0)
        pick = pick if pick < len(axes) else 0  # every axis met a conflict: the last
        sid = self.slot_on(src, axes[pick])
        if sid is not None and len(axes) > 1:
            self.split_origin.setdefault(sid, (src.name, pick, len(axes)))
        return sid

    def named_args(self, node: torch.fx.Node) -> dict[str, Any]:
        """A call's arguments under the op table's canonical names (tensors included)."""
        return bind_arguments(node, spec_for(self.gm, node))

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

    def couple_constant_reads(self) -> None:
        """A parameter or buffer read as channels at several places (a symbolic graph's
        ``h * s.buf + s.buf`` has a get_attr per read, made private copies by `_privatize`) is
        one set of channels, as export's single placeholder for it is: an entry goes everywhere
        or nowhere, and a read that only a junction sees (the ``+ s.buf``) is not a class of
        buffer entries alone, kept as a constant."""
        reads: dict[tuple, list[Slot]] = {}
        for slot in self.slots:
            if slot.role in ("param", "buffer"):
                tensor = ref_for_get_attr(self.gm, self.nodes[slot.node]).get()
                if isinstance(tensor, torch.Tensor):
                    reads.setdefault((id(tensor), slot.axis, slot.size), []).append(slot)
        for first, *others in reads.values():
            for other in others:
                self.uf.union_many(self._positions(first.id), self._positions(other.id))

    def _weights_read(self, node: torch.fx.Node) -> list[torch.Tensor]:
        """Parameters `node` reads directly or through a computation of parameters alone
        (``W.t()``, ``W * scale``)."""
        found, stack, seen = [], list(node.all_input_nodes), set()
        while stack:
            arg = stack.pop()
            if arg in seen:
                continue
            seen.add(arg)
            if arg.op == "get_attr":
                ref = ref_for_get_attr(self.gm, arg)
                value = ref.get() if ref is not None else None
                if isinstance(value, torch.nn.Parameter):
                    found.append(value)
            elif arg.name in self.constant:  # a weight computed from it (``W.t()``, ``W * 2``)
                stack.extend(arg.all_input_nodes)
        return found

    def _positions(self, sid: int) -> np.ndarray:
        slot = self.slots[sid]
        return np.arange(slot.base, slot.base + slot.size)

    def finish(self) -> ChannelGraph:
        self.couple_tied_layers()
        self.couple_constant_reads()
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
        holds = {role: np.zeros(n_classes, dtype=bool) for role in ("producer", "param", "buffer")}
        for slot in self.slots:  # which classes hold positions of each kind of source
            if slot.role in holds:
                holds[slot.role][cls[slot.base:slot.base + slot.size]] = True
        # a class a constant buffer is in stays unless learned weights (a producer's rows, a
        # parameter) are in it too: removing only a causal mask's positions or a rotary
        # frequency would change the model, not drop a channel of it
        pinned |= holds["buffer"] & ~(holds["producer"] | holds["param"])
        # a class of parameter entries that no layer produces or reads as weight columns, and
        # no junction needs gone, saves no compute: it is a parameter axis read as channels
        # (the kernel width of a conv weight computed in the graph), kept whole
        useful = holds["producer"].copy()
        for rule in self.rules.values():
            if rule.category == "producer":
                for _, sid in rule.consumed:
                    useful[cls[self._positions(sid)]] = True
        required = np.zeros(n_classes, dtype=bool)
        required[[x for _, x in precedence]] = True
        pinned |= holds["param"] & ~useful & ~required
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
        unread = ~self._read_classes(cls, pinned | out_cls)
        return ChannelGraph(self.graph, self.slots, self.rules, self.value_slot, cls, n_classes, precedence,
                            self.pinned_nodes, pinned, out_cls, self.module_names, unread)

    def _read_classes(self, cls: np.ndarray, read: np.ndarray) -> np.ndarray:
        """Per class: whether anything reads its channels. A class is read where a consumer
        takes it as weight columns, a pinned node or the output reads it (`read`, the classes
        pinned or reaching the output), a reduction or a statistic over the channels reads it (a
        norm's mean and variance: `reads_across_channels`), a user reads its value in a way its
        rule does not map (all of that value, to be safe), or an index map carries it into a read
        class. What is
        left is dropped by every reader: the channels ``h[:, 2:6]`` or an unused split piece
        leaves out, and what only flows into them."""
        read = read.copy()
        carried_from, carried_to = [], []
        for rule in self.rules.values():
            across = reads_across_channels(rule)
            for _, sid, in_pos, out_pos, out in rule.inputs:
                if in_pos is None or across:  # a reduction or statistic over the channels reads every one
                    read[cls[self._positions(sid)]] = True
                    continue
                carried_from.append(cls[self.slots[sid].base + np.asarray(in_pos, dtype=np.int64)])
                carried_to.append(cls[self.slots[out].base + np.asarray(out_pos, dtype=np.int64)])
            for _, sid in rule.consumed:
                read[cls[self._positions(sid)]] = True
        mentioned = {name: {entry[1] for entry in (*rule.inputs, *rule.consumed)} for name, rule in self.rules.items()}
        for slot in self.slots:
            for user in self.nodes[slot.node].users:
                if slot.id not in mentioned.get(user.name, ()):
                    read[cls[self._positions(slot.id)]] = True
        if not carried_from or read.all():
            return read
        a, b = np.concatenate(carried_from), np.concatenate(carried_to)
        keep = a != b  # positions a map makes one class carry nothing between classes
        n = len(read)
        # walk the maps backwards from the read classes (a virtual root n points at them)
        roots = np.flatnonzero(read)
        links = sp.coo_matrix((np.ones(keep.sum() + len(roots)),
                               (np.concatenate([b[keep], np.full(len(roots), n)]),
                                np.concatenate([a[keep], roots]))), shape=(n + 1, n + 1)).tocsr()
        reached = breadth_first_order(links, n, directed=True, return_predecessors=False)
        read[reached[reached < n]] = True
        return read


#: Modules export lowers to ops that have no channel rule either (im2col, a pooling over channels).
_NOT_HELPED_BY_EXPORT = (torch.nn.RNNBase, torch.nn.Unfold, torch.nn.Fold, torch.nn.LocalResponseNorm,
                         torch.nn.CrossMapLRN2d, torch.nn.Bilinear)


def _normalized_shape_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Any:
    """The `normalized_shape` argument of a layer/RMS norm, None for any other node."""
    view = op_view(gm, node)
    return view.attrs.get("normalized_shape") if view is not None and view.kind in ("layer_norm", "rms_norm") \
        else None


def _expands_to(user: torch.fx.Node, size: torch.fx.Node) -> bool:
    """Whether `user` is ``y.expand(size)`` with `size` the whole size of a value."""
    return user.op == "call_method" and user.target == "expand" and list(user.args[1:]) == [size] \
        and not user.kwargs


def _reads_sign_of_zero(node: torch.fx.Node) -> bool:
    """An op whose result differs between +0.0 and -0.0 inputs."""
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return name.split(".")[0] in ("signbit", "copysign", "copysign_", "atan2", "arctan2")


def _constant_values(gm: torch.fx.GraphModule) -> set[str]:
    """Names of the values computed from parameters, buffers and shapes alone: the same for
    any input data of a given shape (a position table, a rotary sin/cos)."""
    constant: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" or node.op in ("call_function", "call_method", "call_module") and (
                size_read(node) is not None or all(a.name in constant for a in node.all_input_nodes)):
            constant.add(node.name)
    return constant


__all__ = ["ChannelGraph", "ChannelGraphAnalysis", "Rule", "Slot", "WEIGHT_LAYOUTS", "build_channel_graph"]
