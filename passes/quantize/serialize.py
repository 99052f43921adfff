"""Saving int8 models: the codec for prepacked int8 weights, and `save`/`load` for them.

`fxopt.save`/`fxopt.load` store any GraphModule as plain data (`fxopt.serialize`). Prepacked
int8 weights (`torch.ops.quantized` conv/linear packed params, opaque script objects) are the
one object they cannot read; this module registers the codec that stores one as its int8 weight,
per-channel scales, bias and conv geometry, and re-packs it on load as lowering packs it
(the x86 engine, with the per-layer choices of `packing.py`), whatever the global engine is;
and the one for `float_output.FloatOutputConv`, whose oneDNN pack is re-made the same way.

    >>> from fxopt.passes.quantize import save, load   # doctest: +SKIP
    >>> save(result.module, "model.int8.pt"); restored = load("model.int8.pt")  # doctest: +SKIP

`save`/`load` here are `fxopt.save`/`fxopt.load` that raise `QuantizationError`, as they did
before the serializer moved into the core.
"""
from __future__ import annotations

import torch

import fxopt.serialize as graph_io

from .float_output import FloatOutputConv
from .observers import QuantizationError
from .insert import resolve_reduce_range
from .packing import computes_right, prepack_conv, prepack_linear


def _is_packed(obj) -> bool:
    return isinstance(obj, torch.ScriptObject) and hasattr(obj, "unpack")


def _encode(obj) -> dict:
    weight, bias = obj.unpack()
    # the input width the pack is right on: 8 bits where it computes them right, else the 7 that
    # `reduce_range` feeds it (a pack lowered for 8-bit inputs on a CPU without VNNI re-packed
    # with the 7-bit check of "auto" was then fed 8 bits: 18 dB instead of 36.8)
    record = {"weight": graph_io.plain_tensor(weight), "bias": bias,
              "narrow": not computes_right(obj, weight, bias, narrow=False)}
    if hasattr(obj, "stride"):
        record.update(kind=f"conv{weight.dim() - 2}d", stride=list(obj.stride()), padding=list(obj.padding()),
                      dilation=list(obj.dilation()), groups=int(obj.groups()))
    else:
        record["kind"] = "linear"
    return record


def _decode(record: dict):
    weight, bias = graph_io.tensor_from_plain(record["weight"]), record["bias"]
    # files from before the record held it: what the kernels were fed on this machine by default
    narrow = record.get("narrow", resolve_reduce_range("auto"))
    # packed as lowering packs, whatever `torch.backends.quantized.engine` says now: the graph's
    # ops were chosen for those packs (the float-output linear runs x86/fbgemm packs only)
    if record["kind"] == "linear":
        packed = prepack_linear(weight, bias, narrow=narrow)
    else:  # the engine per layer, as lowering chose it (grouped convs fbgemm gets wrong: oneDNN)
        packed = prepack_conv(weight, bias, record["stride"], record["padding"], record["dilation"],
                              record["groups"], narrow=narrow)
    if packed is None:
        raise QuantizationError(f"no int8 kernel on this machine computes a {record['kind']} with weight "
                                f"{tuple(weight.shape)} right (every engine was checked); quantize the model "
                                "again here, which keeps such a layer in float")
    return packed


graph_io.register_codec(graph_io.AttributeCodec("int8-packed", _is_packed, _encode, _decode, provider=__name__))


def _encode_float_output(conv: FloatOutputConv) -> dict:
    return {"weight": conv.weight, "scales": conv.scales, "bias": conv.bias, "stride": conv.stride,
            "padding": conv.padding, "dilation": conv.dilation, "groups": conv.groups, "narrow": conv.narrow}


def _decode_float_output(record: dict) -> FloatOutputConv:
    # packed (and checked) anew: oneDNN's packed weight is no data a file can hold; checked on the
    # inputs the graph feeds it (8 bits when it was lowered with reduce_range=false on any CPU)
    return FloatOutputConv.pack(**record)


graph_io.register_codec(graph_io.AttributeCodec(
    "int8-conv-float-output", lambda obj: isinstance(obj, FloatOutputConv), _encode_float_output,
    _decode_float_output, provider=__name__))


def save(gm: torch.fx.GraphModule, path) -> None:
    """`fxopt.save` for an int8 model (any GraphModule), raising QuantizationError."""
    try:
        graph_io.save(gm, path)
    except graph_io.SerializationError as exc:
        raise QuantizationError(str(exc)) from None


def load(path) -> torch.fx.GraphModule:
    """`fxopt.load`, raising QuantizationError."""
    try:
        return graph_io.load(path)
    except graph_io.SerializationError as exc:
        raise QuantizationError(str(exc)) from None


__all__ = ["load", "save"]
