"""A/B of int8 convs and linears whose value float ops and int8 ops both read (x86 backend).

A: such a layer writes int8 and its float readers dequantize it (the lowering before this
session's change: a layer wrote float only where no int8 op read it); B: the current lowering,
where it writes float and its int8 readers quantize it. Models: a ConvNeXt stage (the
downsample conv feeds the block's depthwise conv and the residual add), an FPN-style backbone
that returns each stage's feature map and reads it on through a relu, and ResNet-18 (no such
layer: the control). Prints SQNR against the float model on held-out batches for A, B and
PT2E (torchao's X86InductorQuantizer, same calibration batches), and latency
(`fxopt.measure.compare_latency`, one thread, interleaved rounds) at batch 1 and 16, with
the float model's for scale.

    python tools/ab_mixed_readers.py --rounds 5
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.examples import zoo
from fxopt.measure import compare_latency
from fxopt.passes.quantize import lower, plan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_average_grid import pt2e_module  # noqa: E402
from ab_float_outputs import fresh_latency, quality_db  # noqa: E402


class ConvNeXtStage(nn.Module):
    def __init__(self, cin: int = 16, c: int = 32, blocks: int = 2):
        super().__init__()
        self.down = nn.Conv2d(cin, c, 2, 2)
        self.dw = nn.ModuleList(nn.Conv2d(c, c, 7, padding=3, groups=c) for _ in range(blocks))
        self.norm = nn.ModuleList(nn.LayerNorm(c) for _ in range(blocks))
        self.pw = nn.ModuleList(nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
                                for _ in range(blocks))
        self.gamma = nn.ParameterList(nn.Parameter(torch.full((c,), 0.1)) for _ in range(blocks))

    def forward(self, x):
        x = self.down(x)
        for dw, norm, pw, gamma in zip(self.dw, self.norm, self.pw, self.gamma):
            y = pw(norm(dw(x).permute(0, 2, 3, 1))) * gamma
            x = x + y.permute(0, 3, 1, 2)
        return x


class FeaturePyramid(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 32, 3, 2, 1), nn.Conv2d(32, 64, 3, 2, 1)

    def forward(self, x):
        f1 = self.c1(x)
        f2 = self.c2(F.relu(f1))
        f3 = self.c3(F.relu(f2))
        return f1, f2, f3


class Flat(nn.Module):
    """The model's outputs concatenated, flat, so one SQNR covers them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return torch.cat([o.flatten(1) for o in out], 1) if isinstance(out, tuple) else out.flatten(1)


def models() -> dict:
    torch.manual_seed(0)
    return {"convnext_stage": (ConvNeXtStage().eval(), lambda b, s: torch.randn(b, 16, 32, 32, generator=s)),
            "feature_pyramid": (FeaturePyramid().eval(), lambda b, s: torch.randn(b, 3, 64, 64, generator=s)),
            "resnet18": (zoo.get("resnet18", batch=1)[0].eval(), lambda b, s: torch.randn(b, 3, 32, 32, generator=s))}


@contextlib.contextmanager
def int8_when_any_int8_reader():
    """A: a layer writes float only where no int8 op reads it."""
    original = plan.writes_float

    def only_float_readers(the_plan, region, value):
        readers = plan.value_readers(value)
        return original(the_plan, region, value) and not any(plan.reads_int8(the_plan, region, u) for u in readers)

    with mock.patch.object(plan, "writes_float", only_float_readers), \
            mock.patch.object(lower, "writes_float", only_float_readers):
        yield


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    print("| model | batch | fp32 ms | A ms (SQNR) | B ms (SQNR) | B / A | PT2E SQNR |")
    print("|---|---|---|---|---|---|---|")
    for name, (model, make) in models().items():
        seed = torch.Generator().manual_seed(1)
        cal = [(make(8, seed),) for _ in range(4)]
        built = {}
        for label, context in (("A", int8_when_any_int8_reader), ("B", contextlib.nullcontext)):
            with context():
                built[label] = Flat(fxopt.optimize(model, cal[0], "quantize{backend=x86}", calibration=cal,
                                                   verify=False).module)
        held_out = [(make(8, seed),) for _ in range(3)]
        quality = quality_db(Flat(model), built, held_out)
        try:
            peer = f"{quality_db(Flat(model), {'PT2E': Flat(pt2e_module(model, cal))}, held_out)['PT2E']:.1f} dB"
        except Exception as error:  # noqa: BLE001 -- a peer's failure is a table entry, not the end
            peer = f"failed ({type(error).__name__})"
        for batch in (1, 16):
            x = (make(batch, seed),)
            t = fresh_latency(built, x, batch, args.rounds, args.repeats)
            fp32 = compare_latency({"fp32": model}, {batch: x}, rounds=args.rounds, repeats=args.repeats)["fp32"][batch]
            print(f"| {name} | {batch} | {fp32:.2f} | {t['A']:.2f} ({quality['A']:.1f} dB) | {t['B']:.2f} "
                  f"({quality['B']:.1f} dB) | {t['B'] / t['A']:.2f} | {peer} |")


if __name__ == "__main__":
    main()
