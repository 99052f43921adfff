"""How fxopt's infrastructure scales with graph size: seconds and µs per node, per stage.

Builds a deep stack of residual MLP blocks (Linear, LayerNorm, GELU, Linear, Dropout, add)
sized to about 1k, 2.5k, 5k and 10k nodes of the symbolic graph, and times for each front
end: capture, the trivial pipeline `remove-noops,fold-constants,dce` through the PassManager,
the same pipeline with a DumpInstrument (no SVG: listing, DOT and diff per step),
`fxopt.verify` of the result against the capture, `fxopt.dump` (no SVG) and Graphviz's SVG
rendering of that dump (collapsed past 1500 nodes). A flat µs/node column across sizes means
linear growth.

    python tools/bench_scale.py                      # all sizes, symbolic and export
    python tools/bench_scale.py --skip-export        # export of 10k nodes takes minutes
    python tools/bench_scale.py --sizes 1000 --profile passes   # cProfile one stage
    python tools/bench_scale.py --pipeline fuse --skip-export   # time another pipeline
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import fxopt
from fxopt.debug import DumpInstrument, dump
from fxopt.debug.render import render_svg

NODES_PER_BLOCK = 6  # fc1, norm, act, fc2, drop, add in a symbolic graph
PIPELINE = "remove-noops,fold-constants,dce"
STAGES = ("capture", "passes", "passes+dump", "verify", "dump", "svg")


class Block(nn.Module):
    """x + drop(fc2(act(norm(fc1(x))))): six nodes symbolic, ten with export's get_attrs."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(width, width)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(self.act(self.norm(self.fc1(x)))))


def deep_stack(nodes: int, width: int = 16) -> nn.Sequential:
    """A stack of blocks whose symbolic graph has about `nodes` nodes."""
    return nn.Sequential(*[Block(width) for _ in range(max(1, nodes // NODES_PER_BLOCK))])


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def measure(nodes: int, frontend: str, profile: str | None,
            pipeline: str = PIPELINE) -> dict[str, float | int | str]:
    """Seconds per stage for one size and front end (NaN where a stage cannot run)."""
    model, inputs = deep_stack(nodes), (torch.randn(4, 16),)
    row: dict[str, float | int | str] = {"frontend": frontend}

    def stage(name: str, fn: Callable[[], object]) -> tuple[float, object]:
        return _profiled(name, fn) if profile == name else timed(fn)

    row["capture"], gm = stage("capture", lambda: fxopt.capture(model, inputs, mode=frontend))
    row["nodes"] = len(gm.graph.nodes)
    # share_tensors: the passes alone, not the copy that keeps `gm` apart from the result
    row["passes"], result = stage("passes", lambda: fxopt.PassManager(pipeline).run(gm, inputs, share_tensors=True))
    with tempfile.TemporaryDirectory() as tmp:
        inst = DumpInstrument(Path(tmp) / "steps", svg=False)
        row["passes+dump"], _ = stage("passes+dump",
                                      lambda: fxopt.PassManager(pipeline, instruments=[inst]).run(
                                          gm, inputs, share_tensors=True))
        row["verify"], report = stage("verify", lambda: fxopt.verify(gm, result.module, inputs))
        assert report.passed, report.summary()
        row["dump"], index = stage("dump", lambda: dump(result.module, Path(tmp) / "one", svg=False))
        if shutil.which("dot"):
            row["svg"], (svg, note) = stage("svg", lambda: render_svg(index.parent / "graph.dot", timeout_s=300))
            if svg is None:
                print(f"  {note}", file=sys.stderr)
        else:
            row["svg"] = float("nan")
    return row


def _profiled(name: str, fn: Callable[[], object]) -> tuple[float, object]:
    profiler = cProfile.Profile()
    seconds, value = timed(lambda: profiler.runcall(fn))
    print(f"\n== cProfile of '{name}' ({seconds:.2f} s), top 15 by cumulative time", file=sys.stderr)
    pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(15)
    return seconds, value


def table(rows: list[dict]) -> str:
    """A markdown table: seconds per stage, then µs per node."""
    head = "| front end | nodes | " + " | ".join(f"{s} s" for s in STAGES) + " | " + \
        " | ".join(f"{s} µs/node" for s in STAGES) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(STAGES))]
    for r in rows:
        secs = " | ".join(f"{r[s]:.3f}" for s in STAGES)
        per = " | ".join(f"{1e6 * r[s] / r['nodes']:.0f}" for s in STAGES)
        lines.append(f"| {r['frontend']} | {r['nodes']} | {secs} | {per} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2500, 5000, 10000],
                        help="approximate node counts of the symbolic graph")
    parser.add_argument("--skip-export", action="store_true", help="time the symbolic front end only")
    parser.add_argument("--export-max", type=int, default=10000, help="largest size to export")
    parser.add_argument("--profile", choices=STAGES, help="print a cProfile of this stage at each size")
    parser.add_argument("--pipeline", default=PIPELINE, help=f"the pipeline timed (default: {PIPELINE})")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows = []
    for frontend in ("symbolic", "export"):
        for size in args.sizes:
            if frontend == "export" and (args.skip_export or size > args.export_max):
                continue
            rows.append(measure(size, frontend, args.profile, args.pipeline))
            print(f"  {frontend} {rows[-1]['nodes']} nodes: " +
                  ", ".join(f"{s} {rows[-1][s]:.2f} s" for s in STAGES), file=sys.stderr, flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
