"""`DumpInstrument`: a dump of every step of a pipeline, with diffs and one index page.

Under `out_dir` it writes the captured graph as step `00-captured`, the graph after each
pass as `NN-<pass>` (listing .txt, .dot, .svg when Graphviz is installed), the unified diff
of listings between consecutive steps as `NN-<pass>.diff`, and `index.html`: one row per
step in order with its files, pass time, node counts, statistics and the verification
summary when the pass record has one (run `VerifyEach` too, or `optimize(verify_each=True)`).
The index is rewritten after every step, so a pipeline that crashes still leaves one. The step
files the last dump wrote in `out_dir` (listed in its `.fxopt-dump-steps`) are deleted first,
so the folder holds one run; every other file stays, whatever its name.

    >>> import tempfile, torch, fxopt
    >>> from fxopt.debug import DumpInstrument
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(), torch.nn.ReLU()).eval()
    >>> inst = DumpInstrument(tempfile.mkdtemp())
    >>> _ = fxopt.optimize(model, (torch.randn(2, 4),), "remove-noops,dce", instruments=[inst])
    >>> [s.stem for s in inst.steps], inst.index_path.exists()
    (['00-captured', '01-remove-noops', '02-dce'], True)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Iterable, Sequence

import torch.fx

from ..manager import Instrument, PassRecord
from ..pass_base import Pass, PassContext, PassResult
from ..pipeline import format_pipeline
from .diff import listing_diff
from .dot import DEFAULT_COLLAPSE_THRESHOLD
from .files import GraphFiles, output_dir, record_step_files, remove_stale_steps, write_graph
from .html import file_links, link, page, verdict
from .render import DEFAULT_TIMEOUT_S


@dataclass
class Step:
    """One dumped step: its files, and the pass record (None for the captured graph)."""

    stem: str
    files: GraphFiles
    record: PassRecord | None = None
    diff: Path | None = None
    added: int = 0
    removed: int = 0


class DumpInstrument(Instrument):
    """Dump the graph before the pipeline and after every pass; see the module docstring."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        title: str = "fxopt pipeline",
        collapse_threshold: int = DEFAULT_COLLAPSE_THRESHOLD,
        svg: bool = True,
        svg_timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.title = title
        self.options = {"collapse_threshold": collapse_threshold, "svg": svg, "svg_timeout_s": svg_timeout_s}
        self.steps: list[Step] = []
        self.pipeline = ""
        self._records: list[PassRecord] = []
        self._index = 0

    @property
    def index_path(self) -> Path:
        return self.out_dir / "index.html"

    def before_pipeline(self, gm: torch.fx.GraphModule, passes: Sequence[Pass]) -> None:
        remove_stale_steps(output_dir(self.out_dir))  # one run per folder
        self.steps, self._records = [], []
        self.pipeline = format_pipeline(passes)
        self._add_step(gm, "00-captured", "captured", None)

    def before_pass(self, p: Pass, gm: torch.fx.GraphModule, index: int) -> None:
        self._index = index

    def after_pass(self, p: Pass, before: torch.fx.GraphModule, result: PassResult,
                   record: PassRecord, ctx: PassContext) -> None:
        self._records.append(record)
        stem = f"{self._index + 1:02d}-{slug(record.pipeline_text)}"
        self._add_step(result.module, stem, f"after {record.pipeline_text}", record)

    def after_pipeline(self, gm: torch.fx.GraphModule, records: list[PassRecord]) -> None:
        self._records = list(records)
        self.write_index()

    def on_pass_error(self, p: Pass, before: torch.fx.GraphModule, error: Exception,
                      records: list[PassRecord]) -> None:
        self.write_index([f"FAIL: {error}"], records=records)  # the steps before it, and why it ended

    def write_index(self, notes: Iterable[str] = (), records: Sequence[PassRecord] | None = None) -> Path:
        """(Re)write index.html; `notes` are extra lines (final verification, an error) shown on top."""
        if records is not None:
            self._records = list(records)
        dumped = {id(s.record) for s in self.steps}
        skipped = [r for r in self._records if id(r) not in dumped]
        body = [f"<p>pipeline: <code>{escape(self.pipeline)}</code></p>"]
        body += [f"<p>{verdict(n)}</p>" for n in notes]
        body.append(_steps_table(self.steps, skipped))
        self.index_path.write_text(page(self.title, body))
        return self.index_path

    def _add_step(self, gm: torch.fx.GraphModule, stem: str, title: str, record: PassRecord | None) -> None:
        files = write_graph(gm, self.out_dir, stem, title=f"{stem}: {title}", **self.options)
        step = Step(stem, files, record)
        if self.steps:
            step.diff, step.added, step.removed = write_diff(self.steps[-1], files, self.out_dir / f"{stem}.diff")
        record_step_files(self.out_dir, [files.listing, files.dot, files.svg, step.diff])
        self.steps.append(step)
        self.write_index()


def write_diff(previous: Step, files: GraphFiles, path: Path) -> tuple[Path, int, int]:
    """Unified diff of two steps' listings at `path`; returns (path, lines added, lines removed)."""
    text, added, removed = listing_diff(previous.files.text, files.text, previous.files.listing.name,
                                        files.listing.name)
    path.write_text(text or "# unchanged\n")
    return path, added, removed


def slug(text: str) -> str:
    """A file-name-safe form of a pass's pipeline text: `prune{ratio=0.5}` -> `prune-ratio-0.5`."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-")[:60] or "pass"


_HEAD = ("<tr><th>step</th><th>pass</th><th>files</th><th>diff</th><th>ms</th>"
         "<th>nodes</th><th>stats</th><th>verification</th></tr>")


def _steps_table(steps: list[Step], skipped: list[PassRecord]) -> str:
    rows = [_HEAD]
    for step in steps:
        r = step.record
        name = escape(r.pipeline_text) if r else "captured"
        diff = (link(step.diff, f"+{step.added} -{step.removed}") if step.added or step.removed
                else "unchanged") if step.diff else ""
        ms = f"{r.seconds * 1e3:.1f}" if r else ""
        nodes = f"{r.nodes_before} &rarr; {r.nodes_after}" if r else str(step.files.nodes)
        stats = escape(", ".join(f"{k}={v}" for k, v in r.stats.items())) if r else ""
        check = verdict(r.verification.summary()) if r and r.verification else ""
        rows.append(f"<tr><td>{escape(step.stem)}</td><td><code>{name}</code></td>"
                    f"<td>{' | '.join(file_links(step.files))}</td><td>{diff}</td><td class=\"num\">{ms}</td>"
                    f"<td class=\"num\">{nodes}</td><td>{stats}</td><td>{check}</td></tr>")
    for r in skipped:
        reason = "skipped (bisect limit)" if r.skipped else "failed: no graph after this pass"
        rows.append(f"<tr><td></td><td><code>{escape(r.pipeline_text)}</code></td>"
                    f"<td colspan=\"6\" class=\"note\">{reason}</td></tr>")
    return "<table>\n" + "\n".join(rows) + "\n</table>"
