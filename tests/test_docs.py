"""The Python examples in README and docs run as written."""
import pathlib
import re

import pytest

import fxopt

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks(path: pathlib.Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


@pytest.mark.parametrize("doc", ["README.md", "docs/writing-a-pass.md", "docs/patterns.md"])
def test_doc_examples_run(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write dumps
    before = set(fxopt.available_passes())
    try:
        namespace: dict = {}  # a doc's blocks build on each other, as a reader runs them
        for block in _python_blocks(ROOT / doc):
            exec(compile(block, doc, "exec"), namespace)
    finally:
        for name in set(fxopt.available_passes()) - before:
            fxopt.unregister_pass(name)
