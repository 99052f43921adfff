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
method; each batch size on its own copy of each model, whose packed int8 weights then build
their kernels for that batch).
A method that fails on a model is reported with its error, not hidden.

`unet` is milesial/Pytorch-UNet's U-Net (four ConvTranspose2d up-samplers), defined here, not in
the zoo; `unet_export` is the same model captured with torch.export (not in the default list).
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
from fxopt.serialize import rebuild_coded_attributes

MODELS = {"resnet18": "symbolic", "mobilenet_v2": "symbolic", "bert": "export", "hf_bert": "export",
          "digits": "export", "video3d": "symbolic", "nn_encoder": "symbolic", "unet": "symbolic",
          "unet_export": "export"}


class _DoubleConv(torch.nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        nn = torch.nn
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Up(torch.nn.Module):
    """milesial/Pytorch-UNet's `Up` (bilinear=False): a 2x2 stride-2 transposed conv, the pad
    to the skip's size, cat, double conv."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = torch.nn.ConvTranspose2d(cin, cin // 2, kernel_size=2, stride=2)
        self.conv = _DoubleConv(cin, cout)

    def forward(self, x1, x2):
        x1 = self.up(x1)
        dy, dx = x2.size()[2] - x1.size()[2], x2.size()[3] - x1.size()[3]
        x1 = torch.nn.functional.pad(x1, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([x2, x1], dim=1))


class UNet(torch.nn.Module):
    """milesial/Pytorch-UNet's U-Net (bilinear=False: four ConvTranspose2d(k=2, s=2) up-samplers),
    widths 16..256 instead of 64..1024, on 3 x 64 x 64 images."""

    def __init__(self, channels: int = 3, classes: int = 2, width: int = 16) -> None:
        super().__init__()
        w = [width * 2 ** i for i in range(5)]
        pool = torch.nn.MaxPool2d(2)
        self.inc = _DoubleConv(channels, w[0])
        self.downs = torch.nn.ModuleList(torch.nn.Sequential(pool, _DoubleConv(w[i], w[i + 1])) for i in range(4))
        self.ups = torch.nn.ModuleList(_Up(w[i + 1], w[i]) for i in reversed(range(4)))
        self.outc = torch.nn.Conv2d(w[0], classes, 1)

    def forward(self, x):
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)


def get_model(name: str, batch: int = 1, seed: int = 0):
    """(model, inputs) from the zoo, or the U-Net defined here (`unet`, `unet_export`: one model,
    captured by each front end)."""
    if not name.startswith("unet"):
        return zoo.get(name, batch=batch, seed=seed)
    torch.manual_seed(0)
    model = UNet().eval()
    with torch.no_grad():  # trained-looking batchnorm statistics instead of the identity
        for m in model.modules():
            if isinstance(m, torch.nn.ConvTranspose2d):
                # He init for what it computes (each output pixel sums C_in products): torch's
                # default counts C_out * k * k, which leaves the up-sampled path ~1/10 of the skip
                # it is concatenated with, and the output SQNR blind to the transposed convs
                m.weight.normal_(0.0, (2.0 / m.in_channels) ** 0.5)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.8, 1.2)
    gen = torch.Generator().manual_seed(seed)
    return model, (torch.randn(batch, 3, 64, 64, generator=gen),)


def calibration_for(name: str, n: int = 8):
    if name == "digits":
        from fxopt.examples.digits import calibration_batches

        return calibration_batches(n_batches=n, batch_size=32)
    return [get_model(name, batch=8, seed=100 + i)[1] for i in range(n)]


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
    model, x1 = get_model(name, batch=1)
    _, x16 = get_model(name, batch=16)
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
    (`compare_latency`), or an error text}. Each batch size times its own copy of every model:
    a packed int8 weight keeps the oneDNN primitive of its first call's shape, and a module
    timed at batch 1 first would run batch 16 on a slower path (fxopt's and torch.ao's alike)."""
    out = {}
    for batch, x in inputs.items():
        fns = {label: _fresh_copy(label, m) for label, (m, _, _) in candidates.items() if m is not None}
        lat = compare_latency(fns, {batch: x}, rounds=rounds, repeats=repeats, threads=1)
        out.update({(label, batch): by_batch[batch] for label, by_batch in lat.items()})
    return out


def _fresh_copy(label: str, m):
    """A copy whose packed weights no call has touched; the module itself if it cannot be
    copied (a compiled module). A deep copy re-packs under the current engine, which for
    fxopt's int8 model would undo its per-layer engine choice (oneDNN for depthwise convs):
    its packs are rebuilt by their save/load codec instead."""
    try:
        fresh = copy.deepcopy(m)
    except Exception:
        return m
    if label.startswith("fxopt"):
        rebuild_coded_attributes(fresh)
    return fresh


def head_to_head(name: str, rounds: int, repeats: int = 10) -> list[str]:
    """fxopt int8 against torch.ao FX int8 only, alternating every round (which goes first flips
    too): the median over rounds of each round's median, and the fastest round, per batch size.

    For close calls: on a shared machine a burst of load during one method's turn in the full
    table can flip a 5% difference; `rounds` alternations spread such bursts over both.
    """
    model, x16 = get_model(name, batch=16)
    cal = calibration_for(name)
    fx, _ = quantize_fxopt(model, x16, cal, MODELS[name])
    ao, _ = quantize_ao_fx(model, x16, cal)
    lines = []
    for batch in (1, 16):
        x = get_model(name, batch=batch)[1]
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
    parser.add_argument("--models", nargs="+", default=[m for m in MODELS if m != "unet_export"], choices=list(MODELS))
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
