"""Analyses: computed lazily, cached per graph, invalidated by the passes that change it.

An analysis is a class with a `name` and `run(gm, am)`. Passes ask the manager for one with
`ctx.analyses.get(ShapeAnalysis)`; the result is cached until a pass that modified the graph
does not list the analysis in its `preserves`. Analyses may ask for other analyses.

    >>> import torch, torch.fx
    >>> from fxopt.analysis import AnalysisManager, DataflowAnalysis
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    >>> am = AnalysisManager(gm, example_inputs=(torch.randn(2, 4),))
    >>> g = am.get(DataflowAnalysis)
    >>> sorted(g.successors("_0"))
    ['_1']
"""
from __future__ import annotations

from .base import Analysis, AnalysisManager
from .dataflow import DataflowAnalysis, dataflow_graph
from .shapes import ShapeAnalysis, propagate_shapes

__all__ = [
    "Analysis", "AnalysisManager", "DataflowAnalysis", "ShapeAnalysis", "dataflow_graph",
    "propagate_shapes",
]
