"""The conditions on input sizes torch.export guards besides their ranges, as plain data.

Export keeps one branch of a model's code on the sizes it traced (``if x.shape[0] % 2 == 0:``)
and guards the condition in ``ep._guards_code``, as Python text over the inputs
(``(L['x'].size()[0] % 2) == 0``). A graph `fxopt.save` wrote has no code to run that text, so
capture stores each condition rewritten over the flat inputs' sizes (``(v0_0 % 2) == 0``: leaf 0,
dim 0) when it is arithmetic and comparisons only; `failed` evaluates them on a call. What the
text holds beyond that (a call, an attribute) is dropped, never run: a file holds data, not code.

    >>> conditions = from_export(["(L['x'].size()[0] % 2) == 0"], {"L['x']": 0})
    >>> conditions
    ['(v0_0 % 2) == 0']
    >>> failed(conditions, (torch.zeros(3, 4),), lambda: ["x"]), failed(conditions, (torch.zeros(4, 4),))
    ('(x.shape[0] % 2) == 0', None)
"""
from __future__ import annotations

import ast
import functools
import re
from types import CodeType
from typing import Any, Callable, Sequence

import torch

_SIZE = re.compile(r"(L(?:\[[^\]]+\])+)\.size\(\)\[(\d+)\]")
_VARIABLE = re.compile(r"v(\d+)_(\d+)")
_ALLOWED = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.UAdd, ast.BinOp,
            ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.Compare, ast.Eq, ast.NotEq, ast.Lt,
            ast.LtE, ast.Gt, ast.GtE, ast.Name, ast.Load, ast.Constant)


def from_export(guards: Sequence[str], leaves: dict[str, int]) -> list[str]:
    """`guards` (export's text) over the flat inputs' sizes; `leaves` maps each input's text
    (``L['x']``, ``L['batch']['a']``) to its flat index. A condition on anything else is dropped."""
    conditions = []
    for text in guards:
        unknown = False

        def variable(match: re.Match) -> str:
            nonlocal unknown
            index = leaves.get(match.group(1))
            unknown = unknown or index is None
            return f"v{index}_{match.group(2)}"

        condition = _SIZE.sub(variable, text)
        if not unknown and _arithmetic(condition):
            conditions.append(condition)
    return conditions


def _arithmetic(condition: str) -> bool:
    return _compiled(condition) is not None


@functools.lru_cache(maxsize=256)
def _compiled(condition: str) -> CodeType | None:
    """`condition` compiled, when it is integer arithmetic (no power: no huge numbers from a
    crafted file) and comparisons over `v<leaf>_<dim>` names only; else None. Cached: a loaded
    graph checks its conditions on every call."""
    try:
        tree = ast.parse(condition, mode="eval")
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED):
            return None
        if isinstance(node, ast.Name) and not _VARIABLE.fullmatch(node.id):
            return None
        if isinstance(node, ast.Constant) and type(node.value) not in (int, bool):
            return None
    return compile(tree, "<size condition>", "eval")


def failed(conditions: Sequence[str], flat: Sequence[Any],
           names: Callable[[], Sequence[str]] | None = None) -> str | None:
    """The first of `conditions` the flat inputs' sizes do not meet, in the inputs' words
    (``x.shape[0] % 2 == 0``, `names` giving each flat input's), or None. A condition over a
    leaf that is no tensor of that rank is left to the other checks. Only text `_compiled`
    accepts is evaluated, without builtins."""
    for condition in conditions:
        sizes = {}
        for match in _VARIABLE.finditer(condition):
            leaf, dim = int(match.group(1)), int(match.group(2))
            value = flat[leaf] if leaf < len(flat) else None
            if not isinstance(value, torch.Tensor) or value.dim() <= dim:
                break
            sizes[match.group(0)] = value.shape[dim]
        else:
            code = _compiled(condition)
            if code is not None and not eval(code, {"__builtins__": {}}, sizes):  # noqa: S307
                return _readable(condition, names)
    return None


def _readable(condition: str, names: Callable[[], Sequence[str]] | None) -> str:
    names = names() if names is not None else None

    def size(match: re.Match) -> str:
        leaf = int(match.group(1))
        name = names[leaf] if names and leaf < len(names) else f"input {leaf}"
        return f"{name}.shape[{match.group(2)}]"

    return _VARIABLE.sub(size, condition)
