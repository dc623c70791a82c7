"""Lazy re-exports of a package's public names (PEP 562).

A sub-package names where each public name lives; the defining module is
imported on first use, so that importing e.g. ``mgrit_gru.core.grid`` does not
import the communicator (and mpi4py) through the package's ``__init__``.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list]]:
    """``(__getattr__, __dir__)`` for ``package`` whose names ``exports`` maps to
    the sub-modules that define them."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list:
        return sorted([*namespace, *exports])

    return __getattr__, __dir__
