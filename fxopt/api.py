"""`fxopt.optimize`: capture, run a pipeline, verify — the one call most users need.

    >>> import torch, fxopt
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(), torch.nn.ReLU()).eval()
    >>> res = fxopt.optimize(model, (torch.randn(4, 8),), pipeline="remove-noops,dce")
    >>> res.verification.passed, [p.name for p in res.passes]
    (True, ['remove-noops', 'dce'])
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

import torch
import torch.fx
from torch import nn

from .calibration import check_batches
from .capture import Mode, capture, frontend_of, normalize_inputs
from .errors import VerificationWarning
from .ir import ref_for_get_attr, written_base
from .manager import (Instrument, _checked_instruments, PassManager, PassRecord, PrintIR, TimePasses, VerifyEach, pass_tolerance,
                      record_pipeline)
from .pass_base import Pass
from .pipeline import format_pipeline
from .serialize import rebuild_coded_attributes
from .tracing import one_at_a_time
from .verify import Tolerance, VerificationReport, device_name, loosest, verify


@dataclass
class OptimizeResult:
    """What `optimize` returns.

    - `module`: the optimized, executable GraphModule;
    - `passes`: one PassRecord per pass (name, seconds, nodes before/after, verification);
    - `verification`: the final check against the captured original on CPU;
    - `verification_by_device`: the same check per device (CUDA too when a GPU is present);
      after a lossy pass (`prune`, `distill`) the passes that follow are also checked against
      its output at their own tolerance, and a failure there fails these reports (see
      `_after_lossy`): ``prune,quantize`` must still be a good int8 copy of the pruned model;
    - `original`: the captured, unoptimized GraphModule, which holds the very tensors the passes
      left unchanged in `module` (no second copy of the weights): to train `module` and keep
      `original` as captured, train ``copy.deepcopy(res.module)``; `pipeline`: the text that ran.

        >>> import torch, fxopt
        >>> res = fxopt.optimize(torch.nn.Linear(4, 2).eval(), torch.randn(3, 4), "dce")
        >>> res.frontend, res.pipeline, res.verification.passed
        ('symbolic', 'dce', True)
        >>> print(res.summary().splitlines()[0])
        front end: symbolic
    """

    module: torch.fx.GraphModule
    passes: list[PassRecord]
    verification: VerificationReport | None
    original: torch.fx.GraphModule
    pipeline: str
    frontend: str
    verification_by_device: dict[str, VerificationReport] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"front end: {self.frontend}", f"pipeline: {self.pipeline}"]
        lines += [f"  {r}" for r in self.passes]
        for device, report in self.verification_by_device.items():
            lines.append(f"verification[{device}]: {report.summary()}")
        return "\n".join(lines)


@one_at_a_time
def optimize(
    model: nn.Module,
    example_inputs: Any,
    pipeline: str | Sequence[Pass | str] = "remove-noops,fold-constants,dce",
    *,
    calibration: Iterable[Any] | None = None,
    verify: bool = True,
    mode: Mode = "auto",
    dynamic_shapes: dict | tuple | list | None = None,
    tolerance: str | Tolerance | None = None,
    verify_each: bool = False,
    print_ir_after_each: bool = False,
    print_ir_after_change: bool = False,
    time_passes: bool = False,
    bisect_limit: int | None = None,
    instruments: Sequence[Instrument] | None = (),
    devices: Sequence[str | torch.device] | None = None,
) -> OptimizeResult:
    """Capture `model` (or take a GraphModule), run `pipeline`, verify the result.

    `example_inputs`: a tensor, a tuple of args or a dict of kwargs. `calibration`: batches in
    the same form, for passes that need data (quantization, taylor importance, distill): a list,
    or a DataLoader (any iterable with a length), which each pass reads batch by batch. `mode` and
    `dynamic_shapes` are `fxopt.capture`'s (torch.export's dims to keep dynamic). `tolerance`
    defaults to the loosest that the pipeline's passes promise. `devices` to verify on
    defaults to CPU plus CUDA when a GPU is present. The input model is never modified. A
    result that fails verification is still returned, with a `VerificationWarning`. The result
    records the passes that ran (not those `bisect_limit` skipped) and their tolerance in
    ``module.meta["fxopt"]``, which `fxopt.verify` reads.

        >>> import torch, fxopt
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(), torch.nn.ReLU()).eval()
        >>> res = fxopt.optimize(model, torch.randn(2, 4), "remove-noops,dce")
        >>> [(r.name, r.nodes_before, r.nodes_after) for r in res.passes]
        [('remove-noops', 5, 4), ('dce', 4, 4)]
        >>> res.verification.verdict, res.module.meta["fxopt"]["tolerance"]
        ('PASS', 'exact')
    """
    check_batches(calibration)  # one tensor is refused here, before capture (PassManager.run reads the batches)
    devices = _check_devices(devices)
    manager_instruments = _checked_instruments(instruments)  # one Instrument, not a list: said now
    args, kwargs = normalize_inputs(example_inputs)
    original = capture(model, example_inputs, mode=mode, dynamic_shapes=dynamic_shapes)
    if print_ir_after_each or print_ir_after_change:
        manager_instruments.append(PrintIR(only_changes=print_ir_after_change and not print_ir_after_each))
    if verify_each:
        manager_instruments.append(VerifyEach(original, args, kwargs))
    last_lossy = _LastLossyOutput()
    manager_instruments.append(last_lossy)
    if time_passes:
        manager_instruments.append(TimePasses())
    manager = PassManager(pipeline, instruments=manager_instruments, bisect_limit=bisect_limit)
    result = manager.run(original, args, example_kwargs=kwargs, calibration=calibration, reference=original,
                         share_tensors=True)
    ran = [p for p, r in zip(manager.passes, result.records) if not r.skipped]
    tol = loosest(tolerance) if tolerance is not None else loosest(*(pass_tolerance(p) for p in ran))
    if result.module is not original:  # an empty pipeline hands back the captured graph itself
        record_pipeline(result.module, model, format_pipeline(ran), tol)  # not those bisect_limit skipped
        _own_written_buffers(result.module)
    reports: dict[str, VerificationReport] = {}
    if verify:
        for device in devices or _default_devices():
            reports[device] = verify_on(original, result.module, example_inputs, tol, device)
            if last_lossy.module is not None and tolerance is None:
                reports[device] = _after_lossy(reports[device], last_lossy, result.module, example_inputs,
                                               device)
            report = reports[device]
            if not report.passed or report.unproven:
                # a returned module is easy to use unchecked: say it failed (or proved nothing) where it is used
                what = ("failed" if not report.passed else "compared no value" if report.uncompared
                        else "proved nothing")
                warnings.warn(f"optimize('{result.pipeline}'): verification {what}: {report.summary()}",
                              VerificationWarning, stacklevel=2)
    # packed int8 weights remember the shape of their first call (the example's, just above)
    rebuild_coded_attributes(result.module)
    return OptimizeResult(
        module=result.module,
        passes=result.records,
        verification=reports.get("cpu") or next(iter(reports.values()), None),
        original=original,
        pipeline=result.pipeline,
        frontend=frontend_of(original),
        verification_by_device=reports,
    )


def verify_on(reference, candidate, inputs, tol, device: str) -> VerificationReport:
    """`verify` on one device; a module that cannot run there (CPU-only int8 kernels) says so."""
    try:
        return verify(reference, candidate, inputs, tolerance=tol, device=device)
    except Exception as exc:  # e.g. x86 quantized kernels moved to CUDA
        return VerificationReport(False, tol, device, message=f"could not run on {device}: {exc}")


def _own_written_buffers(gm: torch.fx.GraphModule) -> None:
    """Give `gm` its own copy of every tensor its graph writes in place as it runs (a call
    counter, statistics kept in forward): passes share tensors with the captured original, and
    calling one must not change the other's state."""
    for node in gm.graph.nodes:
        target = written_base(gm, node)
        if target is not None and target.op == "get_attr":
            ref = ref_for_get_attr(gm, target)
            value = ref.get() if ref is not None else None
            if isinstance(value, torch.Tensor):
                ref.set(value.clone())


