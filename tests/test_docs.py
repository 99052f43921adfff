"""The Python examples in README and docs run as written, each block on its own (as a reader
copies one into a fresh session), so a block that leans on names from another fails here."""
import pathlib
import re

import pytest

import fxopt

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _python_blocks(doc: str) -> list[tuple[int, str]]:
    """(line of the block's first code line, code) for each ```python block of `doc`."""
    text = (ROOT / doc).read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


BLOCKS = [(doc, line, code) for doc in DOCS for line, code in _python_blocks(doc)]


def test_the_docs_with_examples_are_all_found():
    found = {doc for doc, _, _ in BLOCKS}
    assert {"README.md", "docs/patterns.md", "docs/pruning.md", "docs/quantization.md",
            "docs/writing-a-pass.md"} <= found


@pytest.mark.parametrize("doc, line, code", BLOCKS, ids=[f"{doc}:{line}" for doc, line, _ in BLOCKS])
def test_doc_example_runs_on_its_own(doc, line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples write files (model.int8.pt, dump/)
    before = set(fxopt.available_passes())
    try:
        # padded so that a traceback points at the doc's own line numbers
        exec(compile("\n" * (line - 1) + code, str(ROOT / doc), "exec"), {"__name__": "__doc_example__"})
    finally:
        for name in set(fxopt.available_passes()) - before:
            fxopt.unregister_pass(name)
