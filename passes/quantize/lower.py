"""`lower-int8`: replace observed float patterns with int8 kernels.

Preconditions: the module went through `insert-observers` and saw calibration data
(`fxopt.calibrate`, or the composite `quantize` pass). Observers are removed here.

Backends (`backend=`):
- `x86` — torch's quantized CPU kernels with prepacked weights (fbgemm/x86 engine): int8 conv,
  conv+relu, linear, linear+relu, add, add+relu, matmul, hardswish, leaky_relu, and cat as
  `kernels.int8_cat` (bytes copied, only inputs off the output grid requantized); pass-through ops run on the
  quantized tensors directly. Fast on CPU; CPU only.
- `reference` — explicit `quantized_decomposed` quantize/dequantize around float ATen ops, weights
  stored as int8 plus per-channel scales: the numerics of int8 on any device, CUDA included.
- `cuda` — `reference`, with linear layers as int8 x int8 -> int32 matmuls (`torch._int_mm`) on
  CUDA tensors, falling back to the reference math elsewhere.

Before/after (x86) for conv -> batch_norm -> relu -> max_pool -> flatten -> linear::

    %obs_x = call_module[_fxq_obs_0](%x)             %q  = quantize_per_tensor(%x, 0.02, 64, quint8)
    %conv = conv2d(%obs_x, %w, %b)                   %c  = quantized.conv2d_relu.new(%q, %packed0, 0.03, 0)
    %bn = batch_norm(%conv, ...)           ==>       %mp = max_pool2d(%c, [2, 2])
    %relu = relu(%bn); %obs_1 = ...(%relu)           %fl = flatten(%mp, 1)
    %mp = max_pool2d(%obs_1, [2, 2]); ...            %d  = dequantize(%fl)
    %lin = linear(%fl, %w2, %b2)                     %y  = quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                                                               %d, 0.03, 0, %packed1)

A conv or linear read in float (here: by the graph output) writes float, so no output grid
clips values calibration did not see (`plan.writes_float`).

With `target_sqnr=D` the pass measures, on calibration data and with the backend's own kernels,
the output SQNR with each layer alone in int8, and keeps the most sensitive layers in float
until the whole model reaches D dB.
"""
from __future__ import annotations

import contextlib
import fnmatch
import functools
import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx

import torch.ao.quantization.fx._decomposed  # noqa: F401  registers quantized_decomposed ops
from fxopt import Pass, PassContext, PassResult
from fxopt.analysis.shapes import propagate_shapes
from fxopt.errors import PassWarning, did_you_mean, node_location, user_stacklevel
from fxopt.ir import (add_tensor_attr, clone_sharing_tensors, contiguous_outputs, delete_unused_attributes,
                      delete_unused_submodules, downstream, fresh_inputs, is_effectful, module_path, names_a_dtype,
                      op_view, origin, reads_memory_order, run_graph, same_random_draws, size_read, tensor_meta,
                      upstream, value_nbytes, written_in_place)
from fxopt.ir.rewrite import COMPUTES
from fxopt.serialize import CodedValue
from fxopt.verify import compare_outputs

from .float_output import FloatOutputConv, int8_conv_float_output
from .kernels import (depth_to_space, float_between_int8, int8_cat, int8_linear, int8_pad, int8_pixel_shuffle,
                      subpixel_weight)
from .observers import Observer, QuantizationError, quant_range, quantize_weight
from .packing import prepack_conv, prepack_linear, quantized_engine
from .plan import (AVERAGING, BATCH_NORM_KERNELS, CUT_DECIDES, SLICING, Group, Plan, activation_bounds, blocked_by,
                   build_plan, grid_source, int8_region, leaky_slope, quantized_late, shared_grids, unfolded_reason,
                   writes_float)

aten = torch.ops.aten
qops = torch.ops.quantized
dec = torch.ops.quantized_decomposed

Backend = Literal["x86", "reference", "cuda"]
AverageGrid = Literal["input", "own"]
_POOLS = frozenset({"max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool"})
#: An int8 value's grid: (scale, zero point, qmin, qmax).
Grid = tuple[float, int, int, int]


@functools.lru_cache(maxsize=1)
def cpu_has_vnni() -> bool:
    """Whether fbgemm's dense int8 kernels may take full-range (8-bit) activations here: they
    add uint8 x int8 products in int16 unless the CPU has AVX512-VNNI. torch reports only
    "AVX512", which Skylake has without VNNI, so the CPU flags are read where the OS lists them."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "avx512_vnni" in line.split() for line in f)
    except OSError:  # no cpuinfo (macOS, Windows): torch's capability, as before
        return "AVX512" in torch.backends.cpu.get_cpu_capability()


def check_target_sqnr(value: float | None) -> None:
    """A target is a signal-to-noise ratio worth asking for: a number above 0 dB (0 dB is an
    error as large as the output itself)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"option 'target_sqnr': {value!r} is not a target; give the output SQNR to reach in dB, "
                         "a number above 0 (int8 models reach 25-45), or none for every layer in int8")


