"""Observers: the modules `insert-observers` puts on activations, and weight quantization.

Activations are quantized per tensor, affine, to quint8; weights per output channel,
symmetric, to qint8. Where torch.ao already has the right observer it is reused as is:

| option             | statistics collected by                    | range chosen by                     |
|--------------------|--------------------------------------------|-------------------------------------|
| `minmax`           | torch.ao MinMaxObserver                    | torch.ao (min/max)                  |
| `moving_average`   | torch.ao MovingAverageMinMaxObserver, averaging constant 1/n at batch n | torch.ao (the mean of the per-batch min/max) |
| `histogram`        | torch.ao HistogramObserver                 | torch.ao (its L2 bin-trimming search) |
| `percentile`       | torch.ao HistogramObserver                 | fxopt: the 0.01% / 99.99% quantiles of the histogram |
| `mse`              | torch.ao HistogramObserver                 | fxopt: exhaustive search over clipping ranges minimizing the expected squared error (rounding + clipping) over the histogram |
| weights            | torch.ao PerChannelMinMaxObserver (symmetric, qint8) | torch.ao                  |

torch.ao has no percentile observer, and its histogram search trims one bin at a time
greedily; `mse` scores every (lo, hi) clipping pair on a grid exactly, so it is written here.

Every observer wraps its torch.ao core in `Observer`, which knows the node it watches and fails
with that name on NaN or a dtype it cannot handle. An infinity is no error: masks are built with
-inf (`masked_fill(mask, -inf)` before a softmax) on purpose. The observer records it
(`Observer.nonfinite`) and stops collecting; such a value has no int8 grid, so `lower-int8` keeps
it, and every op that would need it quantized, float.
"""
from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from torch import nn
from torch.ao.quantization import observer as ao_obs

from fxopt.calibration import current_batch
from fxopt.errors import FxoptError

ObserverKind = Literal["minmax", "moving_average", "histogram", "percentile", "mse"]
OBSERVER_KINDS = ("minmax", "moving_average", "histogram", "percentile", "mse")


class QuantizationError(FxoptError):
    """Quantization cannot go on: bad calibration data, an observer with no data, bad options."""


def quant_range(reduce_range: bool) -> tuple[int, int]:
    """quint8 (qmin, qmax) for activations; fbgemm on CPUs without VNNI needs 7 bits."""
    return (0, 127) if reduce_range else (0, 255)


