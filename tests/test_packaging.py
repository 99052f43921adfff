"""Layout rules: the core never imports a concrete pass; every package is listed for install."""
import ast
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_core_never_imports_passes():
    offenders = []
    for path in (ROOT / "fxopt").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module if node.level == 0 else "." * node.level + node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                          if n.startswith(("fxopt.passes", "passes")) or n.lstrip(".").startswith("passes")]
    assert not offenders, offenders


def test_every_package_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(ROOT / "fxopt").parts).join(["fxopt.", ""]).rstrip(".")
             for p in (ROOT / "fxopt").rglob("__init__.py")}
    found |= {".".join(("fxopt", "passes") + p.parent.relative_to(ROOT / "passes").parts)
              for p in (ROOT / "passes").rglob("__init__.py")}
    assert found <= listed, f"add to pyproject [tool.setuptools] packages: {sorted(found - listed)}"


def test_passes_import_only_under_fxopt_namespace():
    import importlib.util

    import fxopt.passes

    assert pathlib.Path(fxopt.passes.__file__).parent == ROOT / "passes"
    assert importlib.util.find_spec("passes") is None or "site-packages" not in str(importlib.util.find_spec("passes").origin)