@dataclass
class LowerInt8(Pass):
    """Lower an observed, calibrated module to int8 kernels (see the module docstring)."""

    name = "lower-int8"
    tolerance = "int8"
    backend: Backend = "x86"
    #: Keep the most sensitive layers float until the output SQNR (dB) reaches this; None: all int8.
    target_sqnr: float | None = None
    #: Layers (anchor node names) kept in float, e.g. `[fc,conv1]`.
    skip: tuple[str, ...] = ()
    #: Where an average pool rounds: `input`, its input's grid (an int8 pool); `own`, its own
    #: observed grid where that is twice as fine (more accurate, slower: see docs/quantization.md).
    average_grid: AverageGrid = "input"

    def __post_init__(self) -> None:
        check_target_sqnr(self.target_sqnr)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        observers = {n.name: gm.get_submodule(n.target) for n in gm.graph.nodes if _is_observer(gm, n)}
        if not observers:
            raise QuantizationError("lower-int8 found no observers: run insert-observers and calibrate "
                                    "(fxopt.calibrate) first, or use the composite 'quantize' pass")
        if all(obs.batches == 0 for obs in observers.values()):
            raise QuantizationError(_uncalibrated_message(len(observers), ctx))
        stats: dict = {}
        exclude = self.skipped_layers(gm) if self.skip else set()
        if self.target_sqnr is not None:
            exclude |= self._select_float_layers(gm, ctx, stats)
        lowered, lstats = lower_module(gm, self.backend, exclude, self.average_grid)
        stats.update(lstats)
        if ctx.example_inputs or ctx.example_kwargs:  # the int8 nodes' shapes and dtypes, for dumps and later passes
            propagate_shapes(lowered, ctx.example_inputs, ctx.example_kwargs)
        return PassResult(lowered, modified=True, stats=stats)

    def skipped_layers(self, gm: torch.fx.GraphModule) -> set[str]:
        """The anchor node names `skip` names: the module path of a layer (``encoder.fc``, as
        ``named_modules`` spells it, in both front ends: every call of a module called twice;
        a container's path, every layer inside it),
        its weight's own path (``w`` of ``F.conv2d(x, self.w)``), or a node name (as a dump
        lists it). A name that is both a path and another call's node name (a module `fc_1`
        beside the second call of `fc`, node `fc_1`, in a symbolic graph) means the path, as
        it does in an export graph. A name that is none of them would keep nothing float,
        silently: a typo."""
        groups = build_plan(strip_observers(clone_sharing_tensors(gm))[0]).groups.values()
        names: dict[str, set[str]] = {}  # module and weight paths
        nodes: dict[str, set[str]] = {}
        for g in groups:
            nodes[g.name] = {g.name}
            weight = g.view.params.get("weight") if g.view is not None else None
            # the module the call was made in first: a tied weight (an LM head sharing the
            # embedding's) names one module for two calls
            called = module_path(g.view.node) if g.view is not None else None
            # a module names the layers inside it too (``attn``: its in- and out-projections,
            # which a symbolic graph calls as ``attn`` and ``attn.out_proj``; ``encoder``)
            paths = set(_dotted_prefixes(called)) if called else set()
            if weight is not None:
                paths.add(weight.qualname)
                owner = weight.qualname.rsplit(".", 1)[0] if "." in weight.qualname else None
                if owner and (not called or owner.startswith(called + ".")):
                    # no record of the call's module, or the weight's module inside it (export
                    # records MultiheadAttention's out_proj, never called itself, as the attention)
                    paths.add(owner)
            for path in paths:
                names.setdefault(path, set()).add(g.name)
        names = {**nodes, **names}
        # a glob (``*.dwconv``) names every path or node it matches, as prune's `ignore` does
        hits = {name: names[name] if name in names else
                set().union(*(layers for path, layers in names.items() if fnmatch.fnmatchcase(path, name)))
                for name in self.skip}
        unknown = [name for name, layers in hits.items() if not layers]
        if unknown:
            raise ValueError(f"option 'skip': no quantizable layer named {', '.join(map(repr, unknown))} (a node "
                             f"name, a layer's module path or its weight's path, or a glob of them)"
                             + did_you_mean(unknown[0], set(names), limit=20))
        return set().union(*hits.values())

    # ----- mixed precision ------------------------------------------------------------------
    def _select_float_layers(self, gm, ctx: PassContext, stats: dict) -> set[str]:
        # two batches read, not every one: a DataLoader arrives streamed (`fxopt.calibration`)
        batches = list(itertools.islice(ctx.calibration or [], 2)) or [(ctx.example_inputs, ctx.example_kwargs)]
        reference = strip_observers(clone_sharing_tensors(gm))[0]
        ref_out = [_run_from_the_same_state(reference, batch) for batch in batches]
        if not any(_float_sqnrs(r, r) for r in ref_out):  # (an argmax, a mask: nothing an SQNR measures)
            warnings.warn(f"lower-int8: target_sqnr={self.target_sqnr} dB has nothing to score: the model returns "
                          "no floating output; every layer is quantized (return the logits to have them scored)",
                          PassWarning, stacklevel=user_stacklevel())
            stats["kept_float"], stats["sqnr_db"] = [], None
            return set()

        def sqnr_of(exclude: set[str]) -> float:
            candidate, _ = lower_module(gm, self.backend, exclude, self.average_grid)  # the kernels it will run
            outs = [_run_from_the_same_state(candidate, batch) for batch in batches]
            return min((db for r, c in zip(ref_out, outs) for db in _float_sqnrs(r, c)), default=math.inf)

        stripped, observers = strip_observers(clone_sharing_tensors(gm))
        plan, float_only = build_plan(stripped), nonfinite_values(observers)
        # add/cat follow the minimum cut (alone they are never int8), so only the rest are scored;
        # a layer reading or producing a value with an infinite range is float whatever happens.
        layers = [g.name for g in plan.groups.values()
                  if g.kind not in CUT_DECIDES and blocked_by(g, float_only) is None]
        all_layers = set(layers)
        sensitivity = {name: sqnr_of(all_layers - {name}) for name in layers}
        order = sorted(layers, key=lambda name: sensitivity[name])
        exclude: set[str] = set()
        current = sqnr_of(exclude)
        for name in order:
            if current >= self.target_sqnr:
                break
            exclude.add(name)
            current = sqnr_of(exclude)
        stats["sensitivity_db"] = {name: round(sensitivity[name], 2) for name in order}
        stats["kept_float"] = sorted(exclude)
        stats["sqnr_db"] = round(current, 2)
        if current < self.target_sqnr:
            warnings.warn(f"lower-int8: target_sqnr={self.target_sqnr} dB not reached "
                          f"({current:.1f} dB with every layer float)", PassWarning, stacklevel=user_stacklevel())
        return exclude


def _writes_channels_last(node: torch.fx.Node) -> bool:
    """An x86 int8 conv kernel call (`quantized.conv*`, or one writing float): oneDNN writes
    its value channels-last."""
    target = node.target
    if target is int8_conv_float_output:
        return True
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "quantized" \
        and target.overloadpacket.__name__.startswith("conv")


def _run_from_the_same_state(module: torch.fx.GraphModule, batch: tuple) -> object:
    """`module` run on copies of a calibration batch and of its buffers, drawing the same random
    numbers each time: the search runs every batch many times, and what a run wrote or drew
    reached the next (quantize tester: a model normalizing its input in place wrote into the
    user's batches, a step counter's write was refused, Monte Carlo dropout drew other masks;
    each time the all-float model scored -61 or 14 dB and nothing was quantized)."""
    args, kwargs = fresh_inputs(*batch)
    with torch.no_grad(), same_random_draws():
        return run_graph(module, args, kwargs, private_buffers=True)


def _float_sqnrs(ref: object, out: object) -> list[float]:
    """The SQNR of each floating output: an index (argmax) or a mask (`y > 0`) is no signal
    whose noise an SQNR measures (one flipped class in 170 read as 25.7 dB, and every layer was
    kept float; quantize tester); verification judges those by agreement."""
    comparisons, _ = compare_outputs(ref, out)
    return [c.sqnr_db for c in comparisons if c.dtype is None or c.dtype.is_floating_point]


def _is_observer(gm, node) -> bool:
    return node.op == "call_module" and getattr(gm.get_submodule(node.target), "is_fxopt_observer", False)


def strip_observers(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, dict[str, Observer]]:
    """Remove observer nodes from `gm` (edited in place); value name -> its observer."""
    found: dict[str, Observer] = {}
    for node in list(gm.graph.nodes):
        if _is_observer(gm, node):
            value = node.args[0]
            found[value.name] = gm.get_submodule(node.target)
            node.replace_all_uses_with(value)
            gm.graph.erase_node(node)
    delete_unused_submodules(gm)
    gm.recompile()
    return gm, found


def lowering_stats(backend: str, float_ops: dict[str, str], reduce_range) -> dict:
    """The stats of a lowering before it lowers anything (what a model with nothing to
    quantize reports as it is)."""
    return {"backend": backend, "quantized": {}, "float_ops": dict(float_ops), "int8_pass_through": 0,
            "quantize_nodes": 0, "dequantize_nodes": 0, "reduce_range": reduce_range, "narrow_values": 0,
            "shared_qparams": 0, "cat_requantized": 0}


