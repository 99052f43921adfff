"""Module scopes of graph nodes, for drawing big graphs one box per module.

A node's scope is the dotted path of the innermost module that ran it:

- `node.meta["nn_module_stack"]` when the front end recorded it (export, and symbolic tracing
  for the nodes it traced inside modules);
- otherwise the `call_module` target itself, or the owner of a `get_attr` attribute;
- otherwise (nodes a pass created) the scope of its latest input in graph order, so a new
  node lands where its data comes from.

Placeholders and the output keep a scope of their own (`input:x`, `output`) so a collapsed
drawing still shows where data enters and leaves. `collapse_scopes` then cuts every path at
the deepest depth that keeps the number of boxes under a budget.

    >>> import torch, fxopt
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.ReLU()))
    >>> gm = fxopt.capture(model, (torch.randn(2, 4),), mode="symbolic")
    >>> [s for s in node_scopes(gm.graph)]
    ['input:input_1', '0', '1.0', 'output']
    >>> collapse_scopes(node_scopes(gm.graph), max_groups=3)
    ['input:input_1', '0', '1', 'output']
"""
from __future__ import annotations

import torch.fx

ROOT = "(root)"


def node_scopes(graph: torch.fx.Graph) -> list[str]:
    """The scope of every node, in graph order (one pass over the graph)."""
    scopes: list[str] = []
    seen: dict[torch.fx.Node, tuple[int, str]] = {}
    for index, node in enumerate(graph.nodes):
        scope = _own_scope(node)
        if scope is None:
            latest = max((seen[a] for a in node.all_input_nodes if a in seen), default=None)
            scope = latest[1] if latest is not None and not latest[1].startswith("input:") else ROOT
        seen[node] = (index, scope)
        scopes.append(scope)
    return scopes


def _own_scope(node: torch.fx.Node) -> str | None:
    if node.op == "placeholder":
        return f"input:{node.name}"
    if node.op == "output":
        return "output"
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = next(reversed(stack.values()))[0]
        if path:
            return path
    if node.op == "call_module":
        return node.target
    if node.op == "get_attr":
        owner = node.target.rpartition(".")[0]
        return owner or ROOT
    return None


def collapse_scopes(scopes: list[str], max_groups: int = 400) -> list[str]:
    """Cut each scope path to the deepest depth that yields at most `max_groups` groups.

    Depth 1 (top-level modules) is the floor, even when it alone exceeds the budget.
    """
    split = [s.split(".") if ":" not in s and s != "output" else [s] for s in scopes]
    deepest = max((len(parts) for parts in split), default=1)
    chosen = 1
    for depth in range(2, deepest + 1):
        if len({".".join(parts[:depth]) for parts in split}) > max_groups:
            break
        chosen = depth
    return [".".join(parts[:chosen]) for parts in split]