class Observer(nn.Module):
    """Identity on its input; records statistics of one activation for calibration.

    `node_name` names the graph value it watches, so errors point at the model.
    """

    is_fxopt_observer = True
    # why fxopt.save refuses it: its statistics live in torch.ao observer objects no file stores
    save_advice = ("an insert-observers observer holds calibration statistics, not a model to keep: save "
                   "the model before insert-observers, or once lower-int8 has made it int8")

    def __init__(self, node_name: str, kind: str = "histogram", reduce_range: bool = False,
                 location: str = "") -> None:
        super().__init__()
        if kind not in OBSERVER_KINDS:
            raise QuantizationError(f"unknown observer '{kind}'; valid: {', '.join(OBSERVER_KINDS)}")
        self.node_name = node_name
        self.location = location or f"node '{node_name}'"
        self.kind = kind
        self.reduce_range = reduce_range
        self.batches = 0
        #: "" while every value seen was finite; else which infinities calibration saw ("-inf",
        #: "+inf" or "±inf"): the range is unbounded, there is no int8 grid for this value.
        self.nonfinite = ""
        self.nonfinite_batch: int | None = None  # the first calibration batch that had one
        self._qparams_cache: dict[tuple[bool, int], tuple[float, int]] = {}
        # The core always collects for the 8-bit grid; `qparams(reduce_range)` picks the grid later.
        common = dict(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
        if kind == "minmax":
            self.core = ao_obs.MinMaxObserver(**common)
        elif kind == "moving_average":
            self.core = ao_obs.MovingAverageMinMaxObserver(**common)
        else:
            self.core = ao_obs.HistogramObserver(**common)

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            return x
        if not x.is_floating_point():
            hint = ("; the model is already quantized: quantize the float model once" if x.is_quantized
                    else "; only floating-point activations can be quantized")
            raise QuantizationError(f"observer for {self.location} got a {x.dtype} tensor{hint}")
        if x.numel() and not bool(torch.isfinite(x).all()):
            if bool(torch.isnan(x).any()):
                raise QuantizationError(
                    f"observer for {self.location} saw NaN in calibration batch {self._batch_index()}; "
                    "check the input data or the model (a NaN activation has no int8 range)")
            self._record_inf(x)
        if x.numel() and self.nonfinite:
            self.batches += 1  # the range is unbounded whatever comes next: nothing to collect
        elif x.numel():
            if self.kind == "moving_average":
                # Equal weight for every calibration batch (a running mean of the per-batch
                # min/max): torch.ao's fixed 0.01 suits QAT's thousands of steps, but over a few
                # PTQ batches it would keep almost only the first batch's range.
                self.core.averaging_constant = 1.0 / (self.batches + 1)
            self.core(x.detach().float())
            self.batches += 1
        return x

    def _record_inf(self, x: torch.Tensor) -> None:
        negative = "-" in self.nonfinite or "±" in self.nonfinite or bool((x == -math.inf).any())
        positive = "+" in self.nonfinite or "±" in self.nonfinite or bool((x == math.inf).any())
        self.nonfinite = "±inf" if negative and positive else "-inf" if negative else "+inf"
        if self.nonfinite_batch is None:
            self.nonfinite_batch = self._batch_index()

    def _batch_index(self) -> int:
        """The batch's index in the running `fxopt.calibrate` call (the caller's list index;
        this observer's own count outside one)."""
        batch = current_batch()
        return self.batches if batch is None else batch

    def nonfinite_reason(self) -> str:
        """Why the watched value stays float, for the pass stats ("" when it need not)."""
        if not self.nonfinite:
            return ""
        return f"saw ±inf in calibration: kept float ({self.nonfinite} in batch {self.nonfinite_batch})"

    def extra_repr(self) -> str:
        extra = f", saw {self.nonfinite}" if self.nonfinite else ""
        return f"{self.node_name}, kind={self.kind}, batches={self.batches}{extra}"

    # ----- results ------------------------------------------------------------------------
    def range(self, reduce_range: bool | None = None) -> tuple[float, float]:
        """The (min, max) the quantization grid covers."""
        self._check_ready()
        narrow = self.reduce_range if reduce_range is None else reduce_range
        if self.kind in ("minmax", "moving_average", "histogram"):
            scale, zp = self.qparams(narrow)
            qmin, qmax = quant_range(narrow)
            return (qmin - zp) * scale, (qmax - zp) * scale
        return self._clip_range(narrow)

    def qparams(self, reduce_range: bool | None = None) -> tuple[float, int]:
        """(scale, zero_point) for quint8 per-tensor affine.

        `reduce_range` picks the 7-bit (True) or 8-bit (False) grid; None: the one the observer
        was built with. The statistics do not depend on it, so one calibration serves both.
        """
        self._check_ready()
        narrow = self.reduce_range if reduce_range is None else reduce_range
        # Cached per grid and calibration state: lowering asks once per reader of a value, and
        # the histogram search costs ~0.1-1 s each time (MobileViT: 10 minutes uncached).
        key = (narrow, self.batches)
        cached = self._qparams_cache.get(key)
        if cached is not None:
            return cached
        core = self.core
        saved = core.quant_min, core.quant_max
        core.quant_min, core.quant_max = quant_range(narrow)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if self.kind == "histogram" and self._degenerate_range():
                    # the scale would be clamped to eps whatever the search finds; the
                    # search itself takes seconds on such ranges (1e-18 wide in MobileViT)
                    scale, zp = core._calculate_qparams(core.min_val, core.max_val)
                elif self.kind in ("minmax", "moving_average", "histogram"):
                    scale, zp = core.calculate_qparams()
                else:
                    lo, hi = self._clip_range(narrow)
                    scale, zp = core._calculate_qparams(torch.tensor(lo), torch.tensor(hi))
        finally:
            core.quant_min, core.quant_max = saved
        result = float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0])
        self._qparams_cache = {k: v for k, v in self._qparams_cache.items() if k[1] == self.batches}
        self._qparams_cache[key] = result
        return result

    def _degenerate_range(self) -> bool:
        """True when the observed range is below one step of the smallest scale (float eps)."""
        core = self.core
        width = float(core.max_val) - float(core.min_val)
        return width <= torch.finfo(torch.float32).eps * (core.quant_max - core.quant_min)

    def _check_ready(self) -> None:
        if self.batches == 0:
            raise QuantizationError(
                f"observer for {self.location} has seen no data; run calibration batches through "
                "the observed module (fxopt.calibrate) before lower-int8")
        if self.nonfinite:
            raise QuantizationError(
                f"observer for {self.location} saw {self.nonfinite} in calibration batch "
                f"{self.nonfinite_batch}: the value has no int8 grid and must stay float")

    def grid_error(self, scale: float, zero_point: int, qmin: int, qmax: int) -> float:
        """Mean squared error of putting the observed values on the grid (scale, zero point,
        [qmin, qmax]): rounding inside it, clipping outside. Histogram observers weigh the
        histogram's bins; min/max ones assume values spread evenly over the range they saw.
        Compares grids for one value (lowering picks an int8 cat's output grid with it)."""
        self._check_ready()
        lo, hi = float(self.core.min_val), float(self.core.max_val)
        if self.kind in ("minmax", "moving_average") or hi <= lo:
            hist = torch.ones(2048, dtype=torch.float64)
        else:
            hist, lo, hi = self._histogram()
        if hi <= lo:
            centers, hist = torch.tensor([lo], dtype=torch.float64), torch.ones(1, dtype=torch.float64)
        else:
            width = (hi - lo) / hist.numel()
            centers = lo + (torch.arange(hist.numel(), dtype=torch.float64) + 0.5) * width
        q = torch.clamp(torch.round(centers / scale) + zero_point, qmin, qmax)
        err = hist * (centers - (q - zero_point) * scale) ** 2
        return float(err.sum() / hist.sum().clamp_min(1e-30))

    def _histogram(self) -> tuple[torch.Tensor, float, float]:
        core = self.core
        return core.histogram.double(), float(core.min_val), float(core.max_val)

    def _clip_range(self, reduce_range: bool) -> tuple[float, float]:
        hist, lo, hi = self._histogram()
        if hi <= lo:
            return min(lo, 0.0), max(hi, 0.0)
        if self.kind == "percentile":
            return _percentile_range(hist, lo, hi, 1e-4)
        return _mse_range(hist, lo, hi, quant_range(reduce_range))