def nonfinite_values(observers: dict[str, Observer]) -> dict[str, str]:
    """Value name -> why it stays float, for the observed values calibration saw an infinity in."""
    return {name: obs.nonfinite_reason() for name, obs in observers.items() if obs.nonfinite}


def lower_module(observed: torch.fx.GraphModule, backend: str, exclude: set[str] = frozenset(),
                 average_grid: str = "input"):
    """A lowered copy of `observed` (which is left as it is) and the stats of the lowering."""
    if backend not in ("x86", "reference", "cuda"):
        raise QuantizationError(f"lower-int8 option 'backend': unknown '{backend}'; valid: x86, reference, cuda")
    gm, observers = strip_observers(clone_sharing_tensors(observed))
    lowering = _Lowering(gm, observers, backend, set(exclude), average_grid)
    return lowering.run(), lowering.stats


class _Lowering:
    def __init__(self, gm, observers: dict[str, Observer], backend: str, exclude: set[str],
                 average_grid: str = "input"):
        self.gm, self.graph, self.observers = gm, gm.graph, observers
        self.backend, self.exclude, self.average_grid = backend, exclude, average_grid
        self.plan: Plan = build_plan(gm)
        any_obs = next(iter(observers.values()))
        self.reduce_range = any_obs.reduce_range
        self.narrow: set[str] = set()  # values on the 7-bit grid (see _kernel_inputs)
        self.shared: dict[str, str] = {}  # value -> the cat whose grid it takes (plan.shared_grids)
        self.cat_grids: dict[str, Grid] = {}  # int8 cat output -> its output grid (_cat_grid)
        self.q_of: dict[torch.fx.Node, torch.fx.Node] = {}      # dq node -> quantized node (x86)
        self.grid_of: dict[torch.fx.Node, Grid] = {}  # int8 value -> its grid
        self.boundary: dict[torch.fx.Node, torch.fx.Node] = {}  # float value -> its int8 version
        # a layer's float output (`plan.writes_float`) -> the name its observer has: int8 readers
        # of it quantize it onto that grid
        self.observed_as: dict[torch.fx.Node, str] = {}
        self.packed_cache: dict[tuple, str | None] = {}  # holder attribute; None: no engine computes it right
        # Values with no int8 grid (calibration saw +-inf in them, e.g. an attention mask):
        # they, and the ops that would read them quantized, stay float.
        self.float_only = nonfinite_values(observers)
        self.stats = lowering_stats(backend, {**self.plan.unsupported, **self.float_only}, self.reduce_range)

    # ----- driver ---------------------------------------------------------------------------
    def run(self) -> torch.fx.GraphModule:
        enabled = set()
        for out, group in self.plan.groups.items():
            if group.name in self.exclude:
                self.stats["float_ops"][group.name] = f"{group.kind}: kept float (skip/target_sqnr)"
            elif out not in self.observers:
                self.stats["float_ops"][group.name] = f"{group.kind}: output was not observed"
            elif (blocked := blocked_by(group, self.float_only)) is not None:
                self.stats["float_ops"][group.name] = (
                    f"{group.kind}: {'its output' if blocked == out else f'input {blocked!r}'} "
                    f"{self.float_only[blocked]}")
            else:
                enabled.add(out)
        region = quantized_late(self.gm, self.plan, int8_region(self.gm, self.plan, enabled, set(self.float_only)),
                                set(self.observers))
        self.region = region
        for out in sorted(enabled - region):  # an add/cat/batchnorm the cut left float (CUT_DECIDES)
            group = self.plan.groups[out]
            why = "int8 would cost more conversions than it saves"
            if group.kind == "batch_norm":
                if group.view.input.name not in region:
                    why = f"its input '{group.view.input.name}' is a float value (an int8 batchnorm reads int8 ones)"
                why = f"{unfolded_reason(self.gm, group.view)}; kept float: {why}"
            else:
                why = f"kept float: {why}"
            self.stats["float_ops"][group.name] = f"{group.kind}: {why}"
        self.shared = shared_grids(self.gm, self.plan, region)
        self.stats["shared_qparams"] = len(self.shared)
        if self.reduce_range:
            self.narrow = self._kernel_inputs(enabled, region)
            self.stats["narrow_values"] = len(self.narrow)
        for out, group in self.plan.groups.items():  # on the untouched graph: it walks the inputs
            if group.kind == "cat" and out in region:
                self._cat_grid(out)
        # the user's global engine is theirs: packs carry the engine they were made with
        engine = quantized_engine("x86") if self.backend == "x86" else contextlib.nullcontext()
        with warnings.catch_warnings(), engine:
            warnings.simplefilter("ignore")
            for node in list(self.graph.nodes):
                if node.name not in region:
                    continue
                group = self.plan.groups.get(node.name)
                if group is not None:
                    self._lower_group(group)
                else:
                    self._lower_pass_through(node)
        for message in self.stats.get("float_kernels", {}).values():
            warnings.warn(f"lower-int8: {message}", PassWarning, stacklevel=user_stacklevel())
        # What the rewrites left unread: q/dq pairs, weights, a linear's transposed weight.
        for node in reversed(list(self.graph.nodes)):
            if node.op in ("get_attr", "call_function", "call_method") and not node.users \
                    and not is_effectful(node):
                self.graph.erase_node(node)
        delete_unused_attributes(self.gm)
        if self.backend == "x86":  # its convs run channels-last: hand the caller the usual layout
            self._row_major_for_memory_order_readers(self._views_downstream_as_reshapes())
            contiguous_outputs(self.gm, among=self._downstream_of_float_output_convs())
        self.graph.lint()
        self.gm.recompile()
        self.stats["quantize_nodes"] = sum(_is_quantize(n) for n in self.graph.nodes)
        self.stats["dequantize_nodes"] = sum(_is_dequantize(n) for n in self.graph.nodes)
        return self.gm

    def _views_downstream_as_reshapes(self) -> None:
        """`_view_as_reshape` for every view computed from an int8 value, float ones included: a
        squeeze or select of a channels-last kernel output, dequantized, keeps its strides
        (``conv(x).squeeze(-1).view(n, -1)`` failed). A view written through stays a view."""
        stack = [n for n in self.graph.nodes
                 if n.name in self.region or _is_dequantize(n) or n.target is int8_conv_float_output]
        written = written_in_place(self.gm)  # a write into the value, or through any view of it
        seen: set[torch.fx.Node] = set()
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if node.name not in written and not any(u.op != "output" and is_effectful(u) for u in node.users):
                _view_as_reshape(node)
            elif _is_view_call(node):  # a view written through: every reader of its input reads one
                self._contiguous_for_all_readers(node.args[0])  # row-major copy, so the view stays one
            stack.extend(node.users)
        return seen

    def _row_major_for_memory_order_readers(self, downstream: set[torch.fx.Node]) -> None:
        """Eager's layouts for each op of `downstream` whose result depends on its input's
        memory order (`reads_memory_order`): the conv kernels it is computed from hand their
        values on row-major, so every op between sees what it saw in eager. Monte Carlo dropout
        after an int8 conv masked other elements of its channels-last value than eager's
        (verification FAILed at 11 dB), also behind a view (a ViT's patch embedding: 9.8 dB;
        adversary), which a row-major copy of the dropout's own input does not undo."""
        def between(value: torch.fx.Node) -> bool:  # an op between the kernels and the reader
            return value in downstream and not _writes_channels_last(value)

        for node in list(self.graph.nodes):
            if node not in downstream or not reads_memory_order(node):
                continue
            for producer in upstream(node.all_input_nodes, through=between):
                if producer in downstream and _writes_channels_last(producer):
                    self._contiguous_for_all_readers(producer)

    def _downstream_of_float_output_convs(self) -> set[torch.fx.Node]:
        """The values computed from an `int8_conv_float_output`: oneDNN writes conv1d and conv3d
        outputs channels-last too, a layout `contiguous_outputs` fixes at rank 4 only."""
        return downstream(n for n in self.graph.nodes if n.target is int8_conv_float_output)

    def _contiguous_for_all_readers(self, value: torch.fx.Node) -> None:
        if value.op == "call_method" and value.target == "contiguous":
            return
        with self.graph.inserting_after(value):
            copy = self.graph.call_method("contiguous", (value,))
        value.replace_all_uses_with(copy, delete_user_cb=lambda u: u is not copy)

    def _kernel_inputs(self, enabled: set[str], region: set[str]) -> set[str]:
        """Names of the values an int8 conv/linear kernel reads, directly or through pass-through ops.

        Without VNNI, fbgemm multiplies uint8 activations by int8 weights in pairs summed into
        int16 (vpmaddubsw), which saturates unless activations stay below 128: those values
        need the 7-bit grid. Every other int8 value (add, cat, matmul, graph outputs) keeps
        all 8 bits; torch.ao narrows every activation, losing a bit where no kernel needs it.
        """
        narrow: set[str] = set()
        stack = [i for out in enabled if self.plan.groups[out].kind in ("conv", "linear")
                 for i in op_view(self.gm, self.plan.groups[out].anchor).inputs]
        while stack:
            value = stack.pop()
            if value.name in narrow:
                continue
            narrow.add(value.name)
            if value.name in self.plan.pass_through and value.name in region:
                stack.append(op_view(self.gm, value).input)  # it runs on its input's grid
        return narrow

    # ----- values ---------------------------------------------------------------------------
    def _observed_grid(self, name: str) -> Grid:
        """The grid of the observed value called `name`: 7-bit if a kernel needs it, else 8-bit;
        a cat's input takes its cat's grid (`shared_grids`)."""
        while name in self.shared:
            name = self.shared[name]
        if name in self.cat_grids:
            return self.cat_grids[name]
        narrow = name in self.narrow
        return (*self.observers[name].qparams(narrow), *quant_range(narrow))

    def _cat_grid(self, out: str) -> Grid:
        """The output grid of the int8 cat `out`: its observer's, or the grid of an input that
        keeps its own (something else reads it) when that costs less error.

        Inputs on the output grid are copied byte for byte (`kernels.int8_cat`); any other is
        requantized, a second rounding and most of the cat's time. The inputs `shared_grids`
        gave the cat are written on whatever grid it has; an input read elsewhere has its own.
        Each candidate is scored on the cat's calibration values (`Observer.grid_error`, mean
        squared error E): the observer's grid C adds E_C to every element (the inputs written
        on it round once onto it; the others round a second time), an input's grid G adds E_G
        to the elements not already on G only. The smaller wins, G on a tie (no requantization):
        DenseNet-style cats of relu features whose widest input covers the rest take its grid;
        a U-Net's skip (relu, >= 0) concatenated with the up-sampled path (signed) cannot hold
        the negative values, so the cat keeps its grid and requantizes the skip alone.
        """
        if out in self.cat_grids:
            return self.cat_grids[out]
        narrow = out in self.narrow
        observer = self.observers[out]
        own: Grid = (*observer.qparams(narrow), *quant_range(narrow))
        fixed: dict[Grid, int] = {}
        total = 0
        for value in self.plan.groups[out].inputs:  # cat([x, x]) counts x twice
            size = max(value_nbytes(value), 1)
            total += size
            name = grid_source(self.gm, self.plan, self.region, value).name
            root = name
            while root in self.shared and root != out:
                root = self.shared[root]
            if root == out or name not in self.observers:
                continue  # written on the cat's grid, whichever it is
            grid = self._observed_grid(name)
            if grid[2:] == own[2:]:  # bytes of a wider 0..255 grid may not go on a 7-bit one
                fixed[grid] = fixed.get(grid, 0) + size
        best, best_error = own, observer.grid_error(*own)
        for grid, size in sorted(fixed.items(), key=lambda item: -item[1]):
            error = observer.grid_error(*grid) * (1 - size / total)
            if error < best_error or (best is own and error <= best_error):
                best, best_error = grid, error
        self.cat_grids[out] = best
        return best

    def _grid_of_float(self, value: torch.fx.Node, user: torch.fx.Node) -> Grid:
        name = self.observed_as.get(value, value.name)
        if name not in self.observers and name not in self.shared:
            raise QuantizationError(f"no observer on {node_location(value)}, which feeds int8 "
                                    f"{node_location(user)}; re-run insert-observers")
        return self._observed_grid(name)

    def _int8_input(self, value: torch.fx.Node, user: torch.fx.Node) -> torch.fx.Node:
        """What an int8 op reads for `value`: x86 a quantized tensor, else the grid float value."""
        if value in self.q_of:
            return self.q_of[value] if self.backend == "x86" else value
        if value not in self.boundary:
            grid = self._grid_of_float(value, user)
            if self.backend == "x86":
                with self.graph.inserting_after(value):
                    new = self.graph.call_function(aten.quantize_per_tensor.default,
                                                   (value, *grid[:2], torch.quint8))
            else:
                _, new = self._reference_qdq(value, grid)
            new.meta[COMPUTES] = origin(value)
            if self.backend != "x86":
                self.grid_of[new] = grid
            self.boundary[value] = new
        return self.boundary[value]

    def _reference_qdq(self, value: torch.fx.Node, grid: Grid) -> tuple[torch.fx.Node, torch.fx.Node]:
        """(q, dq): `value` rounded onto `grid` by an explicit quantize/dequantize pair after it."""
        scale, zp, qmin, qmax = grid
        with self.graph.inserting_after(value):
            q = self.graph.call_function(dec.quantize_per_tensor.default, (value, scale, zp, qmin, qmax, torch.uint8))
        with self.graph.inserting_after(q):
            dq = self.graph.call_function(dec.dequantize_per_tensor.default, (q, scale, zp, qmin, qmax, torch.uint8))
        return q, dq

    def _publish(self, old: torch.fx.Node, result: torch.fx.Node, grid: Grid) -> torch.fx.Node:
        """Make `result` (x86: quantized; else float) the value of `old` for every user."""
        if self.backend == "x86":
            with self.graph.inserting_after(result):
                dq = self.graph.call_function(aten.dequantize.self, (result,))
        else:
            result, dq = self._reference_qdq(result, grid)
        _take_value_meta(old, dq)
        if old is not result:
            old.replace_all_uses_with(dq, delete_user_cb=lambda u: u is not result and u is not dq)
        else:
            old.replace_all_uses_with(dq, delete_user_cb=lambda u: u is not dq)
        if self.backend == "x86":  # a quantized tensor has the sizes and rank of its float value
            for reader in [u for u in dq.users if _reads_shape_of(u, dq)]:
                reader.replace_input_with(dq, result)  # x[:, :, :x.size(2) - 1]: no dequantize for it
        self.q_of[dq] = result
        self.grid_of[dq] = grid
        return dq

    # ----- groups ---------------------------------------------------------------------------
    def _lower_group(self, group: Group) -> None:
        out = group.output
        grid = self._observed_grid(out.name)
        qparams = grid[:2]
        view = op_view(self.gm, group.anchor)
        inputs = [self._int8_input(i, group.anchor) for i in view.inputs]
        if writes_float(self.plan, self.region, out):
            with self.graph.inserting_before(out):
                result = self._weighted(group, view, inputs, grid, float_output=True)
            self._publish_float(group, result)
            return
        with self.graph.inserting_before(out):
            if group.kind in ("conv", "linear"):
                result = self._weighted(group, view, inputs, grid)
            elif group.kind == "add":
                result = self._unweighted(group, inputs, qparams, qops.add_relu.default if group.act is not None
                                      else qops.add.default, aten.add.Tensor)
            elif group.kind == "matmul":
                result = self._unweighted(group, inputs, qparams, qops.matmul.default, aten.matmul.default)
            elif group.kind == "hardswish":
                result = self._unweighted(group, inputs[:1], qparams, qops.hardswish.default, aten.hardswish.default)
            elif group.kind == "leaky_relu":  # onto its own grid (an in-place one writes a new tensor too)
                slope = leaky_slope(view)
                result = self.graph.call_function(qops.leaky_relu.default, (inputs[0], slope, False, *qparams)) \
                    if self.backend == "x86" else self.graph.call_function(aten.leaky_relu.default, (inputs[0], slope))
            elif group.kind == "batch_norm":
                result = self._batch_norm(group, view, inputs[0], qparams)
            else:  # cat
                dim = view.attrs.get("dim", 0)
                self.stats["cat_requantized"] += sum(
                    (self.grid_of.get(v) or self._grid_of_float(v, group.anchor)) != grid for v in view.inputs)
                if self.backend == "x86":
                    result = self.graph.call_function(int8_cat, (inputs, dim, *grid))
                else:
                    result = self.graph.call_function(aten.cat.default, (inputs, dim))
        for piece in group.views:  # relu(x[..., :-2]) computed as relu(x)[..., :-2]
            source = op_view(self.gm, piece).input
            with self.graph.inserting_before(out):
                result = self.graph.create_node(
                    piece.op, piece.target, *torch.fx.map_arg((piece.args, piece.kwargs),
                                                             lambda n, s=source, r=result: r if n is s else n))
        if self.backend == "x86" and group.kind == "conv" and view.attrs["dim"] == 1 \
                and not self._feeds_int8_convs_only(out):
            # int8 conv1d runs as a channels-last conv2d and returns its output squeezed:
            # strides (C*L, 1, C) that no memory format names, so the quantized add and relu
            # that read it take a strided path 10-20x slower (280 vs 14 us at 8x32x128). An
            # int8 conv reading it needs no copy: it lays its input out channels-last itself;
            # nor does a pool, which is 15x slower on the copy (337 vs 20 us on an audio CNN).
            with self.graph.inserting_before(out):
                result = self.graph.call_function(aten.contiguous.default, (result,))
        result.meta[COMPUTES] = origin(out)
        self._publish(out, result, grid)
        self._retire(group)

    def _retire(self, group: Group) -> None:
        """Erase the group's float nodes nothing reads now, and count it as quantized."""
        for node in reversed(group.nodes):
            if not node.users:
                self.graph.erase_node(node)
        counts = self.stats["quantized"]
        label = group.kind + ("+bn" if group.bn is not None else "") + ("+act" if group.act is not None else "")
        counts[label] = counts.get(label, 0) + 1

    def _publish_float(self, group: Group, result: torch.fx.Node) -> None:
        _take_value_meta(group.output, result)
        self.observed_as[result] = group.output.name
        group.output.replace_all_uses_with(result)
        self._retire(group)
        self.stats["float_outputs"] = self.stats.get("float_outputs", 0) + 1

    def _feeds_int8_convs_only(self, value: torch.fx.Node) -> bool:
        """Whether every reader of `value` is an int8 conv, directly or through int8 slicing and
        pooling (a conv1d's strides suit those; see `_lower_group`)."""
        for user in value.users:
            group = self.plan.member_of.get(user.name)
            if group is not None and group.kind == "conv" and group.anchor is user:
                if group.output.name not in self.region:
                    return False
            elif not (user.name in self.region and user.name in self.plan.pass_through
                      and op_view(self.gm, user).kind in SLICING | _POOLS and self._feeds_int8_convs_only(user)):
                return False
        return True

    def _unweighted(self, group, inputs, qparams, x86_op, float_op):
        """An int8 op without weights (add, matmul, hardswish): x86's kernel onto the output
        grid, or the float op the reference backend rounds afterwards."""
        bounds = activation_bounds(op_view(self.gm, group.act)) if group.act is not None else None
        if self.backend == "x86":
            args = list(inputs)
            if group.kind == "matmul":
                args = [self.graph.call_function(aten.contiguous.default, (a,)) for a in args]
            y = self.graph.call_function(x86_op, (*args, *qparams))
            # add + relu6: the kernel's relu, on relu6's grid (`_follower_ok`: bounds from 0)
            return self._clamp_int8_output(y, bounds, qparams, relu=True) if bounds is not None else y
        return self._float_activation(self.graph.call_function(float_op, tuple(inputs)), bounds)

    def _batch_norm(self, group: Group, view, x: torch.fx.Node, qparams: tuple) -> torch.fx.Node:
        """A batchnorm (and relu) no layer precedes: x86's quantized.batch_norm{1,2,3}d(_relu)
        onto the output grid, or the float batchnorm the reference backend rounds afterwards.
        The kernel reads its own copies of the statistics and affine (as a folded weight is)."""
        bounds = activation_bounds(op_view(self.gm, group.act)) if group.act is not None else None
        mean, weight, bias = view.param("running_mean"), view.param("weight"), view.param("bias")
        # x86's kernel wants an affine: a batchnorm without one scales by 1 and shifts by 0
        stored = {"weight": weight if weight is not None else torch.ones_like(mean),
                  "bias": bias if bias is not None else torch.zeros_like(mean),
                  "running_mean": mean, "running_var": view.param("running_var")}
        tensors = [self.graph.get_attr(add_tensor_attr(self.gm, f"{group.name}_{name}", value.detach().float(),
                                                       parameter=False)) for name, value in stored.items()]
        eps = float(view.attrs.get("eps", 1e-5))
        if self.backend == "x86":
            kernel = BATCH_NORM_KERNELS[len(tensor_meta(group.anchor)[0])] + ("_relu" if bounds is not None else "")
            y = self.graph.call_function(getattr(qops, kernel).default, (x, *tensors, eps, *qparams))
            return self._clamp_int8_output(y, bounds, qparams, relu=True) if bounds is not None else y
        y = self.graph.call_function(aten.batch_norm.default, (x, *tensors, False, 0.0, eps, False))
        return self._float_activation(y, bounds)

    def _weighted(self, group: Group, view, inputs, grid: Grid, float_output: bool = False) -> torch.fx.Node:
        """The int8 layer; with `float_output` its value in float, not on `grid` (`plan.writes_float`)."""
        qparams = grid[:2]
        weight, bias = _folded_weights(self.gm, group, view)
        act = op_view(self.gm, group.act) if group.act is not None else None
        # (lo, hi) of the relu/hardtanh/clamp (None: unbounded); the kernel's relu clamps at 0
        bounds = activation_bounds(act) if act is not None else None
        relu = bounds is not None and bounds[0] == 0.0
        x = inputs[0]
        padding = view.attrs.get("padding")
        mode = view.attrs.get("padding_mode", "zeros")
        if mode != "zeros":  # Conv2d(padding_mode='reflect'): the pad on int8, then an unpadded conv
            pads = [p for p in reversed(padding) for _ in range(2)]
            pad_fn = int8_pad if self.backend == "x86" else aten.pad.default
            x = self.graph.call_function(pad_fn, (x, pads, mode))
            padding = (0,) * len(padding)
        # A prepacked weight bakes in the bias and the conv geometry: share it only between
        # sites that agree on all of them (a tied weight may meet different biases).
        bias_ref = view.params.get("bias")
        key = (group.kind, id(view.params["weight"].get()), id(group.bn) if group.bn is not None else None,
               id(bias_ref.get()) if bias_ref is not None else None,
               tuple(sorted((k, repr(v)) for k, v in view.attrs.items())))
        geometry = dict(stride=view.attrs.get("stride"), padding=padding, dilation=view.attrs.get("dilation"),
                        groups=view.attrs.get("groups"))
        taps = None
        if group.kind == "conv" and view.attrs.get("transposed"):
            # stride == kernel, no padding (plan.transposed_reason): a 1x1 conv to one channel per
            # kernel tap and output channel, interleaved by depth_to_space
            taps = list(weight.shape[2:])
            weight, bias = subpixel_weight(weight, bias)
            ones = [1] * len(taps)
            geometry = dict(stride=ones, padding=[0] * len(taps), dilation=ones, groups=1)
        qw = quantize_weight(weight)
        if self.backend == "x86":
            if float_output and group.kind == "conv":
                return self._conv_float_output(group, key, x, qw, bias, geometry, bounds, taps)
            if key not in self.packed_cache:  # pack (and check) once per weight, bias and geometry
                prepacked, name = self._prepack(group, qw, bias, geometry), None
                if prepacked is not None:  # held so that copies and pickles keep its engine (CodedValue)
                    holder = _fresh_attr(self.gm, f"{group.name}_packed")
                    self.gm.add_submodule(holder, CodedValue(prepacked))
                    name = f"{holder}.value"
                self.packed_cache[key] = name
            name = self.packed_cache[key]
            if float_output:
                if name is None:
                    y = self._float_between_int8(group, x, qw, bias, False, geometry, (None, None))
                else:  # fbgemm quantizes its float input onto the grid itself: the values on it
                    y = self.graph.call_function(qops.linear_with_input_q_dq_qweight_dq_output_fp32.default,
                                                 (*self._float_and_grid(x), self.graph.get_attr(name)))
                return self._float_activation(y, bounds)
            if name is None:
                y = self._float_between_int8(group, x, qw, bias, relu, geometry, qparams)
            else:
                kernel = self._x86_kernel(group, view, relu)
                y = self.graph.call_function(kernel, (x, self.graph.get_attr(name), *qparams))
            if taps is not None:
                y = self.graph.call_function(depth_to_space, (y, taps))
            if bounds is not None:
                y = self._clamp_int8_output(y, bounds, qparams, relu)
            return y
        w_int = add_tensor_attr(self.gm, f"{group.name}_weight_int8", qw.int_repr(), parameter=False)
        w_scale = add_tensor_attr(self.gm, f"{group.name}_weight_scale",
                                  qw.q_per_channel_scales().float(), parameter=False)
        b = add_tensor_attr(self.gm, f"{group.name}_bias", bias, parameter=False) if bias is not None else None
        w_node = self.graph.get_attr(w_int)
        s_node = self.graph.get_attr(w_scale)
        b_node = self.graph.get_attr(b) if b is not None else None
        if group.kind == "linear" and self.backend == "cuda":
            y = self.graph.call_function(int8_linear, (x, w_node, s_node, b_node, *self.grid_of[x]))
        else:
            zps = add_tensor_attr(self.gm, f"{group.name}_weight_zp",
                                  torch.zeros(qw.shape[0], dtype=torch.int64), parameter=False)
            w = self.graph.call_function(dec.dequantize_per_channel.default,
                                         (w_node, s_node, self.graph.get_attr(zps), 0, -128, 127, torch.int8))
            if group.kind == "linear":
                y = self.graph.call_function(aten.linear.default, (x, w, b_node))
            else:
                g = geometry
                op = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}[view.attrs["dim"]]
                y = self.graph.call_function(op, (x, w, b_node, list(g["stride"]), list(g["padding"]),
                                                  list(g["dilation"]), g["groups"]))
                if taps is not None:
                    y = self.graph.call_function(depth_to_space, (y, taps))
        return self._float_activation(y, bounds)

    def _clamp_int8_output(self, y: torch.fx.Node, bounds: tuple, qparams: tuple, relu: bool) -> torch.fx.Node:
        """x86: a group's activation `bounds` on the int8 kernel output `y` (`relu`: the kernel
        applied the lower bound, 0). The output grid is the activation's (its observer saw the
        clamped values): the kernel's rounding saturates at the grid's ends, and a bound inside
        the grid is one clamp on the int8 output (hardtanh(-0.5, 0.5) on a wide conv output gets
        all 256 levels inside [-0.5, 0.5], not the few the conv's own grid had there)."""
        lo, hi = bounds
        scale, zero_point = qparams
        # the bytes the kernel saturates at are quint8's whole range, whatever a 7-bit grid's
        # qmax says: relu6 on a 7-bit grid let values to 12 through (adversary)
        qmin, qmax = quant_range(False)
        lo = lo if lo is not None and not relu and (qmin - zero_point) * scale < lo else None
        hi = hi if hi is not None and (qmax - zero_point) * scale > hi else None
        if relu and hi is not None:
            return self.graph.call_function(aten.hardtanh.default, (y, 0.0, hi))
        if lo is not None or hi is not None:
            return self.graph.call_function(aten.clamp.default, (y, lo, hi))
        return y

    def _conv_float_output(self, group, key, x, qw, bias, geometry: dict, bounds, taps) -> torch.fx.Node:
        """x86: the int8 conv that writes float32 (`float_output.int8_conv_float_output`), its
        relu fused, any other activation after it."""
        if ("float output", key) not in self.packed_cache:
            holder = _fresh_attr(self.gm, f"{group.name}_float_out")
            conv = FloatOutputConv.pack(qw.int_repr(), qw.q_per_channel_scales(), bias, narrow=self.reduce_range,
                                        **geometry)
            self.gm.add_submodule(holder, CodedValue(conv))
            # the holder, not its value: a re-trace (torch.save re-traces the code) keeps a
            # module as a get_attr, and would spell the value out field by field
            self.packed_cache[("float output", key)] = holder
        relu = bounds == (0.0, None)
        y = self.graph.call_function(int8_conv_float_output,
                                     (x, self.graph.get_attr(self.packed_cache[("float output", key)]), relu))
        if taps is not None:
            y = self.graph.call_function(depth_to_space, (y, taps))
        return y if relu else self._float_activation(y, bounds)

    def _float_activation(self, y: torch.fx.Node, bounds: tuple | None) -> torch.fx.Node:
        """relu / relu6 / clamp `bounds` (`activation_bounds`) on a float layer output."""
        if bounds == (0.0, None):
            return self.graph.call_function(aten.relu.default, (y,))
        if bounds is not None and bounds[0] == 0.0:
            return self.graph.call_function(aten.hardtanh.default, (y, 0.0, bounds[1]))
        if bounds is not None:
            return self.graph.call_function(aten.clamp.default, (y, *bounds))
        return y

    def _float_and_grid(self, q: torch.fx.Node) -> tuple[torch.fx.Node, float, int]:
        """(float value, scale, zero point) of the x86 int8 value `q`, for a kernel that rounds
        its float input onto the grid itself: an int8 op's output is the dequantize `_publish`
        made for it; a boundary `quantize_per_tensor(value, scale, zp, quint8)` is its float
        value, which the kernel rounds and clamps to [0, 255] exactly as that quantize does."""
        dq = next((d for d, qq in self.q_of.items() if qq is q), None)
        if dq is not None:
            return dq, *self.grid_of[dq][:2]
        value, scale, zero_point = q.args[:3]
        return value, scale, zero_point

    def _float_between_int8(self, group, x, qw, bias, relu: bool, geometry: dict, qparams) -> torch.fx.Node:
        """The layer no engine's int8 kernel computes right here (`packing.computes_right`):
        float between its int8 input and output, with the int8 weight's values (warned after
        the lowering loop, which silences torch's warnings)."""
        message = (f"no int8 kernel on this CPU computes {group.kind} '{group.name}' right (every engine was "
                   f"checked); it runs in float between its int8 input and output")
        self.stats.setdefault("float_kernels", {})[group.name] = message
        w = self.graph.get_attr(add_tensor_attr(self.gm, f"{group.name}_weight", qw.dequantize(), parameter=False))
        b = self.graph.get_attr(add_tensor_attr(self.gm, f"{group.name}_bias", bias, parameter=False)) \
            if bias is not None else None
        shape = () if group.kind == "linear" else (list(geometry["stride"]), list(geometry["padding"]),
                                                   list(geometry["dilation"]), geometry["groups"])
        return self.graph.call_function(float_between_int8, (x, w, b, *qparams, relu, *shape))

    def _prepack(self, group, qw, bias, geometry: dict):
        """The x86 packed weight (None where no engine computes the layer right)."""
        if group.kind == "linear":
            return prepack_linear(qw, bias, narrow=self.reduce_range)
        g = geometry
        return prepack_conv(qw, bias, g["stride"], g["padding"], g["dilation"], g["groups"], narrow=self.reduce_range)

    @staticmethod
    def _x86_kernel(group, view, relu: bool):
        if group.kind == "linear":
            return qops.linear_relu.default if relu else qops.linear.default
        fused, plain = {1: (qops.conv1d_relu.default, qops.conv1d.default), 2: (qops.conv2d_relu.new, qops.conv2d.new),
                        3: (qops.conv3d_relu.new, qops.conv3d.new)}[view.attrs["dim"]]
        return fused if relu else plain

    # ----- pass-through ---------------------------------------------------------------------
    def _lower_pass_through(self, node: torch.fx.Node) -> None:
        view = op_view(self.gm, node)
        src = view.input
        new_input = self._int8_input(src, node)
        grid = self.grid_of.get(new_input) or self.grid_of.get(src) or self._grid_of_float(src, node)
        if view.kind in AVERAGING and self.average_grid == "own" \
                and (finer := self._finer_average_grid(node, grid)) is not None:
            return self._in_float_on_own_grid(node, src, new_input, finer, "averaged_in_float")
        if view.kind in ("hardtanh", "clamp") \
                and (finer := self._own_finer_grid(node, grid, _FINER_CLAMP)) is not None:
            # clamp(0, 0.3) on an add's grid kept a handful of levels (33.7 dB, PT2E 39.2;
            # adversary): where its own grid is much finer, it is worth the conversions
            return self._in_float_on_own_grid(node, src, new_input, finer, "clamped_in_float")
        if new_input is not src:
            _view_as_reshape(node)
        if self.backend == "x86":
            node.replace_input_with(src, new_input)
            if view.kind == "pad":  # torch's quantized pad copies element by element: pad the bytes
                node.op, node.target = "call_function", int8_pad  # (an nn.*PadNd module call too)
                node.args, node.kwargs = (new_input, list(view.attrs["pad"]), view.attrs.get("mode", "constant")), {}
            elif view.kind in ("pixel_shuffle", "pixel_unshuffle"):  # moves the bytes, channels-last kept
                factor = view.attrs["upscale_factor" if view.kind == "pixel_shuffle" else "downscale_factor"]
                node.op, node.target = "call_function", int8_pixel_shuffle
                node.args, node.kwargs = (new_input, factor), {"inverse": view.kind == "pixel_unshuffle"}
            elif view.kind == "clamp":  # quantized tensors have clamp, not clamp_min / clamp_max (adversary)
                node.op, node.target = "call_function", aten.clamp.default
                node.args, node.kwargs = (new_input, *activation_bounds(view)), {}
            self._publish(node, node, grid)
        else:
            if new_input is not src:
                node.replace_input_with(src, new_input)
            if view.kind in AVERAGING:
                self._publish(node, node, grid)  # the int8 kernel rounds to the input's grid
            else:
                self.grid_of[node] = grid
                self.q_of[node] = node
        self.stats["int8_pass_through"] += 1


    def _finer_average_grid(self, node: torch.fx.Node, grid: Grid) -> Grid | None:
        """The observed grid of an averaging pool's output where it is at least twice as fine
        as its input's (`_own_finer_grid`): an average spans less than its inputs (a 3x3 blur of
        noise a third), and an int8 kernel writes it on the input grid, a rounding as coarse as
        the input's after the average shrank the rest of the error (5-8 dB behind PT2E, quantize
        tester)."""
        meta = tensor_meta(node)
        windowed_3d = meta is not None and len(meta[0]) > 4 and any(size != 1 for size in meta[0][2:])
        if windowed_3d:
            return None  # aten's float 3-D pools are 2-5x slower than the int8 one (adversary): too
            # much for the bit. A global 3-D average is a mean, as fast in float (15.2 us int8,
            # 13.7 float on a video head) and 12 dB ahead of its input's grid (quantize tester)
        return self._own_finer_grid(node, grid, _FINER)

    def _own_finer_grid(self, node: torch.fx.Node, grid: Grid, factor: float) -> Grid | None:
        """The observed grid of a pass-through op's output where it is at least `factor` times
        as fine as its input's `grid`, else None. Not before an int8 cat: a cat rounds its
        inputs onto its own grid anyway (twice is worse)."""
        into_cat = any((g := self.plan.member_of.get(u.name)) is not None and g.kind == "cat" for u in node.users)
        if node.name not in self.observers or into_cat:
            return None
        finer = self._observed_grid(node.name)
        return finer if finer[0] <= grid[0] / factor else None

    def _in_float_on_own_grid(self, node: torch.fx.Node, src: torch.fx.Node, new_input: torch.fx.Node,
                              grid: Grid, stat: str) -> None:
        """The op on the dequantized input, rounded once onto its own output `grid`."""
        if self.backend == "x86":
            with self.graph.inserting_before(node):
                values = self.graph.call_function(aten.dequantize.self, (new_input,))
            node.replace_input_with(src, values)
            with self.graph.inserting_after(node):
                result = self.graph.call_function(aten.quantize_per_tensor.default,
                                                  (node, *grid[:2], torch.quint8))
            self._publish(node, result, grid)
        else:
            node.replace_input_with(src, new_input)
            self._publish(node, node, grid)
        self.stats[stat] = self.stats.get(stat, 0) + 1


