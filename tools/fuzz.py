#!/usr/bin/env python3
"""Differential fuzzing campaign: random models x random pipelines, every result verified.

    python tools/fuzz.py --seconds 600 --seed 1 --save tests/fuzz/regressions

Prints graphs tried, pipelines and passes run, outcomes, failures by signature, and the
paths of shrunk reproducers (JSON cases replayed by tests/fuzz/test_regressions.py).
Exit status 1 when a failure was found.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from fxopt.fuzz import campaign

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="time budget")
    ap.add_argument("--seed", type=int, default=0, help="campaign seed (same seed, same cases)")
    ap.add_argument("--pipelines-per-graph", type=int, default=3)
    ap.add_argument("--no-every-pass", action="store_true", help="skip running each pass alone per graph")
    ap.add_argument("--save", type=Path, default=None,
                    help="directory for shrunk reproducers (e.g. tests/fuzz/regressions)")
    ap.add_argument("--shrink-seconds", type=float, default=30.0)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON here")
    args = ap.parse_args(argv)
    stats = campaign(args.seconds, args.seed, pipelines_per_graph=args.pipelines_per_graph,
                     save_dir=args.save, shrink_budget_s=args.shrink_seconds,
                     every_pass=not args.no_every_pass, log=lambda s: print(s, flush=True))
    print(stats.summary(), flush=True)
    if args.json:
        args.json.write_text(json.dumps({
            "seed": stats.seed, "seconds": stats.seconds, "graphs": stats.graphs, "pipelines": stats.pipelines,
            "passes_run": stats.passes_run, "outcomes": stats.outcomes, "signatures": stats.signatures,
            "reproducers": stats.reproducers}, indent=1))
    return 1 if stats.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
