"""Weighted layers (conv, linear, addmm, embedding) and the norms (batch, instance,
layer, RMS, group): producers of channels and the exact-norm gathers."""
from __future__ import annotations

import numpy as np
import torch
import torch.fx

from fxopt.ir import ParamRef, attribute_use_counts, is_shared, op_view, transposed_parameter

from ..channel_model import WEIGHT_LAYOUTS, Rule, _Pin, param_arg, producer_weights
from ..computed_weights import ComputedWeight
from ..node_facts import _COMPUTED, _module_name, _shape


def _computed_weight(gm: torch.fx.GraphModule, weight) -> str:
    """Why a layer's weight is computed, where the graph tells: a slice of a parameter whose
    bounds are computed (a slimmable layer's ``w[:, :x.shape[1]]``), else the usual suspects."""
    view = op_view(gm, weight) if isinstance(weight, torch.fx.Node) and weight.op != "get_attr" else None
    if view is not None and view.kind in ("getitem", "slice", "narrow") and view.inputs \
            and view.inputs[0].op == "get_attr" \
            and any(a is not view.inputs[0] and a.op != "get_attr" for a in weight.all_input_nodes):
        return (f" (a slice of '{view.inputs[0].target}' with bounds computed in the graph, as a slimmable "
                "layer's w[:, :x.shape[1]]: mode='export' fixes them at the example's sizes and prunes it)")
    return _COMPUTED



#: A norm's per-channel operands, which apply slices with its channels.
_NORM_OPERANDS = ("weight", "bias", "running_mean", "running_var")
#: Group norms of at least this many groups lose whole groups under exact_norms (a group is at
#: most a quarter of the channels); fewer, coarser groups (GroupNorm(1, C), a layer norm over
#: C, H, W) are read at full width and gathered after, channel by channel.
_WHOLE_GROUPS_FROM = 4


def _stored_operands(view) -> None:
    """A norm whose per-channel operand is computed in the graph (``torch.ones(C)``,
    ``self.weight * 2``) is pinned: apply slices stored tensors, and the computed one would keep
    the full width."""
    computed = [k for k in _NORM_OPERANDS if isinstance(view.attrs.get(k), torch.fx.Node)]
    if computed:
        raise _Pin(f"{view.kind}'s {' and '.join(computed)} computed in the graph "
                   f"('{view.attrs[computed[0]].name}'), not a stored tensor apply could slice")


def _normalized_dims(node: torch.fx.Node, view) -> tuple:
    """The normalized shape of a layer/RMS norm: written in the graph (``[C]``, ``(C, H, W)``)
    or computed from sizes in a symbolic trace (``F.layer_norm(h, h.shape[1:])``), which capture
    recorded in the size node's metadata. A shape known only at run time pins the norm."""
    norm_shape = view.attrs.get("normalized_shape")
    if isinstance(norm_shape, torch.fx.Node):
        norm_shape = norm_shape.meta.get("tensor_meta")
        if not isinstance(norm_shape, (tuple, list)):
            raise _Pin(f"{view.kind} over a normalized shape computed in the graph, of unknown length")
    return tuple(norm_shape) if isinstance(norm_shape, (list, tuple)) else (norm_shape,)


def _pointwise(view) -> bool:
    """A conv that reads each spatial position alone and writes it in place: kernel 1, stride 1,
    no padding (dilation is then moot), not transposed. The op view gives stride and padding
    as tuples in both front ends (a padding string it cannot say in integers stays one)."""
    weight, attrs = view.param("weight"), view.attrs
    return (weight is not None and all(k == 1 for k in weight.shape[2:]) and not attrs.get("transposed")
            and all(v == 1 for v in attrs["stride"]) and all(v == 0 for v in attrs["padding"]))


