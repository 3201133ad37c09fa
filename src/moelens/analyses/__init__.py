"""Analyses: each a sub-package with a frozen config in and tidy tables (a :class:`~moelens.results.Run`) out.

Every analysis has the shape of :class:`~moelens.analyses.base.Analysis` and runs through
:func:`~moelens.analyses.runner.run_analysis`; :data:`ANALYSES` lists them by name.

Names are imported on first use (PEP 562, :mod:`moelens.lazy`): a config (``<analysis>/config.py``,
torch-free) costs neither torch nor pandas, and the command line derives its options from the
configs without importing the analyses.
"""

from moelens.lazy import lazy_package

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("Analysis", "Plan", "Unit", "UnitContext"), "moelens.analyses.base"),
    "option": "moelens.analyses.fields",
    **dict.fromkeys(("ANALYSES", "get_analysis"), "moelens.analyses.registry"),
    "run_analysis": "moelens.analyses.runner",
    "CalibrationConfig": "moelens.analyses.calibration.config",
    **dict.fromkeys(("Calibration", "calibrate", "load_calibration"), "moelens.analyses.calibration.analysis"),
    **dict.fromkeys(("ClusteringConfig", "MergeCostConfig"), "moelens.analyses.clustering.config"),
    **dict.fromkeys(("Clustering", "cluster"), "moelens.analyses.clustering.analysis"),
    **dict.fromkeys(("MergeCost", "merge_cost"), "moelens.analyses.clustering.merge_cost"),
    "merge_clusters": "moelens.analyses.clustering.merging",
    "ExpertDistanceConfig": "moelens.analyses.expert_distance.config",
    **dict.fromkeys(("ExpertDistance", "expert_distance"), "moelens.analyses.expert_distance.analysis"),
    "InterventionsConfig": "moelens.analyses.interventions.config",
    **dict.fromkeys(("Interventions", "trace"), "moelens.analyses.interventions.analysis"),
    "ModuleMetricsConfig": "moelens.analyses.module_metrics.config",
    **dict.fromkeys(("ModuleMetrics", "module_metrics"), "moelens.analyses.module_metrics.analysis"),
    "RouterAlignmentConfig": "moelens.analyses.router_alignment.config",
    **dict.fromkeys(("RouterAlignment", "default_ks", "router_alignment"), "moelens.analyses.router_alignment.analysis"),
    "RouterEditsConfig": "moelens.analyses.router_edits.config",
    **dict.fromkeys(("RouterEdits", "router_edits"), "moelens.analyses.router_edits.analysis"),
}

__getattr__, __dir__ = lazy_package(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
