"""Unified diffs of graph listings in linear time.

`difflib.unified_diff` searches for longest matching blocks; when a pass touches thousands of
lines spread over a big graph (every dropout of a 10k-node model removed) that search grows
much faster than the graph. Listings have a key per line, the node name, and passes keep the
order of the nodes they do not touch, so lines align by name in one walk. Only when the
surviving names changed order does this fall back to difflib.

    >>> old = "%x = placeholder x\\n%d = call_module d(%x)\\n%y = relu(%d)\\n"
    >>> new = "%x = placeholder x\\n%y = relu(%x)\\n"
    >>> text, added, removed = listing_diff(old, new, "before.txt", "after.txt")
    >>> print(text, end="")
    --- before.txt
    +++ after.txt
    @@ -1,3 +1,2 @@
     %x = placeholder x
    -%d = call_module d(%x)
    -%y = relu(%d)
    +%y = relu(%x)
    >>> added, removed
    (1, 2)
"""
from __future__ import annotations

import difflib

Opcode = tuple[str, int, int, int, int]


def listing_diff(old: str, new: str, old_name: str, new_name: str, context: int = 2) -> tuple[str, int, int]:
    """(unified diff text, lines added, lines removed); the text is "" when nothing changed."""
    a, b = old.splitlines(), new.splitlines()
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    opcodes = aligned_opcodes(a, b)
    if opcodes is not None:
        matcher.get_opcodes = lambda: opcodes  # get_grouped_opcodes reads them from here
    out: list[str] = []
    added = removed = 0
    for group in matcher.get_grouped_opcodes(context):
        if not out:
            out += [f"--- {old_name}", f"+++ {new_name}"]
        first, last = group[0], group[-1]
        out.append(f"@@ -{_range(first[1], last[2])} +{_range(first[3], last[4])} @@")
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                out.extend(" " + line for line in a[i1:i2])
                continue
            out.extend("-" + line for line in a[i1:i2])
            out.extend("+" + line for line in b[j1:j2])
            removed, added = removed + i2 - i1, added + j2 - j1
    return ("\n".join(out) + "\n" if out else ""), added, removed


def aligned_opcodes(a: list[str], b: list[str]) -> list[Opcode] | None:
    """difflib-style opcodes aligning lines by node name; None if shared names changed order."""
    ka, kb = [_key(line) for line in a], [_key(line) for line in b]
    common = set(ka) & set(kb)
    if len(set(ka)) != len(ka) or len(set(kb)) != len(kb):
        return None  # duplicate keys: not a listing
    if [k for k in ka if k in common] != [k for k in kb if k in common]:
        return None
    ops: list[Opcode] = []
    i = j = 0
    while i < len(a) or j < len(b):
        if i < len(a) and ka[i] not in common:
            tag, di, dj = "delete", 1, 0
        elif j < len(b) and kb[j] not in common:
            tag, di, dj = "insert", 0, 1
        else:
            tag, di, dj = ("equal" if a[i] == b[j] else "replace"), 1, 1
        if ops and ops[-1][0] == tag:
            ops[-1] = (tag, ops[-1][1], i + di, ops[-1][3], j + dj)
        else:
            ops.append((tag, i, i + di, j, j + dj))
        i, j = i + di, j + dj
    return ops


def _key(line: str) -> str:
    return line.partition(" = ")[0]


def _range(start: int, stop: int) -> str:
    length = stop - start
    if length == 1:
        return str(start + 1)
    return f"{start + 1 if length else start},{length}"
