"""Values taken apart and put together along an axis: cat, split/chunk, stack,
unbind, getitem, indexing by tensors, select, slice, narrow, index_select/index_add, pad."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx

from fxopt.ir import op_view, tensor_meta

from ..channel_model import Rule, _Pin
from ..node_facts import _is_number, _norm_axes, _norm_axis, _piece_index, _piece_sizes, _shape


class IndexRules:
    """Rules for cat/split, getitem, indexing and slicing; methods of `channel_graph._Builder`."""

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
            chunks = view.attrs.get("chunks")
            if isinstance(chunks, torch.fx.Node):  # a count computed in the graph
                sizes = _piece_sizes(node, dim, n)
            else:
                step = -(-n // int(chunks))
                sizes = [min(step, n - i) for i in range(0, n, step)]
        elif view.kind == "tensor_split":
            points = view.attrs.get("indices_or_sections")
            computed = isinstance(points, torch.fx.Node) or (
                isinstance(points, (list, tuple)) and any(isinstance(v, torch.fx.Node) for v in points))
            sizes = _piece_sizes(node, dim, n) if computed else _tensor_split_sizes(points, n)
            if sizes is None:
                raise _Pin("tensor_split at points out of order (overlapping pieces)")
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

    rule_chunk = rule_tensor_split = rule_split

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
        if node.op == "call_module":  # (apply recounts the pads of an F.pad call's arguments)
            raise _Pin("a pad module over the channel axis")
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
        bounds = (item.start, item.stop, item.step)
        if any(isinstance(v, torch.fx.Node) for v in bounds):
            # bounds computed from channel counts alone (ShiftNet's ``q = h.shape[1] // 4``):
            # the original numbers, which apply writes as constants in place of the counts
            if not all(self._counts_only(v, during_walk=True) for v in bounds if isinstance(v, torch.fx.Node)):
                raise _Pin("slice on the channel axis with bounds computed in the graph")
            item = slice(*(v.meta["tensor_meta"] if isinstance(v, torch.fx.Node) else v for v in bounds))
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


def _tensor_split_sizes(spec, n: int) -> list[int] | None:
    """The piece sizes of ``tensor_split(x, spec)`` over an axis of `n`: a count k gives the
    first ``n % k`` pieces one longer; split points give ``x[p_i:p_i+1]`` each (clipped to
    the axis). None for points computed in the graph, or out of order (pieces that overlap)."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        return [n // spec + (i < n % spec) for i in range(spec)]
    if not isinstance(spec, (list, tuple)) or not all(isinstance(p, int) and not isinstance(p, bool) for p in spec):
        return None
    bounds = [0, *(min(max(p + n if p < 0 else p, 0), n) for p in spec), n]
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    return None if min(sizes) < 0 else sizes

