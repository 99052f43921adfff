"""Layer weights the forward computes from parameters alone: weight standardization (BiT,
NFNet), a causal mask (``w * mask``, PixelCNN, MADE), equalized learning rate's ``w * scale``
(StyleGAN), a weight norm written out.

Such a weight is the same for every input, so a layer reading it is a layer like any other:
its rows are output channels and its columns input channels. Pruning does not touch the
computation: it runs on the full parameters, exactly as before, and the layer reads the kept
rows and columns of its result (an ``index_select`` after it). That is exact for any
computation, including one that mixes a row's entries (standardization), and it keeps the
computation for fine-tuning (a mask stays a mask). The parameters themselves keep their size.

A computation is one only when nothing but layer weights reads it and its parameters are read
by nothing else (under any name: a tied weight is one tensor): a parameter a pruned layer also
slices, or a value the graph reads elsewhere, would see two different widths.
"""
from __future__ import annotations

import torch
import torch.fx

from fxopt.ir import add_tensor_attr, bind_arguments, get_attr_value, op_view, spec_for

from ..cleanup import attribute_leaves, constant_nodes, evaluate_constant

# layer kinds whose `weight` argument may be computed (a module call holds a parameter)
_LAYERS = ("conv", "linear")


def _weight_argument(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node | None:
    """The `weight` operand of a functional conv/linear call, when it is a graph value."""
    if node.op != "call_function":
        return None
    view = op_view(gm, node)
    if view is None or view.kind not in _LAYERS:
        return None
    spec = spec_for(gm, node)
    bound = bind_arguments(node, spec) if spec is not None else {}
    weight = bound.get("weight")
    if not isinstance(weight, torch.fx.Node) or weight.op == "get_attr":
        return None
    if any(v is weight for k, v in bound.items() if k != "weight"):
        return None  # also read as the input or bias of the same call
    return weight


def weight_computations(gm: torch.fx.GraphModule) -> set[str]:
    """Names of the nodes that compute layer weights from parameters alone (see the module
    docstring): the channel analysis leaves them out and the layers reading them prune.

        >>> import torch, torch.nn.functional as F
        >>> class Masked(torch.nn.Conv2d):
        ...     def forward(self, x):
        ...         return F.conv2d(x, self.weight * self.mask, self.bias)
        >>> conv = Masked(3, 8, 3); conv.register_buffer("mask", torch.ones_like(conv.weight))
        >>> sorted(weight_computations(torch.fx.symbolic_trace(conv)))
        ['mul']
    """
    constant = constant_nodes(gm)
    readers: dict[torch.fx.Node, set[torch.fx.Node]] = {}  # weight value -> the layers reading it
    for node in gm.graph.nodes:
        weight = _weight_argument(gm, node)
        if weight is not None and constant.get(weight):
            readers.setdefault(weight, set()).add(node)
    cone: set[torch.fx.Node] = set()
    stack = list(readers)
    while stack:
        n = stack.pop()
        if n in cone or n.op == "get_attr":
            continue
        cone.add(n)
        stack.extend(n.all_input_nodes)
    # drop what something outside reads, until nothing changes (a drop exposes its inputs)
    changed = True
    while changed:
        changed = False
        outside_tensors = _tensors_read_outside(gm, cone)
        for n in list(cone):
            outside = any(u not in cone and u not in readers.get(n, ()) and not _checks_only(gm, u) for u in n.users)
            open_input = any(a.op != "get_attr" and a not in cone for a in n.all_input_nodes)
            shared_leaf = any(a.op == "get_attr" and id(get_attr_value(gm, a.target)) in outside_tensors
                              for a in n.all_input_nodes)
            if outside or open_input or shared_leaf:
                cone.discard(n)
                changed = True
    return {n.name for n in cone}


def _checks_only(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """An export guard on a value's dtype and device (``_assert_tensor_metadata``): it reads
    the value, which pruning leaves as it is."""
    view = op_view(gm, node)
    return view is not None and view.kind == "assert_metadata"


def _tensors_read_outside(gm: torch.fx.GraphModule, cone: set[torch.fx.Node]) -> set[int]:
    """ids of the tensors something outside `cone` reads: a `get_attr` another node uses, or a
    called module's own parameters and buffers (a tied weight is one tensor under two names)."""
    ids = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and any(u not in cone and not _checks_only(gm, u) for u in node.users):
            ids.add(id(get_attr_value(gm, node.target)))
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            ids.update(id(t) for t in (*module.parameters(), *module.buffers()))
    return ids


class ComputedWeight:
    """The weight a layer computes in the graph, in `ParamRef`'s place for reading (`get`
    evaluates it). It is never replaced: `gather` and `zero` edit the graph between the value
    and the one layer reading it.

        >>> import torch, torch.nn.functional as F
        >>> class Scaled(torch.nn.Linear):
        ...     def forward(self, x):
        ...         return F.linear(x, self.weight * 0.5, self.bias)
        >>> gm = torch.fx.symbolic_trace(Scaled(4, 3, bias=False))
        >>> layer = next(n for n in gm.graph.nodes if n.name == "linear")
        >>> w = ComputedWeight(gm, layer.args[1], layer)
        >>> w.qualname, tuple(w.get().shape)
        ('weight', (3, 4))
        >>> w.gather(0, torch.tensor([0, 2])); _ = gm.recompile()
        >>> tuple(gm(torch.randn(2, 4)).shape)
        (2, 2)
    """

    def __init__(self, gm: torch.fx.GraphModule, value: torch.fx.Node, reader: torch.fx.Node) -> None:
        self.gm, self.value, self.reader = gm, value, reader
        self.qualname = next((str(n.target) for n in attribute_leaves(value)
                              if isinstance(get_attr_value(gm, n.target), torch.nn.Parameter)), value.name)

    def get(self) -> torch.Tensor:
        return evaluate_constant(self.gm, self.value).detach()

    def set(self, value: torch.Tensor | None) -> None:
        raise TypeError(f"the weight of '{self.reader.name}' is computed in the graph ({self.value.name}): "
                        "it is gathered or zeroed after its computation, never replaced")

    def gather(self, axis: int, index: torch.Tensor) -> None:
        """The layer reads entries `index` of `axis` of the computed weight."""
        self._after(torch.index_select, "kept", axis, index)

    def zero(self, axis: int, index: torch.Tensor) -> None:
        """The layer reads the computed weight with entries `index` of `axis` zero."""
        self._after(torch.index_fill, "zeroed", axis, index, 0.0)

    def _after(self, op, what: str, axis: int, index: torch.Tensor, *rest) -> None:
        g = self.gm.graph
        name = add_tensor_attr(self.gm, f"prune_idx_{self.reader.name}_{what}_{axis}",
                               torch.as_tensor(index, dtype=torch.long), parameter=False)
        current = self.reader_input()
        with g.inserting_before(self.reader):
            idx = g.get_attr(name)
            edited = g.call_function(op, (current, axis, idx, *rest))
        self.reader.replace_input_with(current, edited)

    def reader_input(self) -> torch.fx.Node:
        """What the layer reads as its weight now (the value, or the last edit after it)."""
        spec = spec_for(self.gm, self.reader)
        return bind_arguments(self.reader, spec)["weight"]
