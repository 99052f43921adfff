"""Time several `prune` option sets on one zoo model side by side, with Torch-Pruning.

    python tools/ab_prune.py densenet --rounds 9 "" "cost=latency" "cost=latency"

Each spec is `prune` options as in bench_prune's ``--models`` (``k=v;k=v``; ``""`` for the
defaults); a spec given twice is analyzed twice (to see how much a measured selection moves).
``--lower`` runs every pruned model, Torch-Pruning's included, through
``remove-noops,fuse,lower-cpu,lower-eager`` before timing (how a pruned CNN is deployed on a CPU);
MACs are counted before that.
Unlike bench_prune, whose rows are timed apart, every model here — the original, each fxopt
variant and Torch-Pruning (MagnitudeImportance p=1, local) — is timed in the same interleaved
rounds (`fxopt.measure.compare_latency`), so a drift of the machine hits all alike. Prints,
per model: MACs as % of the original, the best median ms at batch 1 and 16, and each fxopt
variant's analysis seconds and conv/linear output widths.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch

import fxopt

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import bench_prune  # noqa: E402  (a sibling tool, not a package)

from fxopt.examples import zoo  # noqa: E402
from fxopt.measure import compare_latency, count_macs  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(bench_prune.CLASSIFIER))
    parser.add_argument("specs", nargs="+", help='prune options per variant, "k=v;k=v" ("" for the defaults)')
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--lower", action="store_true", help="fuse and lower every pruned model for the CPU first")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    models = {}
    for i, spec in enumerate(args.specs):
        original, pruned, seconds, _ = bench_prune.bench_fxopt(args.model, bench_prune.prune_options(args.ratio, spec))
        label = f"fxopt#{i} {spec or 'defaults'}"
        models[label] = pruned
        widths = [p.shape[0] for name, p in pruned.named_parameters() if name.endswith("weight") and p.dim() > 1]
        print(f"{label}: analysis {sum(seconds):.2f} s, widths {widths}")
    models = {"original": original, **models, "torch-pruning": bench_prune.bench_tp(args.model, args.ratio)[0]}
    inputs = {b: zoo.get(args.model, batch=b)[1] for b in (1, 16)}
    base = count_macs(original, inputs[1])
    macs = {label: count_macs(model, inputs[1]) / base for label, model in models.items()}  # before lowering
    if args.lower:  # the same deployment passes for every pruned model (lowered ops are not counted as MACs)
        example = zoo.get(args.model, batch=2)[1]
        for label in list(models)[1:]:
            captured = fxopt.capture(models[label], example)
            models[label] = fxopt.PassManager("remove-noops,fuse,lower-cpu,lower-eager").run(captured, example).module
    latency = compare_latency(models, inputs, rounds=args.rounds, repeats=args.repeats)
    print("\n| model | MACs | batch 1 ms | batch 16 ms |\n|---|---|---|---|")
    for label, model in models.items():
        lat = latency[label]
        print(f"| {label} | {100 * macs[label]:.1f}% | {lat[1]:.2f} | {lat[16]:.1f} |")


if __name__ == "__main__":
    main()
