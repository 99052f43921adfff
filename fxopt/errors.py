"""Errors a user can act on.

Every fxopt error names what is at fault — the pass, the option, the node and the source line
that produced it — so a failure deep in a pipeline points back at the user's model code.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable

import torch.fx


class FxoptError(Exception):
    """Base class of every error fxopt raises on purpose.

        >>> import torch, fxopt
        >>> try:
        ...     fxopt.optimize(torch.nn.Linear(4, 2), torch.randn(3, 4), "dce,fusee")
        ... except fxopt.FxoptError as exc:     # catches any of them: here a PipelineError
        ...     print(type(exc).__name__, "-", str(exc).split(";")[0])
        PipelineError - unknown pass 'fusee' (did you mean 'fuse'?)
    """


class CaptureError(FxoptError):
    """No front end could turn the model into a GraphModule; lists each attempt.

        >>> import torch, fxopt
        >>> try:                                # Linear.forward takes one input, not two
        ...     fxopt.capture(torch.nn.Linear(4, 2), (torch.randn(3, 4), torch.randn(3, 4)))
        ... except fxopt.CaptureError as exc:
        ...     print(str(exc).split(" (given")[0])
        the example inputs do not fit Linear.forward(input: torch.Tensor) -> torch.Tensor: too many positional arguments
    """


class InputMismatchError(FxoptError, ValueError):
    """A call of an exported graph does not fit the inputs it was captured with: a keyword it
    was captured without, another structure, or a size export fixed (a sequence length). Names
    the input, the dimension and the captured size or range, and says how to capture again; the
    error torch raised is its ``__cause__``.

        >>> import torch, fxopt
        >>> gm = fxopt.capture(torch.nn.Linear(4, 2), torch.randn(3, 4), mode="export")
        >>> try:
        ...     gm(torch.randn(3, 5))
        ... except fxopt.errors.InputMismatchError as exc:
        ...     print(str(exc).split(";")[0])
        input 0 ('input') has size 5 at dim 1, where the graph was captured with size 4
    """


class PipelineError(FxoptError):
    """A pipeline text or pass option is invalid (unknown pass/option, bad value).

        >>> import fxopt
        >>> try:
        ...     fxopt.parse_pipeline("dce,prune{ratoi=0.5}")
        ... except fxopt.PipelineError as exc:
        ...     print(exc)  # doctest: +ELLIPSIS
        pass 'prune' has no option 'ratoi' (did you mean 'ratio'?); valid: ..., ratio, round_to, scope
    """


class PassError(FxoptError):
    """A pass raised; the input module and the last good module are intact.

    `pass_name` names the pass; raised by the pass manager, it also carries
    `last_good_module` (the module as the passes before it left it) and `records` (a
    `PassRecord` per pass that ran, the failed one last).

        >>> import dataclasses, torch, fxopt
        >>> @dataclasses.dataclass
        ... class Broken(fxopt.Pass):
        ...     name = "broken"
        ...     def run(self, gm, ctx):
        ...         raise RuntimeError("boom")
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout()).eval()
        >>> try:
        ...     fxopt.optimize(model, torch.randn(2, 4), ["remove-noops", Broken()])
        ... except fxopt.PassError as exc:
        ...     print(exc, "|", len(exc.last_good_module.graph.nodes), [r.name for r in exc.records])
        pass 'broken' failed: RuntimeError: boom | 3 ['remove-noops', 'broken']
    """

    def __init__(self, pass_name: str, message: str) -> None:
        super().__init__(f"pass '{pass_name}' failed: {message}")
        self.pass_name = pass_name


class VerificationError(FxoptError):
    """A transformed module no longer matches the original within tolerance.

        >>> import torch, fxopt
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(4, 2)
        >>> report = fxopt.verify(model, torch.nn.Sequential(model, torch.nn.ReLU()), torch.randn(8, 4))
        >>> try:
        ...     report.raise_if_failed()
        ... except fxopt.VerificationError as exc:
        ...     print(str(exc).split(":")[0])
        FAIL (exact, cpu)
    """


class SerializationError(FxoptError):
    """`fxopt.save` cannot store something in a graph, or `fxopt.load` refuses a file.

        >>> import os, tempfile, torch, fxopt
        >>> path = os.path.join(tempfile.mkdtemp(), "weights.pt")
        >>> torch.save({"weight": torch.ones(2)}, path)   # a plain checkpoint, not a saved graph
        >>> try:
        ...     fxopt.load(path)
        ... except fxopt.SerializationError as exc:
        ...     print(exc)  # doctest: +ELLIPSIS
        load: .../weights.pt is not an fxopt saved graph (...)
    """


class VerificationWarning(UserWarning):
    """`optimize` returned a module that failed verification (see its report); filter it with
    ``warnings.simplefilter("error", fxopt.VerificationWarning)`` to make that an exception.

        >>> import dataclasses, warnings, torch, fxopt
        >>> @dataclasses.dataclass
        ... class ZeroBias(fxopt.Pass):                 # a buggy pass: it changes the output
        ...     name = "zero-bias"
        ...     def run(self, gm, ctx):
        ...         gm.bias = torch.nn.Parameter(torch.zeros(2))
        ...         return fxopt.PassResult(gm, modified=True)
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("error", fxopt.VerificationWarning)
        ...     fxopt.optimize(torch.nn.Linear(4, 2), torch.randn(3, 4), [ZeroBias()])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fxopt.errors.VerificationWarning: optimize('zero-bias'): verification failed: FAIL (exact, cpu): ...
    """


class PassWarning(UserWarning):
    """A pass ran but did less than it was asked, and says why: prune removed nothing or well
    under its ratio, quantize found nothing to quantize, lower-int8 missed its target SQNR.
    Make it an exception with ``warnings.simplefilter("error", fxopt.PassWarning)``: raised
    inside a pass, it reaches the caller as the `PassError` of that pass.

        >>> import warnings, torch, fxopt
        >>> with warnings.catch_warnings():      # a lone output layer has no channel to prune
        ...     warnings.simplefilter("error", fxopt.PassWarning)
        ...     fxopt.optimize(torch.nn.Linear(4, 2), torch.randn(3, 4), "prune{ratio=0.5}")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fxopt.errors.PassError: pass 'prune' failed: PassWarning: prune: nothing to prune: ...
    """


class CaptureWarning(UserWarning):
    """Capture made a graph that differs from the model in a way it names: the batch kept static
    or dynamic over a range only, a dim `dynamic_shapes` asked for kept static, output that
    depends on state forward keeps in Python (the graph repeats the captured value). Filter it
    with ``warnings.simplefilter("error", fxopt.CaptureWarning)`` to refuse such graphs: the front
    end that made one fails, and capture raises a `CaptureError` naming the warning.

        >>> import warnings, torch, fxopt
        >>> class Counter(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.calls = 0
        ...     def forward(self, x):
        ...         self.calls += 1
        ...         return x * self.calls
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("error", fxopt.CaptureWarning)
        ...     try:
        ...         fxopt.capture(Counter(), torch.randn(2, 4), mode="export")
        ...     except fxopt.CaptureError as exc:
        ...         print(str(exc).splitlines()[1].split(" (")[0])
          - export: CaptureWarning: capture: Counter's output depends on state its forward keeps in Python attributes
    """


class TrainingModeWarning(UserWarning):
    """A model (or a batchnorm or dropout inside it) was in training mode: fxopt captures and
    optimizes its eval-mode semantics. Call ``model.eval()`` first, or make it an exception
    with ``warnings.simplefilter("error", fxopt.TrainingModeWarning)``.

        >>> import warnings, torch, fxopt
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout())  # no .eval()
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("error", fxopt.TrainingModeWarning)
        ...     try:
        ...         fxopt.capture(model, torch.randn(2, 4))
        ...     except fxopt.TrainingModeWarning as w:
        ...         print(str(w).split(";")[0])
        ...     gm = fxopt.capture(model.eval(), torch.randn(2, 4))   # in eval mode: no warning
        capture: Sequential is in training mode (Dropout '1')
    """


def user_stacklevel() -> int:
    """The `warnings.warn` stacklevel, for a warning its caller raises, that points at the first
    frame outside fxopt and its passes: the user's call, not `optimize`'s call of `capture`."""
    dirs = [os.path.dirname(os.path.abspath(__file__))]
    passes = sys.modules.get("fxopt.passes")
    if getattr(passes, "__file__", None):
        dirs.append(os.path.dirname(os.path.abspath(passes.__file__)))
    ours = tuple(d + os.sep for d in dirs)
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(ours):
        frame, level = frame.f_back, level + 1
    return level


def first_line(exc: BaseException) -> str:
    """An exception's first line (at most 300 characters), or its type's name when it has no text."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def node_location(node: torch.fx.Node) -> str:
    """`node 'name' (op target) at file:line` — the user's source line when fx recorded one."""
    line = user_source_line(node.meta.get("stack_trace"))
    return f"{node_label(node)} at {line}" if line else node_label(node)


