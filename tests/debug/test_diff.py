"""Listing diffs: aligned by node name in one walk, difflib only when nodes were reordered."""
from fxopt.debug.diff import aligned_opcodes, listing_diff


def apply(old: str, diff: str) -> str:
    """Rebuild the new text from the old one and a unified diff (enough for these tests)."""
    a, out, i = old.splitlines(), [], 0
    for line in diff.splitlines()[2:]:
        if line.startswith("@@"):  # @@ -start,length +start,length @@; start is 1-based unless length is 0
            first, _, length = line.split()[1][1:].partition(",")
            start = int(first) - (length != "0")
            out.extend(a[i:start])
            i = start
        elif line[:1] in (" ", "-"):
            i += 1
            if line[0] == " ":
                out.append(line[1:])
        elif line[:1] == "+":
            out.append(line[1:])
    return "\n".join(out + a[i:]) + "\n"


def listing(names, suffix=""):
    return "".join(f"%{n} = call_function f(%x){suffix if n.startswith('r') else ''}\n" for n in names)


def test_big_interleaved_change_diffs_and_applies():
    names = [f"{'d' if i % 5 == 0 else 'r' if i % 7 == 0 else 'n'}{i}" for i in range(3000)]
    old = listing(names)
    new = listing([n for n in names if not n.startswith("d")], suffix="  : f32[2]")
    text, added, removed = listing_diff(old, new, "00.txt", "01.txt")
    assert text.startswith("--- 00.txt\n+++ 01.txt\n@@ -1,")
    assert removed == 600 + 343 and added == 343  # dropped d-nodes; r-nodes changed
    assert apply(old, text) == new


def test_unchanged_listing_has_an_empty_diff():
    assert listing_diff(listing(["a", "b"]), listing(["a", "b"]), "x", "y") == ("", 0, 0)


def test_reordered_nodes_fall_back_to_difflib():
    old, new = listing(["a", "b", "c"]), listing(["a", "c", "b"])
    assert aligned_opcodes(old.splitlines(), new.splitlines()) is None
    text, added, removed = listing_diff(old, new, "x", "y")
    assert added == removed == 1 and apply(old, text) == new
