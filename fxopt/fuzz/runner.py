"""Differential fuzzing: random models x random pipelines, every result verified.

One *case* is plain data: `{"spec": <model spec>, "pipeline": "fuse,dce", "mode": "symbolic"}`
(plus `"check": "prune-exact"` for the zeroed-channel prune check). `run_case(case)` captures
the model, runs the pipeline through `fxopt.optimize(..., verify=True)` and returns an
`Outcome`:

- `ok` — verified within the pipeline's loosest tolerance, on the example batch and on a batch
  of another size, and the user's model is untouched;
- `refused` — a pass refused the model with an fxopt error (or a ValueError) that says why;
- `int8-low` — an int8 result below the 20 dB floor but above `INT8_HARD_FLOOR_DB`, or one
  whose observer clips by design (the same case with `observer=minmax` verifies);
- anything else is a failure: `miscompile` (verification failed), `crash` (a pass raised an
  unexpected exception), `capture` (a valid model could not be captured), `mutated` (the
  input model changed), `shape` (output shapes differ).

Failures shrink (`shrink`) by dropping pipeline steps, layers and options while the failure
keeps the same signature, and are saved as JSON files that `tests/fuzz/test_regressions.py`
replays.
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import json
import math
import random
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import fxopt
from fxopt.errors import FxoptError

from .models import build, make_input, random_spec

FAILURES = ("miscompile", "crash", "capture", "mutated", "shape")

#: Option values the generator draws from, per pass. Passes it does not know run with defaults.
PASS_OPTIONS: dict[str, list[dict[str, Any]]] = {
    "dce": [{}],
    "remove-noops": [{}],
    "fold-constants": [{}],
    "fuse": [{}, {"fold_bn": "false"}, {"merge_linears": "false"}, {"attention": "false"}, {"remove_noops": "false"},
             {"activations": "false"}],
    "lower-cpu": [{}, {"min_macs": "0"}, {"by_batch": "false"}, {"conv": "false"}, {"linear": "false"}],
    "insert-observers": [{}, {"observer": "histogram"}],
    "lower-int8": [{}],
    "quantize": [{"backend": "x86"}, {"backend": "reference"}, {"backend": "x86", "observer": "percentile"},
                 {"backend": "x86", "observer": "mse"}, {"backend": "reference", "observer": "moving_average"}],
    "prune": [{"ratio": "0.3"}, {"ratio": "0.5", "scope": "global"}, {"ratio": "0.25", "importance": "l2"},
              {"ratio": "0.3", "importance": "bn_scale"}, {"ratio": "0.3", "importance": "taylor"},
              {"ratio": "0.4", "round_to": "4"}, {"ratio": "0.4", "cost": "latency"}],
}

#: Int8 results whose SQNR misses the 20 dB floor but stay above this are counted as
#: `int8-low` (random weights quantize worse than trained ones), not as miscompiles.
INT8_HARD_FLOOR_DB = 10.0


def format_step(name: str, options: dict) -> str:
    if not options:
        return name
    return name + "{" + ",".join(f"{k}={v}" for k, v in options.items()) + "}"


def random_pipeline(rng: random.Random, passes: list[str] | None = None, max_len: int = 4) -> str:
    passes = passes or fxopt.available_passes()
    steps = []
    for _ in range(rng.randint(1, max_len)):
        name = rng.choice(passes)
        options = rng.choice(PASS_OPTIONS.get(name, [{}]))
        steps.append(format_step(name, options))
    return ",".join(steps)


def random_case(rng: random.Random, passes: list[str] | None = None) -> dict:
    return {"spec": random_spec(rng), "pipeline": random_pipeline(rng, passes),
            "mode": rng.choice(["symbolic", "export"])}


@dataclass
class Outcome:
    kind: str                      # ok | refused | int8-low | one of FAILURES
    detail: str = ""
    signature: str = ""            # what must stay the same while shrinking
    passes_run: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.kind in FAILURES


def _state_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict(keep_vars=True).items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(str(model.training).encode())
    return h.hexdigest()


def _uses_calibration(pipeline: str) -> bool:
    return any(w in pipeline for w in ("quantize", "insert-observers", "taylor"))


def _cause_chain(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _signature(kind: str, exc: BaseException | None = None, extra: str = "") -> str:
    if exc is None:
        return f"{kind}:{extra}"
    root = _cause_chain(exc)
    pass_name = getattr(exc, "pass_name", "")
    return f"{kind}:{pass_name.split('{')[0]}:{type(root).__name__}"


def run_case(case: dict) -> Outcome:
    """Run one case; see the module docstring for the outcomes."""
    start = time.perf_counter()
    try:
        out = _run_case(case)
    except Exception as exc:  # the fuzzer's own bug (e.g. an invalid generated model)
        out = Outcome("harness", f"{type(exc).__name__}: {exc}", "harness:" + type(exc).__name__)
    out.seconds = time.perf_counter() - start
    return out


#: Observers that clip outliers by design; minmax covers everything calibration saw.
CLIPPING_OBSERVERS = ("moving_average", "percentile", "mse", "histogram")


def _clipping_observer(case: dict, report) -> str | None:
    """Why a low int8 result is the observer's choice, not a miscompile: the same case with
    every clipping observer replaced by minmax verifies. None if not (or not int8, also where
    an int8 stage after a lossy pass is what failed)."""
    if report is not None and report.stage is not None:
        report = report.stage
    if report is None or report.tolerance.name != "int8":
        return None
    pipeline = case["pipeline"]
    for kind in CLIPPING_OBSERVERS:
        pipeline = pipeline.replace(f"observer={kind}", "observer=minmax")
    if pipeline == case["pipeline"]:
        return None
    again = _run_case({**case, "pipeline": pipeline})
    if again.kind != "ok":
        return None
    return f"the observer clips: with observer=minmax the same case verifies ({again.detail.splitlines()[0]})"


def _run_case(case: dict) -> Outcome:
    spec, pipeline, mode = case["spec"], case["pipeline"], case.get("mode", "symbolic")
    model, inputs = build(spec)
    before = _state_fingerprint(model)
    if case.get("check") == "prune-exact":
        return _prune_exact(model, inputs, spec, mode, case.get("ratio", 0.3))
    calibration = None
    if _uses_calibration(pipeline):
        # the inputs verification uses are calibrated on too: a range clipped because the
        # calibration never saw such values is a data problem, not a miscompile
        calibration = [inputs, (make_input(spec, spec["batch"] + 2, seed=7),)]
        calibration += [(make_input(spec, 4, seed=100 + i),) for i in range(4)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = fxopt.optimize(model, inputs, pipeline, calibration=calibration, mode=mode, verify=True)
    except fxopt.CaptureError as exc:
        return Outcome("capture", str(exc)[:2000], _signature("capture", extra=mode))
    except Exception as exc:
        if _state_fingerprint(model) != before:
            return Outcome("mutated", f"input model changed after {type(exc).__name__}", "mutated:")
        root = _cause_chain(exc)
        if isinstance(root, (FxoptError, ValueError)) and not isinstance(root, (IndexError, KeyError)):
            return Outcome("refused", f"{type(root).__name__}: {root}"[:500], _signature("refused", exc))
        tb = "".join(traceback.format_exception(root))[-3000:]
        return Outcome("crash", f"{exc}\n{tb}", _signature("crash", exc))
    ran = sum(1 for r in res.passes if not r.skipped)
    if _state_fingerprint(model) != before:
        return Outcome("mutated", "the input model's state changed", "mutated:", ran)
    report = res.verification
    if report is None or not report.passed:
        detail = report.summary() if report is not None else "no verification"
        judged = report.stage or report if report is not None else None  # the int8 stage after a lossy pass
        if judged is not None and _only_int8_precision(judged):
            return Outcome("int8-low", detail, "int8-low:", ran)
        clipped = _clipping_observer(case, report)
        if clipped is not None:
            return Outcome("int8-low", f"{detail}\n{clipped}", "int8-low:", ran)
        if report is not None and report.divergence is not None:
            detail += f"\n{report.divergence}"
        return Outcome("miscompile", detail, f"miscompile:{report.tolerance.name if report else ''}", ran)
    # the batch dimension stays dynamic: check on another batch size too
    other = make_input(spec, spec["batch"] + 2, seed=7)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report2 = fxopt.verify(model, res.module, (other,), tolerance=report.tolerance)
    except Exception as exc:
        root = _cause_chain(exc)
        return Outcome("crash", f"optimized module fails on batch {spec['batch'] + 2}: "
                       f"{type(root).__name__}: {root}"[:2000], "crash:batch:" + type(root).__name__, ran)
    if not report2.passed:
        if _only_int8_precision(report2):
            return Outcome("int8-low", report2.summary(), "int8-low:", ran)
        clipped = _clipping_observer(case, report2)
        if clipped is not None:
            return Outcome("int8-low", f"on batch {spec['batch'] + 2}: {report2.summary()}\n{clipped}", "int8-low:", ran)
        return Outcome("miscompile", f"on batch {spec['batch'] + 2}: {report2.summary()}",
                       "miscompile:batch", ran)
    return Outcome("ok", report.summary(), "ok:", ran)


def _only_int8_precision(report) -> bool:
    """Whether an int8 FAIL is precision only: the float outputs above the hard floor and every
    integer output (an argmax, topk indices) passing. The headline SQNR reads float outputs
    only, so a wrong index output alone was filed as "int8-low", not a miscompile."""
    return (report.tolerance.name == "int8" and report.sqnr_db >= INT8_HARD_FLOOR_DB
            and not math.isnan(report.max_abs_error)
            and all(o.mismatches is None or o.passes(report.tolerance) for o in report.outputs))


def _prune_exact(model, inputs, spec, mode, ratio) -> Outcome:
    """Prune with the removed channels zeroed first: the pruned model must equal the masked one."""
    prune_module = importlib.import_module(fxopt.get_pass("prune").__module__)
    apply_module = importlib.import_module(prune_module.__name__.rsplit(".", 1)[0] + ".apply")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = prune_module.analyze(model, inputs, mode=mode, ratio=ratio)
            if plan.selection.removed == 0:
                return Outcome("refused", "nothing selected", "refused:prune:none")
            apply_module.zero_removed(plan.gm, plan.channel_graph, plan.dead)
            with torch.no_grad():
                masked = plan.gm(*inputs)
                pruned = plan.apply()
                out = pruned(*inputs)
                other = make_input(spec, spec["batch"] + 2, seed=7)
                out2 = pruned(other)
    except Exception as exc:
        root = _cause_chain(exc)
        if isinstance(root, (FxoptError, ValueError)) and not isinstance(root, (IndexError, KeyError)):
            return Outcome("refused", f"{type(root).__name__}: {root}"[:500], "refused:prune:" + type(root).__name__)
        tb = "".join(traceback.format_exception(root))[-3000:]
        return Outcome("crash", f"{type(root).__name__}: {root}\n{tb}", "crash:prune-exact:" + type(root).__name__)
    if out.shape != masked.shape or out2.shape[0] != spec["batch"] + 2:
        return Outcome("shape", f"{tuple(out.shape)} vs {tuple(masked.shape)}", "shape:prune-exact")
    err = float((out.double() - masked.double()).abs().max()) if out.numel() else 0.0
    scale = float(masked.double().abs().max()) if masked.numel() else 0.0
    if not (err <= 1e-5 + 1e-4 * scale):
        return Outcome("miscompile", f"pruned differs from masked: max_abs={err:.3g} scale={scale:.3g}",
                       "miscompile:prune-exact", 1)
    return Outcome("ok", f"removed {plan.selection.removed}, max_abs={err:.3g}", "ok:", 1)


# ----- shrinking ----------------------------------------------------------------------------

def shrink(case: dict, outcome: Outcome, budget_s: float = 60.0,
           runner: Callable[[dict], Outcome] = run_case) -> dict:
    """A smaller case failing with the same signature: drop pipeline steps, layers, head, options."""
    deadline = time.monotonic() + budget_s
    best = copy.deepcopy(case)

    def still_fails(candidate: dict) -> bool:
        if time.monotonic() > deadline:
            return False
        try:
            got = runner(candidate)
        except Exception:  # the generator's own error is not the failure we shrink
            return False
        return got.signature == outcome.signature

    changed = True
    while changed and time.monotonic() < deadline:
        changed = False
        steps = _split_pipeline(best["pipeline"])
        for i in range(len(steps)):
            if len(steps) > 1:
                cand = copy.deepcopy(best)
                cand["pipeline"] = ",".join(steps[:i] + steps[i + 1:])
                if still_fails(cand):
                    best, changed = cand, True
                    break
        if changed:
            continue
        layers = best["spec"]["layers"]
        for i in range(len(layers)):
            cand = copy.deepcopy(best)
            del cand["spec"]["layers"][i]
            if still_fails(cand):
                best, changed = cand, True
                break
        if changed:
            continue
        for key, simpler in (("head", "none"), ("batch", 2), ("batch", 1)):
            current = best["spec"].get(key)
            if current != simpler and (key != "batch" or current > simpler):
                cand = copy.deepcopy(best)
                cand["spec"][key] = simpler
                if still_fails(cand):
                    best, changed = cand, True
                    break
        if changed:
            continue
        for i, layer in enumerate(best["spec"]["layers"]):
            for key in [k for k in layer if k != "op"]:
                for simpler in _simpler_values(layer[key]):
                    cand = copy.deepcopy(best)
                    cand["spec"]["layers"][i][key] = simpler
                    if still_fails(cand):
                        best, changed = cand, True
                        break
                if changed:
                    break
            if changed:
                break
    return best


def _simpler_values(value):
    if isinstance(value, bool):
        return [False] if value else []
    if value is None:
        return []
    if isinstance(value, int) and value > 1:
        return [1]
    return [None] if isinstance(value, str) and value in ACT_NAMES else []


ACT_NAMES = {"relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "leaky_relu", "hardtanh"}


def _split_pipeline(text: str) -> list[str]:
    steps, depth, cur = [], 0, ""
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            steps.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        steps.append(cur)
    return steps


def save_regression(case: dict, outcome: Outcome, directory: Path, seed: int, index: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(json.dumps(case, sort_keys=True).encode()).hexdigest()[:8]
    path = directory / f"case_{seed}_{index}_{digest}.json"
    path.write_text(json.dumps({"case": case, "found": {"kind": outcome.kind, "signature": outcome.signature,
                                                         "detail": outcome.detail[:1500]},
                                "status": "open"}, indent=1, sort_keys=True) + "\n")
    return path


# ----- campaign -----------------------------------------------------------------------------

@dataclass
class CampaignStats:
    seed: int
    graphs: int = 0
    pipelines: int = 0
    passes_run: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[dict, Outcome]] = field(default_factory=list)
    reproducers: list[str] = field(default_factory=list)
    signatures: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"seed {self.seed}: {self.graphs} graphs, {self.pipelines} pipelines, "
                 f"{self.passes_run} passes run in {self.seconds:.0f}s",
                 "outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items()))]
        failed = {s: n for s, n in self.signatures.items() if s.split(":")[0] in FAILURES}
        lines.append(f"failures: {sum(failed.values())} ({len(failed)} distinct signatures)")
        lines += [f"  {n:4d}  {s}" for s, n in sorted(failed.items(), key=lambda kv: -kv[1])]
        lines += [f"reproducer: {p}" for p in self.reproducers]
        return "\n".join(lines)


def campaign(seconds: float, seed: int = 0, *, pipelines_per_graph: int = 3, save_dir: Path | None = None,
             shrink_budget_s: float = 30.0, every_pass: bool = True, log: Callable[[str], None] | None = None,
             max_graphs: int | None = None) -> CampaignStats:
    """Fuzz for `seconds`: each random graph gets every registered pass alone (`every_pass`),
    `pipelines_per_graph` random pipelines, both capture modes, and a zeroed-channel prune check.
    The first failure of each distinct signature is shrunk and saved under `save_dir`."""
    rng = random.Random(seed)
    stats = CampaignStats(seed)
    passes = fxopt.available_passes()
    start = time.monotonic()
    deadline = start + seconds
    seen: set[str] = set()
    while time.monotonic() < deadline and (max_graphs is None or stats.graphs < max_graphs):
        spec = random_spec(rng)
        stats.graphs += 1
        cases = []
        for p in (passes if every_pass else []):
            cases.append({"spec": spec, "pipeline": format_step(p, rng.choice(PASS_OPTIONS.get(p, [{}]))),
                          "mode": rng.choice(["symbolic", "export"])})
        for _ in range(pipelines_per_graph):
            cases.append({"spec": spec, "pipeline": random_pipeline(rng, passes), "mode": rng.choice(["symbolic", "export"])})
        # pipelines the README recommends, plus the exact prune check
        cases.append({"spec": spec, "pipeline": rng.choice(["fuse", "quantize{backend=x86}", "prune{ratio=0.3}",
                                                            "remove-noops,fold-constants,dce",
                                                            "fuse,prune{ratio=0.5},quantize{backend=x86}"]),
                      "mode": rng.choice(["symbolic", "export"])})
        if "prune" in passes:
            cases.append({"spec": spec, "pipeline": "prune", "mode": rng.choice(["symbolic", "export"]),
                          "check": "prune-exact"})
        for case in cases:
            if time.monotonic() > deadline:
                break
            outcome = run_case(case)
            stats.pipelines += 1
            stats.passes_run += outcome.passes_run
            stats.outcomes[outcome.kind] = stats.outcomes.get(outcome.kind, 0) + 1
            stats.signatures[outcome.signature] = stats.signatures.get(outcome.signature, 0) + 1
            if outcome.failed:
                stats.failures.append((case, outcome))
                if log:
                    log(f"[{stats.graphs}] {outcome.kind} {outcome.signature} :: {case['pipeline']} "
                        f"({case['mode']})\n    {outcome.detail.splitlines()[0][:300] if outcome.detail else ''}")
                if save_dir is not None and outcome.signature not in seen:
                    seen.add(outcome.signature)
                    small = shrink(case, outcome, budget_s=shrink_budget_s)
                    path = save_regression(small, outcome, save_dir, seed, len(stats.reproducers))
                    stats.reproducers.append(str(path))
                    if log:
                        log(f"    reproducer: {path} ({len(small['spec']['layers'])} layers, "
                            f"pipeline {small['pipeline']})")
    stats.seconds = time.monotonic() - start
    return stats
