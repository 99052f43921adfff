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
    """Base class of every error fxopt raises on purpose."""


class CaptureError(FxoptError):
    """No front end could turn the model into a GraphModule; lists each attempt."""


class PipelineError(FxoptError):
    """A pipeline text or pass option is invalid (unknown pass/option, bad value)."""


class PassError(FxoptError):
    """A pass raised; the input module and the last good module are intact."""

    def __init__(self, pass_name: str, message: str) -> None:
        super().__init__(f"pass '{pass_name}' failed: {message}")
        self.pass_name = pass_name


class VerificationError(FxoptError):
    """A transformed module no longer matches the original within tolerance."""


class SerializationError(FxoptError):
    """`fxopt.save` cannot store something in a graph, or `fxopt.load` refuses a file."""


class VerificationWarning(UserWarning):
    """`optimize` returned a module that failed verification (see its report); filter it with
    ``warnings.simplefilter("error", fxopt.VerificationWarning)`` to make that an exception."""


class PassWarning(UserWarning):
    """A pass ran but did less than it was asked, and says why: prune removed nothing or well
    under its ratio, quantize found nothing to quantize, lower-int8 missed its target SQNR.
    Make it an exception with ``warnings.simplefilter("error", fxopt.PassWarning)``."""


class TrainingModeWarning(UserWarning):
    """A model (or a batchnorm or dropout inside it) was in training mode: fxopt captures and
    optimizes its eval-mode semantics. Call ``model.eval()`` first, or make it an exception
    with ``warnings.simplefilter("error", fxopt.TrainingModeWarning)``."""


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
    user = [f for f in frames if not _is_library_frame(f)]
    return (user or frames)[-1]


def _library_dirs() -> tuple[str, ...]:
    import os

    import torch

    return tuple(
        os.path.dirname(os.path.abspath(path)) + os.sep for path in (torch.__file__, __file__)
    )


def _is_library_frame(frame: str) -> bool:
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
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    listed = choices if limit is None else choices[:limit]
    more = f", ... ({len(choices)} in all)" if len(listed) < len(choices) else ""
    return f"{hint}; valid: {', '.join(listed)}{more}"
