"""fxopt.dump on one graph: listing, DOT with shapes and annotations, SVG, index page."""
import shutil

import pytest
import torch
from torch import nn

import fxopt
from fxopt.debug import annotate, dump
from fxopt.debug.dot import full_dot, group_color
from fxopt.debug.render import render_svg


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.head(y.mean((2, 3)))


@pytest.fixture
def graph():
    gm = fxopt.capture(ConvNet(), (torch.randn(2, 3, 8, 8),), mode="symbolic")
    nodes = {n.name: n for n in gm.graph.nodes}
    annotate(nodes["conv"], "group", 1)
    annotate(nodes["bn"], "group", 1)
    annotate(nodes["relu"], "qparams", {"scale": 0.05, "zero_point": 3})
    annotate(nodes["relu"], "cut", ["bn"])
    return gm


def test_dump_writes_listing_dot_and_index(graph, tmp_path):
    index = dump(graph, tmp_path / "out", title="convnet")
    out = tmp_path / "out"
    assert index == out / "index.html"

    listing = (out / "graph.txt").read_text()
    assert listing.startswith("# convnet\n")
    assert "%conv = call_module conv(%x)  : f32[2, 8, 8, 8]  {group: 1}" in listing
    assert "{qparams: {'scale': 0.05, 'zero_point': 3}, cut: ['bn']}" in listing

    dot = (out / "graph.dot").read_text()
    assert dot.startswith("digraph fxopt {") and dot.rstrip().endswith("}")
    assert 'label="conv\\ncall_module conv\\nf32[2, 8, 8, 8]\\ngroup: 1"' in dot
    assert dot.count(f'fillcolor="{group_color(1)}"') == 2  # conv and bn share group 1's colour
    assert "qparams: {'scale': 0.05, 'zero_point': 3}" in dot
    assert dot.count("color=red, style=dashed") == 1  # only the cut edge bn -> relu
    assert dot.count(" -> ") == len(graph.graph.nodes) - 1  # a chain of producer/consumer edges

    html = index.read_text()
    assert 'href="graph.txt"' in html and 'href="graph.dot"' in html
    assert f"{len(graph.graph.nodes)} nodes" in html


def test_an_int8_graph_lists_the_shape_and_dtype_of_its_int8_values(tmp_path):
    """The int8 nodes quantize writes had no shape metadata, so their listing lines had no type."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    res = fxopt.optimize(model, (x,), "fuse,quantize", calibration=[(x,)])
    dump(res.module, tmp_path / "out")
    lines = (tmp_path / "out" / "graph.txt").read_text().splitlines()
    int8 = [line for line in lines if ("quantized." in line or "quantize_per_tensor" in line)
            and "output_fp32" not in line]  # the head's int8 linear writes float (read by the output only)
    assert int8 and all(line.split("  : ")[-1].startswith("qu8[2, ") for line in int8), int8
    # torch.fx's own printer reads the same metadata (it raised KeyError: torch.quint8)
    assert "qu8[2, 8, 8, 8]" in res.module.print_readable(print_output=False)


def test_dump_is_callable_from_the_package_root(graph, tmp_path):
    index = fxopt.dump(graph, tmp_path)
    assert index.exists() and (tmp_path / "graph.txt").exists()


def test_cut_edge_is_found_by_node_too(graph):
    relu = next(n for n in graph.graph.nodes if n.name == "relu")
    annotate(relu, "cut", relu.args[0])  # a Node, not a name
    assert "color=red, style=dashed" in full_dot(graph)


class _ConvIntoGRU(nn.Module):
    """Convs whose mean feeds a GRU (no channel rule: pinned, its input edge cut)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = (nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1),
                                     nn.Conv2d(32, 32, 3, padding=1))
        self.gru, self.fc = nn.GRU(32, 4, batch_first=True), nn.Linear(32, 4)

    def forward(self, x):
        b = torch.relu(self.c2(torch.relu(self.c1(x))))
        h, _ = self.gru(b.mean(3).transpose(1, 2))
        return self.fc(self.c3(b).mean((2, 3))) + h[:, -1].sum(1, keepdim=True)


def test_a_prune_plan_dump_draws_its_groups_and_cut_edges(tmp_path):
    """dot.py read `group` and `cut`, prune writes `prune.group` and `prune.cut_from` (a slot,
    'transpose:2'): a plan's drawing had no group colours and no cut edge (api F1)."""
    from fxopt.passes.prune.prune_pass import analyze

    torch.manual_seed(0)
    plan = analyze(_ConvIntoGRU().eval(), (torch.randn(2, 3, 8, 8),), ratio=0.5)
    assert plan.boundary.cut_edges == [("transpose:2", "pin:gru")]
    dump(plan, tmp_path, svg=False)
    text = (tmp_path / "graph.dot").read_text()
    ids = {name: line.split(" [")[0].strip() for line in text.splitlines()
           if (name := line.partition('label="')[2].split("\\n")[0]) in ("transpose", "gru", "c1", "c2")}
    assert f"{ids['transpose']} -> {ids['gru']} [color=red, style=dashed" in text, text
    assert text.count("color=red") == 1
    fills = {name: line.partition('fillcolor="')[2].split('"')[0] for line in text.splitlines()
             if (name := line.partition('label="')[2].split("\\n")[0]) in ("c1", "c2")}
    assert fills["c1"] and fills["c2"] and fills["c1"] != fills["c2"], fills  # two groups, two colours


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_svg_rendered_when_graphviz_is_installed(graph, tmp_path):
    index = dump(graph, tmp_path)
    svg = (tmp_path / "graph.svg").read_text()
    assert "<svg" in svg and "conv" in svg
    assert 'href="graph.svg"' in index.read_text()


