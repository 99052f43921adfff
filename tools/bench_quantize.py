"""Benchmark int8 post-training quantization: fxopt vs torch.ao FX vs PT2E (torchao), 1 thread.

    python tools/bench_quantize.py                       # every model, markdown table on stdout
    python tools/bench_quantize.py --models digits bert --repeats 20
    python tools/bench_quantize.py --head-to-head 15       # fxopt vs torch.ao int8 only, alternating

Per model and batch size (1 and 16): latency of fp32, fxopt's fused fp32 (`fuse,lower-cpu`, when the
pass exists), fxopt int8 (`quantize{backend=x86}`), torch.ao FX (prepare_fx/convert_fx with
the x86 qconfig) and PT2E (torchao X86InductorQuantizer, compiled with torch.compile when that
works, else skipped); SQNR vs fp32 on a batch of 16; digits test accuracy; model size; time to
quantize (capture + insert + calibrate + lower). Every number comes from fxopt.measure/verify;
latencies are the lowest median over `--rounds` interleaved rounds (each round times every
method at both batch sizes).
A method that fails on a model is reported with its error, not hidden.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import traceback
import warnings

import torch

import fxopt
from fxopt.examples import zoo
from fxopt.measure import compare_latency, measure_latency, model_size_bytes

MODELS = {"resnet18": "symbolic", "mobilenet_v2": "symbolic", "bert": "export", "hf_bert": "export",
          "digits": "export", "video3d": "symbolic", "nn_encoder": "symbolic"}


def calibration_for(name: str, n: int = 8):
    if name == "digits":
        from fxopt.examples.digits import calibration_batches

        return calibration_batches(n_batches=n, batch_size=32)
    return [zoo.get(name, batch=8, seed=100 + i)[1] for i in range(n)]


def quantize_fxopt(model, inputs, cal, mode):
    start = time.perf_counter()
    res = fxopt.optimize(model, inputs, "quantize{backend=x86}", calibration=cal, mode=mode, verify=False)
    return res.module, time.perf_counter() - start


def quantize_ao_fx(model, inputs, cal):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    start = time.perf_counter()
    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), inputs)
    with torch.no_grad():
        for batch in cal:
            prepared(*batch)
    return convert_fx(prepared), time.perf_counter() - start


def quantize_pt2e(model, inputs, cal):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    start = time.perf_counter()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    # torch.export's own module (FakeTensor metadata, which prepare_pt2e's conv-BN folding reads;
    # fxopt.capture's graph carries real example tensors there) with a dynamic batch dimension.
    batch = torch.export.Dim("batch", min=1, max=1024)
    dynamic = tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() else None for x in inputs)
    exported = torch.export.export(copy.deepcopy(model).eval(), tuple(inputs), dynamic_shapes=dynamic).module()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in cal:
            prepared(*batch)
    converted = convert_pt2e(prepared)
    compiled = torch.compile(converted)
    with torch.no_grad():
        compiled(*inputs)
    return compiled, time.perf_counter() - start


def fused_fp32(model, inputs, mode):
    available = fxopt.available_passes()
    if "fuse" not in available:
        return None
    pipeline = "fuse,lower-cpu" if "lower-cpu" in available else "fuse"
    try:
        return fxopt.optimize(model, inputs, pipeline, mode=mode, verify=False).module
    except Exception:
        return fxopt.optimize(model, inputs, "fuse", mode=mode, verify=False).module


def size_bytes(label: str, m) -> int:
    """fxopt.measure's size; fxopt int8 modules keep weights prepacked, so theirs is the saved file."""
    if label == "fxopt int8":
        import io

        from fxopt.passes.quantize import save

        buffer = io.BytesIO()
        save(m, buffer)
        return buffer.tell()
    return model_size_bytes(m)


def run_model(name: str, repeats: int, with_pt2e: bool, rounds: int = 3) -> list[dict]:
    mode = MODELS[name]
    model, x1 = zoo.get(name, batch=1)
    _, x16 = zoo.get(name, batch=16)
    cal = calibration_for(name)
    rows = []
    candidates: dict[str, tuple] = {"fp32": (model, 0.0, None)}
    fused = None
    try:
        fused = fused_fp32(model, x16, mode)
    except Exception as exc:
        candidates["fxopt fused fp32"] = (None, 0.0, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
    if fused is not None:
        candidates["fxopt fused fp32"] = (fused, 0.0, None)
    makers = {"fxopt int8": lambda: quantize_fxopt(model, x16, cal, mode),
              "torch.ao FX int8": lambda: quantize_ao_fx(model, x16, cal)}
    if with_pt2e:
        makers["PT2E int8 (torchao, compiled)"] = lambda: quantize_pt2e(
            model, x16, cal)
    for label, make in makers.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qmodel, seconds = make()
            candidates[label] = (qmodel, seconds, None)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:100]
            candidates[label] = (None, 0.0, f"{type(exc).__name__}: {first}")
            traceback.print_exc(limit=1)
    accuracy = {}
    if name == "digits":
        from fxopt.examples.digits import evaluate_accuracy

        for label, (m, _, err) in candidates.items():
            if m is not None:
                try:
                    accuracy[label] = evaluate_accuracy(m)
                except Exception:
                    accuracy[label] = float("nan")
    latency = time_rounds(candidates, {1: x1, 16: x16}, repeats, rounds)
    base = {}
    for batch, x in ((1, x1), (16, x16)):
        for label, (m, seconds, err) in candidates.items():
            row = {"model": f"{name} ({mode})", "batch": batch, "method": label}
            ms = latency.get((label, batch), err)
            if m is None or isinstance(ms, str):
                row["error"] = ms
                rows.append(row)
                continue
            if label == "fp32":
                base[batch] = ms
            row.update(ms=ms, speedup=base[batch] / ms)
            if batch == 16:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    rep = fxopt.verify(model, m, x16, tolerance="lossy", localize=False)
                row["sqnr"] = rep.sqnr_db
                try:
                    row["size_mb"] = size_bytes(label, m) / 2**20
                except Exception:
                    row["size_mb"] = float("nan")
                row["quant_s"] = seconds
                if label in accuracy:
                    row["acc"] = accuracy[label]
            rows.append(row)
    return rows


