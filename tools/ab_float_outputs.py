"""A/B of int8 layers that write float where only float ops read them (x86 backend).

A: every conv output on an int8 grid (what `lower-int8` did before: only linears wrote float,
and the cut priced their float reads as dequantizes); B: the current lowering. Prints SQNR
against the float model on held-out batches and latency (`fxopt.measure.compare_latency`, one
thread, interleaved rounds), per model and batch size.

    python tools/ab_float_outputs.py --models unet mobilenet_v2 --rounds 5
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path
from unittest import mock

import torch

import fxopt
from fxopt.measure import compare_latency
from fxopt.passes.quantize import lower, plan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize import _fresh_copy, calibration_for, get_model  # noqa: E402


@contextlib.contextmanager
def int8_outputs():
    """The lowering before float-output convs: convs keep their grid, the cut prices float reads."""
    original = plan.writes_float

    def linears_only(the_plan, region, value):
        group = the_plan.groups.get(value.name)
        return group is not None and group.kind == "linear" and original(the_plan, region, value)

    with mock.patch.object(plan, "writes_float", linears_only), mock.patch.object(lower, "writes_float", linears_only), \
            mock.patch.object(plan, "_writes_float_when_read_in_float", lambda *args: False):
        yield


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


def quality_db(model, modules: dict, batches: list) -> dict[str, float]:
    """SQNR (dB) of each module against `model` over the held-out `batches` together."""
    with torch.no_grad():
        ref = torch.cat([model(*b) for b in batches])
        return {label: sqnr(ref, torch.cat([m(*b) for b in batches])) for label, m in modules.items()}


def fresh_latency(modules: dict, x: tuple, batch: int, rounds: int, repeats: int) -> dict[str, float]:
    """Milliseconds per call of each module at `batch`, side by side (`compare_latency`), each on
    fresh packs: a pack keeps the primitive of its first call's batch size."""
    fresh = {label: _fresh_copy(f"fxopt {label}", m) for label, m in modules.items()}
    times = compare_latency(fresh, {batch: x}, rounds=rounds, repeats=repeats)
    return {label: t[batch] for label, t in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["unet", "mobilenet_v2"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    print("| model | batch | int8 outputs ms (SQNR) | float outputs ms (SQNR) | B / A |")
    print("|---|---|---|---|---|")
    for name in args.models:
        model, example = get_model(name, batch=1)
        cal = calibration_for(name)
        built = {}
        for label, context in (("A", int8_outputs), ("B", contextlib.nullcontext)):
            with context():
                built[label] = fxopt.optimize(model, example, "quantize{backend=x86}", calibration=cal,
                                              verify=False).module
        quality = quality_db(model, built, [get_model(name, batch=8, seed=500 + i)[1] for i in range(3)])
        for batch in (1, 16):
            t = fresh_latency(built, get_model(name, batch=batch, seed=7)[1], batch, args.rounds, args.repeats)
            print(f"| {name} | {batch} | {t['A']:.2f} ({quality['A']:.1f} dB) | {t['B']:.2f} ({quality['B']:.1f} dB) "
                  f"| {t['B'] / t['A']:.2f} |")


if __name__ == "__main__":
    main()
