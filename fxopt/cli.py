"""The `fxopt` command line.

    fxopt optimize [MODEL] --pipeline P     optimize, verify, print a before/after table
                  [--save FILE]           ... and store the result (`fxopt.load(FILE)` reads it)
    fxopt dump [MODEL] --pipeline P --out D write listings, DOT/SVG, diffs and an index page
    fxopt passes                            list the registered passes and their options

MODEL is `package.module:callable`, imported from the current directory or sys.path; the
callable returns `(model, example_inputs)` or `(model, example_inputs, calibration_batches)`
(the CLI's only source of calibration data, which `quantize` and `distill` need). Without
MODEL, the bundled example runs: a small CNN trained on scikit-learn's handwritten digits
(trained once, then cached).

Exit codes: 0 success; 1 the result failed verification; 2 a pass, the pipeline text or the
MODEL failed (MODEL cannot be imported, its callable raises or returns something else).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

from torch import nn
from tqdm import tqdm

from .calibration import check_batches
from .errors import FxoptError, PipelineError, first_line

DEFAULT_PIPELINE = "fuse,quantize{backend=x86}"


class ModelLoadError(FxoptError):
    """MODEL could not be turned into a workload; `main` reports it in one line, exit code 2."""


@dataclass
class Workload:
    """What the CLI runs on: a model, its example inputs, and optional data."""

    name: str
    model: nn.Module
    example_inputs: Any
    calibration: list | None = None
    accuracy: Callable[[Callable], float] | None = None


def _shape_of(value: Any) -> str:
    """What a MODEL factory returned, in a few words: 'a tuple of 4 items', 'a dict'."""
    if isinstance(value, tuple):
        return f"a tuple of {len(value)} item{'s' if len(value) != 1 else ''}"
    return f"a {type(value).__name__}"


def load_workload(spec: str | None) -> Workload:
    """The bundled digits example for None, else the model returned by `package.module:callable`."""
    if spec is None:
        from .examples import digits

        model, inputs = digits.load_example(progress=True)
        return Workload("bundled digits CNN", model, inputs, digits.calibration_batches(),
                        digits.evaluate_accuracy)
    module_name, sep, attr = spec.partition(":")
    if not sep or not attr:
        raise ModelLoadError(f"MODEL must look like package.module:callable, got '{spec}'")
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        name = os.path.splitext(os.path.basename(module_name))[0]
        raise ModelLoadError(f"MODEL '{spec}' names a file; MODEL names a module, as Python imports it: "
                             f"'{name}:{attr}' (run fxopt in the folder that holds {os.path.basename(module_name)}, "
                             "or put that folder on PYTHONPATH)")
    factory = _factory(spec, module_name, attr)
    made = _call_factory(spec, factory)
    if isinstance(made, nn.Module):
        inputs = getattr(made, "example_inputs", None)
        if inputs is None:
            raise ModelLoadError(f"MODEL '{spec}' returned a model without example inputs; "
                                 "return (model, example_inputs) instead")
        made = (made, inputs)
    if not isinstance(made, tuple) or len(made) not in (2, 3):
        raise ModelLoadError(f"MODEL '{spec}' must return (model, example_inputs[, calibration]), got "
                             f"{_shape_of(made)}")
    if not isinstance(made[0], nn.Module):
        raise ModelLoadError(f"MODEL '{spec}' returned a {type(made[0]).__name__} as its model, which is no "
                             "torch.nn.Module: fxopt captures modules (wrap a function in an nn.Module's forward)")
    calibration = _calibration(spec, made[2]) if len(made) == 3 else None
    return Workload(spec, made[0], made[1], calibration)


def _calibration(spec: str, batches: Any) -> list | None:
    """MODEL's third item as a list of batches, None for none. One tensor is refused as
    `fxopt.optimize` refuses it (its rows would each be taken for a batch), and so is what is no
    sequence: both in one line naming MODEL, not a traceback."""
    if batches is None:
        return None
    try:
        check_batches(batches, f"MODEL '{spec}' returned calibration")
        return list(batches)
    except FxoptError as exc:
        raise ModelLoadError(str(exc)) from None
    except TypeError:
        raise ModelLoadError(f"MODEL '{spec}' returned calibration: got a {type(batches).__name__}, not a sequence "
                             "of batches (e.g. [(x,)] for one batch; None for none)") from None


def _factory(spec: str, module_name: str, attr: str) -> Callable:
    """The callable MODEL names. Whatever importing its module raises (no such module, a syntax
    error, an exception at import time) is a MODEL that cannot be loaded, not a crash of fxopt."""
    try:
        factory = getattr(_import_from_cwd(module_name), attr)
    except Exception as exc:  # the user's module runs here: any error of it is MODEL's
        raise ModelLoadError(f"cannot load MODEL '{spec}': {_error_text(exc)}") from None
    if not callable(factory):
        raise ModelLoadError(f"MODEL '{spec}' names a {type(factory).__name__}, not a callable that returns "
                             "(model, example_inputs[, calibration])")
    return factory


def _call_factory(spec: str, factory: Callable) -> Any:
    """What MODEL's callable returns; an exception in it is reported in one line, without
    fxopt's traceback, so a script can tell it from a failed verification by the exit code."""
    try:
        return factory()
    except Exception as exc:  # the user's code: every error of it is MODEL's
        raise ModelLoadError(f"cannot load MODEL '{spec}': calling it raised {_error_text(exc)}") from None


