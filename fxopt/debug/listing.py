"""A readable listing of a graph: one line per node.

    %conv2d = call_function aten.conv2d.default(%x, %c_weight, %c_bias, [1, 1], [1, 1])  : f32[2, 8, 8, 8]  {qparams: ...}

Each line gives the op, target, arguments, shape and dtype, and the annotations passes attach
under `node.meta["fxopt.annotations"]` (quantization parameters, pruning groups, ...). Built
with plain string joins so graphs of thousands of nodes list in milliseconds.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.fx

ANNOTATIONS = "fxopt.annotations"
#: The type text a node of a saved graph listed with, which `fxopt.load` puts back: a graph
#: records its shapes as tensors of torch's own, which the file does not hold.
SAVED_TYPE = "fxopt.saved_type"

_DTYPE_SHORT = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "bool",
    torch.quint8: "qu8", torch.qint8: "qi8", torch.qint32: "qi32",
}


def annotate(node: torch.fx.Node, key: str, value: Any) -> None:
    """Attach an annotation that dumps show next to the node (e.g. `annotate(n, "group", 3)`).

    Copy on write: a copied graph shares its nodes' meta dicts' contents with the original
    (fx copies meta shallowly), and annotating the copy must not relabel the original."""
    node.meta[ANNOTATIONS] = {**node.meta.get(ANNOTATIONS, {}), key: value}


def target_text(node: torch.fx.Node) -> str:
    """The op a node runs, short: `aten.conv2d.default`, `F.relu`, `operator.add`, `layer1.conv`."""
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return str(target).replace("aten::", "aten.")
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)
    if name.startswith("_VariableFunctionsClass."):  # torch.relu and other C builtins
        name = name.partition(".")[2]
    short = {"torch.nn.functional": "F", "_operator": "operator", "torch._C._nn": "F"}.get(module, module)
    return f"{short}.{name}" if short else name


def type_text(node: torch.fx.Node) -> str:
    """`f32[2, 8, 4, 4]` from the node's shape metadata; tuples as `(f32[..], i64[..])`; for a
    node of a loaded graph, which has none, the text it was saved with (`SAVED_TYPE`)."""
    val = node.meta.get("tensor_meta")
    if val is None:
        val = node.meta.get("val")
    return _type_of(val) or node.meta.get(SAVED_TYPE, "")


def _type_of(val: Any) -> str:
    if val is None:
        return ""
    dtype = getattr(val, "dtype", None)
    shape = getattr(val, "shape", None)
    if dtype is None or shape is None:  # TensorMetadata is a tuple too: test it as a tensor first
        if isinstance(val, (list, tuple)):
            inner = ", ".join(t for t in (_type_of(v) for v in val) if t)
            return f"({inner})" if inner else ""
        return ""
    dims = ", ".join(str(d) for d in shape)
    return f"{_DTYPE_SHORT.get(dtype, str(dtype).replace('torch.', ''))}[{dims}]"


def arg_text(arg: Any) -> str:
    if isinstance(arg, torch.fx.Node):
        return f"%{arg.name}"
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(arg_text(a) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k}: {arg_text(v)}" for k, v in arg.items()) + "}"
    if isinstance(arg, torch.dtype):
        return str(arg).replace("torch.", "")
    if isinstance(arg, float):
        return f"{arg:.6g}"
    return repr(arg)


def node_line(node: torch.fx.Node) -> str:
    args = [arg_text(a) for a in node.args] + [f"{k}={arg_text(v)}" for k, v in node.kwargs.items()]
    if node.op == "placeholder":
        body = f"placeholder {node.target}"
    elif node.op == "output":
        body = f"output {', '.join(args)}"
    elif node.op == "get_attr":
        body = f"get_attr {node.target}"
    else:
        body = f"{node.op} {target_text(node)}({', '.join(args)})"
    line = f"%{node.name} = {body}"
    typ = type_text(node)
    if typ:
        line += f"  : {typ}"
    notes = node.meta.get(ANNOTATIONS)
    if notes:
        line += "  {" + ", ".join(f"{k}: {note_text(v)}" for k, v in notes.items()) + "}"
    return line


def note_text(value: Any) -> str:
    """An annotation value as short text: floats to 6 digits, small tensors as lists."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, torch.Tensor):
        if value.numel() <= 4:
            return str([round(v, 6) if isinstance(v, float) else v for v in value.flatten().tolist()])
        return f"tensor{list(value.shape)}"
    return str(value)


def graph_listing(gm: torch.fx.GraphModule, title: str | None = None) -> str:
    """The whole listing as text (what `print-ir-after-*` prints and dumps write). A subgraph an
    export graph runs (a `torch.cond` branch, a `no_grad` or `autocast` region) is listed below
    the `get_attr` that reads it, indented: its ops are the graph's too."""
    lines = [f"# {title}"] if title else []
    lines.extend(_lines(gm, ""))
    return "\n".join(lines) + "\n"


def _lines(gm: torch.fx.GraphModule, indent: str) -> Iterator[str]:
    for node in gm.graph.nodes:
        yield indent + node_line(node)
        sub = subgraph_of(gm, node)
        if sub is not None:
            yield from _lines(sub, indent + "    ")


def subgraph_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.GraphModule | None:
    """The GraphModule a `get_attr` node reads, or None."""
    if node.op != "get_attr":
        return None
    value: Any = gm
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, torch.fx.GraphModule) else None
