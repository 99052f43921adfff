"""Every public function and class shows its use in its own docstring, as a doctest that runs."""
import inspect
import pathlib

import pytest

import fxopt

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Public names whose docstring has no example yet. Every public name has one now: keep it empty;
# a new public name must come with its example.
WITHOUT_EXAMPLE: set[str] = set()


def _public_callables() -> dict[str, object]:
    return {name: getattr(fxopt, name) for name in fxopt.__all__
            if inspect.isclass(getattr(fxopt, name)) or inspect.isfunction(getattr(fxopt, name))}


def test_public_functions_and_classes_have_a_doctest_example():
    missing = {name for name, obj in _public_callables().items() if ">>>" not in (obj.__doc__ or "")}
    assert missing <= WITHOUT_EXAMPLE, f"add a >>> example to the docstring of: {sorted(missing - WITHOUT_EXAMPLE)}"


def test_the_default_pytest_run_collects_the_doctests():
    """CI runs a bare `python3 -m pytest -q`: the examples are tests only if that collects fxopt/."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--doctest-modules" in options["addopts"].split()
    assert "fxopt" in options["testpaths"]