def time_rounds(candidates: dict, inputs: dict, repeats: int, rounds: int) -> dict:
    """{(method, batch): the lowest median latency in ms over `rounds` interleaved rounds
    (`compare_latency`), or an error text}."""
    fns = {label: m for label, (m, _, _) in candidates.items() if m is not None}
    lat = compare_latency(fns, inputs, rounds=rounds, repeats=repeats, threads=1)
    return {(label, batch): v for label, by_batch in lat.items() for batch, v in by_batch.items()}


def head_to_head(name: str, rounds: int, repeats: int = 10) -> list[str]:
    """fxopt int8 against torch.ao FX int8 only, alternating every round (which goes first flips
    too): the median over rounds of each round's median, and the fastest round, per batch size.

    For close calls: on a shared machine a burst of load during one method's turn in the full
    table can flip a 5% difference; `rounds` alternations spread such bursts over both.
    """
    model, x16 = zoo.get(name, batch=16)
    cal = calibration_for(name)
    fx, _ = quantize_fxopt(model, x16, cal, MODELS[name])
    ao, _ = quantize_ao_fx(model, x16, cal)
    lines = []
    for batch in (1, 16):
        x = zoo.get(name, batch=batch)[1]
        got: dict[str, list[float]] = {"fxopt int8": [], "torch.ao FX int8": []}
        for r in range(rounds):
            order = [("fxopt int8", fx), ("torch.ao FX int8", ao)]
            for label, m in (order if r % 2 else order[::-1]):
                got[label].append(measure_latency(m, x, threads=1, repeats=repeats, warmup=2).median_ms)
        med = {k: statistics.median(v) for k, v in got.items()}
        lines.append(f"| {name} | {batch} | {med['fxopt int8']:.2f} (min {min(got['fxopt int8']):.2f}) | "
                     f"{med['torch.ao FX int8']:.2f} (min {min(got['torch.ao FX int8']):.2f}) | "
                     f"{med['torch.ao FX int8'] / med['fxopt int8']:.2f}x |")
    return lines


def table(rows: list[dict]) -> str:
    head = "| model | batch | method | latency ms | speedup vs fp32 | SQNR dB | digits acc % | size MB | quantize s |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['method']} | failed: {r['error']} | | | | | |")
            continue
        fmt = lambda k, f: (f.format(r[k]) if k in r else "")
        lines.append(f"| {r['model']} | {r['batch']} | {r['method']} | {r['ms']:.2f} | {r['speedup']:.2f}x | "
                     f"{fmt('sqnr', '{:.1f}')} | {fmt('acc', '{:.2f}')} | {fmt('size_mb', '{:.2f}')} | "
                     f"{fmt('quant_s', '{:.1f}') if r.get('quant_s') else ''} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the best median counts")
    parser.add_argument("--no-pt2e", action="store_true", help="skip the torchao PT2E comparison")
    parser.add_argument("--head-to-head", type=int, default=0, metavar="ROUNDS",
                        help="only fxopt int8 vs torch.ao FX int8, alternating for ROUNDS rounds")
    args = parser.parse_args(argv)
    if args.head_to_head:
        print("| model | batch | fxopt int8 ms | torch.ao FX int8 ms | torch.ao / fxopt |\n|---|---|---|---|---|")
        for name in args.models:
            if name != "hf_bert":  # torch.ao FX cannot trace it
                print("\n".join(head_to_head(name, args.head_to_head)), flush=True)
        return
    torch.manual_seed(0)
    with_pt2e = not args.no_pt2e
    if with_pt2e:
        try:
            import torchao  # noqa: F401
        except Exception as exc:
            print(f"PT2E skipped: torchao not importable ({exc})")
            with_pt2e = False
    rows = []
    for name in args.models:
        rows += run_model(name, args.repeats, with_pt2e, args.rounds)
        print(table(rows), flush=True)
    print("\nFINAL\n" + table(rows))


if __name__ == "__main__":
    main()
