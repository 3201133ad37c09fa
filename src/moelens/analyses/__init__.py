"""Analyses: each a sub-package with a frozen config in and tidy tables (a :class:`~moelens.results.Run`) out.

Every analysis has the shape of :class:`~moelens.analyses.base.Analysis` and runs through
:func:`~moelens.analyses.runner.run_analysis`; :data:`ANALYSES` lists them by name.
"""

from moelens.analyses.base import Analysis, Plan, Unit, UnitContext, option
from moelens.analyses.calibration import Calibration, CalibrationConfig, calibrate, load_calibration
from moelens.analyses.clustering import (
    Clustering,
    ClusteringConfig,
    MergeCost,
    MergeCostConfig,
    cluster,
    merge_clusters,
    merge_cost,
)
from moelens.analyses.expert_distance import ExpertDistance, ExpertDistanceConfig, expert_distance
from moelens.analyses.interventions import Interventions, InterventionsConfig, trace
from moelens.analyses.module_metrics import ModuleMetrics, ModuleMetricsConfig, module_metrics
from moelens.analyses.router_alignment import RouterAlignment, RouterAlignmentConfig, default_ks, router_alignment
from moelens.analyses.runner import run_analysis

#: Every analysis by its manifest name.
ANALYSES: dict[str, type[Analysis]] = {cls.name: cls for cls in (RouterAlignment, ExpertDistance, ModuleMetrics, Interventions, Calibration, Clustering, MergeCost)}


def get_analysis(name: str) -> Analysis:
    """An analysis by name (``router_alignment``), or a ConfigError listing the known ones."""
    from moelens.errors import ConfigError

    if name not in ANALYSES:
        raise ConfigError(f"no analysis named {name!r}; known: {', '.join(ANALYSES)}")
    return ANALYSES[name]()


__all__ = [
    "ANALYSES", "Analysis", "Interventions", "InterventionsConfig", "trace", "ModuleMetrics", "ModuleMetricsConfig", "module_metrics", "ExpertDistance", "ExpertDistanceConfig", "expert_distance", "Plan", "RouterAlignment", "RouterAlignmentConfig", "Unit", "UnitContext",
    "default_ks", "get_analysis", "option", "router_alignment", "run_analysis",
    "Calibration", "CalibrationConfig", "calibrate", "load_calibration", "Clustering", "ClusteringConfig", "cluster",
    "MergeCost", "MergeCostConfig", "merge_cost", "merge_clusters",
]
