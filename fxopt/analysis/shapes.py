"""Shape and dtype propagation: `node.meta["tensor_meta"]` and `node.meta["val"]` on every node.

It runs the graph once on the example inputs with real tensors (quantized and custom kernels
have no fake-tensor rules, so running is the one method that works on every graph fxopt
writes). Structured values (tuples of tensors) keep the metadata of each tensor leaf.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.fx

from .base import Analysis
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.utils._dtype_abbrs import dtype_abbrs
from torch.utils._pytree import tree_map

from ..ir.interpret import fresh_inputs, run_graph
from ..ir.rewrite import SYMBOLIC_SIZES

# torch.fx's printer (`print_readable`, and the Interpreter's error path, which prints the
# graph) has no abbreviation for the quantized dtypes a recorded tensor_meta may hold: a
# KeyError from any int8 graph, raised in place of the error being reported. Added once.
for _dtype, _abbr in ((torch.quint8, "qu8"), (torch.qint8, "qi8"), (torch.qint32, "qi32"),
                      (torch.quint4x2, "qu4x2"), (torch.quint2x4, "qu2x4")):
    dtype_abbrs.setdefault(_dtype, _abbr)


def propagate_shapes(gm: torch.fx.GraphModule, args: tuple, kwargs: dict | None = None) -> dict:
    """Run `gm` once, record each node's tensor metadata; returns name -> metadata."""
    metas: dict[str, Any] = {}

    def record(node: torch.fx.Node, value: Any) -> None:
        _keep_symbolic_sizes(node)
        meta = tree_map(_meta_of, value)
        node.meta["tensor_meta"] = meta
        if isinstance(value, torch.Tensor) and not value.is_quantized:
            node.meta["val"] = torch.empty_strided(
                value.shape, value.stride(), dtype=value.dtype, device="meta"
            )
        elif isinstance(value, torch.Tensor):  # made int8: capture's float `val` would contradict tensor_meta
            node.meta.pop("val", None)
        metas[node.name] = meta

    with torch.no_grad():
        run_graph(gm, *fresh_inputs(args, kwargs), record, private_buffers=True)
    return metas


def _keep_symbolic_sizes(node: torch.fx.Node) -> None:
    """Save which sizes of export's fake value are symbols before the real run's shapes
    replace it (`fxopt.ir.symbolic_sizes`)."""
    val = node.meta.get("val")
    symbols = {axis: str(size.node.expr) for axis, size in enumerate(val.shape) if isinstance(size, torch.SymInt)} \
        if isinstance(val, torch.Tensor) else {}
    if symbols:
        node.meta[SYMBOLIC_SIZES] = symbols


def _meta_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _extract_tensor_metadata(value)
    return value if isinstance(value, (int, float, bool, str, type(None))) else None


class ShapeAnalysis(Analysis):
    """name -> TensorMetadata (or a tree of them) for every node; see `propagate_shapes`.

        >>> import torch, fxopt
        >>> x = torch.randn(2, 4)
        >>> gm = fxopt.capture(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()), x)
        >>> shapes = fxopt.AnalysisManager(gm, (x,)).get(fxopt.ShapeAnalysis)
        >>> {name: tuple(meta.shape) for name, meta in shapes.items()}
        {'input_1': (2, 4), '_0': (2, 8), '_1': (2, 8), 'output': (2, 8)}
        >>> shapes["_0"].dtype
        torch.float32
    """

    name: ClassVar[str] = "shapes"

    def run(self, gm: torch.fx.GraphModule, am) -> dict:
        if not am.example_inputs and not am.example_kwargs:
            raise ValueError("the shapes analysis needs example inputs; pass them to capture/optimize")
        return propagate_shapes(gm, am.example_inputs, am.example_kwargs)
