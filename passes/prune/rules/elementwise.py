"""Elementwise ops, activations, reductions and the junctions (add/sub, products,
selections): how each passes, gates or mixes channels."""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.fx

from ..channel_model import SPATIAL, Rule, _Pin
from ..node_facts import _is_number, _is_zero_fill, _norm_axes, _norm_axis, _piece_index, _shape, _sign


class ElementwiseRules:
    """Rules for elementwise ops, reductions and junctions; methods of `channel_graph._Builder`."""

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
        """amax/amin, var/std and (var, mean)/(std, mean) over other axes: per channel (both
        results of the pairs), and 0 over a removed (zero) channel; over the channel axis the
        removed zeros would count (a max of negatives, a variance)."""
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        out_axis = self._reduced_axis(src, sid, view)
        if out_axis is None:
            raise _Pin(f"{view.kind} over the channel axis (the removed zeros would count)", conflict=sid)
        if view.kind not in ("var_mean", "std_mean"):
            return self.passthrough(node, view, src, out_axis)
        dims = view.attrs.get("dim")
        reduced = _norm_axes(dims, len(_shape(src)))[0] if dims not in (None, []) else None
        self._tuple_pieces(node, view, src, sid, reduced, out_axis, 2)

    rule_amin = rule_var = rule_std = rule_var_mean = rule_std_mean = rule_amax

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
        if any(_piece_index(user) == 1 for user in node.users):
            # a removed, all-zero channel's indices are each window's first position, not 0
            raise _Pin(f"{view.kind}'s indices are read (a removed channel's are not zero)")
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
        if view.kind in ("repeat", "tile"):
            counts = list(view.attrs.get("repeats") or ())
            counts = [1] * (len(in_shape) - len(counts)) + counts  # tile's, padded to the input's rank
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
            raise _Pin(f"{view.kind} count of the channel axis computed in the graph", conflict=sid)
        c = in_shape[axis]
        self.passthrough(node, view, src, out_axis, copies(np.arange(c), r), np.arange(c * r), how=f"copies x{r}")

    rule_repeat = rule_tile = rule_repeat_interleave

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

    def _aligned_inputs(self, node, view, shape, allow_broadcast: bool):
        """(input node, slot) per tensor input aligned on the output channel axis; a number
        computed in the graph (``math.sqrt(q.size(-1))``) is a scalar operand."""
        tensor_inputs = [a for a in view.inputs if not _is_number(a)]
        slotted = [(a, self.in_slot(a)) for a in tensor_inputs if self.in_slot(a) is not None]
        if not slotted:
            # parameters alone (ACON's ``p1 - p2``, ``p * 2.0``): a parameter's slot, so the
            # result is sliced with the channels it later scales, as a parameter read alone is
            slotted = [(a, sid) for a in tensor_inputs if (sid := self.parameter_slot(a)) is not None][:1]
        if not slotted:
            return None, []
        # the output follows a value computed from the input first: a constant operand (a
        # rotary table) may be the one that broadcasts over its channels
        ref_node, ref_sid = min(slotted, key=lambda pair: pair[0].name in self.constant)
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
                    # would break the broadcast (a gate over the positions times a feature map).
                    # A constant (RoFormer's sin/cos over each head's features, times q's heads)
                    # keeps them all instead and is spread like a number: only a table is held.
                    if a.name not in self.constant:
                        raise _Pin(f"input {a.name} carries channels on another axis than the output's",
                                   conflict=own)
                    self.pinned_positions.extend(self._positions(own))
                    self.held_constants.add(a.name)
                broadcast.append(a)
                continue
            if a_shape[a_axis] != c:
                raise _Pin("channel sizes differ")
            sid = self.slot_on(a, a_axis)
            if sid is None:
                # (a parameter [heads, d] times [.., heads, .., d]: its slot moves to the heads)
                raise _Pin(f"input {a.name} tracks channels on another axis", conflict=self.in_slot(a))
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
            if len(pairs) != 1 or any(self.in_slot(a) is not None and a.name not in self.held_constants
                                      for a in spread):
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
        """clamp/clip/hardtanh: zero-preserving when its range holds 0 (`clamp(min=0)` is a relu),
        else dirty (``hardtanh(x, 0.5, 2)`` gives 0.5 on a removed channel)."""
        if view.kind == "hardtanh":
            low, high = view.attrs.get("min_val", -1.0), view.attrs.get("max_val", 1.0)
        else:
            low, high = view.attrs.get("min"), view.attrs.get("max")
        if isinstance(low, torch.fx.Node) or isinstance(high, torch.fx.Node):
            raise _Pin(f"{view.kind} with tensor bounds")
        holds_zero = (low is None or low <= 0) and (high is None or high >= 0)
        self._channelwise(node, view, shape, dirty=not holds_zero)

    rule_hardtanh = rule_clamp

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
        if not any(self.in_slot(a) is not None or getattr(a, "op", None) == "get_attr" for a in view.inputs):
            return self.free_output(node, view)  # no channels in it (ALiBi's slopes, from arange)
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
        free = [(a, sid) for a, sid in pairs if self.lazy_pins.get((a.name, self.slots[sid].axis)) == sid]
        if view.kind == "mul" and free and len(free) < len(pairs):
            # a value whose channels nothing follows (a pinned region's output: a norm spelled out
            # over the channels, whose affine comes next; the model input) times channels: the
            # product is zero where they are, so it has their classes, and apply gathers the
            # free operand to the channels kept instead of holding them all
            info["gathered"] = [(a.name, sid) for a, sid in free]
            if any(_is_zero_fill(self.gm, a) for a, _ in free):
                info["zero_product"] = True  # times zeros (an RNN's initial state): zero, dirty factors too
            pairs = [pair for pair in pairs if pair not in free]
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
