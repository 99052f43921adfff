"""A/B of the weight packs of int8 convs that write float (`float_output.FloatOutputConv`).

A: one oneDNN pack made without the input's shape and zero point (what `quantize` did before:
oneDNN then reorders the weight on every call, to the blocked layout its kernel for that shape
runs and with the zero-point compensation the input needs); B: a pack per (threads, input
shape, zero point), made on the first call (`FloatOutputConv.pack_for`). Models: a PointNet
(1x1 conv1d 3 -> 64 -> 128 -> 512 over 1024 points, global max, linear head: its last conv
writes float for the max) and a YOLOv8-style neck (conv-BN-SiLU blocks and C2f splits: every
conv read by a SiLU writes float). Prints latency (`fxopt.measure.measure_latency`, one thread,
each variant in a process of its own, `main` says why; the median over rounds) of fp32 eager,
torch.ao FX int8 (x86; the peer), A and B at batch 1 and 16, and each int8 model's SQNR
against fp32 on a held-out batch.
The pipeline is `quantize` alone (PointNet's max stays a max: the pack is what is measured).

    python tools/ab_float_output_packs.py --rounds 7
"""
from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import statistics
import subprocess
import sys
import warnings
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.measure import measure_latency
from fxopt.passes.quantize.float_output import FloatOutputConv

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import quantize_ab  # noqa: E402  (a sibling module, not a package)


class PointNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(3, 64, 1), nn.BatchNorm1d(64)
        self.c2, self.b2 = nn.Conv1d(64, 128, 1), nn.BatchNorm1d(128)
        self.c3, self.b3 = nn.Conv1d(128, 512, 1), nn.BatchNorm1d(512)
        self.f1, self.f2 = nn.Linear(512, 256), nn.Linear(256, 10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        x = self.b3(self.c3(x))
        x = torch.max(x, 2, keepdim=True)[0].view(-1, 512)
        return self.f2(F.relu(self.f1(x)))


def _cbs(cin: int, cout: int, k: int = 3, s: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class C2f(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b, self.c, self.o = _cbs(c, c, 1), _cbs(c // 2, c // 2), _cbs(c // 2, c // 2), _cbs(2 * c, c, 1)

    def forward(self, x):
        y1, y2 = self.a(x).chunk(2, 1)
        y3 = self.b(y2)
        return self.o(torch.cat([y1, y2, y3, self.c(y3)], 1))


class Neck(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(_cbs(3, 16, 3, 2), _cbs(16, 32, 3, 2), C2f(32), _cbs(32, 64, 3, 2), C2f(64))
        self.head = nn.Conv2d(64, 8, 1)

    def forward(self, x):
        return self.head(self.body(x))


def _with_statistics(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


class _ShapelessPacks(dict):
    """The packs of A: the one made without a shape, whatever the call."""

    def __init__(self, conv: FloatOutputConv) -> None:
        super().__init__()
        self.packed = torch.ops.onednn.qconv_prepack(conv.weight, conv.scales, 1.0, 0, conv.stride, conv.padding,
                                                     conv.dilation, conv.groups, None)

    def get(self, key, default=None):
        return self.packed


@contextlib.contextmanager
def shapeless_packs():
    pack = FloatOutputConv.pack.__func__

    def patched(cls, *args, **kwargs):
        conv = pack(cls, *args, **kwargs)
        conv._shaped = _ShapelessPacks(conv)
        return conv

    with mock.patch.object(FloatOutputConv, "pack", classmethod(patched)):
        yield


_MODELS = {"pointnet": (PointNet, (3, 1024)), "yolo_neck": (Neck, (3, 64, 64))}


def _time_one(name: str, variant: str, repeats: int) -> None:
    """Build one variant of one model and print its (batch 1, batch 16) medians and SQNR."""
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    cls, shape = _MODELS[name]
    model = _with_statistics(cls())
    torch.manual_seed(1)
    calibration = [torch.randn(8, *shape) for _ in range(4)]
    example = (calibration[0][:1],)
    if variant == "fp32":
        fn = model
    elif variant == "torch.ao":
        fn = quantize_ab._torch_ao(model, example, calibration)
    else:
        with shapeless_packs() if variant == "A" else contextlib.nullcontext():
            fn = fxopt.optimize(model, example, "quantize", calibration=calibration, verify=False).module
    held_out = torch.randn(16, *shape)
    with torch.no_grad():
        times = [measure_latency(fn, (held_out[:batch],), threads=1, repeats=repeats).median_ms for batch in (1, 16)]
        sqnr = quantize_ab.sqnr(model(held_out), fn(held_out))
    print(json.dumps({"ms": times, "sqnr": sqnr}))


def main(argv=None) -> None:
    """Each variant runs in a process of its own, the variants in turn, `--rounds` times: in a
    process that has run a pack made for a shape (B's, or torch.ao's `quantized.conv1d_prepack`)
    A's shapeless pack runs without its reorder (cause unknown; an outside tester found it), which
    would hide A's cost."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        return _time_one(*args.one, args.repeats)
    print("| model | batch | fp32 ms | torch.ao ms | A ms (one shapeless pack) | B ms (pack per shape) | B / A "
          "| B / torch.ao |")
    print("|---|---|---|---|---|---|---|---|")
    variants = ("fp32", "torch.ao", "A", "B")
    for name in _MODELS:
        runs = {v: [] for v in variants}
        for _ in range(args.rounds):
            for variant in variants:
                out = subprocess.run([sys.executable, __file__, "--one", name, variant, "--repeats", str(args.repeats)],
                                     capture_output=True, text=True, check=True).stdout
                runs[variant].append(json.loads(out.strip().splitlines()[-1]))
        ms = {v: [statistics.median(r["ms"][i] for r in runs[v]) for i in range(2)] for v in variants}
        for i, batch in enumerate((1, 16)):
            print(f"| {name} | {batch} | {ms['fp32'][i]:.3f} | {ms['torch.ao'][i]:.3f} | {ms['A'][i]:.3f} | "
                  f"{ms['B'][i]:.3f} | {ms['B'][i] / ms['A'][i]:.2f} | {ms['B'][i] / ms['torch.ao'][i]:.2f} |")
        print(f"SQNR dB, {name}: " + ", ".join(f"{v} {runs[v][0]['sqnr']:.1f}" for v in variants if v != "fp32"))


if __name__ == "__main__":
    main()
