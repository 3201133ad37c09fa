"""moelens: look inside Mixture-of-Experts language models.

>>> import moelens as ml
>>> model = ml.open_model("mistralai/Mixtral-8x7B-v0.1")   # or a local directory
>>> model.layer(0).router().weight.shape
"""

from moelens.analyses import (
    CalibrationConfig,
    ClusteringConfig,
    ExpertDistanceConfig,
    InterventionsConfig,
    MergeCostConfig,
    ModuleMetricsConfig,
    RouterAlignmentConfig,
    calibrate,
    cluster,
    expert_distance,
    load_calibration,
    merge_clusters,
    merge_cost,
    module_metrics,
    router_alignment,
    trace,
)
from moelens.atlas import atlas
from moelens.checkpoint import ExpertWeights, MoELayer, MoEModel, RouterWeights, open_model
from moelens.errors import MoelensError
from moelens.report import build_report, report
from moelens.results import Run, load_run, load_runs

__version__ = "0.1.0"

_LAZY_SUBPACKAGES = ("zoo", "runtime")


def __getattr__(name: str):
    # ``ml.zoo.build()`` without importing the training code on ``import moelens``
    if name in _LAZY_SUBPACKAGES:
        import importlib

        return importlib.import_module(f"moelens.{name}")
    raise AttributeError(f"module 'moelens' has no attribute {name!r}")

__all__ = [
    "ExpertWeights", "MoELayer", "MoEModel", "RouterWeights", "open_model", "MoelensError",
    "Run", "load_run", "load_runs", "__version__",
    "RouterAlignmentConfig", "router_alignment", "ExpertDistanceConfig", "expert_distance", "ModuleMetricsConfig", "module_metrics",
    "InterventionsConfig", "trace",
    "CalibrationConfig", "calibrate", "load_calibration", "ClusteringConfig", "cluster", "merge_clusters", "MergeCostConfig", "merge_cost",
    "build_report", "report", "atlas",
]
