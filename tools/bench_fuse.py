"""Benchmark fusion: eager vs fxopt `fuse` vs `fuse,lower-cpu` (each + `lower-eager`) vs torch.fx fuse vs torch.compile
(freezing) vs ONNX Runtime, on the zoo's models, with one thread.

Every number comes from fxopt.measure (latency medians; the lowest over `--rounds` interleaved
rounds, each timing every method); errors are max |ref - out| against the eager model. Prints
a Markdown table (latency ratio vs eager at batch 1 and 16: < 1 is faster; transform time;
max error).

    python tools/bench_fuse.py                       # all models, all methods
    python tools/bench_fuse.py --models resnet18 --skip-compile --repeats 10
"""
from __future__ import annotations

import argparse
import copy
import io
import signal
import sys
import time
import warnings
from contextlib import contextmanager

import torch

import fxopt
from fxopt.examples import zoo
from fxopt.measure import compare_latency

CAPTURE = {"bert": "export"}
# lower-eager changes nothing on symbolic graphs (the CNNs); on BERT's export graph it calls
# the ATen ops through their eager bindings.
METHODS = ("eager", "fxopt fuse,lower-eager", "fxopt fuse,lower-cpu,lower-eager", "torch.fx fuse",
           "torch.compile freezing", "onnxruntime")


class Timeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float | None):
    if not seconds:
        yield
        return

    def handler(signum, frame):
        raise Timeout(f"over {seconds:.0f}s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def max_error(ref, out) -> float:
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    out = out[0] if isinstance(out, (tuple, list)) else out
    if hasattr(ref, "last_hidden_state"):
        ref, out = ref.last_hidden_state, out.last_hidden_state
    return float((ref.float() - torch.as_tensor(out).float()).abs().max())


def build(method: str, name: str, model, inputs, args):
    """(callable, seconds to build it) for one method."""
    start = time.perf_counter()
    if method == "eager":
        fn = model
    elif method.startswith("fxopt"):
        pipeline = method.split(" ", 1)[1]
        res = fxopt.optimize(model, inputs, pipeline=pipeline, mode=CAPTURE.get(name, "auto"), verify=False)
        fn = res.module
    elif method == "torch.fx fuse":
        from torch.fx.experimental.optimization import fuse

        fn = fuse(copy.deepcopy(model))  # symbolic trace + conv/bn folding
    elif method == "torch.compile freezing":
        import torch._inductor.config as cfg

        cfg.freezing = True
        torch._dynamo.reset()
        fn = torch.compile(copy.deepcopy(model))
        with torch.no_grad(), time_limit(args.compile_timeout):
            fn(*inputs)
    elif method == "onnxruntime":
        fn = _onnx(model, inputs)
    else:
        raise ValueError(method)
    return fn, time.perf_counter() - start


def _onnx(model, inputs):
    import onnxruntime as ort

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, buffer, dynamo=False, opset_version=17,
                          input_names=[f"in{i}" for i in range(len(inputs))],
                          dynamic_axes={f"in{i}": {0: "batch"} for i in range(len(inputs))})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(buffer.getvalue(), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*xs):
        return torch.from_numpy(session.run(None, {n: x.numpy() for n, x in zip(names, xs)})[0])

    return run


def bench_model(name: str, args) -> dict:
    """Build every method, then time them in interleaved rounds (see `time_rounds`)."""
    torch.manual_seed(0)
    rows: dict[str, dict] = {}
    model1, in1 = zoo.get(name, batch=1)
    _, in16 = zoo.get(name, batch=16)
    model1.eval()
    with torch.no_grad():
        ref1, ref16 = model1(*in1), model1(*in16)
    built = {}
    for method in args.methods:
        try:
            fn, seconds = build(method, name, model1, _batch2(in16), args)
            with torch.no_grad():
                err = max(max_error(ref1, fn(*in1)), max_error(ref16, fn(*in16)))
            built[method] = fn
            rows[method] = dict(build_s=seconds, err=err)
        except Exception as exc:  # a method that cannot take this model is reported, not fatal
            rows[method] = dict(error=_first_line(exc))
    for method, lat in time_rounds(built, {1: in1, 16: in16}, args).items():
        rows[method].update(lat)  # an error while timing replaces the numbers in the table
        print(f"  {name:12s} {method:24s} {rows[method]}", file=sys.stderr, flush=True)
    return rows


def time_rounds(built: dict, inputs: dict, args) -> dict[str, dict]:
    """{method: {"lat1": ms, "lat16": ms} or {"error": text}}: `compare_latency`'s interleaved
    rounds (the lowest per-round median), a time limit around torch.compile's first calls."""
    def guard(method):
        return time_limit(args.compile_timeout if "compile" in method else None)

    lat = compare_latency(built, inputs, rounds=args.rounds, warmup=args.warmup, repeats=args.repeats, guard=guard)
    out = {}
    for method, by_batch in lat.items():
        errors = [v for v in by_batch.values() if isinstance(v, str)]
        out[method] = dict(error=errors[0]) if errors else {f"lat{b}": ms for b, ms in by_batch.items()}
    return out


def _first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"


def _batch2(inputs):
    return tuple(x[:2] for x in inputs)


def table(results: dict) -> str:
    lines = ["| model | method | batch 1 ms (ratio) | batch 16 ms (ratio) | transform s | max error |",
             "|---|---|---|---|---|---|"]
    for name, rows in results.items():
        eager = rows.get("eager", {})
        for method, r in rows.items():
            if "error" in r:
                lines.append(f"| {name} | {method} | — | — | — | skipped: {r['error']} |")
                continue
            ratio1 = r["lat1"] / eager["lat1"] if "lat1" in eager else float("nan")
            ratio16 = r["lat16"] / eager["lat16"] if "lat16" in eager else float("nan")
            lines.append(f"| {name} | {method} | {r['lat1']:.2f} ({ratio1:.2f}x) | {r['lat16']:.2f} ({ratio16:.2f}x) "
                         f"| {r['build_s']:.2f} | {r['err']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "bert", "digits"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--skip-compile", action="store_true", help="leave out torch.compile (slow to build)")
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument("--compile-timeout", type=float, default=300.0, help="seconds; 0 = no limit")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the best median counts")
    args = parser.parse_args(argv)
    if args.skip_compile:
        args.methods = [m for m in args.methods if "compile" not in m]
    if args.skip_onnx:
        args.methods = [m for m in args.methods if m != "onnxruntime"]
    torch.set_num_threads(1)
    results = {name: bench_model(name, args) for name in args.models}
    print(table(results))


if __name__ == "__main__":
    main()
