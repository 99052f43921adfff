"""The pass manager: runs a pipeline over a GraphModule with instruments watching each step.

Guarantees:
- the module handed in, and the verification reference, are never mutated: every pass works
  on a private copy (graph and module tree copied, tensors shared — passes replace tensors,
  never write into them, and a pass that bumps a shared tensor's version counter is refused;
  one that swaps a shared tensor's data, `param.data = ...`, or an attribute of its input or of
  `ctx.reference`, or registers a hook on one of their modules, is refused and the original put
  back); instrument hooks run under the same guard;
- when a pass raises, `PassError` names it and carries the last good module and the records
  of the passes that ran;
- analyses are cached across passes and invalidated by what each pass says it preserves.

Instruments observe without changing anything: timing and node counts (always recorded),
print-IR after each pass or only after a change (as a diff), verify-each (graph lint plus a
numerical check against the original, localized to the first diverging node), dumps to disk,
and a bisect limit (run only the first N passes) to find the pass that breaks a model.

    >>> import torch, fxopt
    >>> from fxopt.manager import PassManager
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout()).eval()
    >>> gm = fxopt.capture(model, (torch.randn(2, 4),))
    >>> result = PassManager("remove-noops,dce").run(gm, (torch.randn(2, 4),))
    >>> [r.name for r in result.records], result.records[0].nodes_before > result.records[0].nodes_after
    (['remove-noops', 'dce'], True)
"""
from __future__ import annotations

import copy
import functools
import gc
import inspect
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence, TextIO

import torch
import torch.fx
from torch.overrides import TorchFunctionMode

from .analysis import AnalysisManager, ShapeAnalysis
from .calibration import batches_for_passes
from .call_check import explain_failed_calls
from .debug.diff import listing_diff
from .debug.listing import graph_listing
from .errors import InputMismatchError, PassError, PassWarning, first_line
from .capture import META_KEY, adopt_graph_module, copied_tags
from .ir.interpret import BufferState, fresh_inputs
from .ir.rewrite import clone_sharing_tensors
from .pass_base import Pass, PassContext, PassResult
from .pipeline import format_pass, format_pipeline, parse_pipeline
from .tracing import one_at_a_time
from .verify import TOLERANCES, Tolerance, VerificationReport, brief_inputs, loosest, recorded_tolerance, verify


@dataclass
class PassRecord:
    """One pass as it ran: what it was, how long it took, what it did to the graph.

        >>> import torch, fxopt
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout()).eval()
        >>> res = fxopt.optimize(model, torch.randn(2, 4), "remove-noops,dce", bisect_limit=1)
        >>> ran, skipped = res.passes
        >>> ran.name, ran.nodes_before, ran.nodes_after, ran.modified
        ('remove-noops', 4, 3, True)
        >>> print(ran)  # doctest: +ELLIPSIS
        remove-noops: ... ms, nodes 4 -> 3
        >>> print(skipped)
        dce: skipped (bisect limit)
    """

    name: str
    pipeline_text: str
    seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    modified: bool = False
    skipped: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    verification: VerificationReport | None = None
    failed: str | None = None  # why the pass failed (its PassError's first line)

    def __str__(self) -> str:
        if self.skipped:
            return f"{self.pipeline_text}: skipped (bisect limit)"
        if self.failed is not None:
            return f"{self.pipeline_text}: failed after {self.seconds * 1e3:.1f} ms: {self.failed}"
        check = f", {self.verification.summary().splitlines()[0]}" if self.verification else ""
        return (f"{self.pipeline_text}: {self.seconds * 1e3:.1f} ms, nodes {self.nodes_before} -> "
                f"{self.nodes_after}{'' if self.modified else ' (unchanged)'}{check}")


@dataclass
class PipelineResult:
    module: torch.fx.GraphModule
    records: list[PassRecord]
    pipeline: str


class Instrument:
    """Hooks the manager calls around every pass. Override what you need.

    Instruments observe: a hook runs under the guard a pass runs under, so writing into a tensor
    of the modules it is handed (which share their tensors with the input and the verification
    reference), or reassigning their attributes, stops the pipeline with an error naming the hook
    (copy a tensor before changing it). Running the model is fine: a buffer its forward updates
    must only be back at its value when the hook returns.

        >>> import torch, fxopt
        >>> class NodeCounts(fxopt.Instrument):
        ...     def __init__(self):
        ...         self.seen = []
        ...     def after_pass(self, p, before, result, record, ctx):
        ...         self.seen.append((p.name, len(before.graph.nodes), len(result.module.graph.nodes)))
        >>> counts = NodeCounts()
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout()).eval()
        >>> _ = fxopt.optimize(model, torch.randn(2, 4), "remove-noops,dce", instruments=[counts])
        >>> counts.seen
        [('remove-noops', 4, 3), ('dce', 3, 3)]
    """

    def before_pipeline(self, gm: torch.fx.GraphModule, passes: Sequence[Pass]) -> None: ...

    def before_pass(self, p: Pass, gm: torch.fx.GraphModule, index: int) -> None: ...

    def after_pass(self, p: Pass, before: torch.fx.GraphModule, result: PassResult,
                   record: PassRecord, ctx: PassContext) -> None: ...

    def on_pass_error(self, p: Pass, before: torch.fx.GraphModule, error: PassError,
                      records: list[PassRecord]) -> None:
        """A pass failed (or an instrument failed after it): `before` is the last good module,
        `records` every pass so far, the failing one last. The pipeline ends with `error`."""
    def after_pipeline(self, gm: torch.fx.GraphModule, records: list[PassRecord]) -> None: ...


class PrintIR(Instrument):
    """Print the listing after every pass, or with `only_changes` a diff when it changed.

    `fxopt.optimize(..., print_ir_after_change=True)` adds ``PrintIR(only_changes=True)``.

        >>> import torch, fxopt
        >>> x = torch.randn(2, 4)
        >>> gm = fxopt.capture(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout()).eval(), x)
        >>> _ = fxopt.PassManager("remove-noops,dce", instruments=[fxopt.PrintIR(only_changes=True)]).run(gm, (x,))
        --- before
        +++ after remove-noops
        @@ -2,3 +2,2 @@
         %_0 = call_module 0(%input_1)  : f32[2, 4]
        -%_1 = call_module 1(%_0)  : f32[2, 4]
        -%output = output %_1  : f32[2, 4]
        +%output = output %_0  : f32[2, 4]
    """

    def __init__(self, only_changes: bool = False, stream: TextIO | None = None) -> None:
        self.only_changes = only_changes
        self.stream = stream

    def before_pipeline(self, gm, passes):
        if not self.only_changes:
            self._write(graph_listing(gm, "captured"))

    def after_pass(self, p, before, result, record, ctx):
        title = f"after {record.pipeline_text}"
        if not self.only_changes:
            self._write(graph_listing(result.module, title))
            return
        diff, _, _ = listing_diff(graph_listing(before), graph_listing(result.module), "before", title, context=1)
        if diff:
            self._write(diff if diff.endswith("\n") else diff + "\n")

    def _write(self, text: str) -> None:
        (self.stream or sys.stdout).write(text)