def test_svg_skipped_quietly_without_graphviz(graph, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    index = dump(graph, tmp_path)
    assert not (tmp_path / "graph.svg").exists()
    assert "Graphviz `dot` is not on PATH" in index.read_text()


def test_svg_timeout_is_reported(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "dot"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexec /bin/sleep 5\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    dot_file = tmp_path / "g.dot"
    dot_file.write_text("digraph { a -> b }")
    svg, note = render_svg(dot_file, timeout_s=0.2)
    assert svg is None and "longer than 0.2 s" in note


def test_a_second_pipeline_dump_into_the_same_folder_leaves_no_stale_steps(tmp_path):
    """01-fuse.*, 02-dce.* of the first run stayed next to the second run's 01-remove-noops.*."""
    from fxopt.debug import dump_pipeline

    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    dump_pipeline(m, x, "fuse,dce", tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "1-keep.txt").write_text("not fxopt's pattern")
    dump_pipeline(m, x, "remove-noops", tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".svg")
    assert names == [".fxopt-dump-steps", "00-captured.dot", "00-captured.txt", "01-remove-noops.diff",
                     "01-remove-noops.dot", "01-remove-noops.txt", "1-keep.txt", "index.html", "notes.txt"]


def test_a_dump_deletes_no_file_it_did_not_write_whatever_its_name(tmp_path):
    """A first dump into a folder deleted the user's 01-notes.txt, 10-todo.txt and
    2024-meeting-notes.txt: every name of the step-file pattern went, not just fxopt's."""
    from fxopt.debug import dump_pipeline

    mine = {"01-notes.txt": "a", "10-todo.txt": "b", "2024-meeting-notes.txt": "c", "03-plan.diff": "d"}
    for name, text in mine.items():
        (tmp_path / name).write_text(text)
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(), torch.nn.ReLU()).eval()
    x = torch.randn(2, 4)
    dump_pipeline(m, x, "remove-noops,dce", tmp_path)
    dump_pipeline(m, x, "dce", tmp_path)   # the second removes the first's 02-dce.*, and only that
    assert {name: (tmp_path / name).read_text() for name in mine} == mine
    assert not list(tmp_path.glob("02-*")) and (tmp_path / "01-dce.txt").exists()


def test_dump_to_a_file_path_says_it_is_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("")
    gm = fxopt.capture(torch.nn.Linear(4, 2).eval(), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"dump: '.*afile' is a file, not a folder; give the path of a folder"):
        fxopt.dump(gm, f)


def test_dump_under_a_file_names_the_folder_it_cannot_create(tmp_path):
    """A file on the way ('/etc/hostname/x') surfaced as pathlib's bare NotADirectoryError."""
    (tmp_path / "afile").write_text("")
    gm = fxopt.capture(torch.nn.Linear(4, 2).eval(), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"dump: cannot create the folder '.*afile/x' \(Not a directory\)"):
        fxopt.dump(gm, tmp_path / "afile" / "x")


def test_dump_of_an_optimize_result_or_a_model_says_what_to_pass(tmp_path):
    model = torch.nn.Linear(4, 2).eval()
    result = fxopt.optimize(model, torch.randn(3, 4), "dce")
    with pytest.raises(TypeError, match=r"got OptimizeResult: pass its \.module"):
        fxopt.dump(result, tmp_path)
    with pytest.raises(TypeError, match=r"got Linear: capture it first"):
        fxopt.dump(model, tmp_path)


class _Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        y = torch.cond(x.sum() > 0, lambda t: self.a(t) * 2, lambda t: self.b(t) - 1, (x,))
        with torch.no_grad():  # a region capture keeps (it writes in place; a plain one is inlined)
            self.calls.add_(1)
            return y * 3


def test_a_listing_shows_the_ops_of_the_subgraphs_an_export_graph_runs(tmp_path):
    """A torch.cond branch or a no_grad region was one opaque get_attr: the linears, the mul and the
    sub inside never showed in a dump (api F10)."""
    gm = fxopt.capture(_Branches().eval(), torch.randn(3, 4), mode="export")
    dump(gm, tmp_path)
    text = (tmp_path / "graph.txt").read_text()
    lines = text.splitlines()
    for region, op in (("true_graph_0", "aten.mul.Tensor(%linear, 2)"), ("false_graph_0", "aten.sub.Tensor(%linear, 1)"),
                       ("submod_1", "aten.mul.Tensor(%getitem, 3)")):
        start = next(i for i, line in enumerate(lines) if line.startswith("%") and f"get_attr {region}" in line)
        body = [line for line in lines[start + 1:] if line.startswith("    ")]
        assert any(op in line for line in body[:8]), (region, text)


def test_a_drawing_shows_the_subgraphs_an_export_graph_runs():
    """The .dot drew a torch.cond branch or a no_grad region as one get_attr box (api F10)."""
    gm = fxopt.capture(_Branches().eval(), torch.randn(3, 4), mode="export")
    text = full_dot(gm)
    for region in ("true_graph_0", "false_graph_0", "submod_1"):
        assert f'label="{region}"' in text, text
    cluster = text.split('label="true_graph_0"')[1].split("}")[0]
    assert "aten.mul.Tensor" in cluster and "aten.linear.default" in cluster, cluster
