"""Ops that move axes: expand, permute/transpose, flatten/reshape/unflatten (digit
maps, head splits), squeeze/unsqueeze and pixel (un)shuffle."""
from __future__ import annotations

import math

import numpy as np
import torch

from fxopt.ir import size_read

from ..channel_model import _Pin
from ..node_facts import _digit_map, _norm_axis, _prefix_hits, _shape, _size_entries


class ShapeRules:
    """Rules for expand, permute, reshape and pixel shuffles; methods of `channel_graph._Builder`."""

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

    def rule_expand(self, node, view, shape) -> None:
        size = view.attrs.get("size")
        query = size_read(size) if isinstance(size, torch.fx.Node) else None
        if query is not None and query[1] is None:
            if size.name in self.pinned_nodes:  # the size reads the full width: so does the expand
                raise _Pin(f"expand to the size of {query[0].name}, read at full width")
            # ``y.expand(x.size())`` (AdaIN's statistics): x's run-time shape, so y's channels are x's
            return self._expand_to(node, view, shape, query[0])
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        axis = self.slots[sid].axis + len(shape) - len(_shape(src))
        self.passthrough(node, view, src, axis, info={"size_index": axis})

    def _expand_to(self, node, view, shape, target) -> None:
        """``y.expand(x.size())``: the output has x's shape, as with ``y.expand_as(x)``."""
        src, sid = self.single_input(node, view)
        tid = self.in_slot(target)
        if tid is None:
            if sid is not None:
                raise _Pin("expand to the size of a value without channels")
            return self.free_output(node, view)
        axis = self.slots[tid].axis
        if sid is None or len(_shape(src)) != len(shape):
            raise _Pin("expand to another value's size where fxopt cannot tie the channels")
        if self.slots[sid].axis != axis or _shape(src)[axis] != shape[axis]:
            raise _Pin(f"input {src.name} carries channels on another axis than the output's")
        out = self.passthrough(node, view, src, axis, sid=sid)
        pos = np.arange(shape[axis])
        self.link(tid, out, pos, pos, view.kind, "shape")
        self.rules[node.name].inputs.append((target.name, tid, pos, pos, out))

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
        dims = [_norm_axis(int(d), nd) for d in view.attrs.get("dims") or ()]
        self.passthrough(node, view, src, dims.index(self.slots[sid].axis))

    def rule_movedim(self, node, view, shape) -> None:
        """movedim/moveaxis: a permute, whose order torch computes from the moved axes (read
        off a meta tensor whose axis i has size i + 2)."""
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        source, destination = view.attrs.get("source"), view.attrs.get("destination")
        probe = torch.empty([i + 2 for i in range(len(shape))], device="meta")
        order = [size - 2 for size in probe.movedim(source, destination).shape]
        self.passthrough(node, view, src, order.index(self.slots[sid].axis))

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
