"""moelens: look inside Mixture-of-Experts language models.

>>> import moelens as ml
>>> model = ml.open_model("mistralai/Mixtral-8x7B-v0.1")   # or a local directory
>>> model.layer(0).router().weight.shape

Every public name is imported on first use (PEP 562), so ``import moelens`` (and the command
line's ``--help``) does not pay for torch, transformers and pandas.

``ml.report`` and ``ml.atlas`` are functions, although ``moelens.report`` and ``moelens.atlas`` are
also modules: import those with ``from moelens.report import build_report`` (or
``importlib.import_module("moelens.report")``).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

#: Each public name and the module that defines it.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("load_calibration", "merge_clusters"), "moelens.analyses"),
    "atlas": "moelens.atlas",
    **dict.fromkeys(("ExpertWeights", "MoELayer", "MoEModel", "RouterWeights", "open_model"), "moelens.checkpoint"),
    "MoelensError": "moelens.errors",
    "build_report": "moelens.report",
    "report": "moelens.report",
    **dict.fromkeys(("Run", "load_run", "load_runs"), "moelens.results"),
    "set_threads": "moelens.threads",
}


def _analyses() -> list[str]:
    """Every registered analysis's function (``router_alignment``) and config class, from its
    declaration (reading the declarations imports no torch)."""
    from moelens.analyses.registry import declarations

    return [name for d in declarations().values() for name in (d.config.rpartition(":")[2], d.function)]


_ANALYSIS_NAMES = _analyses()
_EXPORTS.update(dict.fromkeys(_ANALYSIS_NAMES, "moelens.analyses"))

#: Sub-packages reachable as attributes (``ml.zoo.build()``) without importing them up front.
_LAZY_SUBPACKAGES = ("zoo", "runtime")


#: Public functions named like the module that defines them (``moelens.report.report``).
_FUNCTIONS_OVER_MODULES = frozenset(name for name, module in _EXPORTS.items() if module == f"moelens.{name}")


class _Package(types.ModuleType):
    """The ``moelens`` package. Importing a submodule makes the import system bind it as an
    attribute of its package (``moelens.report = <module moelens.report>``), which would hide the
    function ``ml.report`` once anything imported the module; such a binding is skipped for the
    names of :data:`_FUNCTIONS_OVER_MODULES`, so those names stay the functions (:func:`__getattr__`
    fetches them). The module itself stays in ``sys.modules``, so ``from moelens.report import …``
    works as ever."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FUNCTIONS_OVER_MODULES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name == "__version__":  # declared once, in pyproject.toml; read from the installed metadata
        from moelens.version import package_version

        return package_version()
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name in _LAZY_SUBPACKAGES:
        return importlib.import_module(f"moelens.{name}")
    raise AttributeError(f"module 'moelens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_LAZY_SUBPACKAGES, "__version__"})


__all__ = [
    "ExpertWeights", "MoELayer", "MoEModel", "RouterWeights", "open_model", "MoelensError",
    "Run", "load_run", "load_runs", "__version__",
    *_ANALYSIS_NAMES, "load_calibration", "merge_clusters",
    "build_report", "report", "atlas", "set_threads",
]
