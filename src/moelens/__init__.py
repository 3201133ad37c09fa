"""moelens: look inside Mixture-of-Experts language models.

>>> import moelens as ml
>>> model = ml.open_model("mistralai/Mixtral-8x7B-v0.1")   # or a local directory
>>> model.layer(0).router().weight.shape

Every public name is imported on first use (PEP 562), so ``import moelens`` (and the command
line's ``--help``) does not pay for torch, transformers and pandas.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Each public name and the module that defines it.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys((
        "CalibrationConfig", "ClusteringConfig", "ExpertDistanceConfig", "InterventionsConfig", "MergeCostConfig",
        "ModuleMetricsConfig", "RouterAlignmentConfig", "calibrate", "cluster", "expert_distance", "load_calibration",
        "merge_clusters", "merge_cost", "module_metrics", "router_alignment", "trace",
    ), "moelens.analyses"),
    "atlas": "moelens.atlas",
    **dict.fromkeys(("ExpertWeights", "MoELayer", "MoEModel", "RouterWeights", "open_model"), "moelens.checkpoint"),
    "MoelensError": "moelens.errors",
    "build_report": "moelens.report",
    "report": "moelens.report",
    **dict.fromkeys(("Run", "load_run", "load_runs"), "moelens.results"),
    "set_threads": "moelens.threads",
}

#: Sub-packages reachable as attributes (``ml.zoo.build()``) without importing them up front.
_LAZY_SUBPACKAGES = ("zoo", "runtime")


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name in _LAZY_SUBPACKAGES:
        return importlib.import_module(f"moelens.{name}")
    raise AttributeError(f"module 'moelens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_LAZY_SUBPACKAGES})


__all__ = [
    "ExpertWeights", "MoELayer", "MoEModel", "RouterWeights", "open_model", "MoelensError",
    "Run", "load_run", "load_runs", "__version__",
    "RouterAlignmentConfig", "router_alignment", "ExpertDistanceConfig", "expert_distance", "ModuleMetricsConfig", "module_metrics",
    "InterventionsConfig", "trace",
    "CalibrationConfig", "calibrate", "load_calibration", "ClusteringConfig", "cluster", "merge_clusters", "MergeCostConfig", "merge_cost",
    "build_report", "report", "atlas", "set_threads",
]
