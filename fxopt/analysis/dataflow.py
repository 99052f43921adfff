"""The dataflow graph as networkx: nodes are fx node names, edges follow values.

Each graph node carries `op`, `target` (as text) and, when the shapes analysis ran, `shape`
and `dtype`; each edge carries `bytes`, the size of the value that flows along it, which the
pruning and quantization passes use as min-cut capacities.
"""
from __future__ import annotations

from typing import ClassVar

import networkx as nx
import torch
import torch.fx

from .base import Analysis

from ..ir.rewrite import tensor_meta, value_nbytes


def dataflow_graph(gm: torch.fx.GraphModule) -> nx.DiGraph:
    """The graph's values as a networkx DiGraph: a node per fx node (with its op, target and
    recorded shape), an edge per use."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        meta = tensor_meta(node)
        attrs = dict(op=node.op, target=_target_text(node.target))
        if meta is not None:
            attrs.update(shape=tuple(meta[0]), dtype=str(meta[1]).replace("torch.", ""))
        g.add_node(node.name, **attrs)
        for src in node.all_input_nodes:
            g.add_edge(src.name, node.name, bytes=value_nbytes(src))
    return g



def _target_text(target: object) -> str:
    if isinstance(target, str):
        return target
    return getattr(target, "__qualname__", None) or str(target)


class DataflowAnalysis(Analysis):
    """networkx.DiGraph view of the fx graph; see `dataflow_graph`.

    With example inputs it runs `ShapeAnalysis` first, so nodes carry shapes and edges bytes.

        >>> import torch, fxopt
        >>> x = torch.randn(2, 4)
        >>> gm = fxopt.capture(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()), x)
        >>> g = fxopt.AnalysisManager(gm, (x,)).get(fxopt.DataflowAnalysis)
        >>> list(g.successors("_0")), g.nodes["_0"]["shape"], g.edges["_0", "_1"]["bytes"]
        (['_1'], (2, 8), 64)
    """

    name: ClassVar[str] = "dataflow"

    def run(self, gm: torch.fx.GraphModule, am) -> nx.DiGraph:
        from .shapes import ShapeAnalysis

        if am.example_inputs or am.example_kwargs:
            am.get(ShapeAnalysis)
        return dataflow_graph(gm)
