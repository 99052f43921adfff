"""The docstring examples of the built-in passes run as written.

pytest's `--doctest-modules` collects the core only (./passes would import as a top-level
module), so the passes' examples run here, imported under their installed name.
"""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import fxopt.passes

MODULES = sorted(m.name for m in pkgutil.walk_packages(fxopt.passes.__path__, "fxopt.passes."))


@pytest.mark.parametrize("name", MODULES)
def test_pass_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed; run python -m doctest on it"
