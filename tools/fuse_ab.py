"""The loop the `lower-cpu` A/B tools share (`ab_lower_conv_transpose.py`,
`ab_channel_shuffle.py`): per model, `fuse,lower-cpu` as it was (A: under the tool's patch) and
as it is (B), against eager, torch.fx's `fuse` and ONNX Runtime (ORT_ENABLE_ALL, one thread;
where installed) as peers, latency at batch 1 and 16 (`fxopt.measure.compare_latency`, one
thread, interleaved rounds) and B's largest difference from eager, printed as a markdown
table. Not a tool of its own: imported by its siblings.
"""
from __future__ import annotations

import argparse
import copy
import io
import warnings
from typing import Callable, ContextManager

import torch
import torch.fx.experimental.optimization as fx_optimization
from torch import nn

import fxopt
from fxopt.measure import compare_latency


def onnx_runtime(model: nn.Module, shape: tuple):
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


def with_statistics(model: nn.Module) -> nn.Module:
    """`model` in eval mode with seeded, non-trivial batchnorm running statistics (what a
    trained model has: folding them must change numbers)."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def main(description: str, models: dict[str, tuple[nn.Module, tuple[int, ...]]], before: Callable[[], ContextManager],
         what: tuple[str, str], argv=None, pipelines: tuple[str, ...] = ("fuse,lower-cpu",)) -> None:
    """Run the A/B of each of `pipelines` on `models` (name -> (eval model, input shape without
    the batch)): A under `before()`, B as the code is; `what` names A's and B's columns."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    for pipeline in pipelines:
        print(f"`{pipeline}`\n")
        _table(models, before, what, pipeline, args.rounds, args.repeats)
        print()


def _table(models: dict[str, tuple[nn.Module, tuple[int, ...]]], before: Callable[[], ContextManager],
           what: tuple[str, str], pipeline: str, rounds: int, repeats: int) -> None:
    print(f"| model | batch | eager ms | torch.fx fuse ms | ORT ms | A ms ({what[0]}) | B ms ({what[1]}) | B / A "
          "| B / eager | B / ORT | B max error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (model, shape) in models.items():
        example = (torch.randn(2, *shape),)
        with before():
            a = fxopt.optimize(model, example, pipeline, verify=False).module
        b = fxopt.optimize(model, example, pipeline, verify=False).module
        fns = {"eager": model, "torch.fx": fx_optimization.fuse(copy.deepcopy(model)), "A": a, "B": b}
        ort = onnx_runtime(model, shape)
        if ort is not None:
            fns["ORT"] = ort
        inputs = {batch: (torch.randn(batch, *shape),) for batch in (1, 16)}
        with torch.no_grad():
            error = max(float((b(*x) - model(*x)).abs().max()) for x in inputs.values())
            t = compare_latency(fns, inputs, rounds=rounds, repeats=repeats)
        for batch in inputs:
            row = {k: t[k][batch] for k in fns}
            ort_ms = row.get("ORT", float("nan"))
            print(f"| {name} | {batch} | {row['eager']:.3f} | {row['torch.fx']:.3f} | {ort_ms:.3f} | {row['A']:.3f} | "
                  f"{row['B']:.3f} | {row['B'] / row['A']:.2f} | {row['B'] / row['eager']:.2f} | "
                  f"{row['B'] / ort_ms:.2f} | {error:.1e} |")