class _LastLossyOutput(Instrument):
    """Keeps the output of the last lossy pass and the tolerances of the passes after it."""

    def __init__(self) -> None:
        self.module: torch.fx.GraphModule | None = None
        self.name = ""
        self.after: list[Tolerance] = []
        self.names_after: list[str] = []

    def after_pass(self, p, before, result, record, ctx):
        tolerance = pass_tolerance(p)
        if tolerance.name == "lossy":
            self.module, self.name, self.after, self.names_after = result.module, record.pipeline_text, [], []
        elif self.module is not None:
            self.after.append(tolerance)
            self.names_after.append(record.pipeline_text)


def _after_lossy(report: VerificationReport, last_lossy: _LastLossyOutput, candidate: torch.fx.GraphModule,
                 inputs, device: str) -> VerificationReport:
    """`report` (against the original), failed if the passes after the last lossy one do not
    hold their own tolerance against its output: against the original anything passes at
    `lossy`, which would let a broken int8 kernel after `prune` through unseen."""
    if not report.passed or not last_lossy.after:
        return report
    stage = verify_on(last_lossy.module, candidate, inputs, loosest(*last_lossy.after), device)
    if stage.passed:
        return report
    after = ", ".join(last_lossy.names_after)
    return replace(report, passed=False, stage=stage,
                   message=f"the passes after '{last_lossy.name}' ({after}) fail against its output; "
                           f"verify_each=True names the first that does: {stage.summary()}")


def _check_devices(devices: Sequence[str | torch.device] | None) -> list[str] | None:
    """The device names to verify on, or None for the default; refuses, before any work, a name
    torch does not know, `meta`, or a GPU this machine lacks: each came back as a FAIL report
    ('could not run on tpu') after the whole pipeline. A torch.device is taken as its name."""
    if devices is None:
        return None
    if isinstance(devices, (str, torch.device)):
        raise TypeError(f"optimize: devices= takes a list of device names, e.g. devices=['{devices}']")
    return [device_name(d, "optimize: devices= names") for d in devices]


def _default_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