def _percentile_range(hist: torch.Tensor, lo: float, hi: float, tail: float) -> tuple[float, float]:
    cdf = hist.cumsum(0) / hist.sum()
    width = (hi - lo) / hist.numel()
    first = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=cdf.dtype)))
    last = int(torch.searchsorted(cdf, torch.tensor(1 - tail, dtype=cdf.dtype)))
    return min(lo + first * width, 0.0), max(lo + (last + 1) * width, 0.0)


def _mse_range(hist: torch.Tensor, lo: float, hi: float, qrange: tuple[int, int],
               steps: int = 40) -> tuple[float, float]:
    """Clipping range minimizing the expected squared quantization error over the histogram."""
    n = hist.numel()
    width = (hi - lo) / n
    centers = lo + (torch.arange(n, dtype=torch.float64) + 0.5) * width
    levels = qrange[1] - qrange[0]
    fractions = torch.linspace(0.3, 1.0, steps, dtype=torch.float64)
    best, best_err = (min(lo, 0.0), max(hi, 0.0)), math.inf
    for flo in (fractions if lo < 0 else [1.0]):
        for fhi in (fractions if hi > 0 else [1.0]):
            a, b = min(lo * float(flo), 0.0), max(hi * float(fhi), 0.0)
            scale = max((b - a) / levels, 1e-12)
            zp = round(-a / scale)
            q = torch.clamp(torch.round(centers / scale) + zp, qrange[0], qrange[1])
            err = float((hist * (centers - (q - zp) * scale) ** 2).sum()) + float(hist.sum()) * scale ** 2 / 12
            if err < best_err:
                best, best_err = (a, b), err
    return best


def quantize_weight(w: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Per-channel symmetric qint8 weight (a quantized tensor), via torch.ao's observer."""
    obs = ao_obs.PerChannelMinMaxObserver(ch_axis=axis, dtype=torch.qint8,
                                          qscheme=torch.per_channel_symmetric)
    w = w.detach().float()
    obs(w)
    scales, zps = obs.calculate_qparams()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.quantize_per_channel(w, scales.float(), zps.long(), axis, torch.qint8)


def observers_in(gm: nn.Module) -> dict[str, Observer]:
    """Submodule name -> observer, for every fxopt observer inside `gm`."""
    return {name: m for name, m in gm.named_modules() if getattr(m, "is_fxopt_observer", False)}


_QUANTIZING = frozenset({"quantize_per_tensor", "quantize_per_channel", "dequantize"})


def quantized_node(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """The first node of `gm` that is already int8 (a quantize/dequantize, a `quantized::` kernel,
    a torch.ao quantized module, fxopt's CUDA int8 linear, or a value of a quantized dtype), or None.

    Observing such a graph again would quantize twice (and an x86 int8 value reaches an observer
    as a quint8 tensor), so the passes that insert observers refuse it up front.
    """
    from .kernels import int8_linear

    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_method" and target in _QUANTIZING:
            return node
        if node.op == "call_function" and (
                getattr(target, "namespace", None) in ("quantized", "quantized_decomposed") or target is int8_linear
                or getattr(getattr(target, "overloadpacket", target), "__name__", "") in _QUANTIZING):
            return node
        if node.op == "call_module" and type(gm.get_submodule(target)).__module__.startswith(
                ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")):
            return node
        meta = node.meta.get("tensor_meta")
        if getattr(meta, "dtype", None) in (torch.quint8, torch.qint8, torch.qint32):
            return node
    return None


__all__ = ["OBSERVER_KINDS", "Observer", "ObserverKind", "QuantizationError", "observers_in", "quantized_node",
           "quant_range", "quantize_weight"]
