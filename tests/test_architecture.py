"""The layer rule of docs/architecture.md, read from the source.

Every import statement of the package (module level or inside a function)
is parsed with ``ast``; the layer of the importing module decides which
layers it may import:

=========  =============================================
layer      may import (besides itself)
=========  =============================================
base       -- (the package's ``__init__``, ``errors``, ``limits``, ``_exports``)
core       base
models     core, base
data       base
training   models, data, core, base
top        anything (``cli``, ``__main__``)
=========  =============================================

and: exactly one module imports mpi4py (``core/comm.py``); the data layer
imports neither torch nor mpi4py; no private (underscore) name is imported
from another sub-package.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mgrit_gru"
# the package itself is base: its __init__ holds the version and imports nothing
BASE = {"mgrit_gru", "mgrit_gru.errors", "mgrit_gru.limits", "mgrit_gru._exports"}
TOP = {"mgrit_gru.cli", "mgrit_gru.__main__"}
ALLOWED = {
    "base": {"base"},
    "core": {"base", "core"},
    "models": {"base", "core", "models"},
    "data": {"base", "data"},
    "training": {"base", "core", "models", "data", "training"},
    "top": {"base", "core", "models", "data", "training", "top"},
}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str:
    if module in BASE:
        return "base"
    if module in TOP:
        return "top"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in ("core", "models", "data", "training"):
        return parts[1]
    raise AssertionError(f"{module}: not in any layer of docs/architecture.md; add it "
                         f"to a sub-package or to the base/top lists of this test")


def imports(path: Path, root: Path = PACKAGE):
    """``(line, imported module, names or None)`` of every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            yield node.lineno, target, [a.name for a in node.names]


MODULES = sorted(PACKAGE.rglob("*.py"))


def resolve(target: str, names, root: Path = PACKAGE) -> list[str]:
    """The package modules an import reaches (``from mgrit_gru.models import cells``
    reaches the sub-module ``mgrit_gru.models.cells``)."""
    out = [target]
    if names:
        for n in names:
            sub = Path(*f"{target}.{n}".split("."))
            if (root.parent / sub).with_suffix(".py").exists() or \
                    (root.parent / sub / "__init__.py").exists():
                out.append(f"{target}.{n}")
    return out


def violations(path: Path, root: Path = PACKAGE) -> list[str]:
    """Imports of ``path`` that break the layer rule or import a private name
    from another sub-package."""
    here = module_name(path, root)
    mine = layer(here)
    bad = []
    for line, target, names in imports(path, root):
        if not (target == "mgrit_gru" or target.startswith("mgrit_gru.")):
            continue
        for reached in resolve(target, names, root):
            theirs = layer(reached)
            if theirs not in ALLOWED[mine]:
                bad.append(f"{path.name}:{line} imports {reached} ({theirs}); {here} "
                           f"({mine}) may import only {sorted(ALLOWED[mine])}")
        if names and target.startswith("mgrit_gru.") and \
                (layer(target) != mine or mine == "base"):
            private = [n for n in names if n.startswith("_")]
            if private:
                bad.append(f"{path.name}:{line} imports private {private} from {target}")
    return bad


def test_every_module_is_in_a_layer():
    for path in MODULES:
        layer(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_layer_rule_and_no_private_names_across(path):
    bad = violations(path)
    assert not bad, "; ".join(bad)


def test_one_module_imports_mpi4py():
    users = sorted(module_name(p) for p in MODULES
                   if any(t.split(".")[0] == "mpi4py" for _, t, _ in imports(p)))
    assert users == ["mgrit_gru.core.comm"]


def test_data_layer_imports_no_torch_and_no_mpi():
    for path in MODULES:
        if layer(module_name(path)) != "data":
            continue
        heavy = [t for _, t, _ in imports(path) if t.split(".")[0] in ("torch", "mpi4py")]
        assert not heavy, f"{path}: the data layer is numpy/h5py only, imports {heavy}"


def test_checker_catches_violations(tmp_path):
    """The checker itself, on a fake tree: a core module that imports the models,
    data that imports training, and a private name taken across sub-packages."""
    root = tmp_path / "mgrit_gru"
    for sub in ("core", "models", "data", "training"):
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text("")
    (root / "models" / "cells.py").write_text("X = 1\n")
    (root / "core" / "bad.py").write_text(
        "from mgrit_gru.models import cells\n"
        "def f():\n    from mgrit_gru.models.cells import X\n")
    (root / "data" / "bad.py").write_text("import mgrit_gru.training\n")
    (root / "training" / "bad.py").write_text("from mgrit_gru.models.cells import _hidden\n")
    (root / "training" / "good.py").write_text(
        "from mgrit_gru.models.cells import X\nfrom mgrit_gru.training.bad import _ok\n")
    assert len(violations(root / "core" / "bad.py", root)) == 3   # package, module, lazy import
    assert len(violations(root / "data" / "bad.py", root)) == 1
    assert any("private" in v for v in violations(root / "training" / "bad.py", root))
    assert violations(root / "training" / "good.py", root) == []


@pytest.mark.parametrize("package, names", [
    ("mgrit_gru.core", ["MGRIT", "MGRITSettings", "Comm", "DahlquistStepper", "Partition"]),
    ("mgrit_gru.models", ["SequenceClassifier", "SerialPropagator", "MGRITPropagator",
                          "Pooling", "make_cell"]),
    ("mgrit_gru.data", ["load_dataset", "write_dataset", "Split", "make_synthetic"]),
    ("mgrit_gru.training", ["train", "TrainConfig", "make_config"]),
])
def test_public_names_are_re_exported(package, names):
    import importlib

    mod = importlib.import_module(package)
    for name in names:
        assert name in mod.__all__, f"{package}.__all__ lacks {name}"
        assert getattr(mod, name) is not None
    for name in mod.__all__:
        getattr(mod, name)   # every advertised name resolves
