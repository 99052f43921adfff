"""Physically remove the chosen channels: smaller tensors, rewritten shape arguments, adapters.

For every node with a channel rule, in graph order:

- producers (conv, linear, embedding, addmm, ``x @ W``) get their weight sliced along the axes of
  their `WeightLayout` — ``W[kept_out][:, kept_in]`` for a linear/conv ``[out, in]`` weight,
  ``W[kept_in][:, kept_out]`` for an addmm/matmul ``[in, out]`` one — and a sliced bias through
  `ParamRef.set` (new tensors, never in-place), and module attributes (`in_channels`,
  `out_features`, ...) are updated so the module stays consistent;
- batchnorm and depthwise conv slice their parameters (and `groups`); with
  ``exact_norms=False`` layer/group/RMS norm slice their affine (and `normalized_shape`); with
  ``exact_norms=True`` they run at full width (their input re-expanded) and one
  ``index_select`` after them keeps their live channels;
- reshape/view/expand get the new size at the channel axis (a size computed in the graph, as in
  ``x.view(x.size()[:-1] + (n,))``, gets that entry replaced by graph ops); split/chunk become a split with
  the new piece sizes; a slice or narrow of the channel axis gets the bounds of the channels it
  keeps, a zero pad of it the count of pad channels kept, an index_select/index_add along it
  the index of the channels it keeps;
  parameters used directly are sliced along their channel axis;
- wherever a value arrives with other channels than its reader wants (a junction re-indexing
  into a residual stream, a re-expansion before a pinned reader), one adapter is inserted:
  ``index_select(x, axis, idx)`` or, when zeros must come back,
  ``index_select(F.pad(x, one zero channel at the end of axis), axis, idx)``; a block
  output scattered that way into a plain residual add becomes ``index_add(stream, axis, pos, x)``
  (`_Applier.fold_scatters_into_adds`).

New nodes are plain torch calls and buffers on the root (`get_attr`), valid in both IRs.
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxopt.debug.listing import annotate
from fxopt.ir import add_tensor_attr, op_view, ref_for_get_attr, resolve_attr, size_read, tensor_meta

import numpy as np

from .boundary import Boundary
from .channel_model import ChannelGraph, param_arg, producer_weights
from .computed_weights import ComputedWeight


@dataclass
class _Scatter:
    """A zero-filling re-expansion `node` of `src` (its helper nodes in `chain`, its index
    buffer `buf`): channel i of `src` lands at position ``pos[i]`` of `axis`."""

    node: torch.fx.Node
    chain: list
    buf: str
    src: torch.fx.Node
    axis: int
    pos: list
    label: str


_ADDS = (operator.add, torch.add, torch.ops.aten.add.Tensor)


def is_plain_add(node: torch.fx.Node) -> bool:
    """``a + b`` of two different graph values (no alpha, no out): what a scatter folds into."""
    if node.op != "call_function" or node.target not in _ADDS or node.kwargs or len(node.args) != 2:
        return False
    a, b = node.args
    return isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node) and a is not b


def _gather_over_rows(g: torch.fx.Graph, node: torch.fx.Node, ndim: int) -> None:
    """Rewrite ``index_select(x, axis, idx)`` over the rows of a matrix view of x when `axis`
    is the last of three or more: torch's CPU kernel gathers along the last axis of such a
    tensor about 6x slower than along the columns of the same data seen as a matrix (a
    (16, 64, 256) stream keeping 128 channels: 342 vs 57 us), which made the exact-norm gathers
    a sixth of a pruned encoder's time at batch 16."""
    x, axis, idx = node.args
    if ndim < 3 or axis not in (ndim - 1, -1):
        return
    with g.inserting_before(node):
        rows = g.call_method("flatten", (x, 0, -2))
        picked = g.call_function(torch.index_select, (rows, 1, idx))
        lead = g.call_function(operator.getitem, (g.call_function(getattr, (x, "shape")), slice(None, -1)))
        gathered = g.call_method("unflatten", (picked, 0, lead))
    gathered.meta.update(node.meta)
    node.replace_all_uses_with(gathered)
    g.erase_node(node)


def _other_add_operand(add: torch.fx.Node, operand: torch.fx.Node) -> torch.fx.Node | None:
    """The other tensor of ``operand + other`` for a plain add, else None."""
    if not is_plain_add(add):
        return None
    a, b = add.args
    return b if a is operand else a


def _live(node: torch.fx.Node, replaced: dict[torch.fx.Node, torch.fx.Node]) -> torch.fx.Node:
    """`node`, or what replaced it in the graph (following chains of replacements)."""
    while node in replaced:
        node = replaced[node]
    return node


