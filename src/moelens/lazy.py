"""Packages whose public names are imported on first use (PEP 562).

``lazy_package(__name__, {"name": "module.that.defines.it", …})`` gives a package a module-level
``__getattr__`` and ``__dir__``: ``from package import name`` imports the defining module then, and
only then, so importing the package (for a config, or the command line's ``--help``) does not pay
for torch or pandas.

A public function named like a sub-module of its package (``moelens.analyses.expert_distance``,
the function, defined in the sub-package of the same name) stays the function: importing a
sub-module makes the import system bind it as an attribute of its package, and such a binding is
skipped for the names the package exports. The sub-module itself stays in ``sys.modules``, so
``from moelens.analyses.expert_distance import tables`` works as ever.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any


class LazyPackage(types.ModuleType):
    """A package made by :func:`lazy_package`: a sub-module never hides an exported name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in self.__dict__.get("__lazy_exports__", {}):
            return
        super().__setattr__(name, value)


def lazy_package(name: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of package ``name``, whose public names ``exports`` maps
    to the modules that define them."""
    module = sys.modules[name]
    module.__dict__["__lazy_exports__"] = dict(exports)
    module.__class__ = LazyPackage

    def __getattr__(attr: str) -> Any:
        if attr not in exports:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        value = getattr(importlib.import_module(exports[attr]), attr)
        module.__dict__[attr] = value  # later look-ups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*module.__dict__, *exports})

    return __getattr__, __dir__