class LayerRules:
    """Rules for weighted layers and norms; methods of `channel_graph._Builder`."""

    def rule_batch_norm(self, node, view, shape) -> None:
        src, sid = self.single_input(node, view)
        if sid is None:
            raise _Pin("batch_norm on a value without channel tracking")
        self._private_affine(node, view)
        _stored_operands(view)
        if self.slots[sid].axis != 1:
            raise _Pin("batch_norm input channel axis is not 1")
        batch_statistics = view.attrs.get("training") and view.param("running_mean") is None
        if view.attrs.get("training") and not batch_statistics:
            raise _Pin("batch_norm in training mode")
        # statistics of the batch (track_running_stats=False) are per channel, as an
        # instance_norm's: a removed (zero) channel normalizes to 0, then its affine bias
        if view.param("weight") is None and not batch_statistics:  # a removed channel would leave -mean/std, not zero
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
        self._private_affine(node, view)
        _stored_operands(view)
        self.passthrough(node, view, src, 1, category="norm")

    def rule_unfold(self, node, view, shape) -> None:
        """im2col (``F.unfold``): output row j is input channel j // k for k kernel positions, in
        blocks, as a flatten into a Linear; the kernel's arguments hold no channel count."""
        src, sid = self.single_input(node, view)
        if sid is None:
            return self.free_output(node, view)
        if self.slots[sid].axis != 1 or len(_shape(src)) != 4:
            raise _Pin("unfold of a value whose channels are not on axis 1 of a 4-D value")
        c = self.slots[sid].size
        if shape[1] % c:
            raise _Pin("unfold output rows are no multiple of its channels")
        k = shape[1] // c
        self.passthrough(node, view, src, 1, np.repeat(np.arange(c), k), np.arange(c * k), how=f"blocks x{k}")

    def rule_grid_sample(self, node, view, shape) -> None:
        """Every channel sampled at the grid's positions (a spatial transformer): channelwise
        and zero-preserving; a grid that carries channels keeps them."""
        src, grid = view.inputs[0], view.inputs[1]
        sid = self.in_slot(src)
        if sid is None:
            return self.free_output(node, view)
        if self.slots[sid].axis != 1:
            raise _Pin("grid_sample of a value whose channels are not on axis 1")
        if self.in_slot(grid) is not None:
            raise _Pin("grid_sample whose grid is computed from channels", hold=(self.in_slot(grid),))
        self.passthrough(node, view, src, 1)

    def rule_conv(self, node, view, shape) -> None:
        src = view.input
        if view.param("weight") is None and not self._weight_computed(view):
            raise _Pin("conv weight is not a parameter" + _computed_weight(self.gm, view.attrs.get("weight")))
        if isinstance(view.attrs.get("bias"), torch.fx.Node):
            raise _Pin("conv bias is computed in the graph (not a parameter to slice)")
        transposed = bool(view.attrs.get("transposed"))
        groups = view.attrs.get("groups", 1) or 1
        if not isinstance(groups, int):  # `groups=x.shape[1]` (BlurPool): a count read in the graph
            raise _Pin("conv whose groups are computed in the graph")
        in_shape = _shape(src)
        weight = view.param("weight")
        if in_shape is None or (weight is not None and len(in_shape) != weight.dim()):
            # an unbatched conv ((C, L) in) has its channels on axis 0, which no rule here reads
            raise _Pin("an unbatched conv (or one without shape metadata): its channels are not on axis 1")
        cin, cout = in_shape[1], shape[1]
        cig = cin // groups
        held = self.in_slot(src)
        if held is not None and self.slots[held].axis != 1:  # channels on a length axis (token mixing)
            if not _pointwise(view):
                raise _Pin("conv over a value whose channels are not on axis 1")
            # a 1x1 conv over tokens (gMLP's spatial gating as Conv1d(seq, seq, 1)) maps each
            # position on its own, as a linear over another axis: the identity on the channels
            self._channelwise(node, view, shape, dirty=view.param("bias") is not None)
            self.rules[node.name].info["channelwise"] = True
            return
        sid = self.slot_on(src, 1)
        # depthwise (channel multiplier m = cout // cin); a transposed one's weight [cin, m, k]
        # holds channel c in row c only for m = 1
        if groups > 1 and cig == 1 and (not transposed or cout == cin):
            if sid is None:
                raise _Pin("depthwise conv input has no channel axis to follow")
            if view.param("weight") is None:  # its rows are sliced as a norm's affine, which it has none of
                raise _Pin("depthwise conv with a weight computed in the graph (no rule yet)")
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

    def _weight_computed(self, view) -> bool:
        """Whether the layer's weight is computed from parameters alone (`computed_weights`);
        such a layer is named by its module, as one with a parameter is (for `ignore`)."""
        weight = view.attrs.get("weight")
        computed = isinstance(weight, torch.fx.Node) and weight.name in self.weight_math
        if computed:
            self.module_names[view.node.name] = _module_name(view.node, view,
                                                             ComputedWeight(self.gm, weight, view.node))
        return computed

    def rule_linear(self, node, view, shape) -> None:
        if view.param("weight") is None and not self._weight_computed(view):
            weight = view.attrs.get("weight")
            if isinstance(weight, torch.fx.Node) and transposed_parameter(self.gm, weight) is not None:
                raise _Pin("linear weight is a transposed parameter (F.linear(x, W.t())): write it x @ W, "
                           "which prunes as a layer")
            raise _Pin("linear weight is not a parameter" + _computed_weight(self.gm, weight))
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

    def _private_affine(self, node, view) -> None:
        """A norm's affine read by another op too (``F.layer_norm(h, s, w) * w``) cannot be
        sliced or permuted for the norm alone."""
        for ref in view.params.values():
            self._check_private(node, ref)

    def _normalized_channel_axis(self, node, view, shape) -> tuple[torch.fx.Node, int | None, int]:
        """(input, its slot, the channel axis) of a layer/RMS norm, which must normalize the
        channel axis alone with an affine of its own: the last axis, or the first normalized one
        when the others have size 1 (GCNet's ``LayerNorm([C, 1, 1])`` on a pooled context, read
        from a value whose channels are followed)."""
        self._private_affine(node, view)
        _stored_operands(view)
        src, sid = self.single_input(node, view)
        dims = _normalized_dims(node, view)
        axis = len(shape) - len(dims)
        channels_alone = len(dims) == 1 or (sid is not None and all(d == 1 for d in dims[1:]))
        if not channels_alone or (sid is not None and self.slots[sid].axis != axis):
            raise _Pin(f"{view.kind} over more than the channel axis")
        return src, sid, axis

    def _norm_within_channels(self, node, view, shape) -> bool:
        """A layer/RMS norm over trailing axes that do not hold the channels (timm's q/k norm
        over each head's dims, the channels being the heads): it acts on each channel on its own,
        and a removed (all-zero) channel comes out as the norm's bias — dirty if there is one."""
        src, sid = self.single_input(node, view)
        count = len(_normalized_dims(node, view))
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
        src, sid, axis = self._normalized_channel_axis(node, view, shape)
        if self.exact_norms:
            return self.gathered_norm(node, view, src, sid, axis)
        if axis != len(shape) - 1:  # narrowing it would rewrite a normalized shape of several axes
            raise _Pin(f"{view.kind} over the channels and unit axes (exact_norms=true prunes around it)")
        if sid is None:
            return self.free_output(node, view)
        self.passthrough(node, view, src, axis, category="norm")

    def rule_rms_norm(self, node, view, shape) -> None:
        """RMS norm needs no re-expansion to stay exact: the removed channels are zero, so the sum
        of squares over the kept ones is the full one and only the mean's divisor changes.
        ``rms_norm`` over C' of C channels with weight·√(C/C') and eps·C/C' is the original norm on
        the kept channels, which apply sets. So the affine is sliced with the channels, in both
        `exact_norms` settings."""
        if self._norm_within_channels(node, view, shape):
            return
        src, sid, axis = self._normalized_channel_axis(node, view, shape)
        if axis != len(shape) - 1:  # apply rescales a norm over the last axis alone
            raise _Pin(f"{view.kind} over more than the channel axis")
        if sid is None:  # no channels come in: its output is gathered (exact) or free, as a layer norm's
            return self.gathered_norm(node, view, src, sid, axis) if self.exact_norms \
                else self.free_output(node, view)
        self.passthrough(node, view, src, axis, category="norm", info={"rms_rescale": True})

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
        _stored_operands(view)
        src, sid = self.single_input(node, view)
        if sid is not None and self.slots[sid].axis != 1:
            raise _Pin("group_norm input channel axis is not 1")
        groups = view.attrs.get("num_groups")
        if self.exact_norms and sid is not None and isinstance(groups, int) and groups >= _WHOLE_GROUPS_FROM:
            # Whole groups: each group's statistics are its own, so a group whose every channel
            # is removed (zero in, zero affine: zero out) leaves the others exact. A group norm
            # of C/g channels in g groups becomes one of fewer groups, with no re-expansion in
            # front nor gather after it (which made a pruned GroupNorm CNN as slow as the
            # original at batch 1, prune tester).
            out = self.passthrough(node, view, src, 1, category="norm", info={"group_size": shape[1] // groups})
            pos = np.arange(shape[1])
            base = self.slots[out].base
            self.uf.union_many(base + pos, base + pos - pos % (shape[1] // groups))
            return
        if self.exact_norms:
            return self.gathered_norm(node, view, src, sid, 1)
        if sid is None:
            return self.free_output(node, view)
        if not isinstance(groups, int):  # ``h.shape[1] // 4``: how it would change is not tracked
            raise _Pin("group_norm with a group count computed in the graph (exact_norms=true prunes around it)")
        out = self.passthrough(node, view, src, 1, category="norm")
        # position r of every group is one class, so the groups stay equal (num_groups is kept)
        per_group = shape[1] // groups
        pos = np.arange(shape[1])
        self.uf.union_many(self.slots[out].base + pos, self.slots[out].base + pos % per_group)
