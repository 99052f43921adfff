"""Traceable forwards for torch.nn's attention and transformer modules (see `fxopt.tracing`).

Each computes what the module computes in eval mode, written in ops fxopt's passes read: the
packed q/k/v projection as one linear split by `chunk`, heads as `view(b, t, heads, hd)`,
attention as `scaled_dot_product_attention` (or spelled out when the caller asks for the
weights), `out_proj` as a module call. Symbolic capture then prunes whole heads and quantizes
the projections of `nn.Transformer` models, where fx alone keeps one opaque call.
Options they do not cover raise `NotTraceable`, which keeps the module as one call: `add_bias_kv`,
`add_zero_attn`, dropout in training mode, an encoder that takes its nested-tensor path (a
padding mask with `enable_nested_tensor`), a module with hooks.

    >>> import torch, fxopt
    >>> layer = torch.nn.TransformerEncoderLayer(16, 4, 32, batch_first=True).eval()
    >>> gm = fxopt.capture(layer, (torch.randn(2, 5, 16),), mode="symbolic")
    >>> sorted({n.target for n in gm.graph.nodes if n.op == "call_module"})
    ['dropout', 'dropout1', 'dropout2', 'linear1', 'linear2', 'norm1', 'norm2', 'self_attn.out_proj']
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .tracing import NotTraceable, register_traceable_forward


def attention_mask(attn_mask: Any, key_padding_mask: Any, batch: Any, heads: int,
                   dtype: torch.dtype | torch.Tensor) -> Any:
    """The additive mask nn.MultiheadAttention applies to its scores, shaped to broadcast over
    (batch, heads, query, key): bool masks turn True into -inf, float masks add as they are.
    Called from the graph (an fx leaf): the masks' dtypes are known only when it runs.
    `dtype` is the scores' (the graph passes ``x.dtype``, a metadata read: given the tensor
    itself, as graphs saved before did, the helper read the activations as far as passes
    could tell, and prune kept every channel of the stream)."""
    dtype = dtype.dtype if isinstance(dtype, torch.Tensor) else dtype

    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))
        if not mask.is_floating_point():  # as torch refuses it: 0/1 integers added to the scores mask nothing
            raise TypeError(f"nn.MultiheadAttention: only bool and floating masks are supported, got {mask.dtype}")
        return mask.to(dtype)

    merged = None
    if attn_mask is not None:
        merged = additive(attn_mask)
        if merged.dim() == 3:  # (batch * heads, query, key)
            merged = merged.view(batch, heads, merged.size(-2), merged.size(-1))
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).view(batch, 1, 1, key_padding_mask.size(-1))
        merged = padding if merged is None else merged + padding
    return merged


def add_mask(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`scores + mask`, or the scores when there is no mask (known only at run time: a mask
    argument of the traced model may be given or not)."""
    return scores if mask is None else scores + mask


torch.fx.wrap("attention_mask")
torch.fx.wrap("add_mask")


def _hint(flag: Any) -> bool:
    """A causal hint known while tracing, or False: one that is a graph input cannot be
    branched on, and the mask that comes with the hint computes the same."""
    return flag if isinstance(flag, bool) else False


