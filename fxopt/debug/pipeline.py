"""`dump_pipeline`: optimize a model with every step dumped — what `fxopt dump` runs.

    >>> import tempfile, torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(), torch.nn.ReLU()).eval()
    >>> index = dump_pipeline(model, (torch.randn(2, 4),), "remove-noops,dce", tempfile.mkdtemp())
    >>> index.name, sorted(p.name for p in index.parent.glob("*.diff"))
    ('index.html', ['01-remove-noops.diff', '02-dce.diff'])
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from torch import nn

from ..api import optimize
from ..capture import Mode
from ..errors import PassError
from .dot import DEFAULT_COLLAPSE_THRESHOLD
from .instrument import DumpInstrument


def dump_pipeline(
    model: nn.Module,
    example_inputs: Any,
    pipeline: str,
    out_dir: str | Path,
    *,
    mode: Mode = "auto",
    calibration: Iterable[Any] | None = None,
    collapse_threshold: int = DEFAULT_COLLAPSE_THRESHOLD,
) -> Path:
    """Run `fxopt.optimize` (verifying after each pass) with a DumpInstrument; return index.html.

    When a pass fails (an exception, or verification after it), the index still lists every
    step dumped so far plus the error, and the PassError is re-raised with the index path in
    `error.dump_index`.
    """
    inst = DumpInstrument(out_dir, title=f"fxopt dump: {type(model).__name__}",
                          collapse_threshold=collapse_threshold)
    try:
        res = optimize(model, example_inputs, pipeline, calibration=calibration, mode=mode,
                       verify=True, verify_each=True, instruments=[inst])
    except PassError as exc:
        exc.dump_index = inst.index_path  # written by its on_pass_error, with the error
        raise
    notes = [f"front end: {res.frontend}"]
    notes += [f"{report.summary()} (final check)" for report in res.verification_by_device.values()]
    return inst.write_index(notes)
