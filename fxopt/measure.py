"""Measurements: every number fxopt shows (latency, parameters, size, MACs, nodes) comes from here.

Keeping them in one module means a "before" and an "after" are always measured the same way.
Graph passes may leave weights where ``nn.Module.parameters()`` cannot see them (folded constants
stored as plain GraphModule attributes, quantized packed weights), so the counts here look there
too; otherwise a pass would look like it removed parameters it only moved.

Example::

    >>> import torch
    >>> from fxopt.measure import count_macs, count_parameters, measure_latency
    >>> model = torch.nn.Linear(3, 4)
    >>> count_parameters(model), count_macs(model, (torch.randn(2, 3),))
    (16, 24)
    >>> measure_latency(model, (torch.randn(2, 3),), repeats=5).runs
    5
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import math
import operator
import os
import time
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Union

import numpy as np
import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.parameter import UninitializedBuffer, is_lazy
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .ir.interpret import same_random_draws
from .ir.rewrite import deep_copy
from .manager import TensorWrites
from .manager import _storage_key as _storage_address  # (TensorWrites' keys)
from .serialize import holds_coded_attributes, rebuild_coded_attributes

# Positional args as a tuple, or keyword args as a dict.
Inputs = Union[torch.Tensor, tuple[Any, ...], Mapping[str, Any]]

# Integer weight dtypes that PT2E-style quantization stores as plain int8/uint8 constants; wider
# integer constants (int64 indices, shapes) are not weights and are not counted.
_WEIGHT_INT_DTYPES = (torch.int8, torch.uint8)


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock latency of one call, over `runs` timed calls."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    def __str__(self) -> str:
        spread = f"p10 {self.p10_ms:.3f}, p90 {self.p90_ms:.3f}, n={self.runs}"
        return f"{self.median_ms:.3f} ms ({spread})"


def count_parameters(model: nn.Module) -> int:
    """Number of weight elements: parameters, plus weights a graph pass moved out of parameters().

    Also counted: tensors that GraphModule ``get_attr`` nodes reach but that are not registered
    parameters or buffers (e.g. folded conv+BN weights), integer buffers they reach (a
    reference-backend graph's int8 weights), floating buffers passed as a conv's or linear's
    bias (that graph's biases; its scales are not counted), quantized packed weights
    (``torch.ScriptObject`` with ``unpack()``, biases included), and the weight and bias of a
    layer object a graph holds (quantize's int8 conv with a float output), each counted once.

    >>> count_parameters(torch.nn.Linear(3, 4))  # 3*4 weights + 4 biases
    16
    """
    _check_measurable(model, "count_parameters")
    seen: set[tuple[Any, ...]] = set()
    total = 0
    for tensor in [*model.parameters(), *_hidden_weights(model)]:
        key = _storage_key(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor.numel()
    return total


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())`` plus weights stored outside the state dict.

    Graph passes keep some weights outside it: plain tensor attributes reached by ``get_attr``
    (folded constants) and prepacked quantized weights (``torch.ScriptObject``), counted at
    their unpacked size (int8 weights at one byte an element).

    >>> model_size_bytes(torch.nn.Linear(300, 400)) > 300 * 400 * 4
    True
    """
    _check_measurable(model, "model_size_bytes")
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    saved = {_storage_key(t) for t in model.state_dict().values() if isinstance(t, Tensor)}
    # Eager quantized modules serialize their packed weights; graph attributes are not saved.
    graph_packed = {value for gm in _graph_modules(model) for value in _get_attr_values(gm)
                    if isinstance(value, torch.ScriptObject)}
    unpacked = [t for packed in graph_packed for t in _unpack(packed)]
    held = [t for layer in _held_layers(model) for t in _layer_tensors(layer)]  # saved by fxopt.save too
    extra = {_storage_key(t): t for t in [*_plain_graph_tensors(model), *unpacked, *held]}
    extra_bytes = sum(t.numel() * t.element_size() for k, t in extra.items() if k not in saved)
    return buffer.getbuffer().nbytes + extra_bytes


def count_nodes(gm: object) -> int | None:
    """Number of nodes in a GraphModule's top-level graph; None for anything else.

    >>> count_nodes(torch.fx.symbolic_trace(torch.nn.ReLU()))  # placeholder, relu, output
    3
    """
    return len(gm.graph.nodes) if isinstance(gm, torch.fx.GraphModule) else None


def measure_latency(
    fn: Callable[..., Any],
    inputs: Inputs,
    *,
    warmup: int = 3,
    repeats: int = 20,
    min_time_s: float = 0.0,
    threads: int | None = None,
) -> LatencyStats:
    """Time ``fn(*inputs)`` (``fn(**inputs)`` for a dict, ``fn(inputs)`` for a tensor) with
    time.perf_counter.

    Runs `warmup` untimed calls (at least one: it decides the grad mode), then at least `repeats`
    timed calls and, if needed, more until `min_time_s` seconds were spent timing. Runs under
    torch.inference_mode, or torch.no_grad when fn fails under inference mode. `threads` sets
    torch.set_num_threads for the measurement only. CUDA work is synchronized around every call.
    BatchNorm statistics of a module in training mode are restored afterwards. A model holding lazy
    modules that never ran is timed on a copy its first call initializes, as `count_macs` counts it.

    >>> stats = measure_latency(torch.nn.Linear(3, 4), (torch.randn(2, 3),), repeats=5)
    >>> stats.p10_ms <= stats.median_ms <= stats.p90_ms
    True
    """
    if not (_is_count(repeats) and _is_count(warmup)) or repeats < 1 or warmup < 0:
        raise ValueError(f"need an int repeats >= 1 and an int warmup >= 0, got {repeats=}, {warmup=}")
    repeats, warmup = operator.index(repeats), operator.index(warmup)
    if not 0 <= min_time_s < math.inf:  # inf timed forever; NaN was taken as 0
        raise ValueError(f"min_time_s must be a finite number of seconds >= 0, got {min_time_s}")
    fn = _initialized(fn, inputs)
    call = functools.partial(_call, fn, _private_inputs(inputs))
    sync = _synchronizer(fn, inputs)
    with _num_threads(threads), _restoring_buffers(fn) as first_call:
        grad_mode = _working_grad_mode(call, first_call)
        with grad_mode():
            for _ in range(warmup - 1):
                call()
            times = _timed_runs(call, sync, repeats, min_time_s)
    p10, median, p90 = np.percentile(np.array(times) * 1e3, [10, 50, 90])
    return LatencyStats(float(median), float(p10), float(p90), runs=len(times))


def compare_latency(
    fns: Mapping[str, Callable[..., Any]],
    inputs: Mapping[Any, Inputs],
    *,
    rounds: int = 3,
    warmup: int = 3,
    repeats: int = 20,
    threads: int | None = 1,
    guard: Callable[[str], AbstractContextManager[Any]] | None = None,
) -> dict[str, dict[Any, float | str]]:
    """Time several callables side by side: ``{name: {input key: best median ms, or an error}}``.

    Each of `rounds` rounds times every fn on every input once (`measure_latency`), and the
    lowest per-round median counts. Why rounds: on a shared machine the speed drifts over
    minutes, and timing one method after another turns that drift into differences between
    methods; interleaving makes every method see the same conditions. A fn that raises is
    reported by its error text (``"TypeError: ..."``) and not timed again. `guard(name)`, if
    given, wraps each measurement (e.g. a time limit for a slow first compile). A module that
    holds int8 prepacked weights is timed on a copy whose packs are rebuilt before each input, as
    `fxopt.load` rebuilds them: a pack keeps the kernel of its first call's shape, and one module
    timed at batch 1 then 16 ran 16 on batch 1's, 2-3.5x slower (the caller's module is not run;
    one inside a wrapper, a lambda, is not seen).

    >>> lat = compare_latency({"relu": torch.relu}, {"b2": (torch.randn(2, 3),)}, rounds=2, repeats=3)
    >>> sorted(lat), isinstance(lat["relu"]["b2"], float)
    (['relu'], True)
    """
    if rounds < 1:
        raise ValueError(f"need rounds >= 1, got {rounds=}")
    best: dict[str, dict[Any, float | str]] = {name: {} for name in fns}
    timed = {}
    for name, fn in fns.items():
        try:
            timed[name] = _private_packs(fn)
        except Exception as exc:  # a module deepcopy refuses (a lock in a serving wrapper): reported as its error
            best[name] = {k: _error_text(exc) for k in inputs}
            timed[name] = fn
    for _ in range(rounds):
        for name in fns:
            got = best[name]
            if any(isinstance(v, str) for v in got.values()):
                continue
            for key, x in inputs.items():
                try:
                    if timed[name] is not fns[name]:  # fresh packs: their first call is at this shape
                        rebuild_coded_attributes(timed[name])
                    with guard(name) if guard is not None else contextlib.nullcontext():
                        ms = measure_latency(timed[name], x, warmup=warmup, repeats=repeats,
                                             threads=threads).median_ms
                except Exception as exc:  # reported in the result, the other methods still run
                    got.clear()
                    got.update({k: _error_text(exc) for k in inputs})
                    break
                got[key] = min(ms, got.get(key, ms))
    return best


def _private_packs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What to time: `fn`, or, for a module holding int8 prepacked weights, a copy of it (the
    packs, shared by the copy, are rebuilt for it before each input: the caller's are left alone).
    A module inside a wrapper (a lambda) is not seen."""
    if not (isinstance(fn, nn.Module) and holds_coded_attributes(fn)):
        return fn
    return deep_copy(fn)


def _error_text(exc: BaseException) -> str:
    first = str(exc).splitlines()[0][:80] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


def count_macs(gm: Callable[..., Any], example_inputs: Inputs) -> int:
    """Multiply-accumulates of one call on example_inputs (a tensor, a tuple of positional
    inputs or a dict of keyword inputs, as `fxopt.optimize` takes), counted by FlopCounterMode
    (flops / 2).

    Counts convolutions (any dim, grouped, transposed), linear, matmul/mm/bmm/addmm/baddbmm,
    scaled_dot_product_attention and the matmuls of recurrent layers (LSTM, GRU, RNN), also as
    the int8 and oneDNN kernels fxopt's passes write them (``quantized::conv2d``,
    ``onednn::qconv_pointwise``, ``mkldnn::_convolution_pointwise``: a quantized model counts what
    its float model does); elementwise ops, pooling and normalization count as 0. An op of another
    library with a kernel of its own (``transformers::grouped_mm_fallback``, Mixtral's experts)
    has no formula: it counts as 0, with a warning naming it. Works for any nn.Module or
    callable. BatchNorm statistics of a module in training mode are restored afterwards. A model
    holding lazy modules that never ran (``nn.LazyLinear``) is counted as it is after its first
    call, on a copy that call initializes: the caller's model stays as it was.

    >>> count_macs(torch.nn.Conv2d(3, 8, 3), (torch.randn(1, 3, 10, 10),))  # 8*8*8 outputs x 3*3*3
    13824
    """
    gm = _initialized(gm, example_inputs)
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    uncounted = _UncountedOps(counter.flop_registry)
    inputs = _private_inputs(example_inputs)
    with _restoring_buffers(gm) as watch, _frozen_parameters(gm), _unfused_attention(), torch.no_grad(), counter, \
            uncounted, watch:
        _call(gm, inputs)
    if uncounted.calls:
        listed = ", ".join(f"{name} ({n} call{'s' * (n > 1)})" for name, n in sorted(uncounted.calls.items()))
        warnings.warn(f"count_macs: no formula for {listed}: counted as 0 MACs", stacklevel=2)
    return counter.get_total_flops() // 2 + uncounted.macs


class _UncountedOps(TorchDispatchMode):
    """Counts calls of ops from other libraries that FlopCounterMode has no formula for, and the
    MACs of the int8 and oneDNN conv and linear kernels fxopt's passes write, read from their
    weights' shapes (`_kernel_macs`; they counted 0: an int8 model read as a 24x cut in MACs). A
    dispatch mode sees only ops with kernels of their own: a composite op arrives decomposed
    into ones it counts."""

    _KNOWN_ZERO = frozenset({"aten", "prims", "quantized", "quantized_decomposed", "_quantized", "mkldnn",
                             "mkldnn_prepacked", "onednn"})
    _KERNELS = frozenset({"quantized", "_quantized", "mkldnn", "mkldnn_prepacked", "onednn"})

    def __init__(self, registry) -> None:
        super().__init__()
        self.registry = registry
        self.calls: dict[str, int] = {}
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace not in self._KNOWN_ZERO and func._overloadpacket not in self.registry:
            name = f"{func.namespace}::{func._overloadpacket.__name__}"
            self.calls[name] = self.calls.get(name, 0) + 1
        out = func(*args, **(kwargs or {}))
        if func.namespace in self._KERNELS:
            self.macs += _kernel_macs(func, args, out)
        return out


#: The names the int8 and oneDNN kernels give their weight argument (by the op's schema: a fused
#: conv + add, ``_convolution_pointwise.binary(X, other, W, ...)``, passes the residual before it).
_WEIGHT_ARGUMENTS = ("W", "qw", "weight", "w")


def _kernel_macs(func: Any, args: tuple, out: Any) -> int:
    """MACs of an int8 or oneDNN conv or linear kernel (``quantized::conv2d``, ``quantized::linear``,
    ``mkldnn::_convolution_pointwise``...): its output's elements times what each reads of the
    weight, a prepacked one's (unpacked) or the argument its schema names the weight. A
    transposed conv reads the weight once per input element instead. Other kernels: 0."""
    name = func._overloadpacket.__name__
    if not ("conv" in name or "linear" in name) or not isinstance(out, Tensor) or not args:
        return 0
    names = [a.name for a in func._schema.arguments]
    packed = next((a for a in args if isinstance(a, torch.ScriptObject) and hasattr(a, "unpack")), None)
    named = next((args[i] for i, n in enumerate(names[:len(args)]) if n in _WEIGHT_ARGUMENTS), None)
    weight = packed.unpack()[0] if packed is not None else named
    if not isinstance(weight, Tensor) or weight.dim() < 2 or not isinstance(args[0], Tensor):
        return 0
    if "transpose" in name:  # weight [C_in, C_out / groups, *kernel]
        return args[0].numel() * math.prod(weight.shape[1:])
    return out.numel() * math.prod(weight.shape[1:])  # conv [C_out, C_in / groups, *kernel], linear [out, in]


@contextlib.contextmanager
def _frozen_parameters(fn: Callable[..., Any]) -> Iterator[None]:
    """Parameters stop requiring grad while counting: FlopCounterMode's module tracker fails
    ("Expected gradient function to be set") on a view of a parameter made under no_grad and
    passed into a submodule (Perceiver latents, DETR queries expanded over the batch)."""
    params = [p for p in fn.parameters() if p.requires_grad] if isinstance(fn, nn.Module) else []
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextlib.contextmanager
def _unfused_attention() -> Iterator[None]:
    """Turn off nn.MultiheadAttention/TransformerEncoder's fused inference kernels while counting.

    FlopCounterMode has no formula for them, so an eager model would count 0 attention MACs while
    its captured graph (which never takes the fast path) counts them all.
    """
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *_: Any, **__: Any) -> int:
    """Q @ K^T plus attention @ V, the same count FlopCounterMode uses for the GPU SDPA kernels."""
    *batch, q_len, head_dim = query_shape
    k_len, v_dim = key_shape[-2], value_shape[-1]
    return 2 * math.prod(batch) * q_len * k_len * (head_dim + v_dim)


def _grouped_mm_flops(a_shape: Any, b_shape: Any, *_: Any, **__: Any) -> int:
    """``torch._grouped_mm(a, b, offs)``: one matmul per group (a mixture of experts' tokens
    times each expert's weight). Rows [M, K] x experts [G, K, N]: every row meets one expert;
    [G, M, K] x [G, K, N]: a batch; groups along K ([M, K] x [K, N]): one matmul in pieces."""
    if len(a_shape) == 3 and len(b_shape) == 3:
        return 2 * math.prod(a_shape) * b_shape[-1]
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[-1]
    if len(a_shape) == 3 and len(b_shape) == 2:  # [G, M, K] x [K, G * N]
        return 2 * math.prod(a_shape) * b_shape[-1] // a_shape[0]
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


def _rnn_layer_flops(input_shape: Any, w_ih_shape: Any, w_hh_shape: Any, *_: Any, **__: Any) -> int:
    """``aten.mkldnn_rnn_layer``, one direction of one layer of a CPU ``nn.LSTM``: every step of
    every sequence multiplies its input by the gates' input weights [G * H, I] and the hidden state
    by their hidden weights [G * H, H] (the cell's elementwise ops are not counted, as elsewhere)."""
    steps = math.prod(input_shape) // input_shape[-1]
    return 2 * steps * (math.prod(w_ih_shape) + math.prod(w_hh_shape))


def _matrix_vector_flops(matrix_shape: Any, vector_shape: Any, *_: Any, **__: Any) -> int:
    """``mv`` (a linear on an unbatched input by matmul) and ``dot``: one MAC per matrix element."""
    return 2 * math.prod(matrix_shape)


def _addmv_flops(bias_shape: Any, matrix_shape: Any, vector_shape: Any, *_: Any, **__: Any) -> int:
    return 2 * math.prod(matrix_shape)


def _trilinear_flops(s1: Any, s2: Any, s3: Any, expand1: Any, expand2: Any, expand3: Any, *_: Any,
                     **__: Any) -> int:
    """``_trilinear`` (``nn.Bilinear``: x1 [B, I], W [O, I, J], x2 [B, J]): one MAC for every point of
    the space the three operands are broadcast over (B x O x I x J for a bilinear layer)."""
    spaces = []
    for shape, expanded in ((s1, expand1), (s2, expand2), (s3, expand3)):
        sizes = list(shape)
        for dim in sorted(expanded):
            sizes.insert(dim, 1)
        spaces.append(sizes)
    return 2 * math.prod(max(sizes) for sizes in zip(*spaces))


def _distance_flops(x1_shape: Any, x2_shape: Any, *_: Any, out_shape: Any = None, **__: Any) -> int:
    """``cdist``: every pair of rows [.., P, M] x [.., R, M] meets over its M features; the output
    [.., P, R] has the batch the two broadcast to."""
    return 2 * math.prod(out_shape) * x1_shape[-1]


def _conv_tbc_flops(input_shape: Any, weight_shape: Any, *_: Any, out_shape: Any = None, **__: Any) -> int:
    """``conv_tbc`` (time, batch, channels; weight [K, C_in, C_out]): each output meets K x C_in inputs."""
    kernel, channels_in, _channels_out = weight_shape
    return 2 * math.prod(out_shape) * kernel * channels_in


# FlopCounterMode knows the CUDA attention kernels but not the CPU one SDPA dispatches to, nor
# the grouped matmul Hugging Face's mixtures of experts run their experts with, nor the oneDNN
# kernel a CPU LSTM runs each layer with (an LSTM counted 0; GRU and RNN run as matmuls), nor
# matrix-vector products, nn.Bilinear's _trilinear, cdist and conv_tbc (each counted 0).
_EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
                        torch.ops.aten._grouped_mm: _grouped_mm_flops,
                        torch.ops.aten.mkldnn_rnn_layer: _rnn_layer_flops,
                        torch.ops.aten.mv: _matrix_vector_flops,
                        torch.ops.aten.dot: _matrix_vector_flops,
                        torch.ops.aten.vdot: _matrix_vector_flops,
                        torch.ops.aten.addmv: _addmv_flops,
                        torch.ops.aten._trilinear: _trilinear_flops,
                        torch.ops.aten._cdist_forward: _distance_flops,
                        torch.ops.aten._euclidean_dist: _distance_flops,
                        torch.ops.aten.conv_tbc: _conv_tbc_flops}


def _lazy_tensor(model: nn.Module) -> str | None:
    """The name of a parameter or buffer of a lazy module that never ran (``nn.LazyLinear``), or None."""
    return next((name for name, t in [*model.named_parameters(), *model.named_buffers()] if is_lazy(t)), None)


def _check_measurable(model: nn.Module, measure: str) -> None:
    """Raise TypeError for what is no nn.Module (a function: "'function' object has no attribute
    'parameters'"), and ValueError naming the lazy tensor of `model`, whose size is not known until
    it runs (torch's own error named neither the tensor nor the fix)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{measure} takes an nn.Module, got {type(model).__name__}")
    name = _lazy_tensor(model)
    if name is not None:
        owner = name.rpartition(".")[0]
        where = f"{type(model.get_submodule(owner)).__name__} '{owner}'" if owner else "the model itself"
        raise ValueError(f"{measure}: '{name}' of {where} is not initialized (a lazy module that has not run "
                         "yet, its size is not known): run the model once on an example input (model(x)) first")


def _initialized(fn: Callable[..., Any], inputs: Inputs) -> Callable[..., Any]:
    """`fn`, or, for a module holding lazy modules that never ran, a copy initialized by one call on
    `inputs`: running the caller's model would turn its ``nn.LazyLinear`` into an ``nn.Linear`` with
    weights drawn from torch's generator (which the copy's call leaves as it was)."""
    if not isinstance(fn, nn.Module) or _lazy_tensor(fn) is None:
        return fn
    # torch copies an UninitializedParameter but refuses an UninitializedBuffer (a LazyBatchNorm's)
    fresh = {id(b): UninitializedBuffer(device=b.device, dtype=b.dtype) for b in fn.buffers() if is_lazy(b)}
    model = deep_copy(fn, fresh)
    with same_random_draws(), torch.no_grad():
        _call(model, _private_inputs(inputs))
    return model


def _call(fn: Callable[..., Any], inputs: Inputs) -> Any:
    """Call `fn` on inputs given as `fxopt.optimize` takes them: a tensor (one positional input,
    not its rows), a tuple of positional inputs, or a mapping of keyword inputs."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    return fn(**inputs) if isinstance(inputs, Mapping) else fn(*inputs)


def _private_inputs(inputs: Inputs) -> Inputs:
    """A copy of each tensor of `inputs`, made once: a forward that writes into its input (``x += h``)
    writes into the copy on every timed call, not into the caller's tensor."""
    return tree_map(lambda v: v.clone() if isinstance(v, Tensor) else v, inputs)


def _is_count(value: Any) -> bool:
    """An integer (a NumPy one, a one-element integer tensor too) that is no bool (warmup=1.5 failed in
    range(), deep in the timing loop)."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _timed_runs(
    call: Callable[[], Any], sync: Callable[[], None], repeats: int, min_time_s: float
) -> list[float]:
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_time_s:
        sync()
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return times


def _working_grad_mode(call: Callable[[], Any], watch: AbstractContextManager[Any]) -> Callable[[],
                                                                                     AbstractContextManager[Any]]:
    """inference_mode if one call (under `watch`) succeeds under it, else no_grad (whose error, if
    any, propagates).

    Some modules (e.g. ones that update buffers in place) refuse inference tensors.
    """
    try:
        with torch.inference_mode(), watch:
            call()
        return torch.inference_mode
    except Exception:
        with torch.no_grad(), watch:
            call()
        return torch.no_grad


def _synchronizer(fn: Callable[..., Any], inputs: Inputs) -> Callable[[], None]:
    """torch.cuda.synchronize when the inputs or fn's tensors live on a GPU, else a no-op."""
    tensors = [t for t in tree_leaves(inputs) if isinstance(t, Tensor)]
    if isinstance(fn, nn.Module):
        tensors += [*fn.parameters(), *fn.buffers()]
    if any(t.is_cuda for t in tensors):
        return torch.cuda.synchronize
    return lambda: None


def available_cpus() -> int:
    """The CPUs this process may run on (its CPU affinity where the system has one): the most
    threads a latency is measured with.

        >>> available_cpus() >= 1
        True
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # (macOS, Windows)
        return os.cpu_count() or 1


@contextlib.contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if threads > available_cpus():
        # (a time with more threads than CPUs is their contention's; and at --threads 99999
        # OpenMP's pool could not start so many threads: the process died of a segmentation fault)
        raise ValueError(f"threads={threads} is more than the {available_cpus()} CPUs this process may use: "
                         f"give at most {available_cpus()}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _restoring_buffers(fn: Callable[..., Any]) -> Iterator[AbstractContextManager[Any]]:
    """Put back afterwards the buffers of module `fn` that its calls changed; yields what to run the
    first call under (`_BufferWrites`: it copies each buffer that call writes, at the write).

    A measurement must not change the model: BatchNorm in training mode updates its running
    statistics on every call (inside the kernel, unseen by a torch function mode: a module in
    training mode has its buffers copied up front), and we may not call ``.eval()`` (exported
    GraphModules refuse it); a forward may count its calls in a buffer in eval mode too. A buffer
    no call writes (a 512 MiB static cache) is not copied, nor one not made yet (a LazyBatchNorm's);
    one the first call leaves alone and a later call writes is not put back.
    """
    if not isinstance(fn, nn.Module):
        yield contextlib.nullcontext()
        return
    training = [(b, b.detach().clone()) for m in fn.modules() if m.training
                for b in m.buffers(recurse=False) if not is_lazy(b)]
    writes = _BufferWrites(fn)
    try:
        yield writes
    finally:
        writes.restore()
        with torch.no_grad():
            for buffer, value in training:
                if not torch.equal(buffer, value):
                    buffer.copy_(value)


class _BufferWrites(TensorWrites):
    """`TensorWrites` over the buffers of the modules: keeps each buffer a call writes as it was
    just before the first write, and puts it back on `restore`."""

    @property
    def tensors(self) -> dict[int, Tensor]:
        if self._tensors is None:
            self._tensors = {key: b for m in self.modules for b in m.buffers()
                             if not is_lazy(b) and (key := _storage_address(b)) is not None}
        return self._tensors


def _hidden_weights(model: nn.Module) -> Iterator[Tensor]:
    """Weights outside parameters(): plain get_attr tensors, unpacked quantized packed params,
    and the weight and bias of the layer objects a graph holds (`_held_layers`)."""
    yield from _plain_graph_tensors(model)
    yield from _bias_buffers(model)
    for packed in _packed_params(model):
        yield from _unpack(packed)
    for layer in _held_layers(model):
        yield from _layer_tensors(layer, _LAYER_WEIGHT_FIELDS)


def _bias_buffers(model: nn.Module) -> Iterator[Tensor]:
    """The floating buffers a graph passes as the bias of a conv or linear: a reference-backend
    graph keeps each layer's float bias as a buffer beside its int8 weight, and a float buffer is
    not told apart from batchnorm statistics by anything else (int8 graphs lost their biases
    from the count)."""
    params = {id(t) for t in model.parameters()}
    for gm in _graph_modules(model):
        buffers = {id(t) for t in gm.buffers()}
        for node in gm.graph.find_nodes(op="get_attr"):
            if not any(_is_bias_of_layer(user, node) for user in node.users):
                continue
            try:
                value = functools.reduce(getattr, str(node.target).split("."), gm)
            except AttributeError:  # a stale graph; nothing to count
                continue
            if isinstance(value, Tensor) and value.is_floating_point() and id(value) in buffers - params:
                yield value


def _is_bias_of_layer(user: torch.fx.Node, node: torch.fx.Node) -> bool:
    """Whether `user` calls a conv or linear with `node` as its bias (third argument or `bias=`)."""
    if user.op != "call_function":
        return False
    name = getattr(user.target, "__name__", str(user.target)).split(".")[0]
    if not (name.startswith("conv") or name == "linear"):
        return False
    return (len(user.args) > 2 and user.args[2] is node) or user.kwargs.get("bias") is node


#: The fields of a held layer object counted as its parameters; the rest (per-channel scales)
#: are quantization parameters, which a packed weight's count leaves out too.
_LAYER_WEIGHT_FIELDS = ("weight", "bias")


def _held_layers(model: nn.Module) -> Iterator[Any]:
    """Each distinct dataclass object a graph reads through get_attr (an int8 conv that
    quantize's float-output path calls, held in a `CodedValue`): its tensors are the layer's
    weights, which neither parameters() nor the state dict hold."""
    seen: set[int] = set()
    for gm in _graph_modules(model):
        for value in _get_attr_values(gm):
            if dataclasses.is_dataclass(value) and not isinstance(value, type) and id(value) not in seen:
                seen.add(id(value))
                yield value


def _layer_tensors(layer: Any, names: tuple[str, ...] | None = None) -> list[Tensor]:
    """The plain (strided) tensors in `layer`'s dataclass fields, those in `names` only when
    given; a kernel's packed copy of a weight (a oneDNN layout) is the same weight again."""
    found = []
    for f in dataclasses.fields(layer):
        value = getattr(layer, f.name, None)
        if (names is None or f.name in names) and isinstance(value, Tensor) and value.layout == torch.strided:
            found.append(value)
    return found


def _plain_graph_tensors(model: nn.Module) -> Iterator[Tensor]:
    """Weight tensors that get_attr nodes reach but that are not registered params or buffers,
    and integer buffers they reach: the int8 weights of a reference-backend graph (float
    buffers there are scales or batchnorm statistics, not weights)."""
    registered = {id(t) for t in [*model.parameters(), *model.buffers()]}
    params = {id(t) for t in model.parameters()}
    for gm in _graph_modules(model):
        for value in _get_attr_values(gm):
            if not _is_weight(value) or id(value) in params:
                continue
            if id(value) not in registered or value.is_quantized or value.dtype in _WEIGHT_INT_DTYPES:
                yield value


def _packed_params(model: nn.Module) -> Iterator[torch.ScriptObject]:
    """Each distinct ScriptObject that get_attr reaches or that a module holds as a plain attribute.

    Eager quantized modules (torch.ao.nn.quantized) keep their packed weight as a plain attribute,
    FX/export-lowered graphs reach it through get_attr.
    """
    candidates = [value for m in model.modules() for value in vars(m).values()]
    candidates += [value for gm in _graph_modules(model) for value in _get_attr_values(gm)]
    seen: set[int] = set()
    for value in candidates:
        if isinstance(value, torch.ScriptObject) and id(value) not in seen:
            seen.add(id(value))
            yield value


def _unpack(packed: torch.ScriptObject) -> list[Tensor]:
    """(weight, bias) of linear/conv packed params; [] for objects that cannot be unpacked."""
    try:
        return [t for t in tree_leaves(packed.unpack()) if isinstance(t, Tensor)]
    except Exception:  # not a packed-params object, or its backend is unavailable here
        return []


def _graph_modules(model: nn.Module) -> list[torch.fx.GraphModule]:
    return [m for m in model.modules() if isinstance(m, torch.fx.GraphModule)]


def _get_attr_values(gm: torch.fx.GraphModule) -> Iterator[Any]:
    """The value each get_attr node reads; a `CodedValue` holder read whole stands for the object
    it holds (the graph's function unwraps it)."""
    from .serialize import CodedValue

    for node in gm.graph.find_nodes(op="get_attr"):
        try:
            value = functools.reduce(getattr, str(node.target).split("."), gm)
        except AttributeError:  # a stale graph; nothing to count
            continue
        yield value.value if isinstance(value, CodedValue) else value


def _is_weight(value: Any) -> bool:
    if not isinstance(value, Tensor):
        return False
    return value.is_floating_point() or value.is_quantized or value.dtype in _WEIGHT_INT_DTYPES


def _storage_key(tensor: Tensor) -> tuple[Any, ...]:
    """Identifies the memory behind a tensor, so one weight reached two ways counts once."""
    try:
        pointer = tensor.data_ptr()
    except RuntimeError:  # some tensor subclasses have no data pointer at all
        pointer = 0
    # Meta and fake tensors report 0; they are told apart by identity instead.
    return ("data", pointer, tensor.numel(), tensor.dtype) if pointer else ("id", id(tensor))