def multihead_attention(m: nn.MultiheadAttention, query: Any, key: Any, value: Any, key_padding_mask: Any = None,
                        need_weights: bool = True, attn_mask: Any = None, average_attn_weights: bool = True,
                        is_causal: bool = False) -> tuple[Any, Any]:
    """`nn.MultiheadAttention.forward`: self-attention as one packed projection split by
    `chunk`, cross-attention (or separate key/value dimensions) as three projections whose
    weights are pieces of the packed parameter (`fxopt.ir.split_packed_parameters` gives each
    its own)."""
    if m.bias_k is not None or m.add_zero_attn:
        raise NotTraceable("add_bias_kv / add_zero_attn")
    if m.training and m.dropout > 0:
        raise NotTraceable("attention dropout in training mode")
    if not isinstance(need_weights, bool) or not isinstance(average_attn_weights, bool):
        raise NotTraceable("need_weights / average_attn_weights given as graph inputs")
    is_causal = _hint(is_causal)
    if is_causal and attn_mask is None:
        raise NotTraceable("is_causal without attn_mask (torch raises for it)")
    heads, head_dim = m.num_heads, m.head_dim

    def batch_first(t: Any) -> Any:
        return t if m.batch_first else t.transpose(0, 1)

    x = batch_first(query)
    if m._qkv_same_embed_dim and query is key and key is value:
        qkv = F.linear(x, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1)
    else:
        def thirds(packed: Any) -> tuple:  # a traced chunk is one value: index its pieces
            pieces = packed.chunk(3)
            return pieces[0], pieces[1], pieces[2]

        projections = thirds(m.in_proj_weight) if m._qkv_same_embed_dim else \
            (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
        biases = thirds(m.in_proj_bias) if m.in_proj_bias is not None else (None, None, None)
        qkv = [F.linear(t, w, b) for t, w, b in zip((x, batch_first(key), batch_first(value)), projections, biases)]

    def split_heads(t: Any) -> Any:
        return t.view(t.size(0), t.size(1), heads, head_dim).transpose(1, 2)

    q, k, v = split_heads(qkv[0]), split_heads(qkv[1]), split_heads(qkv[2])
    batch = x.size(0)
    # torch drops the mask for the causal hint when nothing else needs it (F.multi_head_attention_forward)
    causal = is_causal and key_padding_mask is None and not need_weights
    masked = not causal and (attn_mask is not None or key_padding_mask is not None)
    mask = attention_mask(attn_mask, key_padding_mask, batch, heads, x.dtype) if masked else None
    weights = probs = None
    if need_weights:  # a value of its own: erased from the graph when the caller drops it
        scores = torch.matmul(q * (1.0 / math.sqrt(head_dim)), k.transpose(-2, -1))
        if mask is not None:  # a graph value (None at run time when the caller gives no mask)
            scores = add_mask(scores, mask)
        probs = torch.softmax(scores, dim=-1)
        weights = probs.mean(dim=1) if average_attn_weights else probs
    if probs is not None and mask is None:  # the unmasked weights' softmax serves the output too
        out = torch.matmul(probs, v)
    else:  # SDPA, whose mask the passes read (an `add_mask` leaf they cannot)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    out = out.transpose(1, 2).reshape(batch, out.size(2), heads * head_dim)
    out = m.out_proj(out)
    if not m.batch_first:
        out = out.transpose(0, 1)
    return out, weights


def _transformer_block(m: nn.Module, x: Any, blocks: list) -> Any:
    """Residual blocks `(norm, fn)` in pre-norm (`norm_first`) or post-norm order."""
    for norm, fn in blocks:
        x = x + fn(norm(x)) if m.norm_first else norm(x + fn(x))
    return x


def encoder_layer(m: nn.TransformerEncoderLayer, src: Any, src_mask: Any = None, src_key_padding_mask: Any = None,
                  is_causal: bool = False) -> Any:
    """`nn.TransformerEncoderLayer.forward` without its fused inference fast path."""
    def attend(x: Any) -> Any:
        return m.dropout1(m.self_attn(x, x, x, attn_mask=src_mask, key_padding_mask=src_key_padding_mask,
                                      need_weights=False, is_causal=is_causal)[0])

    def feed_forward(x: Any) -> Any:
        return m.dropout2(m.linear2(m.dropout(m.activation(m.linear1(x)))))

    return _transformer_block(m, src, [(m.norm1, attend), (m.norm2, feed_forward)])


def decoder_layer(m: nn.TransformerDecoderLayer, tgt: Any, memory: Any, tgt_mask: Any = None, memory_mask: Any = None,
                  tgt_key_padding_mask: Any = None, memory_key_padding_mask: Any = None,
                  tgt_is_causal: bool = False, memory_is_causal: bool = False) -> Any:
    """`nn.TransformerDecoderLayer.forward`."""
    def attend(x: Any) -> Any:
        return m.dropout1(m.self_attn(x, x, x, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask,
                                      need_weights=False, is_causal=tgt_is_causal)[0])

    def cross(x: Any) -> Any:
        return m.dropout2(m.multihead_attn(x, memory, memory, attn_mask=memory_mask,
                                           key_padding_mask=memory_key_padding_mask, need_weights=False,
                                           is_causal=memory_is_causal)[0])

    def feed_forward(x: Any) -> Any:
        return m.dropout3(m.linear2(m.dropout(m.activation(m.linear1(x)))))

    return _transformer_block(m, tgt, [(m.norm1, attend), (m.norm2, cross), (m.norm3, feed_forward)])


def encoder(m: nn.TransformerEncoder, src: Any, mask: Any = None, src_key_padding_mask: Any = None,
            is_causal: bool | None = None) -> Any:
    """`nn.TransformerEncoder.forward` without nested tensors. The causal hint is a hint: a
    mask given without it is applied as a mask, which computes the same."""
    if getattr(m, "use_nested_tensor", False) and src_key_padding_mask is not None:
        # inference through nested tensors zeroes the padded positions of the output
        raise NotTraceable("nested-tensor path with a padding mask")
    x = src
    for layer in m.layers:
        x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=_hint(is_causal))
    return m.norm(x) if m.norm is not None else x


def decoder(m: nn.TransformerDecoder, tgt: Any, memory: Any, tgt_mask: Any = None, memory_mask: Any = None,
            tgt_key_padding_mask: Any = None, memory_key_padding_mask: Any = None,
            tgt_is_causal: bool | None = None, memory_is_causal: bool = False) -> Any:
    """`nn.TransformerDecoder.forward`."""
    x = tgt
    for layer in m.layers:
        x = layer(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask, tgt_key_padding_mask=tgt_key_padding_mask,
                  memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=_hint(tgt_is_causal),
                  memory_is_causal=memory_is_causal)
    return m.norm(x) if m.norm is not None else x


def transformer(m: nn.Transformer, src: Any, tgt: Any, src_mask: Any = None, tgt_mask: Any = None,
                memory_mask: Any = None, src_key_padding_mask: Any = None, tgt_key_padding_mask: Any = None,
                memory_key_padding_mask: Any = None, src_is_causal: bool | None = None,
                tgt_is_causal: bool | None = None, memory_is_causal: bool = False) -> Any:
    """`nn.Transformer.forward` without its shape checks (the capture's output check stands in)."""
    memory = m.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
    return m.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                     tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                     tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


for _type, _forward in [(nn.MultiheadAttention, multihead_attention), (nn.TransformerEncoderLayer, encoder_layer),
                        (nn.TransformerDecoderLayer, decoder_layer), (nn.TransformerEncoder, encoder),
                        (nn.TransformerDecoder, decoder), (nn.Transformer, transformer)]:
    register_traceable_forward(_type, _forward)
