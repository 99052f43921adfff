"""The loop the quantize A/B tools share (`ab_int8_batchnorm.py`, `ab_int8_upsample.py`): per
model, `quantize` as it was (A: under the tool's patch) and as it is (B), torch.ao FX (x86
qconfig, the same calibration batches) as the peer, SQNR against fp32 on a held-out batch of 16,
and latency at batch 1 and 16 (`fxopt.measure.compare_latency`, one thread, interleaved rounds),
printed as a markdown table. Not a tool of its own: imported by its siblings.
"""
from __future__ import annotations

import argparse
import copy
import warnings
from typing import Callable, ContextManager

import torch
from torch import nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import fxopt
from fxopt.measure import compare_latency


def sqnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(a.pow(2).mean() / (a - b).pow(2).mean()))


def _torch_ao(model: nn.Module, example: tuple, calibration: list) -> nn.Module:
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), example)
    for batch in calibration:
        prepared(batch)
    return convert_fx(prepared)


def main(description: str, models: dict[str, nn.Module], before: Callable[[], ContextManager],
         what: tuple[str, str], input_shape: tuple[int, ...], argv=None) -> None:
    """Run the A/B on `models`: A under `before()`, B as the code is; `what` names A's and B's
    columns; inputs are random of (batch, *input_shape)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    print(f"| model | batch | fp32 ms | torch.ao ms | A ms ({what[0]}) | B ms ({what[1]}) | B / A | B / torch.ao |")
    print("|---|---|---|---|---|---|---|---|")
    sqnrs = {}
    for name, model in models.items():
        calibration = [torch.randn(8, *input_shape) for _ in range(4)]
        example = (calibration[0][:1],)
        with before():
            a = fxopt.optimize(model, example, "quantize", calibration=calibration, verify=False).module
        b = fxopt.optimize(model, example, "quantize", calibration=calibration, verify=False).module
        fns = {"fp32": model, "torch.ao": _torch_ao(model, example, calibration), "A": a, "B": b}
        held_out = torch.randn(16, *input_shape)
        with torch.no_grad():
            sqnrs[name] = {k: sqnr(model(held_out), f(held_out)) for k, f in fns.items() if k != "fp32"}
            t = compare_latency(fns, {1: (held_out[:1],), 16: (held_out,)}, rounds=args.rounds,
                                repeats=args.repeats)
        for batch in (1, 16):
            row = {k: t[k][batch] for k in fns}
            print(f"| {name} | {batch} | {row['fp32']:.3f} | {row['torch.ao']:.3f} | {row['A']:.3f} | "
                  f"{row['B']:.3f} | {row['B'] / row['A']:.2f} | {row['B'] / row['torch.ao']:.2f} |")
    for name, values in sqnrs.items():
        print(f"SQNR dB, {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in values.items()))