def _same_meta(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    """Same shape and dtype as recorded before pruning (pruning narrows both alike), so no
    broadcasting or promotion hides in the add."""
    ma, mb = a.meta.get("tensor_meta"), b.meta.get("tensor_meta")
    if not (hasattr(ma, "shape") and hasattr(mb, "shape")):  # a number (``h + (h.shape[2] - 8)``)
        return False
    return tuple(ma.shape) == tuple(mb.shape) and ma.dtype == mb.dtype


class _Applier:
    def __init__(self, gm: torch.fx.GraphModule, cg: ChannelGraph, dead: np.ndarray, boundary: Boundary,
                 ignored: set[str], slot_group: dict[int, int]) -> None:
        self.gm, self.cg, self.dead, self.boundary, self.ignored = gm, cg, dead, boundary, ignored
        self.slot_group = slot_group
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.adapters = 0
        self.gathers: list[tuple[torch.fx.Node, int]] = []  # index_selects written, with their rank
        self.reexpansions: list[str] = []
        self._keep: dict[int, np.ndarray] = {}
        self._scatters: list[_Scatter] = []
        self._origin: dict[torch.fx.Node, torch.fx.Node] = {}  # adapter node -> the value it adapts
        self._count_slots: dict[str, int] | None = None  # size-read node -> the slot it counts
        self._read_attrs: dict[str, torch.Tensor] = {}  # attribute -> its tensor before slicing
        self._attr_readers: dict[str, int] | None = None  # attribute -> how many get_attr read it

    def alive(self, sid: int) -> np.ndarray:
        return np.nonzero(~self.dead[self.cg.positions(sid)])[0]

    def keep(self, sid: int) -> np.ndarray:
        if sid not in self._keep:
            size = self.cg.slots[sid].size
            self._keep[sid] = np.arange(size) if sid in self.boundary.full else self.alive(sid)
        return self._keep[sid]

    # ----- adapters -----------------------------------------------------------------------
    def adapt(self, user: torch.fx.Node, src_name: str, sid: int, want: np.ndarray) -> None:
        have = self.keep(sid)
        if len(have) == len(want) and np.array_equal(have, want):
            return
        src = self.nodes[src_name]
        axis = self.cg.slots[sid].axis
        where = {int(p): i for i, p in enumerate(have.tolist())}
        zero_slot = len(have)
        idx = [where.get(int(p), zero_slot) for p in want.tolist()]
        needs_zeros = zero_slot in idx
        g = self.gm.graph
        if len(have) == 0:  # a value that lost every channel: its re-expansion is zeros, padded on
            after = self.cg.slots[sid].ndim - 1 - axis
            with g.inserting_before(user):
                new = g.call_function(F.pad, (src, [0, 0] * after + [0, len(want)]))
            annotate(new, "prune.reexpand", f"0->{len(want)}")
            self.reexpansions.append(f"{src_name}->{user.name}")
            user.replace_input_with(src, new)
            self.adapters += 1
            return
        buf = add_tensor_attr(self.gm, f"prune_idx_{src_name}_to_{user.name}", torch.tensor(idx, dtype=torch.long),
                              parameter=False)
        with g.inserting_before(user):
            idx_node = g.get_attr(buf)
            x = src
            chain = [idx_node]
            if needs_zeros:  # one zero channel appended, for every removed position to read
                after = self.cg.slots[sid].ndim - 1 - axis  # F.pad lists axes from the last
                x = g.call_function(F.pad, (src, [0, 0] * after + [0, 1]))
                chain.append(x)
            new = g.call_function(torch.index_select, (x, axis, idx_node))
        self.gathers.append((new, self.cg.slots[sid].ndim))
        annotate(new, "prune.reexpand" if needs_zeros else "prune.gather", f"{len(have)}->{len(want)}")
        self._origin[new] = src
        if needs_zeros:
            self.reexpansions.append(f"{src_name}->{user.name}")
            lands_at = {i: p for p, i in enumerate(idx) if i != zero_slot}
            if len(lands_at) == len(have):  # every channel of x lands once: a scatter of x
                pos = [lands_at[i] for i in range(len(have))]
                self._scatters.append(_Scatter(new, chain, buf, src, axis, pos, f"{len(have)}->{len(want)}"))
        user.replace_input_with(src, new)
        self.adapters += 1

    def fold_scatters_into_adds(self) -> None:
        """``add(reexpand(x), y)`` -> ``index_add(y, axis, pos, x)``: a block output scattered into
        a live residual stream is added into its channels in one pass, instead of building a
        zero-filled copy first (cat + index_select along the last axis of a transformer stream
        measured 10x the add it feeds; see docs/pruning.md)."""
        g = self.gm.graph
        folded_adds: dict[torch.fx.Node, torch.fx.Node] = {}  # erased add -> the index_add replacing it
        for sc in self._scatters:
            users = list(sc.node.users)
            add = users[0] if len(users) == 1 else None
            other = _other_add_operand(add, sc.node) if add is not None else None
            if other is None or not _same_meta(add, self._origin.get(other, other)) or not _same_meta(add, sc.src):
                continue
            # the scattered value may itself be an add folded earlier in this loop (a residual
            # sum scattered into the next one): the graph now holds its index_add instead
            src = _live(sc.src, folded_adds)
            pos = add_tensor_attr(self.gm, sc.buf + "_pos", torch.tensor(sc.pos, dtype=torch.long), parameter=False)
            with g.inserting_before(add):
                folded = g.call_function(torch.index_add, (other, sc.axis, g.get_attr(pos), src))
            folded.meta = dict(add.meta)
            annotate(folded, "prune.reexpand", f"scatter-add {sc.label}")
            add.replace_all_uses_with(folded)
            folded_adds[add] = folded
            g.erase_node(add)
            for node in [sc.node] + sc.chain[::-1]:
                g.erase_node(node)
            delattr(self.gm, sc.buf)

    # ----- rewrite --------------------------------------------------------------------------
    def run(self) -> None:
        for name, rule in list(self.cg.rules.items()):
            node = self.nodes.get(name)
            if node is None:
                continue
            if rule.category == "pinned" or name in self.ignored:
                for src, sid in rule.consumed + [(r[0], r[1]) for r in rule.inputs]:
                    self.adapt(node, src, sid, np.arange(self.cg.slots[sid].size))
                continue
            handler = getattr(self, f"do_{rule.category.replace('-', '_')}", None)
            if handler is not None:
                handler(node, rule)
            for sid in rule.outputs:
                size, kept = self.cg.slots[sid].size, len(self.keep(sid))
                if kept != size:
                    annotate(node if rule.category != "param" else node, "prune.kept", f"{kept}/{size}")
                annotate(node, "prune.group", self.slot_group.get(sid))

    def mapped_inputs(self, node: torch.fx.Node, rule) -> None:
        for src, sid, in_pos, out_pos, out in rule.inputs:
            want = np.unique(in_pos[np.isin(out_pos, self.keep(out))])
            self.adapt(node, src, sid, want)

    def do_pass(self, node, rule) -> None:
        if rule.info.get("channel_slice"):
            return self.slice_channels(node, rule)
        self.mapped_inputs(node, rule)
        for src, sid in rule.consumed:  # contracted features (q.kᵀ): both at their live channels,
            self.adapt(node, src, sid, self.alive(sid))  # even where another reader keeps one whole
        for src, sid in rule.info.get("gathered", ()):  # a full-width factor: the channels kept
            self.adapt(node, src, sid, self.keep(rule.outputs[0]))
        if rule.info.get("channel_index"):
            self.reindex_gather(node, rule)
        if rule.info.get("channel_pad"):
            self.recount_pads(node, rule)
        b = rule.info.get("size_index")
        if b is not None:
            new = int(len(self.keep(rule.outputs[0])))
            if rule.kind == "reshape_as":  # other's shape, written out: other may keep another count
                _reshape_to_size_of(node)
            _set_shape_entry(node, b, new, self.cg.slots[rule.outputs[0]].size,
                             force=rule.kind == "reshape_as" or self._reads_a_resized_count(_shape_entry(node, b)))
            self._fix_count_entries(node, b)
        if rule.kind == "sdpa" and "scale" in rule.info:  # its features shrank: keep 1/sqrt(d) of before
            _set_arg(node, "scale", float(rule.info["scale"]))
        j = rule.info.get("sizes_entry")
        if j is not None:  # unflatten(dim, sizes) of the channel axis: the split's leading size
            view = op_view(self.gm, node)
            sizes = list(view.attrs["sizes"])
            if sizes[j] != -1:
                sizes[j] = int(len(self.keep(rule.outputs[0])))
                if view.module is not None:  # nn.Unflatten
                    view.module.unflattened_size = tuple(sizes)
                else:
                    _set_arg(node, "sizes", sizes)

    def do_free(self, node: torch.fx.Node, rule) -> None:
        if rule.kind == "reshape":  # a value without channels keeps every size
            self._fix_count_entries(node, None)
        for value, (count, users) in rule.info.get("constants", {}).items():
            # a channel count read as a number (``q.size(-1) ** -0.5``): the original count, a
            # constant, so the arithmetic computes what it did before pruning
            read = self.nodes[value]
            for user in [u for u in read.users if u.name in users]:
                user.replace_input_with(read, count)

    def _fix_count_entries(self, node: torch.fx.Node, b: int | None) -> None:
        """The entries of a reshape other than its channel axis `b` keep their sizes; one computed
        from a resized value's channel count (``C // num_heads`` of the attention's input, the
        analysis allowed only counts and constants there) is written as that size."""
        if len(node.args) == 2 and isinstance(node.args[1], torch.fx.Node):
            return  # one computed size value: its entries are not separate arguments
        shape = tensor_meta(node)[0]
        for j in range(len(shape)):
            if j != b and self._reads_a_resized_count(_shape_entry(node, j)):
                _set_shape_entry(node, j, int(shape[j]), int(shape[j]), force=True)

    def _reads_a_resized_count(self, entry) -> bool:
        """Whether a size entry computed in the graph reads the channel count of a value that
        lost channels (`x.shape[-1]` of the attention's input, written into the reshape after
        it): it would then say that value's new count, not the reshape's own."""
        if self._count_slots is None:
            self._count_slots = {value: sid for rule in self.cg.rules.values()
                                 for value, sid in rule.info.get("counts", {}).items()}
        stack, seen = [entry], set()
        while stack:
            value = stack.pop()
            if not isinstance(value, torch.fx.Node) or value in seen or tensor_meta(value) is not None:
                continue  # a constant, or a tensor (size arithmetic starts at size reads)
            seen.add(value)
            sid = self._count_slots.get(value.name)
            if sid is not None and len(self.keep(sid)) != self.cg.slots[sid].size:
                return True
            stack.extend(value.all_input_nodes)
        return False

    def reindex_gather(self, node, rule) -> None:
        """``index_select`` along the channel axis: its input now arrives as the channels it
        still reads (`mapped_inputs`), so each kept output's index is that channel's new place."""
        _, _, in_pos, _, out = rule.inputs[0]
        read = in_pos[self.keep(out)]
        self._set_index(node, np.searchsorted(np.unique(read), read))

    def recount_pads(self, node, rule) -> None:
        """A zero pad of the channel axis keeps as many pad channels on each side as survive."""
        at, lo = rule.info["channel_pad"]
        _, _, _, out_pos, out = rule.inputs[0]
        kept = self.keep(out)
        pad = list(op_view(self.gm, node).attrs["pad"])
        pad[at:at + 2] = [int((kept < lo).sum()), int((kept > out_pos[-1]).sum())]
        _set_arg(node, "pad", pad)

    def _set_index(self, node: torch.fx.Node, index: np.ndarray) -> None:
        ref = param_arg(self.gm, op_view(self.gm, node), "index")
        ref.set(torch.as_tensor(index, dtype=torch.long))

    def slice_channels(self, node, rule) -> None:
        """``x[start:end]`` on the channel axis. When `x` is simply narrower (the usual case) the
        kept channels the slice reads are one run of `x` as it arrives, so only the bounds
        change; otherwise (`x` kept at full width by the boundary, or the slice's output kept
        wider than `x`) an adapter brings exactly those channels and the slice takes all of it."""
        src, sid, in_pos, out_pos, out = rule.inputs[0]
        want = np.unique(in_pos[np.isin(out_pos, self.keep(out))])
        run = _run_in(self.keep(sid), want)
        if run is None:
            self.adapt(node, src, sid, want)
            run = 0
        _set_channel_slice(node, rule, run, run + len(want))

    def do_junction(self, node, rule) -> None:
        if rule.info.get("channel_index"):  # index_add along the channel axis
            (x, x_sid, _, _, out), (source, sid, _, index, _) = rule.inputs
            self.adapt(node, x, x_sid, self.keep(out))
            # the source's kept channels that land on kept ones (the rest are zero: adding them
            # is a no-op), each sent to where its target now sits
            have = self.keep(sid)
            want = have[np.isin(index[have], self.keep(out))]
            self.adapt(node, source, sid, want)
            return self._set_index(node, np.searchsorted(self.keep(out), index[want]))
        for src, sid, _, _, out in rule.inputs:
            self.adapt(node, src, sid, self.keep(out))

    def do_split(self, node, rule) -> None:
        if not rule.inputs:
            return
        view = op_view(self.gm, node)
        src, sid = rule.inputs[0][0], rule.inputs[0][1]
        axis = self.cg.slots[sid].axis
        dim, sizes = rule.info["dim"], rule.info["sizes"]
        starts = np.cumsum([0] + sizes[:-1])
        wants = [np.arange(s, s + n) for s, n in zip(starts, sizes)]
        for _, _, in_pos, out_pos, out in rule.inputs:
            piece = next(i for u, i in rule.info["pieces"].items() if self.cg.value_slot.get(u) == out)
            wants[piece] = np.unique(in_pos[np.isin(out_pos, self.keep(out))])
        if dim == axis:
            want = np.concatenate(wants)
            new_sizes = [int(len(w)) for w in wants]
        else:  # every piece keeps the same channels (their slots are one class each)
            want = wants[piece]
            new_sizes = sizes
        self.adapt(node, src, sid, want)
        x = node.args[0] if node.args else node.kwargs.get("input")
        if dim == axis and (new_sizes != sizes or view.kind in ("chunk", "tensor_split")):
            node.op, node.target = "call_function", torch.split
            node.args, node.kwargs = (x, new_sizes, dim), {}

    def do_gather(self, node, rule) -> None:
        """An exact norm runs at full width, its kept channels taken after it.

        A layer/RMS norm's statistics do not depend on the channel order, so a narrower input
        is padded with zeros at the end (one cheap copy, where a re-expansion to the original
        positions is a gather) and the affine is permuted to match; the kept output channels
        are then one run (narrow) or a gather. A group norm's groups fix the order: its input is
        re-expanded in place. The gather stands in for the norm as the value later readers
        adapt from.
        """
        out = self.cg.slots[rule.outputs[0]]
        if rule.kind in ("layer_norm", "rms_norm") and _computed_norm_shape(self.gm, node):
            _resize_norm(node, None, rule.kind, out.size)  # a count read off its narrowed input
        order = np.arange(out.size)  # original channel at each position the norm computes
        for src, sid in rule.consumed:
            have = self.keep(sid)
            if rule.kind == "group_norm" or len(have) == out.size:
                self.adapt(node, src, sid, order)
                continue
            order = np.concatenate([have, np.setdiff1d(order, have)])
            self._pad_norm_input(node, self.nodes[src], out.size - len(have), torch.as_tensor(order),
                                 out.ndim - 1 - out.axis)
        where = np.empty(out.size, dtype=np.int64)
        where[order] = np.arange(out.size)
        idx = where[self.keep(out.id)]
        if np.array_equal(idx, np.arange(out.size)):
            return
        g = self.gm.graph
        readers = list(node.users)
        if np.array_equal(idx, np.arange(len(idx))):  # a leading run: a plain copy
            with g.inserting_after(node):
                run = g.call_function(torch.narrow, (node, out.axis, 0, len(idx)))
            with g.inserting_after(run):
                kept = g.call_method("contiguous", (run,))
        else:
            buf = add_tensor_attr(self.gm, f"prune_idx_{node.name}_kept", torch.as_tensor(idx), parameter=False)
            with g.inserting_after(node):
                idx_node = g.get_attr(buf)
            with g.inserting_after(idx_node):
                kept = g.call_function(torch.index_select, (node, out.axis, idx_node))
            self.gathers.append((kept, out.ndim))
        for reader in readers:
            reader.replace_input_with(node, kept)
        annotate(kept, "prune.gather", f"{out.size}->{len(idx)}")
        self.nodes[node.name] = kept
        self.adapters += 1

    def _pad_norm_input(self, node: torch.fx.Node, x: torch.fx.Node, zeros: int, order: torch.Tensor,
                        after: int = 0) -> None:
        """Feed the norm `x` with `zeros` zero channels appended on the axis `after` axes before
        the last (a layer norm over ``[C, 1, 1]``: 2), its affine permuted to `order`."""
        with self.gm.graph.inserting_before(node):
            padded = self.gm.graph.call_function(torch.nn.functional.pad, (x, (0, 0) * after + (0, zeros)))
        node.replace_input_with(x, padded)
        annotate(padded, "prune.reexpand", f"pad +{zeros}")
        self.reexpansions.append(f"{x.name}->{node.name}")
        self.adapters += 1
        for ref in op_view(self.gm, node).params.values():
            t = ref.get()
            if t is not None:
                ref.set(t.index_select(0, order).contiguous())

    def do_producer(self, node, rule) -> None:
        view = op_view(self.gm, node)
        pw = producer_weights(self.gm, node, rule)
        out_keep = torch.as_tensor(self.keep(rule.outputs[0]), dtype=torch.long)
        w = pw.weight.get()
        in_keep = None
        for src, sid in rule.consumed:
            want = self.alive(sid)
            self.adapt(node, src, sid, want)
            in_keep = want
        cuts = [(pw.out_axis, torch.as_tensor(pw.out_index(out_keep.numpy()), dtype=torch.long))]
        if in_keep is not None and pw.in_axis is not None:
            n_in = w.shape[pw.in_axis]
            cols = in_keep[in_keep < n_in] if rule.kind == "conv" else in_keep
            if rule.kind == "conv" and rule.info["groups"] > 1:
                cols = np.unique(in_keep % n_in)
            cuts.append((pw.in_axis, torch.as_tensor(cols, dtype=torch.long)))
        new_w = w
        for axis, index in cuts:
            new_w = new_w.index_select(axis, index)
            if isinstance(pw.weight, ComputedWeight) and len(index) != w.shape[axis]:
                pw.weight.gather(axis, index)  # the layer reads the kept part of what it computes
        if not isinstance(pw.weight, ComputedWeight):
            pw.weight.set(new_w.contiguous())
        b = pw.bias.get() if pw.bias is not None else None
        if b is not None:
            pw.bias.set(b.index_select(0, out_keep))
        m = view.module
        if m is None:
            return
        if rule.kind == "embedding":
            m.embedding_dim = len(out_keep)
        elif rule.kind == "conv":
            m.out_channels = len(out_keep)
            m.in_channels = new_w.shape[1] * m.groups
        elif rule.kind == "conv_transpose":
            m.in_channels, m.out_channels = new_w.shape[0], new_w.shape[1] * pw.groups
        else:
            m.out_features, m.in_features = new_w.shape[pw.out_axis], new_w.shape[pw.in_axis]

    def do_norm(self, node, rule) -> None:
        view = op_view(self.gm, node)
        self.mapped_inputs(node, rule)
        out_keep = torch.as_tensor(self.keep(rule.outputs[0]), dtype=torch.long)
        sliced = set()  # one tensor as the weight and the bias (``F.batch_norm(h, m, v, w, w)``) is sliced once
        for key, ref in view.params.items():
            t = ref.get()
            if t is not None and t.dim() >= 1 and ref.qualname not in sliced:
                sliced.add(ref.qualname)
                ref.set(t.index_select(0, out_keep).contiguous())
        m = view.module
        if rule.kind in ("batch_norm", "instance_norm"):
            if m is not None:
                m.num_features = len(out_keep)
            return
        if rule.kind in ("layer_norm", "rms_norm", "group_norm"):  # exact_norms=False: the affine follows
            _resize_norm(node, m, rule.kind, len(out_keep))
            if group_size := rule.info.get("group_size"):  # whole groups removed: fewer of them
                if m is not None:
                    m.num_groups = len(out_keep) // group_size
                else:
                    _set_arg(node, "num_groups", len(out_keep) // group_size)
            if rule.info.get("rms_rescale"):
                self._rescale_rms_norm(node, view, self.cg.slots[rule.outputs[0]].size, len(out_keep))
            return
        if rule.kind == "prelu":
            if m is not None:
                m.num_parameters = len(out_keep)
            return
        # depthwise conv: groups follow the kept inputs
        _, sid, in_pos, out_pos, out = rule.inputs[0]
        groups = int(len(np.unique(in_pos[np.isin(out_pos, self.keep(out))])))
        if m is not None:
            m.groups, m.in_channels, m.out_channels = groups, groups, len(out_keep)
        else:
            _set_arg(node, "groups", groups)

    def _rescale_rms_norm(self, node: torch.fx.Node, view, size: int, kept: int) -> None:
        """rms_norm over `kept` of `size` channels whose removed ones were zero: weight·√(size/kept)
        and eps·size/kept give the original norm (see `rules.layers.LayerRules.rule_rms_norm`)."""
        if kept == size:
            return
        ratio = size / kept
        weight = view.params.get("weight")
        if weight is not None:
            weight.set(weight.get() * ratio ** 0.5)
        else:  # no weight to fold the factor into: one multiply after the norm
            self._scale_after(node, ratio ** 0.5, f"rms_norm over {kept} of {size} channels")
        eps = view.attrs.get("eps")
        if eps is None:  # rms_norm's default: the input dtype's machine epsilon
            eps = torch.finfo(tensor_meta(node)[1]).eps
        if view.module is not None:
            view.module.eps = eps * ratio
        else:
            _set_arg(node, "eps", eps * ratio)

    def do_reduce(self, node, rule) -> None:
        """A mean over the channel axis of a narrower value: rescaled to the original count."""
        _, sid, *_ = rule.inputs[0]
        kept, size = len(self.keep(sid)), self.cg.slots[sid].size
        if rule.kind != "mean" or kept == size:
            return
        self._scale_after(node, kept / size, f"mean over {kept} of {size} channels")

    def _scale_after(self, node: torch.fx.Node, factor: float, label: str) -> None:
        """Every reader of `node` reads ``node * factor`` instead; adapters for them start there."""
        g = self.gm.graph
        with g.inserting_after(node):
            scaled = g.call_function(operator.mul, (node, factor))
        node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
        annotate(scaled, "prune.rescale", label)
        self.nodes[node.name] = scaled

    def do_param(self, node, rule) -> None:
        sid = rule.outputs[0]
        keep = self.keep(sid)
        if len(keep) == self.cg.slots[sid].size:
            return
        ref = ref_for_get_attr(self.gm, node)
        t = self._read_attrs.setdefault(node.target, ref.get())  # as before any use was sliced
        new = t.index_select(self.cg.slots[sid].axis, torch.as_tensor(keep, dtype=torch.long)).contiguous()
        if self._attr_readers is None:  # counted once, before any reader is retargeted
            self._attr_readers = Counter(n.target for n in self.gm.graph.nodes if n.op == "get_attr")
        if self._attr_readers.get(node.target, 0) > 1:  # one tensor read at several places (a constant symbolic tracing folded)
            node.target = add_tensor_attr(self.gm, node.target, new, parameter=isinstance(t, nn.Parameter),
                                          requires_grad=t.requires_grad)
        elif isinstance(t, nn.Parameter):
            ref.owner._parameters[ref.attr] = nn.Parameter(new, requires_grad=t.requires_grad)
        else:
            ref.set(new)


def _computed_norm_shape(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether a norm's `normalized_shape` is computed in the graph (``(x.shape[-1],)``,
    ``x.shape[-1:]``)."""
    norm_shape = op_view(gm, node).attrs.get("normalized_shape")
    return isinstance(norm_shape, torch.fx.Node) or (
        isinstance(norm_shape, (list, tuple)) and any(isinstance(e, torch.fx.Node) for e in norm_shape))


def _resize_norm(node: torch.fx.Node, m: nn.Module | None, kind: str, size: int) -> None:
    """Layer norm normalizes over `size` channels now, the first normalized axis (unit axes
    after it stay: GCNet's ``[C, 1, 1]``); group norm keeps its group count."""
    if kind in ("layer_norm", "rms_norm"):
        old = m.normalized_shape if m is not None else op_view(node.graph.owning_module, node).attrs.get(
            "normalized_shape")
        if isinstance(old, torch.fx.Node):  # ``x.shape[-1:]``: the sizes capture recorded
            old = old.meta.get("tensor_meta")
        rest = list(old[1:]) if isinstance(old, (list, tuple)) else []
        if m is not None:
            m.normalized_shape = (size, *rest)
        else:
            _set_arg(node, "normalized_shape", [size, *rest])
    elif m is not None:
        m.num_channels = size


def _reshape_to_size_of(node: torch.fx.Node) -> None:
    """``x.reshape_as(other)`` -> ``x.reshape(other.size())``, whose entries can be rewritten."""
    x, other = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs["other"]
    with node.graph.inserting_before(node):
        size = node.graph.call_method("size", (other,))
    node.op, node.target, node.args, node.kwargs = "call_method", "reshape", (x, size), {}


def _shape_entry(node: torch.fx.Node, index: int):
    """Entry `index` of a reshape/view/expand size argument as the graph holds it (for a size
    computed as one value, ``x.size()[:-1] + (n,)``, that value)."""
    args = list(node.args)
    if len(args) == 2 and isinstance(args[1], torch.fx.Node):
        return args[1]
    if len(args) >= 2 and isinstance(args[1], (list, tuple)):
        return args[1][index]
    if len(args) >= 2:
        return args[1 + index]
    return list(next(node.kwargs[k] for k in ("shape", "size") if k in node.kwargs))[index]


def _set_shape_entry(node: torch.fx.Node, index: int, new: int, old: int, force: bool = False) -> None:
    """Replace entry `index` of a reshape/view/expand size argument (list or varargs, or one
    value computed in the graph such as ``x.size()[:-1] + (n,)``: its entry is replaced there)."""
    if new == old and not force:  # the entry may be a size read in the graph (`x.shape[2]`): keep it dynamic
        return
    args = list(node.args)
    if len(args) == 2 and isinstance(args[1], torch.fx.Node) and len(tensor_meta(node)[0]) > 1:
        size = args[1]  # a sequence (several axes, one argument): size[:index] + (new,) + size[index + 1:]
        g = node.graph
        with g.inserting_before(node):
            head = g.call_function(operator.getitem, (size, slice(None, index)))
            tail = g.call_function(operator.getitem, (size, slice(index + 1, None)))
            args[1] = g.call_function(operator.add, (g.call_function(operator.add, (head, (new,))), tail))
    elif len(args) >= 2 and isinstance(args[1], (list, tuple)):
        shape = list(args[1])
        if shape[index] != -1:
            shape[index] = new
        args[1] = shape
    elif len(args) >= 2:
        if args[1 + index] != -1:
            args[1 + index] = new
    else:
        key = next(k for k in ("shape", "size") if k in node.kwargs)
        shape = list(node.kwargs[key])
        if shape[index] != -1:
            shape[index] = new
        node.kwargs = {**node.kwargs, key: shape}
        return
    node.args = tuple(args)


def _run_in(have: np.ndarray, want: np.ndarray) -> int | None:
    """Where `want` sits in `have` as one contiguous run (both sorted), else None."""
    if len(want) == 0:
        return None
    start = int(np.searchsorted(have, want[0]))
    return start if np.array_equal(have[start:start + len(want)], want) else None


def _set_channel_slice(node: torch.fx.Node, rule, start: int, stop: int) -> None:
    """Rewrite the channel-axis slice of `node` (an ``aten.slice`` or a getitem, see
    `rules.indexing.IndexRules._slice_channels`) to ``start:stop``."""
    if rule.kind == "slice":
        _set_arg(node, "start", start)
        _set_arg(node, "end", stop)
        return
    if rule.kind == "narrow":
        _set_arg(node, "start", start)
        _set_arg(node, "length", stop - start)
        return
    at, new = rule.info["slice_item"], slice(start, stop)
    index = new if at is None else node.args[1][:at] + (new,) + node.args[1][at + 1:]
    node.args = (node.args[0], index)


def _set_arg(node: torch.fx.Node, name: str, value) -> None:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        names = [a.name for a in target._schema.arguments]
    else:
        from fxopt.ir import spec_for

        names = list(spec_for(None, node).arg_names)
    if name in node.kwargs:
        node.kwargs = {**node.kwargs, name: value}
        return
    i = names.index(name)
    args = list(node.args)
    if i < len(args):
        args[i] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def apply_pruning(gm: torch.fx.GraphModule, cg: ChannelGraph, dead: np.ndarray, boundary: Boundary,
                  ignored: set[str], slot_group: dict[int, int]) -> dict:
    applier = _Applier(gm, cg, dead, boundary, ignored, slot_group)
    applier.run()
    applier.fold_scatters_into_adds()
    for node, ndim in applier.gathers:
        if not getattr(node, "_erased", False):
            _gather_over_rows(gm.graph, node, ndim)
    _erase_dead_size_arithmetic(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return {"adapters": applier.adapters, "reexpansions": applier.reexpansions}


_SIZE_ARITHMETIC = (operator.getitem, operator.floordiv, operator.mul, operator.add, operator.sub)


def _erase_dead_size_arithmetic(graph: torch.fx.Graph) -> None:
    """Size reads, and integer arithmetic on them only, that no rewritten shape entry uses any
    more (ShuffleNet's ``c // groups`` once its view holds the new count): a second prune would
    take them for reads of the channel count of another kind."""
    sizes: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if size_read(node) is not None or (node.op == "call_function" and node.target in _SIZE_ARITHMETIC
                                           and node.all_input_nodes and set(node.all_input_nodes) <= sizes):
            sizes.add(node)
    for node in reversed(list(graph.nodes)):
        if node in sizes and not node.users:
            graph.erase_node(node)


def tied_parameters(gm: torch.fx.GraphModule) -> list[list[str]]:
    """Names that hold one parameter object: tied weights, and the private names `_privatize`
    gave a shared weight's other uses."""
    by_tensor: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    return [names for names in by_tensor.values() if len(names) > 1]


def share_equal_ties(gm: torch.fx.GraphModule, ties: list[list[str]]) -> None:
    """Within each tie (names that held one parameter, `tied_parameters`), the names whose
    tensors are still equal share one again: they were edited alike, each on a copy of its own."""
    params = dict(gm.named_parameters(remove_duplicate=False))
    for names in ties:
        live = [n for n in names if n in params]
        tensors = [params[n] for n in live]
        if len(live) < 2 or not all(t.shape == tensors[0].shape and t.dtype == tensors[0].dtype
                                    and torch.equal(t, tensors[0]) for t in tensors[1:]):
            continue
        for name in live[1:]:
            owner, attr = resolve_attr(gm, name)
            setattr(owner, attr, tensors[0])


def zero_removed(gm: torch.fx.GraphModule, cg: ChannelGraph, dead: np.ndarray) -> None:
    """Mask instead of remove: zero every producer row, norm affine and parameter slice of the
    dead classes (new tensors via ParamRef.set; a weight computed in the graph is zeroed after
    its computation). The masked model computes exactly what the pruned one does, which is how
    the tests check exactness. Tied weights zeroed alike stay tied, so a plan applied after it
    re-ties them as it would have (`PrunePlan.apply`)."""
    ties = tied_parameters(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    edited = False
    for name, rule in cg.rules.items():
        node = nodes.get(name)
        if node is None or rule.category not in ("producer", "norm", "param", "gather"):
            continue
        sid = rule.outputs[0]
        idx = torch.as_tensor(np.nonzero(dead[cg.positions(sid)])[0], dtype=torch.long)
        if len(idx) == 0:
            continue
        if rule.category == "param":
            ref = ref_for_get_attr(gm, node)
            refs = [(ref, cg.slots[sid].axis, idx)]
        elif rule.category == "producer":
            pw = producer_weights(gm, node, rule)
            rows = torch.as_tensor(pw.out_index(idx.numpy()), dtype=torch.long)
            refs = [(pw.weight, pw.out_axis, rows)] + ([(pw.bias, 0, idx)] if pw.bias is not None else [])
            if isinstance(pw.weight, ComputedWeight):  # zero what the layer reads of it
                pw.weight.zero(pw.out_axis, rows)
                refs, edited = refs[1:], True
        else:
            view = op_view(gm, node)
            refs = [(view.params[k], 0, idx) for k in ("weight", "bias") if k in view.params]
        for ref, axis, index in refs:
            if ref.get() is None:
                continue
            t = ref.get().detach().clone()
            t.index_fill_(axis, index, 0.0)
            ref.set(t)
    share_equal_ties(gm, ties)
    if edited:
        gm.recompile()