def node_label(node: torch.fx.Node) -> str:
    """`node 'name' (op target)`."""
    return f"node '{node.name}' ({node.op} {_target_name(node.target)})"


def user_source_line(stack_trace: str | None) -> str | None:
    """The user's own line in an fx stack trace: the last `File "...", line N, in f: code`
    frame outside torch and fxopt (export records frames down into `nn.Linear.forward` and
    the like), or the last frame when every frame is library code."""
    if not stack_trace:
        return None
    lines = [ln.strip() for ln in stack_trace.splitlines()]
    frames = []
    for i, line in enumerate(lines):
        if line.startswith("File "):
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            frames.append(f"{line}: {code}" if code else line)
    if not frames:
        return None
    user = [f for f in frames if not is_library_frame(f)]
    return (user or frames)[-1]


def _library_dirs() -> tuple[str, ...]:
    import os

    import torch

    return tuple(
        os.path.dirname(os.path.abspath(path)) + os.sep for path in (torch.__file__, __file__)
    )


def is_library_frame(frame: str) -> bool:
    """Whether a `File "...", line N` frame is in torch's or fxopt's own code."""
    import os
    import re

    match = re.match(r'File "([^"]+)"', frame)
    if match is None:
        return False
    return os.path.abspath(match.group(1)).startswith(_library_dirs())


def _target_name(target: object) -> str:
    if isinstance(target, str):
        return target
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def did_you_mean(word: str, choices: Iterable[str], limit: int | None = None) -> str:
    """A short " (did you mean 'x'?); valid: a, b, c" suffix; `limit` lists only the first names
    of a long list (a model's layers) and says how many there are."""
    import difflib

    choices = sorted(choices)
    close = difflib.get_close_matches(word, choices, n=1)
    if not close:  # `FUSE`, `Fold_BN`: a close name in another case
        lowered = {c.lower(): c for c in choices}
        close = [lowered[m] for m in difflib.get_close_matches(word.lower(), list(lowered), n=1)]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    listed = choices if limit is None else choices[:limit]
    more = f", ... ({len(choices)} in all)" if len(listed) < len(choices) else ""
    return f"{hint}; valid: {', '.join(listed)}{more}"
