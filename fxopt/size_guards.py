"""The conditions on input sizes torch.export guards besides their ranges, as plain data.

Export keeps one branch of a model's code on the sizes it traced (``if x.shape[0] % 2 == 0:``)
and guards the condition in ``ep._guards_code``, as Python text over the inputs
(``(L['x'].size()[0] % 2) == 0``). A graph `fxopt.save` wrote has no code to run that text, so
capture stores each condition rewritten over the flat inputs' sizes (``(v0_0 % 2) == 0``: leaf 0,
dim 0) when it is arithmetic and comparisons only; `check` evaluates them on a call. What the
text holds beyond that (a call, an attribute) is dropped, never run: a file holds data, not code.

    >>> conditions = from_export(["(L['x'].size()[0] % 2) == 0"], {"L['x']": 0})
    >>> conditions
    ['(v0_0 % 2) == 0']
    >>> failed(conditions, (torch.zeros(3, 4),), ["x"]), failed(conditions, (torch.zeros(4, 4),))
    ('(x.shape[0] % 2) == 0', None)
"""
from __future__ import annotations

import ast
import re
from typing import Any, Sequence

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
    """Whether `condition` is integer arithmetic (no power: no huge numbers from a crafted file)
    and comparisons over `v<leaf>_<dim>` names only."""
    try:
        tree = ast.parse(condition, mode="eval")
    except SyntaxError:
        return False
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED):
            return False
        if isinstance(node, ast.Name) and not _VARIABLE.fullmatch(node.id):
            return False
        if isinstance(node, ast.Constant) and type(node.value) not in (int, bool):
            return False
    return True


def failed(conditions: Sequence[str], flat: Sequence[Any], names: Sequence[str] | None = None) -> str | None:
    """The first of `conditions` the flat inputs' sizes do not meet, in the inputs' words
    (``x.shape[0] % 2 == 0``), or None. A condition over a leaf that is no tensor of that rank is
    left to the other checks. Only text `_arithmetic` accepted is evaluated, without builtins."""
    for condition in conditions:
        sizes = {}
        for match in _VARIABLE.finditer(condition):
            leaf, dim = int(match.group(1)), int(match.group(2))
            value = flat[leaf] if leaf < len(flat) else None
            if not isinstance(value, torch.Tensor) or value.dim() <= dim:
                break
            sizes[match.group(0)] = value.shape[dim]
        else:
            if _arithmetic(condition) and not eval(condition, {"__builtins__": {}}, sizes):  # noqa: S307
                return _readable(condition, names)
    return None


def _readable(condition: str, names: Sequence[str] | None) -> str:
    def size(match: re.Match) -> str:
        leaf = int(match.group(1))
        name = names[leaf] if names and leaf < len(names) else f"input {leaf}"
        return f"{name}.shape[{match.group(2)}]"

    return _VARIABLE.sub(size, condition)
