"""Big graphs are drawn one box per module scope, so Graphviz stays usable."""
import re

import torch
from torch import nn

import fxopt
from fxopt.debug import annotate, dump
from fxopt.debug.dot import collapsed_dot, graph_dot
from fxopt.debug.scopes import ROOT, collapse_scopes, node_scopes


class Block(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        return x + torch.relu(self.norm(self.fc(x)))


def stack(depth=12):
    return nn.Sequential(*[Block() for _ in range(depth)])


def boxes(dot_text):
    return re.findall(r"^  ([ns]\d+) \[label=\"([^\\\"]*)", dot_text, flags=re.M)


def test_collapse_kicks_in_above_the_threshold(tmp_path):
    gm = fxopt.capture(stack(), (torch.randn(2, 8),), mode="symbolic")
    n = len(gm.graph.nodes)
    assert len(boxes(graph_dot(gm, collapse_threshold=n))) == n  # at the threshold: one box per node

    dump(gm, tmp_path, collapse_threshold=20)
    dot = (tmp_path / "graph.dot").read_text()
    names = [name for _, name in boxes(dot)]
    assert len(names) < n
    # few enough scopes to keep every module: a box per Linear, per LayerNorm, per block (relu, add)
    expected = {"input:input_1", "output"} | {f"{i}{m}" for i in range(12) for m in ("", ".fc", ".norm")}
    assert set(names) == expected and len(names) == len(expected)
    assert f"{n} nodes, collapsed by module scope" in dot
    assert "\\n2 nodes\\ntorch.relu x1\\noperator.add x1" in dot  # a block's own box counts its nodes
    assert "collapsed by module scope" in (tmp_path / "index.html").read_text()


def test_edges_between_scopes_are_counted():
    gm = fxopt.capture(stack(3), (torch.randn(2, 8),), mode="symbolic")
    dot = collapsed_dot(gm, max_groups=5)  # input, 3 blocks, output
    # block i feeds block i+1 twice: into its Linear and into its residual add
    assert re.search(r's1 -> s2 \[label="2"\]', dot)
    assert re.search(r's0 -> s1 \[label="2"\]', dot)


def test_export_graphs_collapse_by_nn_module_stack():
    gm = fxopt.capture(stack(4), (torch.randn(2, 8),), mode="export")
    scopes = node_scopes(gm.graph)
    assert {"0.fc", "0.norm", "3.fc"} <= set(scopes)
    assert set(collapse_scopes(scopes, max_groups=8)) >= {"0", "1", "2", "3"}


def test_nodes_a_pass_created_inherit_the_scope_of_their_input():
    gm = fxopt.capture(stack(2), (torch.randn(2, 8),), mode="symbolic")
    fc = next(n for n in gm.graph.nodes if n.target == "1.fc")
    with gm.graph.inserting_after(fc):
        extra = gm.graph.call_function(torch.neg, (fc,))
    scopes = dict(zip(gm.graph.nodes, node_scopes(gm.graph)))
    assert scopes[extra] == "1.fc"
    assert collapse_scopes(["a.b.c", "a.d", ROOT], max_groups=2) == ["a", "a", ROOT]


def test_collapsed_boxes_keep_groups_and_cuts():
    gm = fxopt.capture(stack(3), (torch.randn(2, 8),), mode="symbolic")
    for node in gm.graph.nodes:
        if node.target in ("1.fc", "1.norm"):
            annotate(node, "group", 7)
        if node.target == "2.fc":
            annotate(node, "cut", [node.args[0]])
    dot = collapsed_dot(gm, max_groups=5)
    assert "2 annotated, groups 7" in dot
    assert re.search(r's2 -> s3 \[label="2 \(1 cut\)", color=red, style=dashed\]', dot)
