"""Numerical verification: does the optimized module still compute what the original did?

`verify(reference, candidate, inputs)` runs both on the same inputs (on CPU, or on CUDA with
`device="cuda"`: models and inputs are copied there, the originals stay put) and reports, over
every tensor in the (possibly nested: dicts, dataclasses, tuples) outputs: max absolute and
relative error, SQNR in dB and cosine similarity, and pass/fail against a tolerance that fits
the transformation — `exact` for rewrites that must not change the function, `float` for
rewrites that reorder float arithmetic, `int8` an SQNR floor for quantization, `lossy` for
passes such as pruning that change the function on purpose (numbers reported, never failed:
its report says ``NOT CHECKED``, not ``PASS``, since the accuracy may be gone).

**Precision.** The tolerances are stated for float32. A tensor whose reference value is of a
coarser floating dtype (bfloat16, float16, float8) cannot agree with a rewritten computation
better than that dtype resolves: each rewrite rounds to it in different places. Such a tensor
is judged with ``rtol`` raised to at least ``ulps * torch.finfo(dtype).eps`` — `Tolerance.ulps`
units of the dtype's resolution at the tensor's scale (``max|ref|``): 2 for `exact`, 4 for
`float`, so bfloat16 allows 1.6% / 3.1% of the scale and float16 0.2% / 0.4%. The float32
bound is *not* multiplied by the eps ratio (65536 for bfloat16: it would pass any error); what
is added is the rounding a coarse dtype cannot avoid, and nothing else. float32 and finer
dtypes and quantized outputs are judged by the tolerance as stated; ``atol`` and the SQNR
floor never change. The dtype judged at is the *reference's*: a candidate that lost
precision the reference had (float32 -> bfloat16) is held to float32. The report says which
precision it judged at (``PASS (float, bfloat16: rtol=0.0312, cpu)``).

**SQNR** is 10·log10(signal / noise) with the signal the reference's spread about its mean,
Σ(ref - mean(ref))², not its power Σref²: an offset (a sigmoid's 0.5, a constant bias) carries
nothing an error can destroy, and counted as signal it passed a probability map at 26 dB whose
logits were at 5. The power figure is `TensorComparison.power_sqnr_db` (shown beside where the
mean holds half the power or more). An output of fewer than `FEWEST_FOR_SPREAD` values, or one
constant in the reference, has no spread to measure by and is judged by the power figure; under
an SQNR floor its report says so.

**Integer and bool outputs** (token ids, class indices, masks) have no scale to be relative
to: an id off by 50 is a different token, however large the vocabulary. They are compared
element by element, and `Tolerance.int_agreement` is the fraction of elements that must be
equal: all of them under `exact` and `float`; 99% under `int8` (and at least all but one, for
outputs of fewer than 100 elements), where a class whose two top logits were a rounding apart
legitimately flips (an int8 classifier returning ``argmax`` would
otherwise fail on any batch); in an output of fewer than 8 elements one that differs may be all
it holds (a batch-1 classifier's class), so the report is NOT CHECKED; `lossy` reports the count
and judges nothing. A report names
each integer output with a difference: how many elements differ and the first one's index and
values.

When the check fails and the candidate is a GraphModule, it **localizes**: it runs both node by
node and names the first node of the candidate whose value diverges beyond tolerance from the
reference node it stands for (see `fxopt.ir.origin`), and the model's module it belongs to. A
reference that is the user's nn.Module is captured for this, by the candidate's front end
(where the candidate records another model class, or the capture fails, no node is named).

    >>> import torch, fxopt
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    >>> report = fxopt.verify(model, model, (torch.randn(3, 4),))
    >>> report.passed, report.max_abs_error
    (True, 0.0)
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_leaves, tree_map

from .errors import (FxoptError, InputMismatchError, VerificationError, did_you_mean, first_line,
                     is_library_frame, node_location, user_source_line)
from .ir.interpret import BufferState, fresh_inputs, node_values, run_graph, same_random_draws
from .ir.rewrite import deep_copy, module_path, origin
from .tracing import GradStateReads, one_at_a_time


_FLOAT32_EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class Tolerance:
    """Pass when max|ref - out| <= atol * min(1, max|ref|) + rtol * max|ref| and SQNR >=
    min_sqnr_db (if set); an integer or bool output passes when at least `int_agreement` of its
    elements are equal. The bound is relative to the output's scale: `atol` is the floor for an
    output of scale 1 or more and shrinks with a smaller one (`bound`). A complex output is
    compared by its real and imaginary parts.

    The numbers are for float32. A reference tensor of a coarser floating dtype is judged with
    ``rtol`` raised to ``max(rtol, ulps * torch.finfo(dtype).eps)`` (see `rtol_for`); the
    module docstring says why. The presets are in `TOLERANCES`; `verify` takes a name or one
    of your own:

        >>> import torch, fxopt
        >>> loose = fxopt.Tolerance("loose", rtol=0.05, atol=1e-3)
        >>> loose.accepts(max_abs=0.02, ref_scale=1.0, sqnr_db=30.0)
        True
        >>> model = torch.nn.Linear(4, 2)
        >>> fxopt.verify(model, model.half().float(), torch.randn(3, 4), tolerance=loose).passed
        True
    """

    name: str
    rtol: float
    atol: float
    min_sqnr_db: float | None = None
    #: Position in the exact < float < int8 < lossy order; a pipeline is as loose as its loosest pass.
    rank: int = 0
    #: Least error allowed on a dtype coarser than float32, in units of its eps at the tensor's scale.
    ulps: float = 4.0
    #: Fraction of an integer or bool output's elements that must equal the reference's
    #: (1.0: all of them; integers are never judged by a relative bound).
    int_agreement: float = 1.0

    @property
    def checks_values(self) -> bool:
        """Whether this tolerance bounds the error at all: `lossy` accepts any output that is
        not NaN (its numbers are reported, not judged)."""
        return math.isfinite(self.rtol) or math.isfinite(self.atol) or self.min_sqnr_db is not None

    def rtol_for(self, dtype: torch.dtype | None) -> float:
        """The relative tolerance a tensor of `dtype` is judged with (`rtol` for float32)."""
        eps = coarse_eps(dtype)
        return self.rtol if eps is None else max(self.rtol, self.ulps * eps)

    def bound(self, ref_scale: float, dtype: torch.dtype | None = None) -> float:
        """The largest error a tensor of scale `ref_scale` (max|ref|) and `dtype` may have:
        ``atol * min(1, ref_scale) + rtol_for(dtype) * ref_scale``. `atol` is the floor for an
        output of unit scale or larger; a smaller output gets it in proportion, since a fixed
        floor would pass any error on an output whose values are all below it (``x * 2e-6``
        for ``x * 1e-6`` under `exact`)."""
        return self.atol * min(1.0, ref_scale) + self.rtol_for(dtype) * ref_scale

    def accepts(self, max_abs: float, ref_scale: float, sqnr_db: float,
                dtype: torch.dtype | None = None) -> bool:
        """Whether one tensor's error passes; `dtype` is the reference tensor's (None: float32)."""
        if math.isnan(max_abs):
            return False
        if max_abs > self.bound(ref_scale, dtype):
            return False
        return self.min_sqnr_db is None or sqnr_db >= self.min_sqnr_db

    def accepts_integer(self, mismatches: int, numel: int) -> bool:
        """Whether an integer or bool output with `mismatches` of `numel` elements differing passes.
        An agreement below 1 always lets one element differ: 99% of the 8 classes of a batch of 8
        would let none flip, and one legitimately may."""
        if self.int_agreement >= 1:
            return mismatches == 0
        return mismatches <= max(1.0, (1 - self.int_agreement) * numel)


def coarse_eps(dtype: torch.dtype | None) -> float | None:
    """torch.finfo(dtype).eps for a floating (or complex: of its parts) dtype coarser than
    float32, else None."""
    if dtype is not None and dtype.is_complex:
        dtype = dtype.to_real()
    if dtype is None or not dtype.is_floating_point:
        return None
    eps = torch.finfo(dtype).eps
    return eps if eps > _FLOAT32_EPS else None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


TOLERANCES: dict[str, Tolerance] = {
    "exact": Tolerance("exact", rtol=1e-4, atol=1e-5, rank=0, ulps=2.0),
    "float": Tolerance("float", rtol=2e-3, atol=1e-4, rank=1, ulps=4.0),
    "int8": Tolerance("int8", rtol=math.inf, atol=math.inf, min_sqnr_db=20.0, rank=2, int_agreement=0.99),
    "lossy": Tolerance("lossy", rtol=math.inf, atol=math.inf, rank=3, int_agreement=0.0),
}


def get_tolerance(tolerance: str | Tolerance) -> Tolerance:
    if isinstance(tolerance, Tolerance):
        return tolerance
    try:
        return TOLERANCES[tolerance]
    except KeyError:
        raise ValueError(f"unknown tolerance {tolerance!r}{did_you_mean(str(tolerance), TOLERANCES)}") from None


def loosest(*tolerances: str | Tolerance) -> Tolerance:
    """The loosest of several tolerances (what a whole pipeline must be held to)."""
    return max((get_tolerance(t) for t in tolerances), key=lambda t: t.rank, default=TOLERANCES["exact"])


@dataclass
class TensorComparison:
    """Error statistics of one output tensor (`path` is its place in the output structure;
    `dtype` the reference tensor's, which sets the precision it is judged at). For an integer
    or bool tensor, `mismatches` counts the elements that differ (None for floating tensors)
    and `first_mismatch` is ``(index, reference value, candidate value)`` of the first."""

    path: str
    shape: tuple
    max_abs_error: float
    max_rel_error: float
    sqnr_db: float
    cosine: float
    ref_scale: float
    dtype: torch.dtype | None = None
    mismatches: int | None = None
    first_mismatch: tuple | None = None
    #: How many values were finite on both sides, so compared as numbers (0: an output that is
    #: NaN or infinite everywhere, in both, where equal reads as no error yet nothing was checked).
    finite: int | None = None
    #: Whether the reference, and the candidate, hold any finite value (which side an output
    #: that compared none was NaN or infinite everywhere on).
    any_finite: tuple[bool, bool] = (True, True)
    #: The SQNR with the signal taken as the reference's power, its mean included (sum ref²: the
    #: textbook figure, which torch.ao's tools report). `sqnr_db`, the one judged, takes the
    #: signal as the reference's spread about its mean where `centered` (see `compare_tensors`).
    power_sqnr_db: float | None = None
    #: Whether `sqnr_db` is centered: False for an output of fewer than `FEWEST_FOR_SPREAD` values
    #: or one constant in the reference, where it is `power_sqnr_db`.
    centered: bool = True
    #: The mean of the reference's finite values (what a centered SQNR does not count as signal).
    mean: float = 0.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def __str__(self) -> str:
        if self.mismatches is not None:
            return f"{self.path or 'output'} {list(self.shape)} {_dtype_name(self.dtype)}: {self.mismatch_text()}"
        coarse = f" {_dtype_name(self.dtype)}" if coarse_eps(self.dtype) is not None else ""
        return (f"{self.path or 'output'} {list(self.shape)}{coarse}: max_abs={self.max_abs_error:.3g} "
                f"max_rel={self.max_rel_error:.3g} sqnr={self.sqnr_db:.1f}dB{self.offset_note()} cos={self.cosine:.6f}")

    def offset_note(self) -> str:
        """" (26.0dB counting its mean 0.5 as signal)" where the centered SQNR is 3 dB or more below
        the power one (the mean holds half the power or more: a sigmoid's output), else ''."""
        power = self.power_sqnr_db
        if not self.centered or power is None or not math.isfinite(power) or power - self.sqnr_db < 3:
            return ""
        return f" ({_fmt_db(power)} counting its mean {self.mean:.3g} as signal)"

    def mismatch_text(self) -> str:
        """"3/4 elements differ (75%), first at (0, 2): 17000 vs 17050" for an integer tensor."""
        if not self.mismatches:
            return f"all {self.numel} elements equal"
        index, ref, cand = self.first_mismatch
        return (f"{self.mismatches}/{self.numel} elements differ ({self.mismatches / self.numel:.2%}), "
                f"first at {index}: {ref} vs {cand}")

    def passes(self, tolerance: Tolerance) -> bool:
        if self.mismatches is not None:
            return tolerance.accepts_integer(self.mismatches, self.numel)
        return tolerance.accepts(self.max_abs_error, self.ref_scale, self.sqnr_db, self.dtype)


@dataclass
class Divergence:
    """The first candidate node whose value left tolerance."""

    node: str
    reference_node: str
    source: str | None
    comparison: TensorComparison
    #: The model's module the node computes part of ("'b.l' (Linear)"), where the graph records it:
    #: an export graph's node names ('linear_1') do not say which layer they are.
    module: str | None = None

    def __str__(self) -> str:
        # (a node a pass made stands for the reference node whose value it computes; one that
        # kept its name stands for itself: no need to say so)
        stands = f" (stands for '{self.reference_node}')" if self.reference_node != self.node else ""
        inside = f" in module {self.module}" if self.module else ""
        where = f" at {self.source}" if self.source else ""
        return f"first diverging node '{self.node}'{stands}{inside}{where}: {self.comparison}"


def _user_line(*nodes: torch.fx.Node | None) -> str | None:
    """The user's source line the first of `nodes` that records one came from (a node a pass
    made may have none; the reference node it stands for has). A line in torch's own code (an
    nn.Sequential's layers: no frame of the user's) is none: the module names the layer."""
    for node in nodes:
        line = user_source_line(node.meta.get("stack_trace")) if node is not None else None
        if line is not None and not is_library_frame(line):
            return line
    return None


def _module_of(*nodes: torch.fx.Node | None) -> str | None:
    """"'b.l' (Linear)": the module the first of `nodes` that says calls (a symbolic graph's
    call_module node: its name, '_0', is no path) or ran in, its innermost submodule recorded
    in ``meta["nn_module_stack"]``; None for a node of the model's own forward."""
    for node in nodes:
        if node is None:
            continue
        if node.op == "call_module":
            owner = node.graph.owning_module
            module = owner.get_submodule(node.target) if owner is not None else None
            path = module_path(node)
            return f"'{path}' ({type(module).__name__})" if module is not None else f"'{path}'"
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        path, kind = list(stack.values())[-1]
        if not path:
            return None
        kind = kind if isinstance(kind, str) else getattr(kind, "__qualname__", str(kind))
        return f"'{path}' ({kind.rpartition('.')[2]})"
    return None


@dataclass
class VerificationReport:
    """What `verify` found. `passed` says that nothing it checked failed; the rest explains it.
    Under `lossy` (after `prune`, `distill`) nothing is checked: `passed` is True and `verdict` is
    "NOT CHECKED", so a script that needs a checked result tests ``report.verdict == "PASS"``.

    `stage`: set by `fxopt.optimize` when the result held the pipeline's loosest tolerance
    against the original but the passes after its last lossy pass did not hold theirs against
    that pass's output (an int8 kernel after `prune`): that comparison, which failed.

    `max_abs_error`, `max_rel_error`, `sqnr_db` and `cosine` are the worst over the floating-point
    outputs; integer and bool outputs (indices, masks) are judged by how many elements differ
    (their entries in `outputs`), not as numbers: an index of 60 against 8 is no error of 52. Only
    where every output is an integer one do these numbers read them.

        >>> import torch, fxopt
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(4, 2)
        >>> report = fxopt.verify(model, torch.nn.Sequential(model, torch.nn.ReLU()), torch.randn(8, 4))
        >>> report.verdict, report.max_abs_error > 0
        ('FAIL', True)
        >>> report.raise_if_failed()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fxopt.errors.VerificationError: FAIL (exact, cpu): max_abs=...
        >>> lossy = fxopt.verify(model, torch.nn.Sequential(model, torch.nn.ReLU()), torch.randn(8, 4),
        ...                      tolerance="lossy")
        >>> lossy.passed, lossy.verdict
        (True, 'NOT CHECKED')
    """

    passed: bool
    tolerance: Tolerance
    device: str
    outputs: list[TensorComparison] = field(default_factory=list)
    divergence: Divergence | None = None
    message: str = ""
    stage: VerificationReport | None = None

    @property
    def _numeric_outputs(self) -> list[TensorComparison]:
        """The outputs the headline numbers are over: the floating-point ones, or, without any, all."""
        return [o for o in self.outputs if o.mismatches is None] or self.outputs

    @property
    def max_abs_error(self) -> float:
        # no output compared (the candidate raised): NaN, which reads as no match, never 0
        return max((o.max_abs_error for o in self._numeric_outputs), default=math.nan)

    @property
    def max_rel_error(self) -> float:
        return max((o.max_rel_error for o in self._numeric_outputs), default=math.nan)

    @property
    def sqnr_db(self) -> float:
        return min((o.sqnr_db for o in self._numeric_outputs), default=math.nan)

    @property
    def cosine(self) -> float:
        return min((o.cosine for o in self._numeric_outputs), default=math.nan)

    def _coarse_dtypes(self) -> list[torch.dtype]:
        dtypes = {o.dtype for o in self.outputs if coarse_eps(o.dtype) is not None}
        return sorted(dtypes, key=lambda d: (-torch.finfo(d).eps, str(d)))

    @property
    def precision(self) -> str:
        """The precision the outputs were judged at: "float32" (the tolerance as stated), or the
        coarser dtype(s) whose resolution widened it ("bfloat16", "bfloat16/float16")."""
        return "/".join(_dtype_name(d) for d in self._coarse_dtypes()) or "float32"

    @property
    def verdict(self) -> str:
        """"PASS", "FAIL", or "NOT CHECKED" for a pass under a tolerance that bounds nothing
        (`lossy`: a pruned model may have lost its accuracy; measure that instead) or where an
        output had no value to compare (`uncompared`)."""
        if not self.passed:
            return "FAIL"
        return "PASS" if self.tolerance.checks_values and not self.unproven else "NOT CHECKED"

    @property
    def uncompared(self) -> list[TensorComparison]:
        """The float outputs of which no value was compared: NaN or infinite everywhere, on both
        sides (an example input of NaN); equal, they read as no error, yet prove nothing."""
        return [o for o in self.outputs if o.finite == 0 and o.numel and o.mismatches is None]

    @property
    def unproven(self) -> list[TensorComparison]:
        """The outputs that passed without proving anything: `uncompared` ones, and integer
        outputs of fewer than `FEWEST_TO_JUDGE_A_FLIP` elements where one differs, which a
        tolerance that lets one class flip (`int8`) passes though it may be all that output holds."""
        return self.uncompared + [o for o in self.outputs if _flip_unjudged(o, self.tolerance)]

    def summary(self) -> str:
        verdict = self.verdict
        judged = ""  # float32 reports read as they always did
        for d in self._coarse_dtypes():
            rtol = self.tolerance.rtol_for(d)
            judged += f", {_dtype_name(d)}" + (f": rtol={rtol:.3g}" if math.isfinite(rtol) else "")
        text = f"{verdict} ({self.tolerance.name}{judged}, {self.device}): "
        if self.outputs:
            text += (f"max_abs={self.max_abs_error:.3g} max_rel={self.max_rel_error:.3g} "
                     f"sqnr={_fmt_db(self.sqnr_db)} cos={self.cosine:.6f}")
        else:
            text += "no output compared"
        for o in self.outputs:  # integer outputs are judged by count, not by the numbers above
            if o.mismatches:
                text += f"; integer output{' ' + o.path if o.path else ''}: {o.mismatch_text()}"
                if _flip_unjudged(o, self.tolerance):
                    text += (f": {self.tolerance.name} lets one class flip (two logits a rounding apart), which an "
                             f"output of fewer than {FEWEST_TO_JUDGE_A_FLIP} elements cannot tell from a wrong "
                             f"result: verify on a batch of {FEWEST_TO_JUDGE_A_FLIP} or more")
            if o.finite == 0 and o.numel and o.mismatches is None:
                text += f"; {_nonfinite_text(o)}: no value was compared (verify on inputs with finite outputs)"
            elif o.ref_scale == 0 and o.finite and o.mismatches is None and self.passed:
                text += (f"; output{' ' + o.path if o.path else ''} is 0 everywhere in the reference: a result "
                         "scaled by any factor would match it too (verify on inputs whose outputs are not all 0)")
            elif self.tolerance.min_sqnr_db is not None and _offset_unjudged(o):
                text += f"; {_offset_unjudged_text(o)}"
        if self.message:
            text += f"; {self.message}"
        if self.divergence is not None:
            text += f"\n  {self.divergence}"
        return text

    __str__ = summary

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise VerificationError(self.summary())


@one_at_a_time
def verify(
    reference: nn.Module,
    candidate: nn.Module,
    inputs: Any,
    *,
    tolerance: str | Tolerance | None = None,
    device: str | torch.device = "cpu",
    localize: bool = True,
) -> VerificationReport:
    """Compare `candidate` against `reference` on `inputs` (a tensor, tuple of args or dict).

    `tolerance` defaults to the one `candidate` was optimized at, when it records one (a module
    from `fxopt.optimize`, also after `fxopt.save`/`fxopt.load`: ``gm.meta["fxopt"]["tolerance"]``,
    e.g. `int8` after `quantize`), and to `exact` otherwise. Neither module is modified: a
    module with a lazy parameter that never ran (or one on the meta device) is refused with a
    ValueError, since running it would initialize it, and so are inputs the reference raises on;
    with `device="cuda"` both are copied to the GPU. Each output tensor is judged at its reference
    dtype's precision: bfloat16 and float16 outputs get the rounding their dtype cannot avoid
    (`Tolerance.rtol_for`), float32 the tolerance as stated; integer and bool outputs are
    compared element by element (exactly under `exact` and `float`, 99% agreement under `int8`).
    An output whose dtype changed, or a Python number that changed kind (``True`` that became
    ``1``), fails whatever the tolerance.

        >>> import torch, fxopt
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
        >>> x = torch.randn(16, 8)
        >>> int8 = fxopt.optimize(model, (x,), "quantize", calibration=[(x,)]).module
        >>> report = fxopt.verify(model, int8, (x,))     # held to the int8 tolerance it recorded
        >>> report.tolerance.name, report.passed
        ('int8', True)
        >>> fxopt.verify(model, int8, (x,), tolerance="exact").passed
        False
    """
    from .capture import normalize_inputs, unmaterialized

    device = device_name(device, "verify: got device")
    for role, module in (("reference", reference), ("candidate", candidate)):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"verify: the {role} is a {type(module).__name__}, not a torch.nn.Module; pass the "
                            "model and the module fxopt returned (fxopt.optimize(...).module), or wrap a function "
                            "in an nn.Module")
    tol = get_tolerance(tolerance if tolerance is not None else recorded_tolerance(candidate))
    for role, module in (("reference", reference), ("candidate", candidate)):
        problem = unmaterialized(module)  # running it would change the caller's module
        if problem is not None:
            raise ValueError(f"verify: the {role} {type(module).__name__} cannot be run as it is: {problem}")
    from .manager import TensorWrites

    args, kwargs = normalize_inputs(inputs)
    # a forward that writes its own weights (nn.Embedding(max_norm=...)) or statistics
    attributes, tensors = PythonAttributes(reference, candidate), TensorWrites(reference, candidate)
    try:
        return _run_and_compare(reference, candidate, args, kwargs, tol, device, localize, tensors)
    except ValueError as exc:
        if isinstance(inputs, Mapping) and isinstance(exc.__cause__, TypeError) and "argument" in str(exc.__cause__):
            # forward did not take the mapping's keys as keywords: it may take the mapping itself
            raise ValueError(f"{exc}; a {type(inputs).__name__} is read as keyword inputs "
                             f"({', '.join(map(repr, inputs))}); to pass it as forward's one input, wrap it in a "
                             "tuple: ({...},)") from exc.__cause__
        raise
    finally:
        tensors.restore()
        attributes.restore()


def _run_and_compare(reference: nn.Module, candidate: nn.Module, args: tuple, kwargs: dict, tol: Tolerance,
                     device: str, localize: bool, watch: TorchFunctionMode) -> VerificationReport:
    """`verify`'s work, once the tolerance is known and the modules are checked runnable. `watch`
    (`TensorWrites`) is entered where the modules run, not around the comparison: a torch function
    mode costs every torch call it sees, and on a small model the comparison makes most of them."""
    if device != "cpu":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("verify(device='cuda') needs a CUDA GPU; none is available")
        reference, candidate = _copy_to(reference, device), _copy_to(candidate, device)
        args, kwargs = _move(args, device), _move(kwargs, device)
    # a model that updates its buffers (a step counter) runs from, and is left in, its state
    state = BufferState(reference, candidate)
    callers_grad = _callers_grad_state(args, kwargs)  # (read before no_grad below)
    with torch.no_grad():  # each side on its own copy: a model may write into its inputs
        ref_args, ref_kwargs = fresh_inputs(args, kwargs)
        with same_random_draws(), watch, GradStateReads(reference) as grad_reads:  # (random: the same draws in both)
            ref_out = _run_reference(reference, ref_args, ref_kwargs)
        # the two may share buffers; restore writes back only what the run changed (a write
        # into the float bias quantize{backend=reference} shares is one VerifyEach refuses)
        state.restore()
        try:
            cand_args, cand_kwargs = fresh_inputs(args, kwargs)
            with same_random_draws(), watch:
                cand_out = candidate(*cand_args, **cand_kwargs)
        except Exception as exc:
            # a call the graph refuses (a keyword left out) is about the inputs, which it names: no node
            where = None
            if not isinstance(exc, InputMismatchError):
                with watch:
                    where = _raising_node(candidate, args, kwargs)
            at = f" at {node_location(where)}" if where is not None else ""
            return VerificationReport(False, tol, device, message=f"candidate raised {type(exc).__name__}{at}: {exc}")
        finally:
            state.restore()
    outputs, problem = compare_outputs(ref_out, cand_out)
    if problem is None:
        problem = _input_writes_problem((args, kwargs), (ref_args, ref_kwargs), (cand_args, cand_kwargs), tol)
    if problem is None and grad_reads.found and callers_grad and all(o.passes(tol) for o in outputs):
        # (a FAIL there reports that call's numbers: the no-grad comparison's were perfect)
        problem, outputs = _grad_state_problem(reference, candidate, args, kwargs, tol, callers_grad,
                                               grad_reads.found, watch, outputs)
    passed = problem is None and all(o.passes(tol) for o in outputs)
    if not passed and problem is None:
        problem = _why_failed(outputs, tol) + _training_mode_note(reference)
    report = VerificationReport(passed, tol, device, outputs, message=problem or "")
    if not passed and localize and isinstance(candidate, torch.fx.GraphModule):
        graph = reference if isinstance(reference, torch.fx.GraphModule) else _graph_of(reference, candidate, args, kwargs)
        if graph is not None:
            with watch:
                report.divergence = first_divergence(graph, candidate, args, kwargs, tol)
    return report


def _input_writes_problem(given: tuple, ref_inputs: tuple, cand_inputs: tuple, tol: Tolerance) -> str | None:
    """Which input, written in place by either side (``x += h``), the other leaves otherwise, or
    None: the caller's tensor is part of what the model computes, and a graph that records
    ``x += h`` as ``x + h`` (symbolic tracing) agrees on the outputs alone. Each side ran on its
    own copy of `given`."""
    leaves = zip(tree_flatten_with_path(given)[0], tree_flatten(ref_inputs)[0], tree_flatten(cand_inputs)[0])
    for (path, before), ref, cand in leaves:
        if not isinstance(before, torch.Tensor):
            continue
        try:
            before, ref, cand = (_entries(t) for t in (before, ref, cand))
        except RuntimeError:  # a layout with no COO form: nothing to compare it by
            continue
        if _same_entries(ref, before) and _same_entries(cand, before):
            continue
        side = "the reference" if not _same_entries(ref, before) else "the candidate"
        other = "the candidate" if side == "the reference" else "the reference"
        if not torch.equal(ref[1], cand[1]):  # sparse entries at other places
            return f"{_input_label(path)} is written in place by {side}, and {other} leaves other entries"
        cmp = compare_tensors(ref[0], cand[0], keystr(path))
        if not cmp.passes(tol):
            return (f"{_input_label(path)} is written in place by {side}, and {other} leaves it otherwise: "
                    f"max_abs={cmp.max_abs_error:.3g}")
    return None


def _entries(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of an input: a strided tensor is its own values (indices empty); a sparse
    one its coalesced COO values and indices (torch.equal refuses sparse tensors, and a dense copy
    of a graph's adjacency may not fit in memory)."""
    if t.layout == torch.strided:
        return t, _NO_INDICES
    coo = t.to_sparse_coo().coalesce()
    return coo.values(), coo.indices()


_NO_INDICES = torch.empty(0, dtype=torch.long)


def _same_entries(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])


def _input_label(path: tuple) -> str:
    """"input 0", "input 'mask'", "input 1[0]": a leaf of ``(args, kwargs)`` by its pytree path."""
    kind, key, rest = path[0], path[1], keystr(path[2:])
    return f"input {key.idx}{rest}" if kind.idx == 0 else f"input {key.key!r}{rest}"


def _callers_grad_state(args: tuple, kwargs: dict) -> str:
    """How the caller's call differs from verify's (under torch.no_grad(), on inputs that require no
    grad): "grad on", "an input that requires grad", both, or '' where it does not."""
    parts = ["grad on"] if torch.is_grad_enabled() else []
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves((args, kwargs))):
        parts.append("an input that requires grad")
    return " and ".join(parts)


def _grad_state_problem(reference: nn.Module, candidate: nn.Module, args: tuple, kwargs: dict, tol: Tolerance,
                        callers: str, reads: list[str], watch: TorchFunctionMode,
                        outputs: list[TensorComparison]) -> tuple[str | None, list[TensorComparison]]:
    """Where the reference's forward reads the grad state (`GradStateReads`), compare once more as
    the caller calls, `callers` ("grad on"): a graph captured under no_grad keeps that branch, and
    the comparison under no_grad alone said PASS for a call that computes something else. Returns
    the problem (None: none) and the comparisons to report: that call's where it has them, else
    `outputs` (the no-grad comparison's)."""
    state = BufferState(reference, candidate)
    results = []
    for model in (reference, candidate):  # in the caller's grad mode
        run_args, run_kwargs = tree_map(_copy_as_given, (args, kwargs))
        try:
            with same_random_draws(), watch:
                results.append(tree_map(_detached, model(*run_args, **run_kwargs)))
        except Exception as exc:  # noqa: BLE001  (the call as the caller makes it fails: that is the finding)
            results.append(exc)
        finally:
            state.restore()
    ref_out, cand_out = results
    if isinstance(ref_out, Exception):
        return None, outputs  # the reference itself does not run so: no call of the caller's to compare
    if isinstance(cand_out, Exception):
        differs = f"the candidate raises {type(cand_out).__name__}: {first_line(cand_out)}"
    else:
        compared, structure = compare_outputs(ref_out, cand_out)
        if structure is None and all(o.passes(tol) for o in compared):
            return None, outputs
        differs, outputs = structure or _why_failed(compared, tol), compared or outputs
    return (f"with {callers}, as this call was made, {differs} (forward reads the grad state: {'; '.join(reads)}; "
            "the comparison under torch.no_grad() passed): call the candidate under torch.no_grad() or "
            "torch.inference_mode(), where it computes what the model does, or take the branch out of forward"), outputs


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value


def _copy_as_given(value: Any) -> Any:
    """A copy of an input tensor that requires grad where the caller's does (a copy made under
    no_grad, `fresh_inputs`', does not)."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.detach().clone().requires_grad_(value.requires_grad)


def _run_reference(reference: nn.Module, args: tuple, kwargs: dict) -> Any:
    """`reference(*args, **kwargs)`; its failure is the inputs' (another dtype, shape or
    structure than the model takes): a ValueError saying so, torch's error its cause. fxopt's
    own errors (an exported reference's `InputMismatchError`, which names the input already)
    and running out of memory pass unchanged."""
    try:
        return reference(*args, **kwargs)
    except (FxoptError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        raise ValueError(f"verify: the reference {type(reference).__name__} raised on the inputs "
                         f"({brief_inputs(args, kwargs)}): {type(exc).__name__}: {first_line(exc)}; give inputs "
                         "the model takes") from exc


def _raising_node(candidate: nn.Module, args: tuple, kwargs: dict) -> torch.fx.Node | None:
    """The node of graph `candidate` that raises when run on the inputs (nodes run in graph
    order: the one after the last that ran), or None for another module, a run that does not
    raise again (a module's forward calls the graph some other way), or one that raises before
    any node ran (inputs of another structure)."""
    if not isinstance(candidate, torch.fx.GraphModule):
        return None
    ran: list[torch.fx.Node] = []
    try:
        with torch.no_grad(), same_random_draws():
            run_graph(candidate, *fresh_inputs(args, kwargs), lambda node, _: ran.append(node), private_buffers=True)
    except Exception:  # noqa: BLE001  (the failure being located)
        return ran[-1].next if ran else None
    return None


def _graph_of(model: nn.Module, candidate: torch.fx.GraphModule, args: tuple, kwargs: dict) -> torch.fx.GraphModule | None:
    """`model` captured by the front end `candidate` came from, to localize a failure against
    (`fxopt.verify(model, res.module, x)` is the usual call, and only a graph has nodes to name),
    or None where `candidate` records another model class or the capture fails: a node of
    another model's graph that happens to share a name would be a false lead."""
    from .capture import capture, frontend_of

    info = candidate.meta.get("fxopt") or {}
    recorded = info.get("model_class")
    if recorded is not None and recorded != type(model).__qualname__:
        return None
    if recorded is None and type(candidate).__name__ != type(model).__name__:
        return None  # no record: only symbolic_trace's graph, named after the model's class, says whose it is
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the capture's warnings are the caller's own capture's news
            # verify's inputs are positional or keyword, never both (`normalize_inputs`)
            return capture(model, kwargs if kwargs else args, mode=frontend_of(candidate))
    except Exception:  # noqa: BLE001  (a model no front end takes: the report stands without a node)
        return None


class PythonAttributes:
    """The Python attributes of every module under `modules` (a call counter, an observer's
    batch count): a run rebinds them, and the buffer snapshot does not see it. Verifying an
    observed module fed its observers the example, and lower-int8 then took ranges from it.
    `restore` binds the saved objects again and drops attributes the run added."""

    def __init__(self, *modules: nn.Module) -> None:
        self._saved: list[tuple[nn.Module, dict]] = []
        seen: set[int] = set()
        for module in modules:
            for m in module.modules():
                if id(m) not in seen:
                    seen.add(id(m))
                    self._saved.append((m, dict(vars(m))))

    def restore(self) -> None:
        for m, saved in self._saved:
            now = vars(m)  # written directly: the state as it was, without nn.Module's bookkeeping
            for key in [k for k in now if k not in saved]:
                del now[key]
            for key, value in saved.items():
                if key not in now or now[key] is not value:
                    now[key] = value


#: The fewest elements of an integer output in which one differing element can pass as a class
#: flipped by rounding (`Tolerance.int_agreement` below 1): in fewer, it may be the whole answer.
FEWEST_TO_JUDGE_A_FLIP = 8


def _flip_unjudged(o: TensorComparison, tolerance: Tolerance) -> bool:
    """Whether integer output `o` passes `tolerance` only by its one allowed flip, in an output
    too small to tell a flip from a wrong result (a batch-1 classifier's only class)."""
    return (bool(o.mismatches) and o.numel < FEWEST_TO_JUDGE_A_FLIP and tolerance.int_agreement < 1
            and o.passes(tolerance))


def _offset_unjudged(o: TensorComparison) -> bool:
    """Whether float output `o` was judged by an SQNR that counts its mean as signal (too few
    values, or constant: `_varies`) while it has a mean and an error, so the floor proved less."""
    return (o.mismatches is None and not o.centered and bool(o.finite) and o.mean != 0
            and o.max_abs_error > 0 and math.isfinite(o.sqnr_db))


def _offset_unjudged_text(o: TensorComparison) -> str:
    where = f"output {o.path}" if o.path else "the output"
    if (o.finite or 0) < FEWEST_FOR_SPREAD:
        return (f"{where} has {o.finite} value{'s' if o.finite != 1 else ''}, too few to tell an offset "
                f"from what the model computes: its SQNR counts their mean {o.mean:.3g} as signal (verify on "
                f"a batch with {FEWEST_FOR_SPREAD} or more output values)")
    return (f"{where} is the same value everywhere in the reference ({o.mean:.3g}): its SQNR counts that value "
            "as signal (verify on inputs for which the output varies)")


def _nonfinite_text(o: TensorComparison) -> str:
    """Which side of output `o`, which compared no value, is NaN or infinite everywhere."""
    where = f"output {o.path}" if o.path else "the output"
    ref, cand = o.any_finite
    if ref and not cand:
        return f"in {where}, the candidate is NaN or infinite everywhere, where the reference has finite values"
    if cand and not ref:
        return f"in {where}, the reference is NaN or infinite everywhere, where the candidate has finite values"
    return f"output{' ' + o.path if o.path else ''} is NaN or infinite everywhere, on both sides"


def _why_failed(outputs: list[TensorComparison], tol: Tolerance) -> str:
    """Which output broke `tol`, and by how much (a FAIL always says why)."""
    failing = [o for o in outputs if not o.passes(tol)]
    o = failing[0]
    where = f"output {o.path}" if o.path else "the output"
    more = f" (and {len(failing) - 1} more output{'s' if len(failing) > 2 else ''})" if len(failing) > 1 else ""
    if o.mismatches is not None:  # the summary lists its differing elements
        agree = "all" if tol.int_agreement >= 1 else f"{tol.int_agreement:.0%} (or all but one)"
        why = f"must agree with the reference on {agree} of its integer elements"
    elif math.isnan(o.max_abs_error):
        why = "has NaN where the reference has none (or none where it has)"
    elif o.max_abs_error > tol.bound(o.ref_scale, o.dtype):
        why = f"is off by {o.max_abs_error:.3g}, above the {tol.name} bound {tol.bound(o.ref_scale, o.dtype):.3g}"
    else:
        why = (f"has SQNR {_db_below(o.sqnr_db, tol.min_sqnr_db)}{o.offset_note()}, below the {tol.name} floor "
               f"{tol.min_sqnr_db:g} dB")
    return f"{where} {why}{more}"


def _training_mode_note(reference: nn.Module) -> str:
    """A reference in training mode computes another function than an optimized module, which
    fxopt made from the eval-mode model: say so, since that alone explains a FAIL."""
    from .capture import _training_mode_modules

    found = _training_mode_modules(reference)  # those that compute otherwise in eval mode
    if not found:
        return ""
    names = [f"{type(m).__name__} '{name}'" if name else f"{type(m).__name__} (the model itself)"
             for name, m, _ in found[:3]]
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    return (f"; the reference is in training mode ({', '.join(names)}{more}), and fxopt optimizes the "
            "eval-mode model: compare against model.eval() (or a copy of it)")


def recorded_tolerance(module: nn.Module) -> str | Tolerance:
    """The tolerance `fxopt.optimize` recorded on `module` (``meta["fxopt"]["tolerance"]``), or
    `exact` for a module without one."""
    info = getattr(module, "meta", {}).get("fxopt") if isinstance(module, torch.fx.GraphModule) else None
    recorded = (info or {}).get("tolerance")
    return recorded if isinstance(recorded, (str, Tolerance)) else "exact"


def _paths_apart(ref_paths: list[str], cand_paths: list[str]) -> str:
    """'; the candidate lacks output ['b'][1]' (and what it has besides): where two output
    structures of different sizes part (three of each at most)."""
    lacks = [p for p in ref_paths if p not in cand_paths]
    extra = [p for p in cand_paths if p not in ref_paths]
    return "".join(f"; the candidate {verb} output{'s' if len(paths) > 1 else ''} {', '.join(paths[:3])}"
                   + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
                   for verb, paths in (("lacks", lacks), ("has besides", extra)) if paths)


def compare_outputs(ref: Any, cand: Any) -> tuple[list[TensorComparison], str | None]:
    """Per-tensor statistics over two output structures, and a structural problem if any."""
    ref, cand = _expand_dataclasses(ref), _expand_dataclasses(cand)
    ref_leaves, ref_spec = tree_flatten_with_path(ref)
    cand_leaves, cand_spec = tree_flatten_with_path(_in_key_order_of(ref, cand))
    if len(ref_leaves) != len(cand_leaves):
        return [], (f"output structure differs: {len(ref_leaves)} vs {len(cand_leaves)} values"
                    + _paths_apart([keystr(p) for p, _ in ref_leaves], [keystr(p) for p, _ in cand_leaves]))
    if ref_spec != cand_spec:
        # same number of values, different containers or keys ({'a','b'} vs {'a','c'}, dict vs tuple)
        ref_paths = [keystr(p) for p, _ in ref_leaves]
        cand_paths = [keystr(p) for p, _ in cand_leaves]
        return [], (f"output structure differs: {type(ref).__name__} {ref_paths} vs "
                    f"{type(cand).__name__} {cand_paths}")
    results = []
    for (path, r), (_, c) in zip(ref_leaves, cand_leaves):
        if not isinstance(r, torch.Tensor):
            problem = _non_tensor_problem(path, r, c)
            if problem is not None:
                return results, problem
            if not isinstance(r, float):
                continue
            # a Python float (x.sum().item()) is judged as a float, not by `!=`
            r, c = torch.tensor(r, dtype=torch.float64), torch.tensor(c, dtype=torch.float64)
        if not isinstance(c, torch.Tensor):
            return results, f"{_output_name(path)}, {_brief(r)}, became {_brief(c)} (a Python {type(c).__name__})"
        if tuple(r.shape) != tuple(c.shape):
            return results, f"{_output_name(path)} shape {tuple(r.shape)} became {tuple(c.shape)}"
        if r.dtype != c.dtype and not c.is_quantized:  # callers downstream rely on the dtype too
            return results, f"{_output_name(path)} dtype {r.dtype} became {c.dtype}"
        results.append(compare_tensors(r, c, keystr(path)))
    return results, None


def _number_kind(value: Any) -> str | None:
    """"bool", "int", "float" or "complex" for a Python number (numpy's float64, a float, too),
    else None."""
    return next((kind.__name__ for kind in (bool, int, float, complex) if isinstance(value, kind)), None)


def _non_tensor_problem(path: tuple, r: Any, c: Any) -> str | None:
    """Why non-tensor output `r` and the candidate's `c` differ, or None where they may be the
    same (two floats: judged as floats after). A number of another kind differs though Python
    has ``True == 1 == 1.0``: a caller's `isinstance`, f-string or JSON dump tells them apart."""
    if isinstance(c, torch.Tensor):
        return f"non-tensor output {keystr(path)} differs: {_brief(r)} vs {_brief(c)}"
    kinds = _number_kind(r), _number_kind(c)
    if kinds[0] is not None and kinds[1] is not None and kinds[0] != kinds[1]:
        return f"{_output_name(path)} type {kinds[0]} became {kinds[1]} ({_brief(r)} vs {_brief(c)})"
    if kinds == ("float", "float"):
        return None
    return f"non-tensor output {keystr(path)} differs: {_brief(r)} vs {_brief(c)}" if r != c else None


def _output_name(path: tuple) -> str:
    """"output ['logits']", or "the output" for a single tensor."""
    return f"output {keystr(path)}" if path else "the output"


def brief_inputs(args: tuple, kwargs: dict) -> str:
    """Inputs in a few words, for an error saying which did not run: ``a tensor [2, 4] float32, mask=...``."""
    return ", ".join([_brief(a) for a in args] + [f"{k}={_brief(v)}" for k, v in kwargs.items()])


def _brief(value: Any) -> str:
    """A short description of an output value for a message (not a tensor's whole repr)."""
    if isinstance(value, torch.Tensor):
        return f"a tensor {list(value.shape)} {_dtype_name(value.dtype)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _in_key_order_of(ref: Any, cand: Any) -> Any:
    """`cand` with each plain dict that has the same keys as its counterpart in `ref` in
    `ref`'s key order: dicts equal but for order are the same output (an OrderedDict's order
    is part of its value, and is kept)."""
    if type(ref) is dict and type(cand) is dict and ref.keys() == cand.keys():
        return {k: _in_key_order_of(ref[k], cand[k]) for k in ref}
    if type(ref) in (list, tuple) and type(cand) is type(ref) and len(ref) == len(cand):
        return type(cand)(_in_key_order_of(r, c) for r, c in zip(ref, cand))
    return cand


def _expand_dataclasses(tree: Any) -> Any:
    """Plain dataclasses (not registered with pytree) become dicts of their fields."""

    def expand(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: _expand_dataclasses(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return value

    return tree_map(expand, tree)


def compare_tensors(ref: torch.Tensor, cand: torch.Tensor, path: str = "") -> TensorComparison:
    """Error statistics of `cand` against `ref` (quantized tensors are dequantized first; an
    integer or bool `ref` also gets its count of differing elements)."""
    mismatches = first = None
    if _is_integer(ref):
        differ = ref.detach() != cand.detach().to(ref.device)
        mismatches = int(differ.sum())
        if mismatches:
            at = tuple(int(i) for i in differ.nonzero()[0])
            first = (at, ref[at].item(), cand[at].item())
    r = _as_float(ref)
    c = _as_float(cand).to(r.device)
    shape = tuple(ref.shape)
    if r.numel() == 0:
        return TensorComparison(path, shape, 0.0, 0.0, math.inf, 1.0, 0.0, ref.dtype, mismatches, power_sqnr_db=math.inf)
    compared = int((r.isfinite() & c.isfinite()).sum())  # before the shared NaN below read as zeros
    any_finite = (bool(r.isfinite().any()), bool(c.isfinite().any()))
    both_nan = r.isnan() & c.isnan()
    if both_nan.any():  # the model's own NaN (log of a negative), reproduced where it was: no error
        r, c = r.masked_fill(both_nan, 0.0), c.masked_fill(both_nan, 0.0)
    error = torch.where(r == c, 0.0, r - c)  # equal infinities: no error; inf against a number: inf
    diff = error.abs()
    # the scale and the signal are the finite reference values': one -inf (a masked score)
    # would make every bound infinite and every error pass
    finite = r[r.isfinite()]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    max_abs = float(diff.max())
    rel = torch.where(diff == 0, 0.0, diff / r.abs().clamp_min(1e-12 + 1e-3 * scale))
    max_rel = float(rel.nan_to_num(nan=math.inf).max())  # inf against -inf: inf / inf
    noise = float(error.pow(2).sum())
    power = float(finite.pow(2).sum())
    # the signal is the reference's spread about its mean: a sigmoid's 0.5 (a logit's constant
    # bias) is no signal, and counted as one it passed logits quantized to 5 dB as 26 dB
    mean = float(finite.mean()) if finite.numel() else 0.0
    spread = float((finite - mean).pow(2).sum())
    centered = _varies(finite.numel(), spread, scale, ref.dtype)
    sqnr, power_sqnr = _db(spread if centered else power, noise), _db(power, noise)
    both = r.isfinite() & c.isfinite()
    rf, cf = r[both], c[both]
    denom = float(rf.norm() * cf.norm())
    if noise == 0:
        cosine = 1.0
    else:
        cosine = float((rf @ cf) / denom) if denom > 0 and math.isfinite(noise) else 0.0
    if math.isnan(max_abs) or torch.isnan(c).any() != torch.isnan(r).any():
        max_abs, sqnr, power_sqnr = math.nan, -math.inf, -math.inf
    return TensorComparison(path, shape, max_abs, max_rel, sqnr, cosine, scale, ref.dtype, mismatches, first,
                            compared, any_finite, power_sqnr, centered, mean)


#: The fewest values whose spread about their mean `compare_tensors` takes as an output's signal:
#: in fewer (a batch-1 regression's one number, a box's four coordinates) the spread is incidental,
#: and a good int8 result of [0.51, 0.49] read as 0 dB.
FEWEST_FOR_SPREAD = 8


def _varies(count: int, spread: float, scale: float, dtype: torch.dtype | None) -> bool:
    """Whether `count` finite reference values whose squared deviations from their mean sum to
    `spread` vary enough for that spread to be their signal: at least `FEWEST_FOR_SPREAD` of them,
    spread beyond their dtype's rounding at `scale` (a constant output has none, and any error on it
    would read as -inf dB)."""
    eps = coarse_eps(dtype) or _FLOAT32_EPS
    return count >= FEWEST_FOR_SPREAD and spread > count * (4 * eps * scale) ** 2


def _db(signal: float, noise: float) -> float:
    """10·log10(signal / noise): inf for no noise, -inf for no signal or infinite noise."""
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 and math.isfinite(noise) else -math.inf


def _is_integer(t: torch.Tensor) -> bool:
    """An integer or bool tensor (not a quantized one: that stands for floats)."""
    return not (t.is_floating_point() or t.is_complex() or t.is_quantized)


_NOT_COMPARED = ("placeholder", "get_attr", "output")


def first_divergence(
    reference: torch.fx.GraphModule,
    candidate: torch.fx.GraphModule,
    args: tuple,
    kwargs: dict,
    tolerance: Tolerance,
) -> Divergence | None:
    """The first candidate node (in execution order) whose value breaks `tolerance`.

    Candidate nodes are matched to reference nodes by provenance (`fxopt.ir.origin`): a
    fused conv is compared with the batchnorm whose value it now computes, not with the
    unfused conv that shares its name.
    """
    compared = [n for n in candidate.graph.nodes if n.op not in _NOT_COMPARED]
    with torch.no_grad():
        # snapshots, kept only for the nodes compared: a later in-place op (`relu_` after a
        # batchnorm) must not change the value a reference node is compared by
        with same_random_draws():
            ref_values = node_values(reference, args, kwargs, names={origin(n) for n in compared})
    found: list[Divergence] = []
    ref_nodes = {n.name: n for n in reference.graph.nodes}

    # A candidate value is compared as soon as its node has run, before any later node can
    # write into it, so the candidate side needs no snapshots.
    def check(node: torch.fx.Node, value: Any) -> None:
        if found or node.op in _NOT_COMPARED:
            return
        ref = ref_values.get(origin(node))
        if not (isinstance(ref, torch.Tensor) and isinstance(value, torch.Tensor)):
            return
        if ref.shape != value.shape or _is_integer(ref):
            return
        cmp = compare_tensors(ref, value, node.name)
        if not cmp.passes(tolerance):
            ref_node = ref_nodes.get(origin(node))
            found.append(Divergence(node.name, origin(node), _user_line(node, ref_node), cmp,
                                    _module_of(node, ref_node)))

    with torch.no_grad(), same_random_draws():
        run_graph(candidate, *fresh_inputs(args, kwargs), check, private_buffers=True)
    return found[0] if found else None


def _as_float(t: torch.Tensor) -> torch.Tensor:
    """`t` as float64 values to compare; a complex tensor as its real and imaginary parts (a
    last dimension of 2), since casting it to a real dtype would drop the imaginary part."""
    if t.is_quantized:
        t = t.dequantize()
    if t.is_complex():
        t = torch.view_as_real(t.detach().resolve_conj())
    return t.detach().to(torch.float64)


def device_name(device: str | torch.device, what: str) -> str:
    """`device` (a name or a torch.device) as the name a report shows, or a ValueError naming
    `what` for one torch does not know, one without values (`meta`), or a GPU this machine lacks."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{what} {device!r}, which is no torch device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if parsed.type == "meta":
        raise ValueError(f"{what} 'meta', which holds shapes without values: nothing can be compared there; "
                         "use 'cpu' or 'cuda'")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} {str(parsed)!r}, but this machine has no CUDA GPU; leave it out to verify "
                         "where the module can run")
    if parsed.type != "cpu":
        _check_device_works(parsed, what)
    return str(parsed)


def _check_device_works(device: torch.device, what: str) -> None:
    """Refuse a device this machine cannot hold a tensor on (`mps`, `xpu`, `cuda:7` of one GPU):
    verifying there reported the module as failing verification, for a backend that is missing."""
    try:
        torch.empty(0, device=device)
    except Exception as exc:  # noqa: BLE001  ("not compiled with XPU", no kernel for MPS, no torch.hpu module)
        text = str(exc).strip()
        reason = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
        raise ValueError(f"{what} {str(device)!r}, which this machine cannot use ({reason}); leave it out to "
                         "verify where the module can run") from None


def _copy_to(module: nn.Module, device: str) -> nn.Module:
    return deep_copy(module).to(device)


def _move(tree: Any, device: str) -> Any:
    return tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree)


def _fmt_db(value: float) -> str:
    return "inf" if math.isinf(value) and value > 0 else f"{value:.1f}dB"


def _db_below(value: float, floor: float) -> str:
    """`value` (below `floor`) with the decimals it takes not to read as the floor (19.999dB, not 20.0dB)."""
    digits = 1
    while math.isfinite(value) and round(value, digits) >= floor and digits < 6:
        digits += 1
    return f"{value:.{digits}f}dB"