def _error_text(exc: Exception) -> str:
    """`Type: first line`, the type left out where the text already says it (ImportError's)."""
    if isinstance(exc, (ImportError, AttributeError)):
        return first_line(exc)
    return f"{type(exc).__name__}: {first_line(exc)}"


def _import_from_cwd(module_name: str) -> ModuleType:
    """Import `module_name` with the current directory first on sys.path, as `python -m` does:
    `fxopt optimize mymodel:make` finds ./mymodel.py (an installed console script's sys.path
    starts with the script's directory, not the current one)."""
    cwd = os.getcwd()
    sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    finally:
        if cwd in sys.path:  # the first occurrence is ours, unless the import itself moved it
            sys.path.remove(cwd)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxopt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", nargs="?", help="package.module:callable; default: the bundled example")
        p.add_argument("--pipeline", "-p", default=DEFAULT_PIPELINE, help=f"pass pipeline (default: {DEFAULT_PIPELINE})")
        p.add_argument("--mode", choices=("auto", "symbolic", "export"), default="auto", help="capture front end")

    opt = sub.add_parser("optimize", help="optimize a model and print a before/after table",
                         epilog="exit codes: 0 success, 1 the result failed verification (with --verify-each: "
                                "a pass's result did), 2 a pass, the pipeline text or MODEL failed (cannot be "
                                "imported, its callable raised)")
    common(opt)
    opt.add_argument("--no-verify", action="store_true", help="skip the final numerical check")
    opt.add_argument("--verify-each", action="store_true", help="lint and check numerics after every pass")
    opt.add_argument("--print-ir-after-each", "--print-ir-after-all", dest="print_ir_after_each", action="store_true",
                     help="print the graph after every pass (Python: print_ir_after_each=True)")
    opt.add_argument("--print-ir-after-change", action="store_true", help="print a diff when a pass changed the graph")
    opt.add_argument("--time-passes", action="store_true", help="print per-pass timing")
    opt.add_argument("--bisect-limit", type=_count(0), default=None, metavar="N", help="run only the first N passes")
    opt.add_argument("--threads", type=_count(1), default=1, help="threads for latency measurement (default 1)")
    opt.add_argument("--dump", metavar="DIR", help="also dump every step to DIR")
    opt.add_argument("--save", metavar="FILE", help="store the optimized module in FILE (read it with fxopt.load)")

    dump = sub.add_parser("dump", help="dump the graph before and after every pass")
    common(dump)
    dump.add_argument("--out", "-o", required=True, help="output directory")

    sub.add_parser("passes", help="list registered passes and their options")
    for command, command_parser in sub.choices.items():
        # the checks after parsing report on the command's parser: its usage line names the flag
        # at fault, where the top-level one reads 'fxopt [-h] {optimize,dump,passes} ...'
        command_parser.set_defaults(command_parser=command_parser)
    return parser


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum` (argparse reports the flag on failure)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def _writable_dir(parser: argparse.ArgumentParser, flag: str, path: str | None) -> None:
    """Fail before any work when `path` cannot become an output directory."""
    if path is None:
        return
    target = Path(path)
    if target.exists() and not target.is_dir():
        parser.error(f"{flag} {path}: exists and is not a directory")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"{flag} {path}: cannot create the directory ({exc.strerror})")


def _writable_file(parser: argparse.ArgumentParser, flag: str, path: str | None) -> None:
    """Fail before any work when `path` cannot be written as a file."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        parser.error(f"{flag} {path}: is a directory")
    if not target.parent.is_dir():
        parser.error(f"{flag} {path}: the directory {target.parent} does not exist")
    existed = target.exists()
    try:  # open it as the save will, without changing a file already there
        with open(target, "ab"):
            pass
    except OSError as exc:
        parser.error(f"{flag} {path}: cannot write the file ({exc.strerror})")
    if not existed:
        target.unlink()  # the probe's empty file: no file is left behind by a run that fails later


def _threads_in_reach(parser: argparse.ArgumentParser, threads: int | None) -> None:
    """Fail before any work when --threads asks for more threads than this process has CPUs
    (the latency would time their contention; far more killed the process after the run)."""
    from .measure import available_cpus

    if threads is not None and threads > available_cpus():
        parser.error(f"--threads {threads}: this process may use {available_cpus()} CPUs; give at most "
                     f"{available_cpus()}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    usage = args.command_parser
    _writable_dir(usage, "--dump", getattr(args, "dump", None))
    _writable_dir(usage, "--out", getattr(args, "out", None))
    _writable_file(usage, "--save", getattr(args, "save", None))
    _threads_in_reach(usage, getattr(args, "threads", None))
    try:
        if args.command == "passes":
            return _cmd_passes()
        passes = _parse_with_model_passes(args.pipeline, getattr(args, "model", None))
        if getattr(args, "save", None):
            _check_savable_pipeline([p.name for p in passes][: args.bisect_limit])
        if args.command == "dump":
            return _cmd_dump(args)
        return _cmd_optimize(args)
    except FxoptError as exc:
        print(f"fxopt: error: {exc}", file=sys.stderr)
        return 2


def _parse_with_model_passes(pipeline: str, spec: str | None) -> list:
    """The pipeline's passes, parsed before MODEL is called (a typo fails in a second). A pass
    MODEL's own module registers (`fxopt.register_pass` at import) is unknown until that module
    is imported: on an unknown pass it is imported, and the text parsed again."""
    from .pipeline import parse_pipeline

    try:
        return parse_pipeline(pipeline)
    except PipelineError as exc:
        if spec is None or "unknown pass" not in str(exc) or ":" not in spec:
            raise
        module_name = spec.partition(":")[0]
        try:
            _import_from_cwd(module_name)
        except Exception:  # noqa: BLE001  (MODEL's own import error is reported when it is loaded)
            raise exc from None
        try:
            return parse_pipeline(pipeline)
        except PipelineError as again:
            raise PipelineError(f"{again} (the command line knows the installed passes and those MODEL's module "
                                f"'{module_name}' registers when imported)") from None


def _check_savable_pipeline(names: list[str]) -> None:
    """Refuse, before the minutes a pipeline runs, a --save whose result fxopt.save refuses: what
    `lower-cpu` packs is per machine, and `insert-observers`' observers (until `lower-int8`) are
    calibration state, not a model."""
    if "lower-cpu" in names:
        keep = ",".join(n for n in names if n != "lower-cpu") or "dce"
        raise PipelineError(f"--save cannot store what lower-cpu packs (oneDNN kernels packed for this machine's "
                            f"threads and shapes): save the pipeline without it (-p '{keep}' --save FILE) and "
                            "run lower-cpu on fxopt.load's module (fxopt.optimize(loaded, inputs, 'lower-cpu'))")
    last = max((i for i, n in enumerate(names) if n == "insert-observers"), default=-1)
    if last >= 0 and "lower-int8" not in names[last:]:
        raise PipelineError("--save cannot store insert-observers' observers (calibration statistics, not a model): "
                            "end the pipeline with lower-int8, or use quantize, which does both")


def _cmd_passes() -> int:
    from .registry import available_passes, get_pass

    for name in available_passes():
        try:
            cls = get_pass(name)
        except Exception as exc:  # a broken third-party entry point must not hide the others
            print(f"{name}: cannot load ({exc})")
            continue
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        options = ", ".join(_option_help(cls))
        print(f"{name}{'{' + options + '}' if options else ''}\n    {doc}")
    return 0


def _option_help(cls: type) -> list[str]:
    """`name: type = default` for each option of a pass, the default as pipeline text writes it."""
    import dataclasses

    from .pipeline import _format_value

    def text(value: Any) -> str:
        return "none" if value is None else '""' if value == "" else _format_value(value)

    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = text(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = text(f.default_factory())
    return [f"{name}: {label}" + (f" = {defaults[name]}" if name in defaults else "")
            for name, label in cls.option_specs().items()]


def _cmd_dump(args: argparse.Namespace) -> int:
    from .debug import dump_pipeline
    from .errors import PassError

    work = load_workload(args.model)
    try:
        index = dump_pipeline(work.model, work.example_inputs, args.pipeline, args.out, mode=args.mode,
                              calibration=work.calibration)
    except PassError as exc:
        code = _pass_failed(exc, work)
        index = getattr(exc, "dump_index", None)  # the steps before the failure: where to look next
        if index is not None:
            print(f"wrote {index} (the steps before the failure, and the error)", file=sys.stderr)
        return code
    print(f"wrote {index}")
    return 0


def _pass_failed(exc: Exception, work: Workload | None) -> int:
    """Report a failed pass as `main` reports any fxopt error, plus what to do about it on
    the command line; returns the exit code."""
    print(f"fxopt: error: {exc}", file=sys.stderr)
    hint = _calibration_hint(exc, work)
    if hint:
        print(f"fxopt: hint: {hint}", file=sys.stderr)
    records = getattr(exc, "records", None) or []
    check = records[-1].verification if records else None
    # --verify-each stopped at a pass whose result failed verification: that is exit code 1, as
    # a failed final check is, not 2 (a pass that raised)
    return 1 if check is not None and not check.passed else 2


def _is_terminal(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def _calibration_hint(exc: Exception, work: Workload | None) -> str:
    """CLI advice for a pass that needed calibration data MODEL did not give ("" otherwise).

    The pass's own message speaks of `fxopt.optimize(calibration=...)`; on the command line the
    batches come from MODEL's third return value only (`load_workload`).
    """
    if work is None or work.calibration or "calibration" not in str(exc):
        return ""
    failed = getattr(exc, "pass_name", "the failing pass")
    return (f"the command line reads calibration batches from MODEL: make '{work.name}' return "
            "(model, example_inputs, calibration_batches), calibration_batches a list of inputs shaped "
            f"like example_inputs; or choose a pipeline without '{failed}' with -p")


def _cmd_optimize(args: argparse.Namespace) -> int:
    from . import api
    from .errors import PassError, VerificationWarning
    from .manager import Instrument

    work: Workload | None = None
    instruments: list[Instrument] = []
    try:
        # closed on the way out, whatever happens: an error message must not land on the bar's line
        # (no bar when stderr is no terminal: a log file kept its fragments before the error line)
        with tqdm(total=4, desc="fxopt", unit="step", file=sys.stderr, leave=False,
                  disable=not _is_terminal(sys.stderr)) as steps:
            steps.set_postfix_str("loading model")
            work = load_workload(args.model)
            steps.update()
            if args.dump:
                from .debug import DumpInstrument

                instruments.append(DumpInstrument(args.dump))
            steps.set_postfix_str("optimizing")
            with warnings.catch_warnings():  # the table below reports verification, and the exit code
                warnings.simplefilter("ignore", VerificationWarning)
                res = api.optimize(
                    work.model, work.example_inputs, args.pipeline, calibration=work.calibration,
                    verify=not args.no_verify, mode=args.mode, verify_each=args.verify_each,
                    print_ir_after_each=args.print_ir_after_each, print_ir_after_change=args.print_ir_after_change,
                    time_passes=args.time_passes, bisect_limit=args.bisect_limit, instruments=instruments,
                )
            steps.update()
            if args.save:  # before the minutes of measuring: a module save refuses fails now
                from .serialize import save

                save(res.module, args.save)
            steps.set_postfix_str("measuring")
            latency = _latencies(work, res, args.threads)
            before = _measure(work, res.original, latency["before"])
            after, unmeasured = _measure_result(work, res, latency["after"])
            steps.update(2)
    except PassError as exc:  # reported once the bar is gone
        code = _pass_failed(exc, work)
        if args.dump:
            from .debug import DumpInstrument

            dumped = next(i for i in instruments if isinstance(i, DumpInstrument))  # its index has the error
            print(f"wrote {dumped.index_path} (the steps before the failure, and the error)", file=sys.stderr)
        return code
    print(f"model: {work.name} (captured by {res.frontend})")
    print(f"pipeline: {res.pipeline}")
    for record in res.passes:
        print(f"  {record}")
    print(format_table(before, after, res))
    if unmeasured:
        print(f"the optimized module raised while it was measured: {unmeasured}")
    if args.save:
        print(f"saved {args.save} (fxopt.load reads it)")
    return 0 if res.verification is None or res.verification.passed else 1


#: Rounds in which the table times the original and the optimized module in turn.
LATENCY_ROUNDS = 3


def _latencies(work: Workload, res: Any, threads: int) -> dict[str, float | str]:
    """The median ms of the captured original ("before") and of the optimized module ("after"),
    each the best of `LATENCY_ROUNDS` rounds that time the two in turn (`measure.compare_latency`),
    or the error text of one that raised. Timed one after the other, a shared machine's drift
    showed an unchanged graph (`-p dce`) 0.3x to 3x as fast as itself."""
    from . import measure
    from .capture import normalize_inputs

    args, kwargs = normalize_inputs(work.example_inputs)
    timed = measure.compare_latency({"before": res.original, "after": res.module}, {"example": kwargs or args},
                                    rounds=LATENCY_ROUNDS, threads=threads)
    return {name: by_input["example"] for name, by_input in timed.items()}


def _measure_result(work: Workload, res: Any, latency: float | str) -> tuple[dict[str, str], str | None]:
    """The optimized module's row, and why it is empty: a result that failed verification may
    fail to run at all (the verdict, not a traceback, is the answer then)."""
    if isinstance(latency, str) and (res.verification is None or not res.verification.passed):
        return {}, latency
    return _measure(work, res.module, latency), None


def _measure(work: Workload, module: nn.Module, latency: float | str) -> dict[str, str]:
    """The table's row for `module`, its `latency` (median ms) measured already (`_latencies`)."""
    from . import measure

    if isinstance(latency, str):  # a module that passed verification and raised when timed
        raise RuntimeError(f"{type(module).__name__} raised while it was measured: {latency}")
    row = {
        "latency (median ms)": f"{latency:.3f}",
        "parameters": f"{measure.count_parameters(module):,}",
        "size (KiB)": f"{measure.model_size_bytes(module) / 1024:.1f}",
        "nodes": str(measure.count_nodes(module)),
    }
    if work.accuracy is not None:
        row = {"accuracy (%)": f"{work.accuracy(module):.2f}", **row}
    return row


def format_table(before: dict[str, str], after: dict[str, str], res: Any) -> str:
    """A plain before/after table; ratios where both sides are numbers."""
    rows = [("", "before", "after", "ratio")]
    for key in before:
        rows.append((key, before[key], after.get(key, "-"), _ratio(before[key], after.get(key, "-"))))
    for device, report in res.verification_by_device.items():
        if report.verdict == "NOT CHECKED":  # lossy: the numbers are all there is to go by
            rows.append((f"verification ({device})", "", f"{report.tolerance.name} (not checked)",
                         f"SQNR {report.sqnr_db:.1f} dB, cos {report.cosine:.2f}{_integer_outputs_note(report)}"))
        else:
            rows.append((f"verification ({device})", "", f"{report.verdict} {report.tolerance.name}",
                         f"SQNR {report.sqnr_db:.1f} dB{_integer_outputs_note(report)}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _integer_outputs_note(report: Any) -> str:
    """The integer outputs that differ, by count ("; integer output [3]: 14/16 differ"): the SQNR beside
    them is the float outputs', and a FAIL an index output made read as a FAIL at a good SQNR."""
    return "".join(f"; integer output{' ' + o.path if o.path else ''}: {o.mismatches}/{o.numel} differ"
                   for o in report.outputs if o.mismatches)


def _ratio(a: str, b: str) -> str:
    try:
        x, y = float(a.replace(",", "")), float(b.replace(",", ""))
    except ValueError:
        return ""
    return f"{y / x:.2f}x" if x else ""


if __name__ == "__main__":
    raise SystemExit(main())