class TimePasses(Instrument):
    """Print a table of per-pass time and node counts when the pipeline ends.

    `fxopt.optimize(..., time_passes=True)` adds one that prints to stdout.

        >>> import io, torch, fxopt
        >>> x = torch.randn(2, 4)
        >>> gm = fxopt.capture(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout()).eval(), x)
        >>> table = io.StringIO()
        >>> _ = fxopt.PassManager("remove-noops,dce", instruments=[fxopt.TimePasses(table)]).run(gm, (x,))
        >>> print(table.getvalue())  # doctest: +ELLIPSIS
        pass timing:
        ... ms ...%       4 ->      3  remove-noops
        ... ms ...%       3 ->      3  dce
        ... ms total
        <BLANKLINE>
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    def after_pipeline(self, gm, records):
        out = self.stream or sys.stdout
        total = sum(r.seconds for r in records)
        out.write("pass timing:\n")
        for r in records:
            share = 100 * r.seconds / total if total else 0.0
            state = "  (skipped)" if r.skipped else "  (failed)" if r.failed else ""
            after = f"{'-':>6}" if r.failed else f"{r.nodes_after:6d}"
            out.write(f"  {r.seconds * 1e3:9.1f} ms {share:5.1f}%  {r.nodes_before:6d} -> {after}  "
                      f"{r.pipeline_text}{state}\n")
        out.write(f"  {total * 1e3:9.1f} ms total\n")

    def on_pass_error(self, p, before, error, records):
        self.after_pipeline(before, records)  # the passes up to the failing one


class VerifyEach(Instrument):
    """After each pass: lint the graph and compare with the original module numerically.

    The check uses the loosest tolerance of the passes run so far (an exact pass after an
    int8 one is held to the int8 floor). After a lossy pass (`prune`), whose output nothing
    bounds, each later pass is compared with that output instead, at the loosest tolerance
    of the passes since. A lossy pass itself (`NOT CHECKED`) is measured against the original
    module, whatever came before it: `distill` after `prune` trains toward the original, and its
    numbers against the pruned model it started from (SQNR -15 dB, cosine 0) said nothing. A
    failure raises, naming the pass and the first diverging node, so a pipeline stops at the pass
    that broke the model.
    `fxopt.optimize(..., verify_each=True)` adds one.

        >>> import torch, fxopt
        >>> x = torch.randn(2, 4)
        >>> gm = fxopt.capture(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout()).eval(), x)
        >>> check = fxopt.VerifyEach(gm, (x,))
        >>> result = fxopt.PassManager("remove-noops,dce", instruments=[check]).run(gm, (x,))
        >>> [(r.name, r.verification.verdict) for r in result.records]
        [('remove-noops', 'PASS'), ('dce', 'PASS')]
    """

    def __init__(self, reference: torch.fx.GraphModule, inputs: tuple, kwargs: dict | None = None) -> None:
        self.reference = self.original = reference
        self.inputs = inputs
        self.kwargs = kwargs or {}
        self._tolerances: list[Tolerance] = []  # of the passes since the reference was made

    def _inputs(self) -> Any:
        return self.inputs if not self.kwargs else self.kwargs

    def before_pipeline(self, gm, passes):
        """Check that the reference runs on the inputs given: it failed only after the first
        pass, and the error then read 'pass fuse failed'."""
        try:
            verify(self.reference, self.reference, self._inputs(), localize=False)
        except Exception as exc:
            cause = exc.__cause__ or exc  # verify's ValueError says what this one says: torch's error is the news
            raise ValueError(f"VerifyEach: its reference {type(self.reference).__name__} does not run on the inputs "
                             f"VerifyEach was given ({type(cause).__name__}: {first_line(cause)}); give it the "
                             "example inputs the pipeline runs on") from None

    def after_pass(self, p, before, result, record, ctx):
        tolerance = pass_tolerance(p)
        self._tolerances.append(tolerance)
        result.module.graph.lint()
        against = self.reference if tolerance.checks_values else self.original
        report = verify(against, result.module, self._inputs(), tolerance=loosest(*self._tolerances))
        if not tolerance.checks_values:  # the next passes answer to this output, not to the original
            self.reference, self._tolerances = result.module, []
        record.verification = report
        if not report.passed:
            raise PassError(record.pipeline_text, f"verification failed after the pass: {report.summary()}")


def pass_tolerance(p: Pass) -> Tolerance:
    """The tolerance a pass promises; passes set `tolerance` ("exact" by default)."""
    return loosest(getattr(p, "tolerance", "exact"))


def record_pipeline(gm: torch.fx.GraphModule, model: torch.nn.Module, pipeline: str, tol: Tolerance) -> None:
    """Write the pipeline and its tolerance into ``gm.meta["fxopt"]``: `fxopt.verify(model, gm, x)`
    then holds `gm` to what it was optimized at (an int8 module to `int8`, not `exact`). A
    `model` that an earlier run made (an int8 module saved, loaded and lowered; observers
    inserted, then lowered by hand) passes its history on: the tolerance is the loosest of both
    runs, the pipeline both, in order."""
    earlier = model.meta.get(META_KEY, {}) if isinstance(model, torch.fx.GraphModule) else {}
    if earlier.get("pipeline"):
        pipeline = f"{earlier['pipeline']},{pipeline}" if pipeline else earlier["pipeline"]
    tol = loosest(tol, recorded_tolerance(model))
    recorded: str | Tolerance = tol.name if TOLERANCES.get(tol.name) == tol else tol
    gm.meta[META_KEY] = {**gm.meta.get(META_KEY, {}), "pipeline": pipeline, "tolerance": recorded}


class PassManager:
    """Runs passes in order; see the module docstring for what it guarantees.

    `pipeline` is pipeline text or a list of `Pass` objects and text; `bisect_limit` runs only
    the first N passes (the rest are recorded as skipped).

        >>> import torch, fxopt
        >>> x = torch.randn(2, 4)
        >>> gm = fxopt.capture(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout()).eval(), x)
        >>> pm = fxopt.PassManager("remove-noops, dce")
        >>> result = pm.run(gm, (x,))
        >>> pm.pipeline_text, [r.nodes_after for r in result.records], len(gm.graph.nodes)
        ('remove-noops,dce', [3, 3], 4)
        >>> torch.equal(result.module(x), gm(x))
        True
    """

    def __init__(
        self,
        pipeline: str | Sequence[Pass | str],
        *,
        instruments: Sequence[Instrument] | None = (),
        bisect_limit: int | None = None,
    ) -> None:
        self.passes = parse_pipeline(pipeline)
        self.instruments = _checked_instruments(instruments)
        if bisect_limit is not None and (not isinstance(bisect_limit, int) or isinstance(bisect_limit, bool)
                                         or bisect_limit < 0):
            raise ValueError(f"bisect_limit must be an int >= 0 (how many passes to run), got {bisect_limit!r}")
        self.bisect_limit = bisect_limit

    @property
    def pipeline_text(self) -> str:
        return format_pipeline(self.passes)

    @one_at_a_time
    def run(
        self,
        gm: torch.fx.GraphModule,
        example_inputs: tuple = (),
        *,
        example_kwargs: dict | None = None,
        calibration: Iterable[Any] | None = None,
        reference: torch.fx.GraphModule | None = None,
        verbose: bool = False,
        share_tensors: bool = False,
    ) -> PipelineResult:
        """Run the pipeline on a private copy of `gm`; `gm` itself is left as it was.
        `example_inputs` is a tensor, a tuple of positional inputs or a dict of keyword inputs
        (as `fxopt.capture` takes them); `example_kwargs` adds keyword inputs to a tuple.
        `calibration` is read as `fxopt.optimize` reads it (`fxopt.calibration.pipeline_batches`: a
        list of batches, a generator read once, a DataLoader streamed).

        The result holds its own copy of each tensor the passes left as it was in `gm` (training
        it leaves `gm` alone); `share_tensors=True` keeps them shared instead, which saves a copy
        of the weights but makes a write into one module's tensors a write into the other's
        (`fxopt.optimize` shares them between its result's `module` and `original`)."""
        if not isinstance(gm, torch.fx.GraphModule):
            raise TypeError(f"PassManager.run takes a torch.fx.GraphModule, got {type(gm).__name__}: capture "
                            "the model first (fxopt.capture(model, inputs)) or call fxopt.optimize(model, "
                            "inputs, pipeline), which does both")
        if isinstance(example_inputs, torch.Tensor):  # one input, as fxopt.optimize takes it (not its rows)
            example_inputs = (example_inputs,)
        if isinstance(example_inputs, Mapping):  # keyword inputs, as fxopt.capture and optimize take them
            if example_kwargs:
                raise TypeError("PassManager.run: example_inputs is a dict of keyword inputs and example_kwargs "
                                "is given too; pass the keyword inputs in one of them")
            example_inputs, example_kwargs = (), dict(example_inputs)
        calibration = batches_for_passes(calibration)  # a generator is read once, when a pass first reads it
        given = gm  # the caller's: the result must not hold its tensors
        if META_KEY not in getattr(gm, "meta", {}) and (example_inputs or example_kwargs):
            # a graph fxopt did not capture (torch.fx.symbolic_trace's) lacks the shapes the passes
            # read: fuse folded no batchnorm, prune failed with a bare TypeError; record them as capture does
            gm = adopt_graph_module(gm, tuple(example_inputs), example_kwargs or {})
        elif META_KEY not in getattr(gm, "meta", {}):
            self._warn_if_shapeless(gm)
        # each pass gets its own copy of its input (_run_one), so gm needs none of its own when a
        # pass runs: that copy was half the time of a one-pass pipeline (a deep copy of the graph)
        current = gm if self._runs_a_pass() else explain_failed_calls(clone_sharing_tensors(gm))
        # the passes get copies of the example inputs: one that writes into them changes
        # neither the caller's tensors nor what verification runs on
        example_inputs, example_kwargs = fresh_inputs(tuple(example_inputs), example_kwargs)
        am = AnalysisManager(current, example_inputs, example_kwargs)
        ctx = PassContext(am, example_inputs, example_kwargs, calibration,
                          reference if reference is not None else gm, verbose)
        records: list[PassRecord] = []
        for inst in self.instruments:
            _call_instrument(inst, "before_pipeline", _protected(current, ctx.reference), ctx.reference,
                             current, self.passes)
        stale = 0  # bytes of tensors replaced by passes since the last collection
        for index, p in enumerate(self.passes):
            record = PassRecord(p.name, format_pass(p), nodes_before=_count(current))
            records.append(record)
            if self.bisect_limit is not None and index >= self.bisect_limit:
                record.skipped, record.nodes_after = True, record.nodes_before
                continue
            given_to_pass = current
            try:
                current = self._run_one(p, index, current, am, ctx, record, records)
            except PassError as exc:
                if not any(r.modified for r in records[:-1]):  # nothing ran the graph on them yet (_check_runs)
                    _check_inputs_fit(gm, example_inputs, example_kwargs)
                if exc.last_good_module is not gm:  # what ran before it, as a result records it
                    done = self.passes[:index]
                    record_pipeline(exc.last_good_module, gm, format_pipeline(done),
                                    loosest(*(pass_tolerance(q) for q in done)))
                raise
            stale += _replaced_bytes(given_to_pass, current) if given_to_pass is not gm else 0
            del given_to_pass
            if stale > COLLECT_FREED_BYTES:
                # a GraphModule is a reference cycle (its graph holds it): the pass's input, with the
                # tensors the pass replaced, lived until the collector ran, a copy of them per pass
                gc.collect()
                stale = 0
        for inst in self.instruments:
            _call_instrument(inst, "after_pipeline", _protected(current, ctx.reference), ctx.reference,
                             current, records)
        ran = [p for p, r in zip(self.passes, records) if not r.skipped]
        if current is not gm:  # verify holds the result to what ran (lower-int8 run by hand: int8)
            record_pipeline(current, gm, format_pipeline(ran), loosest(*(pass_tolerance(p) for p in ran)))
            if not share_tensors:
                own_tensors(current, given)
        return PipelineResult(current, records, format_pipeline(ran))  # what ran (not the bisected-off)

    def _warn_if_shapeless(self, gm: torch.fx.GraphModule) -> None:
        """Warn when passes that read node shapes run on a graph that records none (one of
        `torch.fx.symbolic_trace`, run without example inputs): they then silently find nothing
        to do (fuse folded no batchnorm), or blame the model (prune: "no prunable channels")."""
        inputs = gm.graph.find_nodes(op="placeholder")
        if not inputs or any("tensor_meta" in n.meta or "val" in n.meta for n in inputs):
            return
        readers = [p.name for p in self.passes if getattr(p, "reads_shapes", True)]
        if readers:
            warnings.warn(f"PassManager.run: the GraphModule was not captured by fxopt and no example inputs were "
                          f"given, so its nodes carry no shapes, which {', '.join(dict.fromkeys(readers))} "
                          f"read{'s' if len(set(readers)) == 1 else ''}: "
                          "they may find nothing to do; pass example inputs (PassManager(...).run(gm, (x,))) or "
                          "capture the model with fxopt.capture(model, (x,))", PassWarning, stacklevel=3)

    def _runs_a_pass(self) -> bool:
        return bool(self.passes) and (self.bisect_limit is None or self.bisect_limit > 0)

    def _run_one(self, p, index, current, am, ctx, record, records):
        start = time.perf_counter()
        untouched = None
        try:
            for inst in self.instruments:
                _call_instrument(inst, "before_pass", _protected(current, ctx.reference), ctx.reference,
                                 p, current, index)
            working = clone_sharing_tensors(current)
            am.rebind(working)
            protected = _protected(current, ctx.reference)
            untouched = _Untouched(protected, ctx.reference)
            signature = _graph_signature(working)
            writes = TensorWrites(*(m for _, m in protected))
            try:
                with SharedWriteGuard(*(m for _, m in protected), keep=writes):
                    result = p.run(working, ctx)
            finally:
                # the model's forward, which a pass runs (calibration), may write its own weights
                # (nn.Embedding(max_norm=...)): put back, and no write of the pass's
                untouched.forgive(writes.restore())
            if not isinstance(result, PassResult):
                raise TypeError(f"run() returned {type(result).__name__}, expected PassResult")
            if not isinstance(result.module, torch.fx.GraphModule):
                raise TypeError(f"run() returned a PassResult holding a {type(result.module).__name__}, "
                                "expected a torch.fx.GraphModule")
            untouched.check(ctx.reference)
            if not result.module.graph.find_nodes(op="output"):  # lint takes a graph without one
                raise ValueError("the graph it returned has no output node (it was erased): the module would "
                                 "return None")
            if not result.modified and _graph_signature(result.module) != signature:
                # the stale generated code would be what runs and what is verified
                warnings.warn(f"pass '{p.name}' changed the graph but returned modified=False; "
                              "treated as modified", PassWarning, stacklevel=2)
                result = PassResult(result.module, True, result.stats)
            if result.modified:
                result.module.graph.lint()  # a malformed graph is this pass's fault, not the next one's
                result.module.recompile()
            _keep_capture_meta(current, result.module)
            explain_failed_calls(result.module)  # a new module: its call is not wrapped yet
            am.rebind(result.module)
            if result.modified:
                am.invalidate(p.preserves)
                _check_runs(am)
            record.seconds = time.perf_counter() - start
            record.modified, record.stats = result.modified, _plain(dict(result.stats))
            record.nodes_after = _count(result.module)
            for inst in self.instruments:
                _call_instrument(inst, "after_pass", _protected(current, ctx.reference, result.module),
                                 ctx.reference, p, current, result, record, ctx)
        except PassError as exc:
            _put_back(untouched)
            am.rebind(current)
            am.invalidate()
            _record_failure(record, exc, start)
            exc.last_good_module, exc.records = current, records
            self._tell_failure(p, current, exc, records)
            raise
        except Exception as exc:
            _put_back(untouched)
            am.rebind(current)
            am.invalidate()
            error = PassError(record.pipeline_text, f"{type(exc).__name__}: {exc}")
            _record_failure(record, error, start)
            error.last_good_module, error.records = current, records
            self._tell_failure(p, current, error, records)
            raise error from exc
        return result.module


    def _tell_failure(self, p, current, error, records) -> None:
        """`on_pass_error` of every instrument; one failing there must not hide `error`."""
        for inst in self.instruments:
            try:
                _call_instrument(inst, "on_pass_error", _protected(current, None), None, p, current, error, records)
            except Exception as exc:  # noqa: BLE001  (reported, then the pass's error goes on)
                warnings.warn(f"instrument {type(inst).__name__}.on_pass_error raised {type(exc).__name__}: {exc}",
                              stacklevel=3)


#: The bytes of tensors passes must have replaced in their inputs (added up since the last collection)
#: for `PassManager.run` to collect those inputs at once (a full collection costs milliseconds).
COLLECT_FREED_BYTES = 32 * 2**20


def _replaced_bytes(before: torch.nn.Module, after: torch.nn.Module) -> int:
    """The bytes of `before`'s tensors whose storage `after` no longer holds."""
    kept = {_storage_key(t) for t in _tensors_of(after)}
    stale = {key: t for t in _tensors_of(before) if (key := _storage_key(t)) is not None and key not in kept}
    return sum(t.untyped_storage().nbytes() for t in stale.values())


def _check_inputs_fit(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """Raise `InputMismatchError` where the graph given to `PassManager.run` fails on the example
    inputs (the first pass's failure then blamed the pass: "the graph it returned does not run").
    Run on the failure path only; the graph's buffers and weights are left as they were."""
    if not args and not kwargs:
        return
    state, writes = BufferState(gm), TensorWrites(gm)
    try:
        fresh_args, fresh_kwargs = fresh_inputs(args, kwargs)
        with torch.no_grad(), writes:
            gm(*fresh_args, **fresh_kwargs)
    except Exception as exc:  # noqa: BLE001  (the inputs' failure, told instead of the pass's)
        raise InputMismatchError(f"PassManager.run: the example inputs ({brief_inputs(args, kwargs)}) do not run "
                                 f"through the graph it was given: {type(exc).__name__}: {first_line(exc)}; give "
                                 "inputs the graph takes (those it was captured with)") from exc
    finally:
        writes.restore()
        state.restore()


def _check_runs(am: AnalysisManager) -> None:
    """Run the graph `am` is bound to on the example inputs (its shapes analysis, which the next
    pass reads, so it is no extra run when one follows): a graph a pass broke (an op given an
    argument it does not take) failed only at the final verification, which named no pass, or,
    with verify=False, in the caller's hands. Without example inputs nothing is run."""
    if not am.example_inputs and not am.example_kwargs:
        return
    try:
        am.get(ShapeAnalysis)
    except Exception as exc:  # whatever the broken graph raises is the pass's error
        raise RuntimeError(f"the graph it returned does not run on the example inputs: {type(exc).__name__}: "
                           f"{first_line(exc)}") from exc


def _checked_instruments(instruments: Sequence[Instrument] | None) -> list[Instrument]:
    """`instruments` as a list (None: none), each an `Instrument`: a bare one or another object
    failed only when the first hook ran, with Python's words ("'Instrument' object is not iterable")."""
    if instruments is None:
        return []
    if isinstance(instruments, Instrument):
        raise TypeError(f"instruments= takes a list of Instruments, got one {type(instruments).__name__}: "
                        "pass [instrument]")
    listed = list(instruments)
    bad = next((i for i in listed if not isinstance(i, Instrument)), None)
    if bad is not None:
        raise TypeError(f"instruments= holds a {type(bad).__name__} ({bad!r}), not an fxopt.Instrument; "
                        "subclass fxopt.Instrument and override the hooks it needs")
    return listed


class SharedWriteGuard(TorchFunctionMode):
    """Refuse an in-place write into a tensor of `modules` *before* it happens.

    A pass works on a copy that shares its input's tensors, and those of the verification
    reference; writing into one would change the caller's model and what results are checked
    against. The version-counter check after the pass catches any write, but only once the data
    is gone; this mode stops the common ones (`p.mul_(2)`, `p.copy_(x)`, `p[i] = v`, `out=`, an
    aten overload whose schema writes: ``torch.ops.aten.fill_.Scalar(p, 0)``) at the call, so the
    input stays intact. Writes that bypass torch functions are still caught, after the fact, by
    the version check. `who` names the code guarded in the error ("the pass",
    or an instrument's hook: instruments run under the same guard).
    """

    def __init__(self, *modules: torch.nn.Module, who: str = "the pass", buffers: bool = True,
                 keep: "TensorWrites | None" = None) -> None:
        super().__init__()
        self.who = who
        self.keep = keep  # notes the writes it lets through (the model's own): one mode, not two, per call
        self.shared = {}
        for name, t in _named_tensors_of(modules, buffers):
            if (key := _storage_key(t)) is not None:
                self.shared.setdefault(key, name)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.keep is not None:
            self.keep.note(func, args, kwargs)
        written = _written_tensors(func, args, kwargs)
        if isinstance(func, torch._ops.OpOverload) and _written_arguments(func) and not _in_a_module_call():
            # an aten overload the pass calls itself (aten.mul_.Scalar: no in-place method's name); one a
            # model's run calls (an export graph's embedding_renorm_) is the model's own write, put back by `keep`
            written = [*written, *_written_by_call(func, args, kwargs)]
        for target in written:
            name = self.shared.get(_storage_key(target))
            if name is not None:
                how = ("replace the data of" if _sets_data(func) else "write into")
                what = ".data = ..." if _sets_data(func) else (
                    str(func).replace("aten::", "aten.") if isinstance(func, torch._ops.OpOverload)
                    else getattr(func, "__name__", func))
                raise RuntimeError(
                    f"{self.who} tried to {how} tensor '{name}' in place ({what}); {_advice(self.who)}")
        return func(*args, **kwargs)


def _in_a_module_call() -> bool:
    """Whether the code running is inside a call of a module (a forward: the model's, as a pass
    or an instrument runs it), not code of the pass's own."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code in _MODULE_CALLS:
            return True
        frame = frame.f_back
    return False


_MODULE_CALLS = frozenset(f.__code__ for f in (torch.nn.Module._call_impl, torch.nn.Module._wrapped_call_impl))


class TensorWrites(TorchFunctionMode):
    """Keep each parameter and plain tensor attribute (``self.stats = torch.zeros(4)``, no
    buffer: `BufferState` keeps those) of `modules` that a torch function writes into in place,
    as it was just before the first write, and put them back on `restore`: a forward that changes
    its own weights (``nn.Embedding(max_norm=...)`` renormalizes the rows it reads) or statistics
    (``self.stats.add_(...)``) leaves them as they were. Only tensors written are copied; writes
    that bypass torch functions go unseen.

        >>> import torch
        >>> emb = torch.nn.Embedding(4, 2, max_norm=0.1)
        >>> before = emb.weight.detach().clone()
        >>> with TensorWrites(emb) as writes:
        ...     _ = emb(torch.tensor([0, 1]))
        >>> torch.equal(emb.weight, before), (writes.restore(), torch.equal(emb.weight, before))[1]
        (False, True)
    """

    def __init__(self, *modules: torch.nn.Module) -> None:
        super().__init__()
        self.modules = modules
        self._tensors: dict[int, torch.Tensor] | None = None  # read at the first write: most runs make none
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.note(func, args, kwargs)
        return func(*args, **kwargs)

    @property
    def tensors(self) -> dict[int, torch.Tensor]:
        """The tensors watched, by storage address."""
        if self._tensors is None:
            self._tensors = {key: t for m in self.modules for t in _parameters_and_attributes(m)
                             if (key := _storage_key(t)) is not None}
        return self._tensors

    def note(self, func, args: tuple, kwargs: dict) -> None:
        """Keep what a call of `func` is about to write, where it is one of the tensors watched."""
        if kwargs.get("out") is None and not _may_write(func):  # most calls: this runs on every torch call
            return
        for target in (*_written_tensors(func, args, kwargs), *_written_by_call(func, args, kwargs)):
            key = _storage_key(target)
            if key in self.tensors and key not in self.saved:
                self.saved[key] = (self.tensors[key], self.tensors[key].detach().clone())

    def restore(self) -> list[torch.Tensor]:
        """Write the kept values back into the tensors written; returns those tensors."""
        restored = [t for t, _ in self.saved.values()]
        with torch.no_grad():
            for t, value in self.saved.values():
                t.copy_(value)
        self.saved.clear()
        return restored


def _parameters_and_attributes(module: torch.nn.Module) -> list[torch.Tensor]:
    """`module`'s parameters, and the tensors its submodules hold as plain attributes."""
    attributes = [v for m in module.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]
    return [*module.parameters(), *attributes]


def _written_by_call(func, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors a call writes that its name does not say: an aten op's arguments its schema
    marks written (``aten.embedding_renorm_.default``, in an export graph), and the weight of
    ``F.embedding`` / ``F.embedding_bag`` with a ``max_norm``, renormalized inside, where a torch
    function mode does not see it."""
    if func is torch.nn.functional.embedding or func is torch.nn.functional.embedding_bag:
        bound = inspect.signature(func).bind(*args, **kwargs).arguments
        return [bound["weight"]] if bound.get("max_norm") is not None else []
    try:
        written = _written_arguments(func)
    except TypeError:  # an unhashable callable: no aten op
        return []
    return [args[i] for i in written if i < len(args) and isinstance(args[i], torch.Tensor)]


def _may_write(func) -> bool:
    """Whether a call of `func` may write a tensor other than through ``out=``: an in-place op, a
    ``.data`` setter, ``F.embedding`` (``max_norm``) or an aten op whose schema writes (read
    once per function)."""
    try:
        return _writes_by_kind(func)
    except TypeError:  # an unhashable callable: asked in full
        return True


@functools.lru_cache(maxsize=4096)
def _writes_by_kind(func) -> bool:
    return (_sets_data(func) or _inplace_name(getattr(func, "__name__", ""))
            or func is torch.nn.functional.embedding or func is torch.nn.functional.embedding_bag
            or bool(_written_arguments(func)))


@functools.lru_cache(maxsize=None)
def _written_arguments(func) -> tuple[int, ...]:
    """The positions of the arguments an aten op's schema marks written; () for anything else
    (asked on every torch call a pass or verify makes: read once per op)."""
    schema = getattr(func, "_schema", None)
    if schema is None or not schema.is_mutable:
        return ()
    return tuple(i for i, spec in enumerate(schema.arguments)
                 if spec.alias_info is not None and spec.alias_info.is_write)


def _advice(who: str) -> str:
    """What to do instead of a write into a shared tensor, for a pass or an instrument."""
    if who == "the pass":
        return "passes must replace tensors (ParamRef.set) so the input module stays intact"
    return ("instruments observe: the modules they are handed share their tensors with the input module and "
            "the verification reference; copy a tensor (t.clone()) before changing it")


def _module_advice(who: str) -> str:
    """What an instrument that edited or replaced the module the pipeline goes on with does instead."""
    return ("instruments observe: the pipeline goes on with the module a pass made, so an edit belongs in a pass "
            "(a Pass in the pipeline); to try one out, edit a copy (copy.deepcopy(result.module))")


# `t.data = x` reaches a torch function mode as the `__set__` of this descriptor: it swaps the
# storage of the tensor object every holder of it (the caller's module) sees.
_DATA_DESCRIPTOR = torch._C.TensorBase.__dict__.get("data")


def _sets_data(func) -> bool:
    """Whether `func` is the `.data` setter of a tensor."""
    return (getattr(func, "__name__", "") == "__set__" and _DATA_DESCRIPTOR is not None
            and getattr(func, "__self__", None) is _DATA_DESCRIPTOR)  # not `__get__`: reading is fine


_INPLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                              "__ifloordiv__", "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__",
                              "__ilshift__", "__irshift__"})


#: Methods named like in-place ops that change a flag, not the data.
_FLAG_ONLY = frozenset({"requires_grad_"})


def _inplace_name(name: str) -> bool:
    """Whether a function of this name writes its first argument (``add_``, ``__iadd__``)."""
    return name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("_") and name not in _FLAG_ONLY)


def _written_tensors(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors a torch function call writes into: `out=` and the target of an in-place op."""
    if _sets_data(func):
        return [args[0]] if args and isinstance(args[0], torch.Tensor) else []
    out = kwargs.get("out")
    inplace = _inplace_name(getattr(func, "__name__", ""))
    if out is None and not inplace:  # most calls: nothing to check (this runs on every torch call)
        return []
    written = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]
    # (nn.init.constant_ and kin reach a mode with their tensor as a keyword: kwargs["tensor"])
    first = args[0] if args else kwargs.get("tensor", kwargs.get("input", kwargs.get("self")))
    if inplace and isinstance(first, torch.Tensor):
        written.append(first)
    return written


def _storage_key(t: torch.Tensor) -> int | None:
    """The address of `t`'s storage (views and `.data` share it); None for tensors without one."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except Exception:  # meta / fake / sparse tensors
        return None
    return ptr or None


class _Untouched:
    """What guarded code (a pass, an instrument's hook) must leave as it found it: the `modules`
    it is handed or can reach — the pass's input, the verification reference (`ctx.reference`),
    for an instrument also the pass's result — and their tensors: version counters, the data
    each tensor object holds (``param.data = x`` swaps it without a write), the contents of
    float tensors (a write through ``.numpy()`` or ``.data_ptr()`` bumps no version), which
    tensor and submodule each attribute holds (``ctx.reference.fc.weight = nn.Parameter(...)``
    swaps it without touching a tensor), each module's forward and backward hooks, and the
    reference's graph. A change is detected after the fact: the pipeline stops, naming it.
    Swapped data, swapped attributes and hooks are put back (the originals are kept by
    reference, no copy); data written in place cannot be, and the error says so."""

    def __init__(self, protected: Sequence[tuple[str, torch.nn.Module]], reference: torch.fx.GraphModule | None,
                 who: str = "the pass", buffers_by_value: bool = False) -> None:
        self.who = who
        modules = [m for _, m in protected]
        # an instrument may run the model (verify): a forward that updates a buffer is allowed
        # to, as long as the buffer is back at its value after (verify puts it back)
        self.buffer_state = BufferState(*modules) if buffers_by_value else None
        named = _named_tensors_of(modules, buffers=not buffers_by_value)
        self.versions = {}
        for name, t in named:
            if not t.is_inference():
                self.versions.setdefault(id(t), (name, t._version))
        self.contents = {id(t): (name, content) for name, t in named if (content := _content(t)) is not None}
        # every tensor's data, buffers too (a swapped buffer's data is put back either way)
        self.data = {id(t): (name, t, t.data, layout) for name, t in _named_tensors_of(modules)
                     if (layout := _layout(t)) is not None}
        self.attributes = _AttributeSnapshot(protected)
        self.modules = list(modules)
        self.reference = _graph_signature(reference) if isinstance(reference, torch.fx.GraphModule) else None

    def put_back(self, buffers: bool = True) -> list[str]:
        """Give every tensor whose data was swapped its original data again, every module
        attribute that was reassigned its original value and, with `buffers`, every buffer
        checked by value its value; the names of the tensors."""
        self.attributes.restore()
        if buffers and self.buffer_state is not None:
            self.buffer_state.restore()  # a write: only when needed (a buffer may be a parameter too)
        swapped = []
        for name, t, original, layout in self.data.values():
            if _layout(t) != layout:
                with torch.no_grad():
                    t.data = original
                swapped.append(name)
        return swapped

    def forgive(self, tensors: list[torch.Tensor]) -> None:
        """Take `tensors` as they are now: written and put back as they were (`TensorWrites`)."""
        for t in tensors:
            if id(t) in self.versions:
                self.versions[id(t)] = (self.versions[id(t)][0], t._version)

    def check(self, reference: torch.fx.GraphModule | None) -> None:
        changed = self.attributes.changed()
        buffers = self.buffer_state.changed() if self.buffer_state is not None else []
        swapped = self.put_back(buffers=bool(buffers))
        if changed:
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            raise RuntimeError(f"{self.who} {changed[0]}{more}, which it must leave as "
                               f"it is (results are verified against ctx.reference); fxopt put the original "
                               f"back; {_advice(self.who)}")
        if swapped:
            more = f" (and {len(swapped) - 1} more)" if len(swapped) > 1 else ""
            raise RuntimeError(f"{self.who} replaced the data of tensor '{swapped[0]}'{more} (param.data = ...), "
                               "which its input module and the verification reference share; fxopt put the "
                               f"original data back; {_advice(self.who)}")
        if buffers:
            raise RuntimeError(f"{self.who} left buffer '{buffers[0]}' changed; fxopt put its value back; "
                               f"{_advice(self.who)}")
        for name, t in _named_tensors_of(self.modules):
            seen = self.versions.get(id(t))
            if seen is not None and t._version != seen[1]:
                raise RuntimeError(f"{self.who} wrote into tensor '{seen[0]}' in place; {_advice(self.who)}")
            before = self.contents.get(id(t))
            if before is not None and before[1] != _content(t):
                raise RuntimeError(f"{self.who} changed the contents of tensor '{before[0]}' without torch seeing a "
                                   "write (through .numpy() or .data_ptr()?): its input module and the "
                                   "verification reference changed with it, and fxopt cannot restore them "
                                   f"(it keeps no copy of the data); {_advice(self.who)}")
        if self.reference is not None and _graph_signature(reference) != self.reference:
            raise RuntimeError(f"{self.who} changed the graph of ctx.reference, the module results are verified "
                               "against; it must leave it as it is")


#: The hooks of a module that change what its forward (or backward) computes, by attribute.
_HOOKS = {"_forward_hooks": "forward hooks", "_forward_pre_hooks": "forward pre-hooks",
          "_backward_hooks": "backward hooks", "_backward_pre_hooks": "backward pre-hooks"}


class _AttributeSnapshot:
    """Which parameter, buffer, submodule, plain tensor attribute and hook every module under
    `modules` holds (the objects, not copies), and each option it holds as a plain value (a
    batchnorm's `eps`, a conv's `stride`, `training`): `changed` says what was reassigned (or
    hooked), `restore` puts it back. A hook on ``ctx.reference``, or another `eps`, changes
    what results are verified against as surely as a swapped weight."""

    def __init__(self, protected: Sequence[tuple[str, torch.nn.Module]]) -> None:
        self.saved = []
        seen: set[int] = set()
        for label, root in protected:
            for prefix, m in root.named_modules(remove_duplicate=False):
                if id(m) in seen:
                    continue
                seen.add(id(m))
                tensors = {k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)}
                hooks = {name: dict(getattr(m, name)) for name in _HOOKS if hasattr(m, name)}
                where = f"{label}.{prefix}" if prefix else label
                self.saved.append((where, m, dict(m._parameters), dict(m._buffers), dict(m._modules), tensors,
                                   hooks, _options(m), vars(m).get("forward")))

    def changed(self) -> list[str]:
        """What was changed, each as "reassigned attribute 'weight' of ctx.reference.fc"."""
        found = []
        for prefix, m, params, buffers, modules, tensors, hooks, options, forward in self.saved:
            current = {k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)}
            for saved, now in ((params, m._parameters), (buffers, m._buffers), (modules, m._modules),
                               (tensors, current)):
                for key in sorted(set(saved) | set(now)):
                    if saved.get(key) is not now.get(key):
                        found.append(f"reassigned attribute '{key}' of {prefix}")
            found += [f"changed the {_HOOKS[name]} of {prefix} (register_*_hook)"
                      for name, saved in hooks.items() if not _same_entries(saved, getattr(m, name))]
            now = _options(m)
            found += [f"changed attribute '{key}' of {prefix} ({options.get(key)!r} -> {now.get(key)!r})"
                      for key in sorted(set(options) | set(now)) if not _same_option(options.get(key), now.get(key))]
            if vars(m).get("forward") is not forward:  # `module.forward = ...` on the instance
                found.append(f"replaced the forward of {prefix} (module.forward = ...)")
        return found

    def restore(self) -> None:
        for _, m, params, buffers, modules, tensors, hooks, options, forward in self.saved:
            for saved, now in ((params, m._parameters), (buffers, m._buffers), (modules, m._modules),
                               *((saved, getattr(m, name)) for name, saved in hooks.items())):
                if not _same_entries(saved, now):
                    now.clear()
                    now.update(saved)
            for key in [k for k, v in vars(m).items() if isinstance(v, torch.Tensor) and k not in tensors]:
                delattr(m, key)
            for key, value in tensors.items():
                if vars(m).get(key) is not value:
                    object.__setattr__(m, key, value)
            for key in set(_options(m)) - set(options):  # an option the guarded code added
                delattr(m, key)
            for key, value in options.items():
                if not _same_option(vars(m).get(key), value):
                    object.__setattr__(m, key, value)
            if vars(m).get("forward") is not forward:
                if forward is None:
                    del m.__dict__["forward"]
                else:
                    object.__setattr__(m, "forward", forward)


_OPTION_TYPES = (int, float, bool, str, type(None))


def _options(m: torch.nn.Module) -> dict[str, Any]:
    """The public attributes of `m` that hold plain values or tuples of them (`eps`, `stride`,
    `training`): options that change what its forward computes."""
    def plain(v: Any) -> bool:
        return isinstance(v, _OPTION_TYPES) or (isinstance(v, tuple) and all(map(plain, v)))

    return {k: v for k, v in vars(m).items() if not k.startswith("_") and plain(v)}


def _same_option(a: Any, b: Any) -> bool:
    """Whether two option values are the same (1 and 1.0 and True are not; NaN is NaN)."""
    return type(a) is type(b) and (a == b or a != a and b != b)


def _same_entries(saved: dict, now: dict) -> bool:
    """Whether `now` holds the very objects `saved` recorded, under the same keys."""
    return saved.keys() == now.keys() and all(saved[k] is now[k] for k in saved)


def _named_tensors_of(modules: Sequence[torch.nn.Module], buffers: bool = True) -> list[tuple[str, torch.Tensor]]:
    """Every parameter (and buffer) of `modules`, each tensor once (the modules share most)."""
    out, seen = [], set()
    for module in modules:
        for name, t in _named_tensors(module, buffers):
            if id(t) not in seen:
                seen.add(id(t))
                out.append((name, t))
    return out


def _put_back(untouched: _Untouched | None) -> None:
    """After a pass raised: its input gets back any data the pass swapped before it failed."""
    if untouched is not None:
        untouched.put_back()


def _layout(t: torch.Tensor) -> tuple | None:
    """What a tensor object's data is: its storage and the view of it (no copy, no read of the
    values); None for tensors without strides (sparse)."""
    try:
        return _storage_key(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype
    except (RuntimeError, NotImplementedError):
        return None


def _named_tensors(module: torch.nn.Module, buffers: bool = True) -> list[tuple[str, torch.Tensor]]:
    named = list(module.named_parameters(remove_duplicate=False))
    if buffers:
        named += list(module.named_buffers(remove_duplicate=False))
    return [(name, t) for name, t in named if t is not None]


def _content(t: torch.Tensor) -> int | None:
    """A checksum of a float tensor's bytes, None for other tensors. On CPU, where a write
    through ``.numpy()`` lands, the CRC-32 of the bytes: it depends on where each value is (a
    row swap changes it; a sum would not) and is faster than a sum. Elsewhere the sum of the bit
    patterns read as integers: exact whatever order a reduction adds in (thread counts change)."""
    if not t.is_floating_point() or t.is_quantized or t.device.type == "meta" or t.is_inference():
        return None
    with torch.no_grad():
        bits = t.detach() if t.is_contiguous() else t.detach().contiguous()
        bits = bits.view(_SAME_WIDTH_INT[bits.element_size()])
        return zlib.crc32(bits.numpy()) if bits.device.type == "cpu" else int(bits.sum())


_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _graph_signature(gm: torch.fx.GraphModule) -> int:
    """A hash of a graph's nodes (op, target, arguments): equal for an unchanged graph."""
    return hash(tuple((n.op, str(n.target), str(n.args), str(n.kwargs)) for n in gm.graph.nodes))


def _keep_capture_meta(before: torch.fx.GraphModule, after: torch.fx.GraphModule) -> None:
    """A pass that builds a new GraphModule keeps what capture recorded (front end, batch)."""
    if META_KEY in before.meta and META_KEY not in after.meta:
        after.meta[META_KEY] = dict(before.meta[META_KEY])


def _protected(current: torch.nn.Module, reference: torch.nn.Module | None,
               result: torch.nn.Module | None = None) -> list[tuple[str, torch.nn.Module]]:
    """(label, module) of each module guarded code must leave as it is, each once: the pass's
    input, the verification reference, and for an instrument after a pass its result."""
    out: list[tuple[str, torch.nn.Module]] = []
    # the reference first: when it is the input itself (the first pass), its name says more
    for label, m in (("ctx.reference", reference), ("the pass's input module", current),
                     ("the pass's result", result)):
        if m is not None and all(m is not o for _, o in out):
            out.append((label, m))
    return out


def _call_instrument(inst: Instrument, hook: str, protected: Sequence[tuple[str, torch.nn.Module]],
                     reference: torch.fx.GraphModule | None, *args) -> None:
    """An instrument's hook, under the guard a pass runs under: it must not write into, or
    reassign, what the modules it is handed share with the input and the verification
    reference. Its own failure names it (a `PassError` it raises, such as `VerifyEach`'s
    verdict, is about the pass and passes through)."""
    if getattr(type(inst), hook, None) is getattr(Instrument, hook):
        return  # not overridden: nothing to run, nothing to guard
    who = f"instrument {type(inst).__name__}.{hook}"
    untouched = _Untouched(protected, reference, who=who, buffers_by_value=True)
    graphs = [(label, m, _graph_signature(m)) for label, m in protected if isinstance(m, torch.fx.GraphModule)]
    result = next((a for a in args if isinstance(a, PassResult)), None)
    module = result.module if result is not None else None
    try:
        with SharedWriteGuard(*(m for _, m in protected), who=who, buffers=False):
            getattr(inst, hook)(*args)
        untouched.check(reference)
        _check_graphs(graphs, who)
        if result is not None and result.module is not module:
            raise RuntimeError(f"{who} replaced result.module, the module the pipeline goes on with; "
                               f"{_module_advice(who)}")
    except PassError:
        untouched.put_back()
        raise
    except Exception as exc:
        untouched.put_back()
        message = str(exc) if str(exc).startswith(who) else f"{who} raised {type(exc).__name__}: {exc}"
        raise RuntimeError(message) from exc


def _check_graphs(graphs: list[tuple[str, torch.fx.GraphModule, int]], who: str) -> None:
    """Refuse an edit of the graph of a module an instrument was handed (a node retargeted):
    the pipeline would go on with a module no pass made, checked only at the end."""
    for label, gm, signature in graphs:
        if _graph_signature(gm) != signature:
            raise RuntimeError(f"{who} changed the graph of {label}; {_module_advice(who)}")


def own_tensors(result: torch.nn.Module, source: torch.nn.Module) -> int:
    """Give `result` its own copy of each parameter, buffer and tensor attribute it holds over the
    storage of one of `source`'s (that tensor, or another object over its data: ``w.detach()``, a
    slice); returns how many tensors were copied. A tensor held in two places (a tied embedding
    and output layer) gets one copy for both; a parameter stays a parameter, with its
    ``requires_grad``. Opaque objects (int8 packed weights) stay shared: nothing writes into them."""
    theirs = {key for t in _tensors_of(source) if (key := _storage_key(t)) is not None}
    copies: dict[int, torch.Tensor] = {}

    def shared(t: torch.Tensor | None) -> bool:
        return t is not None and _storage_key(t) in theirs

    def own(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in copies:
            copies[id(t)] = _parameter_copy(t) if isinstance(t, torch.nn.Parameter) else t.detach().clone()
        return copies[id(t)]

    for m in result.modules():
        before = len(copies)
        for store in (m._parameters, m._buffers):
            for key, t in list(store.items()):
                if shared(t):
                    store[key] = own(t)
        for key, value in list(vars(m).items()):
            if isinstance(value, torch.Tensor) and shared(value):
                m.__dict__[key] = own(value)
        if len(copies) > before and isinstance(m, torch.nn.RNNBase):  # its flat weights point at the old ones
            m._init_flat_weights()
    return len(copies)


def _parameter_copy(p: torch.nn.Parameter) -> torch.nn.Parameter:
    """A copy of `p` of its own class, with its ``requires_grad`` and the attributes set on it
    (``p._no_weight_decay = True``, which optimizer recipes group parameters by), the tensors
    among them copied (`copied_tags`)."""
    new = copy.deepcopy(p)  # its class and requires_grad; not what is set on it
    new.__dict__.update(copied_tags(p))
    return new


def _tensors_of(module: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter, buffer and tensor attribute of `module` and its submodules."""
    return [t for m in module.modules()
            for t in (*m._parameters.values(), *m._buffers.values(),
                      *(v for v in vars(m).values() if isinstance(v, torch.Tensor)))
            if t is not None]


def _count(gm: torch.fx.GraphModule) -> int:
    return len(gm.graph.nodes)


def _record_failure(record: PassRecord, error: PassError, start: float) -> None:
    record.seconds = time.perf_counter() - start
    record.failed = str(error).splitlines()[0] if str(error) else type(error).__name__


def _plain(value: Any) -> Any:
    """Stats as plain Python values (numpy scalars to int/float), so a report dumps as JSON."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_plain(v) for v in value)
    item = getattr(value, "item", None)
    if type(value).__module__ == "numpy" and callable(item):
        return item()
    return value
