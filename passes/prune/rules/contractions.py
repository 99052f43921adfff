"""Contractions over two operands: matmul, einsum and scaled dot-product attention
(heads, folded heads, features contracted between q and k)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx

from ..channel_model import Rule, _Pin
from ..node_facts import _shape


class ContractionRules:
    """Rules for matmul, einsum and attention; methods of `channel_graph._Builder`."""

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

    def rule_baddbmm(self, node, view, shape) -> None:
        """``beta * bias + alpha * (q @ kᵀ)`` (Bloom's ALiBi scores): the product's features are
        contracted as in `_contracted_matmul`, and a bias without channels makes scores without
        them; any other use of its channels is pinned."""
        bias, a, b = view.inputs
        sa, sb = self.in_slot(a), self.in_slot(b)
        if self.in_slot(bias) is not None:
            raise _Pin("baddbmm's added term carries channels")
        if sa is None and sb is None:
            return self.free_output(node, view)
        if sa is None or sb is None or self.slots[sa].axis != len(_shape(a)) - 1 \
                or self.slots[sb].axis != len(_shape(b)) - 2:
            raise _Pin("baddbmm whose product keeps channels")
        self._contracted_matmul(node, a, sa, b, sb)

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
        # each head's output reads only that head's q, k, mask and v, and is zero where v is: a
        # removed head's q, k or mask may be dirty (BEiT adds a bool mask to its bias per head)
        clean_reads = tuple(x.name for x in per_head if x.name != v.name)
        rule = Rule(node.name, "sdpa", "pass", outputs=[out],
                    info={"channelwise": True, "clean_reads": clean_reads})
        pos = np.arange(shape[axis])
        for x in per_head:
            sid = self.slot_on(x, axis if x is not mask else m_axis)
            if sid is None:
                raise _Pin("attention inputs carry channels on different axes")
            in_pos = self._gqa_heads(view, x, shape[axis], self.slots[sid].size) if x in (k, v) else pos
            rule.inputs.append((x.name, sid, in_pos, pos, out))
            self.link(sid, out, in_pos, pos, "sdpa", "heads")
        self.value_slot[node.name] = out
        self.rules[node.name] = rule

    @staticmethod
    def _gqa_heads(view, x, heads: int, kv_heads: int) -> np.ndarray:
        """The key or value head each of the `heads` output heads reads: itself, or with
        ``enable_gqa=True`` and fewer key/value heads, head ``h // (heads // kv_heads)`` (each
        shared by a group of query heads, as ``repeat_interleave`` would copy it). A removed
        key/value head goes with its whole group of query heads."""
        if kv_heads == heads:
            return np.arange(heads)
        if not view.attrs.get("enable_gqa") or heads % kv_heads:
            raise _Pin(f"attention {x.name!r} has {kv_heads} heads against the query's {heads}")
        return np.repeat(np.arange(kv_heads), heads // kv_heads)

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