def _dotted_prefixes(path: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


#: How much finer (scale ratio) an average's own grid must be than its input's to be worth the
#: float pool's two conversions: one bit, a quarter of the output rounding's error.
_FINER = 2.0
#: The same for a clamp from 0 (relu6, ``clamp(0, hi)``), whose output the input's grid holds
#: exactly but for the levels it keeps: a second rounding costs more there. Measured on a pool
#: -> clamp -> conv (x86, held-out SQNR): own grid 2x finer -0.4 dB, ~6x even, ~20x +4 dB.
_FINER_CLAMP = 8.0


def _reads_shape_of(reader: torch.fx.Node, value: torch.fx.Node) -> bool:
    """Whether `reader` reads only `value`'s sizes or rank (``x.size(2)``, ``x.shape``,
    ``x.dim()``, ``x.ndim``: a rewrite's rank guard), which its quantized form has too."""
    if (read := size_read(reader)) is not None:
        return read[0] is value
    return bool(reader.args) and reader.args[0] is value and (
        reader.op == "call_method" and reader.target == "dim" and len(reader.args) == 1
        or reader.op == "call_function" and reader.target is getattr and reader.args[1:] == ("ndim",))


def _take_value_meta(old: torch.fx.Node, new: torch.fx.Node) -> None:
    """`new` stands for `old`'s value: its provenance and its shape/dtype metadata."""
    new.meta[COMPUTES] = origin(old)
    for key in ("tensor_meta", "val"):
        if key in old.meta:
            new.meta[key] = old.meta[key]


def _is_view_call(node: torch.fx.Node) -> bool:
    return node.op == "call_method" and node.target == "view" or node.op == "call_function" \
        and node.target is aten.view.default


def _view_as_reshape(node: torch.fx.Node) -> None:
    """Make a `view` on a value that lowering turns int8 a `reshape`: the int8 kernels return
    their own layouts (a quantized conv's output is channels-last), where `x.view(n, -1)` on the
    float value was legal and on the int8 one is not; `reshape` copies only when it must."""
    if any(names_a_dtype(a) for a in (*node.args[1:], *node.kwargs.values())):
        return  # ``h.view(torch.int32)`` reinterprets the bytes: no reshape does
    if node.op == "call_method" and node.target == "view":
        node.target = "reshape"
    elif node.op == "call_function" and node.target is aten.view.default:
        node.target = aten.reshape.default


def _folded_weights(gm, group: Group, view) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a conv/linear with a following eval-mode batchnorm folded in."""
    weight = view.param("weight").detach().float()
    bias = view.param("bias")
    bias = bias.detach().float() if bias is not None else None
    if group.bn is None:
        return weight, bias
    bn = op_view(gm, group.bn)
    mean, var = bn.param("running_mean").float(), bn.param("running_var").float()
    gamma = bn.param("weight")
    beta = bn.param("bias")
    gamma = gamma.float() if gamma is not None else torch.ones_like(mean)
    beta = beta.float() if beta is not None else torch.zeros_like(mean)
    factor = gamma / torch.sqrt(var + float(bn.attrs.get("eps", 1e-5)))
    if view.attrs.get("transposed"):  # weight [C_in, C_out / groups, *k]: output channels on dim 1
        weight = weight * factor.reshape(1, -1, *([1] * (weight.dim() - 2)))
    else:
        weight = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
    bias = (bias if bias is not None else torch.zeros_like(mean)) - mean
    return weight, bias * factor + beta


def _fresh_attr(gm, base: str) -> str:
    base = base.replace(".", "_")
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


_QUANTIZE = {aten.quantize_per_tensor.default, dec.quantize_per_tensor.default}
_DEQUANTIZE = {aten.dequantize.self, dec.dequantize_per_tensor.default}


def _is_quantize(node) -> bool:
    return node.op == "call_function" and node.target in _QUANTIZE


def _is_dequantize(node) -> bool:
    return node.op == "call_function" and node.target in _DEQUANTIZE


def _uncalibrated_message(count: int, ctx: PassContext) -> str:
    """Why every observer is empty, and what to run: a pipeline's `calibration=` batches are
    run by the composite `quantize` pass only, never between two passes of a pipeline."""
    head = f"lower-int8: every observer ({count}) has seen no data"
    if ctx.calibration:
        return (f"{head}; the {len(ctx.calibration)} calibration batches given to this run are only fed "
                "through the model by the 'quantize' pass (insert-observers, calibrate, lower-int8 in one "
                "step): use 'quantize{...}' in place of 'insert-observers,lower-int8', or run "
                "insert-observers, then fxopt.calibrate(module, batches), then lower-int8")
    return (f"{head}: run calibration batches through the observed module (fxopt.calibrate) before "
            "lower-int8, or use the composite 'quantize' pass with calibration=")


__all__ = ["LowerInt8", "lower_module", "strip_observers"]
