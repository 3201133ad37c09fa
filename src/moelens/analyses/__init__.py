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
    **dict.fromkeys(("Declaration", "FigureSpec", "ModelInput", "Command", "CommandFlag"), "moelens.analyses.declaration"),
    **dict.fromkeys(("ANALYSES", "declarations", "get_analysis"), "moelens.analyses.registry"),
    "run_analysis": "moelens.analyses.runner",
    "CalibrationConfig": "moelens.analyses.calibration.config",
    **dict.fromkeys(("Calibration", "load_calibration"), "moelens.analyses.calibration.analysis"),
    **dict.fromkeys(("ClusteringConfig", "MergeCostConfig"), "moelens.analyses.clustering.config"),
    "Clustering": "moelens.analyses.clustering.analysis",
    "MergeCost": "moelens.analyses.clustering.merge_cost",
    "merge_clusters": "moelens.analyses.clustering.merging",
    "ExpertDistanceConfig": "moelens.analyses.expert_distance.config",
    "ExpertDistance": "moelens.analyses.expert_distance.analysis",
    "InterventionsConfig": "moelens.analyses.interventions.config",
    "Interventions": "moelens.analyses.interventions.analysis",
    "ModuleMetricsConfig": "moelens.analyses.module_metrics.config",
    "ModuleMetrics": "moelens.analyses.module_metrics.analysis",
    "RouterAlignmentConfig": "moelens.analyses.router_alignment.config",
    **dict.fromkeys(("RouterAlignment", "default_ks"), "moelens.analyses.router_alignment.analysis"),
    "RouterEditsConfig": "moelens.analyses.router_edits.config",
    "RouterEdits": "moelens.analyses.router_edits.analysis",
    **dict.fromkeys(("calibrate", "cluster", "expert_distance", "merge_cost", "module_metrics", "router_alignment", "router_edits", "trace"),
                    "moelens.analyses.api"),
}

__getattr__, __dir__ = lazy_package(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
