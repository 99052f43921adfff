"""A/B of `lower-cpu` on transposed-conv decoders: left on aten, or lowered to oneDNN.

A: `fuse,lower-cpu` with transposed convs left on aten (before this change: a row-major
conv_transpose2d and the folded batchnorm shift as an add after it); B: the same pipeline now,
where a dense transposed conv2d [+ shift] [+ activation] is one
`mkldnn._convolution_transpose_pointwise` call on channels-last values, with the weight packed
for it (`passes/fuse/lower_cpu.py`, `_conv_transpose_check`). Models: the fuse tester's decoder
(three ConvTranspose2d + BatchNorm + ReLU, 32->32->16->16 channels, stride 2), a U-Net
up-sampler stage (k=2, stride 2, then a 3x3 conv) and a GAN-style generator from a 4x4 map.
Prints latency (`fxopt.measure.compare_latency`, one thread, interleaved rounds) of eager,
torch.fx's `fuse`, ONNX Runtime (ORT_ENABLE_ALL, one thread; where installed), A and B at batch
1 and 16, and B's largest difference from eager.

    python tools/ab_lower_conv_transpose.py --rounds 5
"""
from __future__ import annotations

import argparse
import copy
import io
import warnings
from unittest import mock

import torch
import torch.fx.experimental.optimization as fx_optimization
from torch import nn

import fxopt
from fxopt.measure import compare_latency
from fxopt.passes.fuse import lower_cpu


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0), bn.weight.data.uniform_(0.5, 1.5)
    return bn


def _up(i: int, o: int, k: int, s: int, p: int, op: int = 0) -> list:
    return [nn.ConvTranspose2d(i, o, k, s, p, op, bias=False), _bn(o), nn.ReLU()]


def models() -> dict:
    torch.manual_seed(0)
    decoder = nn.Sequential(*_up(32, 32, 4, 2, 1), *_up(32, 16, 3, 2, 1, 1), *_up(16, 16, 4, 2, 1))
    unet_up = nn.Sequential(nn.ConvTranspose2d(64, 32, 2, 2), nn.Conv2d(32, 32, 3, padding=1), _bn(32), nn.ReLU())
    generator = nn.Sequential(*_up(128, 64, 4, 2, 1), *_up(64, 32, 4, 2, 1), *_up(32, 16, 4, 2, 1),
                              nn.ConvTranspose2d(16, 3, 4, 2, 1), nn.Tanh())
    return {"decoder": (decoder.eval(), (32, 8, 8)), "unet_up": (unet_up.eval(), (64, 16, 16)),
            "generator": (generator.eval(), (128, 4, 4))}


def _ort(model: nn.Module, shape: tuple):
    """The model in ONNX Runtime (ORT_ENABLE_ALL, one thread), or None where it is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.randn(2, *shape),), buffer, input_names=["x"], dynamic_axes={"x": {0: "n"}},
                      dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x.numpy()})[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    print("| model | batch | eager ms | torch.fx fuse ms | ORT ms | A ms (aten) | B ms (oneDNN) | B / A | B / eager "
          "| B / ORT | B max error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (model, shape) in models().items():
        example = (torch.randn(2, *shape),)
        with mock.patch.object(lower_cpu, "_conv_transpose_check", lambda view, *floor: "off"):
            a = fxopt.optimize(model, example, "fuse,lower-cpu", verify=False).module
        b = fxopt.optimize(model, example, "fuse,lower-cpu", verify=False).module
        fns = {"eager": model, "torch.fx": fx_optimization.fuse(copy.deepcopy(model)), "A": a, "B": b}
        ort = _ort(model, shape)
        if ort is not None:
            fns["ORT"] = ort
        inputs = {batch: (torch.randn(batch, *shape),) for batch in (1, 16)}
        with torch.no_grad():
            error = max(float((b(*x) - model(*x)).abs().max()) for x in inputs.values())
            t = compare_latency(fns, inputs, rounds=args.rounds, repeats=args.repeats)
        for batch in inputs:
            row = {k: t[k][batch] for k in fns}
            ort_ms = row.get("ORT", float("nan"))
            print(f"| {name} | {batch} | {row['eager']:.3f} | {row['torch.fx']:.3f} | {ort_ms:.3f} | {row['A']:.3f} | "
                  f"{row['B']:.3f} | {row['B'] / row['A']:.2f} | {row['B'] / row['eager']:.2f} | "
                  f"{row['B'] / ort_ms:.2f} | {error:.1e} |")


if __name__ == "__main__":
    main()
