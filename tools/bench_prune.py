"""Benchmark structured pruning (issue 4): fxopt `prune` against Torch-Pruning at the same ratio.

    python tools/bench_prune.py --ratio 0.5 [--models resnet18,mobilenet_v2,densenet,vit,bert,digits,nn_encoder,nn_seq2seq]

A model name may carry `prune` options after a colon, separated by semicolons, e.g.
``bert:exact_norms=false;max_layer_ratio=0.6``; by default the transformers run three times:
with the default options, with ``exact_norms=false`` (layer norm channels pruned like
Torch-Pruning does), and with that plus ``max_layer_ratio=0.6`` (no layer loses more than 60%);
DenseNet runs again with ``cost=latency`` (channels priced by their layers' measured time; the
timing is part of its analysis time).

For each zoo model: parameters, MACs (fxopt.measure.count_macs) and latency at batch 1 and 16
(one thread; the best median over `--rounds` interleaved rounds of fxopt.measure.compare_latency,
which times the original, the fxopt and the Torch-Pruning model in turn) before and after,
analysis time, and the same numbers for Torch-Pruning (MagnitudeImportance p=1, local, the
classifier ignored) in the same process.
fxopt runs with its default options and no `ignore`: the graph output's channels are never
pruned, which is what ignoring the classifier does in Torch-Pruning (its input columns still
follow the previous layer there; fxopt's `ignore` would also keep those at full width).
fxopt's pruned model then goes through `--tail` (default `remove-noops,lower-eager`: eval
dropout removed, an export graph's ATen calls made through the eager bindings), as a
deployment pipeline would; Torch-Pruning's model is its eager module.
For digits also accuracy before, after pruning and after `fxopt.distill`. Prints a Markdown
table. CNNs are captured symbolically, the transformers with torch.export; `nn_encoder` (torch.nn's
own `nn.TransformerEncoder`, BERT-sized) and `nn_seq2seq` (`nn.Transformer`, 2+2 layers of width
256, with cross-attention) symbolically through fxopt's traceable forwards, against
Torch-Pruning's default handling of `nn.MultiheadAttention` (it halves the embedding width).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import sys
import time
import warnings

import torch

import fxopt
from fxopt.examples import zoo
from fxopt.measure import compare_latency, count_macs, count_parameters
from fxopt.passes.prune.channel_graph import build_channel_graph
from fxopt.passes.prune.prune_pass import _prepare, plan_pruning

EXPORT = {"vit", "bert"}
#: Passes run on fxopt's pruned model before it is measured: what a deployment pipeline
#: puts after `prune` (eval dropout out; an export graph's ATen calls through eager bindings).
TAIL = "remove-noops,lower-eager"
CLASSIFIER = {"resnet18": "fc", "mobilenet_v2": "classifier", "densenet": "fc", "vit": "head",
              "bert": "classifier", "digits": "fc", "nn_encoder": "classifier", "nn_seq2seq": "generator"}


def bench_fxopt(name, options: dict, tail: str = TAIL):
    model, x2 = zoo.get(name, batch=2)
    mode = "export" if name in EXPORT else "symbolic"
    gm = fxopt.capture(model, x2, mode=mode)
    gc.collect()  # time the analysis, not the collection of the previous model's garbage
    start = time.perf_counter()
    _prepare(gm)
    cg = build_channel_graph(gm, options["exact_norms"])
    graph_s = time.perf_counter() - start
    plan = plan_pruning(gm, channel_graph=cg, example_inputs=x2, **options)
    analysis_s = (graph_s, time.perf_counter() - start - graph_s)
    pruned = plan.apply()
    if tail:  # the deployment passes that follow prune in a pipeline (not part of the analysis time)
        pruned = fxopt.PassManager(tail).run(pruned, x2).module
    return model, pruned, analysis_s, plan


def bench_tp(name, ratio):
    import torch_pruning as tp

    model, x2 = zoo.get(name, batch=2)
    model = copy.deepcopy(model)
    head = model.get_submodule(CLASSIFIER[name])
    kwargs = {}
    if name in EXPORT:
        heads = {}
        for m in model.modules():
            if hasattr(m, "heads") and hasattr(m, "query"):
                for lin in (m.query, m.key, m.value):
                    heads[lin] = m.heads
        kwargs = dict(num_heads=heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio)
    gc.collect()
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(model, x2, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=[head], **kwargs)
    graph_s = time.perf_counter() - start
    # step() = importance + selection, yielding each group to prune; the pruning itself is
    # timed apart so both columns hold the same work (fxopt's selection excludes apply too)
    start, prune_s = time.perf_counter(), 0.0
    for group in pruner.step(interactive=True):
        t = time.perf_counter()
        group.prune()
        prune_s += time.perf_counter() - t
    analysis_s = (graph_s, time.perf_counter() - start - prune_s)
    if name in EXPORT:  # keep the hand-written attention consistent with the new head count
        for m in model.modules():
            if hasattr(m, "heads") and hasattr(m, "query"):
                m.heads = m.query.out_features // m.head_dim
    for m in model.modules():  # nn.Transformer checks its inputs against d_model, which TP leaves
        if isinstance(m, torch.nn.Transformer):
            m.d_model = m.encoder.layers[0].self_attn.embed_dim
    return model, analysis_s


def size(model, inputs1):
    return dict(params=count_parameters(model), macs=count_macs(model, inputs1))


def add_latency(rows: dict, models: dict, inputs: dict, args) -> None:
    """Time the original and both pruned models in interleaved rounds (`compare_latency`)."""
    for label, lat in compare_latency(models, inputs, rounds=args.rounds, repeats=args.repeats).items():
        for key, value in lat.items():
            if isinstance(value, str):
                rows[label]["error"] = value
            else:
                rows[label][key] = value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the best median counts")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per measurement")
    parser.add_argument("--models", default="resnet18,mobilenet_v2,densenet,densenet:cost=latency,"
                                                "vit,vit:exact_norms=false,"
                                                "vit:exact_norms=false;max_layer_ratio=0.6,bert,bert:exact_norms=false,"
                                                "bert:exact_norms=false;max_layer_ratio=0.6,digits,nn_encoder,"
                                                "nn_encoder:exact_norms=false,nn_encoder:exact_norms=false;max_layer_ratio=0.6,"
                                                "nn_seq2seq,nn_seq2seq:exact_norms=false")
    parser.add_argument("--tail", default=TAIL, help="passes run after prune on fxopt's model ('' for none)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    rows = []
    for label in args.models.split(","):
        name, _, opt = label.partition(":")
        try:
            options = prune_options(args.ratio, opt)
        except fxopt.PipelineError as exc:
            parser.error(f"--models: {name}: {exc}")
        _, x1 = zoo.get(name, batch=1)
        _, x16 = zoo.get(name, batch=16)
        model, pruned, fx_s, plan = bench_fxopt(name, options, args.tail)
        base, ours = size(model, x1), size(pruned, x1)
        timed = {"base": model, "ours": pruned}
        try:
            tp_model, tp_s = bench_tp(name, args.ratio)
            theirs = size(tp_model, x1)
            theirs["s"] = tp_s
            timed["tp"] = tp_model
        except Exception as exc:  # report, do not hide
            theirs = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"}
            tp_model = None
        add_latency({"base": base, "ours": ours, "tp": theirs}, timed, {"b1": x1, "b16": x16}, args)
        row = dict(name=label.replace(":", " "), base=base, ours=ours, ours_s=fx_s, tp=theirs,
                   pinned=len(plan.channel_graph.pinned_nodes), reexp=len(plan.applied["reexpansions"]))
        if name == "digits":
            from fxopt.examples import digits

            train, _ = digits.load_digits_data()
            data = [(train.tensors[0][i:i + 64],) for i in range(0, len(train), 64)]
            row["acc"] = (digits.evaluate_accuracy(model), digits.evaluate_accuracy(pruned),
                          digits.evaluate_accuracy(fxopt.distill(pruned, model, data, epochs=5, lr=3e-3,
                                                                 progress=False)),
                          digits.evaluate_accuracy(tp_model) if tp_model is not None else float("nan"))
        rows.append(row)
        print(_row_text(row), flush=True)
    print()
    print(table(rows, args.ratio))


def prune_options(ratio: float, spec: str) -> dict:
    """`plan_pruning` keyword arguments from ``"k=v;k=v"`` (validated by the pass itself)."""
    text = f"ratio={ratio}" + "".join(f",{kv}" for kv in spec.split(";") if kv)
    (prune,) = fxopt.parse_pipeline(f"prune{{{text}}}")
    return {f.name: getattr(prune, f.name) for f in dataclasses.fields(prune)}


def _row_text(r):
    return f"{r['name']}: {r}"


def table(rows, ratio):
    lines = [f"ratio {ratio}; params/MACs as % of the original; latency in ms (median), speedup vs the "
             "original eager model.", "",
             "| model | params fxopt | params TP | MACs fxopt | MACs TP | b1 orig | b1 fxopt | b1 TP | "
             "b16 orig | b16 fxopt | b16 TP | fxopt graph + selection | TP graph + selection |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, o, t = r["base"], r["ours"], r["tp"]
        pct = lambda a, k: f"{100 * a[k] / b[k]:.1f}%" if k in a else "—"  # noqa: E731
        lat = lambda a, k: f"{a[k]:.2f} ({b[k] / a[k]:.2f}x)" if k in a else "—"  # noqa: E731
        tps = f"{t['s'][0]:.3f} + {t['s'][1]:.3f} s" if "s" in t else t.get("error", "—")
        lines.append(f"| {r['name']} | {pct(o, 'params')} | {pct(t, 'params')} | {pct(o, 'macs')} | "
                     f"{pct(t, 'macs')} | {b['b1']:.2f} | {lat(o, 'b1')} | {lat(t, 'b1')} | {b['b16']:.2f} | "
                     f"{lat(o, 'b16')} | {lat(t, 'b16')} | {r['ours_s'][0]:.3f} + {r['ours_s'][1]:.3f} s | {tps} |")
    for r in rows:
        if "acc" in r:
            a = r["acc"]
            lines += ["", f"digits accuracy: original {a[0]:.1f}%, fxopt pruned {a[1]:.1f}%, "
                          f"after fxopt.distill (5 epochs) {a[2]:.1f}%, Torch-Pruning pruned {a[3]:.1f}%"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
