"""Pattern rewriting for researchers: write a pattern and its replacement, fxopt finds it.

Patterns match on the semantic op view (`fxopt.ir.op_view`), so one pattern covers
`torch.relu`, `F.relu`, `nn.ReLU`, `x.relu()` and `aten.relu`, in symbolic and torch.export
graphs alike. A pattern is either a small Python function (`pattern_from_function`) or an
explicit tree of `Op` / `Var` / `Const`; a replacement is a Python function of the names the
match binds, or a `rewrite` function for rewrites that compute new tensors. Shape/dtype
constraints go on `Var`, and `check=` is an extra hook on the whole match. `apply_patterns`
counts matches per pattern, lists where they matched, and with `debug="<node>"` says why
each pattern did not match at that node.

A runnable example — replace `x * sigmoid(x)` by `F.silu`, on both front ends::

    >>> import torch, torch.nn.functional as F, fxopt
    >>> from fxopt.patterns import Pattern, apply_patterns, pattern_from_function
    >>> def swish(x):
    ...     return x * torch.sigmoid(x)
    >>> def silu(x):
    ...     return F.silu(x)
    >>> p = Pattern("swish->silu", pattern_from_function(swish), replacement=silu)
    >>> class M(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x.sigmoid().mul(x) + 1
    >>> for mode in ("symbolic", "export"):
    ...     gm = fxopt.capture(M(), (torch.randn(2, 3),), mode=mode)
    ...     report = apply_patterns(gm, p)
    ...     _ = gm.recompile()
    ...     print(mode, report.counts, sum(n.target is F.silu for n in gm.graph.nodes))
    symbolic {'swish->silu': 1} 1
    export {'swish->silu': 1} 1

See docs/patterns.md for the guide.
"""
from .core import ANNOTATIONS, Const, Match, NoMatch, Op, Var, annotate, annotations, explain, match
from .functions import pattern_from_function
from .rewrite import ApplyReport, Pattern, PatternSet, Rewriter, apply_patterns

__all__ = [
    "ANNOTATIONS", "ApplyReport", "Const", "Match", "NoMatch", "Op", "Pattern", "PatternSet", "Rewriter",
    "Var", "annotate", "annotations", "apply_patterns", "explain", "match", "pattern_from_function",
]
