"""A/B of average pools that round onto their own output grid (x86 backend).

A: `quantize{average_grid=input}` (the default), every average pool an int8 pass-through on its
input's grid; B: `average_grid=own`, where a pool whose observed output grid is at least twice
as fine as its input's runs on the dequantized input and rounds once onto its own grid. Prints SQNR against the float model on held-out batches, PT2E's (torchao's
X86InductorQuantizer, its converted q/dq module, same calibration batches) as the peer, and
latency (`fxopt.measure.compare_latency`, one thread, interleaved rounds) per batch size.

    python tools/ab_average_grid.py --models blur global_average resnet18 mobilenet_v2 --rounds 5
"""
from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fxopt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_float_outputs import fresh_latency, quality_db  # noqa: E402
from bench_quantize import calibration_for, get_model  # noqa: E402


class Blur(nn.Module):
    """A 3x3 stride-1 average between two convs (the quantize tester's case)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.o = nn.Conv2d(16, 64, 3, padding=1), nn.Conv2d(64, 16, 3, padding=1)

    def forward(self, x):
        return self.o(F.avg_pool2d(F.relu(self.a(x)), 3, 1, 1))


class GlobalAverage(nn.Module):
    """A classifier head: a conv, a global average, a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.fc = nn.Conv2d(16, 128, 3, padding=1), nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.a(x)), 1).flatten(1))


_LOCAL = {"blur": Blur, "global_average": GlobalAverage}


def model_and_input(name: str, batch: int, seed: int):
    if name not in _LOCAL:
        return get_model(name, batch=batch, seed=seed)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(seed)
    return _LOCAL[name]().eval(), (torch.randn(batch, 16, 32, 32, generator=gen),)


def calibration(name: str) -> list:
    if name not in _LOCAL:
        return calibration_for(name)
    return [model_and_input(name, 8, 100 + i)[1] for i in range(8)]


def pt2e_module(model, cal):
    """PT2E's converted module, exported at the calibration batches' size (those of the
    held-out batches too); no torch.compile: the same numbers, minutes sooner."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    exported = torch.export.export(copy.deepcopy(model).eval(), tuple(cal[0])).module()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch_inputs in cal:
            prepared(*batch_inputs)
    return convert_pt2e(prepared)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["blur", "global_average", "resnet18", "mobilenet_v2"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    print("| model | batch | input grid ms (SQNR) | own grid ms (SQNR) | B / A | PT2E SQNR |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        model, example = model_and_input(name, 1, 0)
        cal = calibration(name)
        built = {}
        for label, grid in (("A", "input"), ("B", "own")):
            built[label] = fxopt.optimize(model, example, f"quantize{{backend=x86,average_grid={grid}}}",
                                          calibration=cal, verify=False).module
        held_out = [model_and_input(name, 8, 500 + i)[1] for i in range(3)]
        quality = quality_db(model, built, held_out)
        try:
            pt2e = f"{quality_db(model, {'pt2e': pt2e_module(model, cal)}, held_out)['pt2e']:.1f} dB"
        except Exception as exc:  # noqa: BLE001 - the peer's failure is reported, not hidden
            pt2e = f"fails: {type(exc).__name__}"
        for batch in (1, 16):
            t = fresh_latency(built, model_and_input(name, batch, 7)[1], batch, args.rounds, args.repeats)
            print(f"| {name} | {batch} | {t['A']:.2f} ({quality['A']:.1f} dB) | {t['B']:.2f} ({quality['B']:.1f} dB) "
                  f"| {t['B'] / t['A']:.2f} | {pt2e} |")


if __name__ == "__main__":
    main()
