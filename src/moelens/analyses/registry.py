"""Every analysis by its manifest name (importing it imports every analysis, and so torch)."""

from __future__ import annotations

from moelens.analyses.base import Analysis
from moelens.analyses.calibration.analysis import Calibration
from moelens.analyses.clustering.analysis import Clustering
from moelens.analyses.clustering.merge_cost import MergeCost
from moelens.analyses.expert_distance.analysis import ExpertDistance
from moelens.analyses.interventions.analysis import Interventions
from moelens.analyses.module_metrics.analysis import ModuleMetrics
from moelens.analyses.router_alignment.analysis import RouterAlignment
from moelens.analyses.router_edits.analysis import RouterEdits
from moelens.errors import ConfigError

#: Every analysis by its manifest name.
ANALYSES: dict[str, type[Analysis]] = {cls.name: cls for cls in (RouterAlignment, ExpertDistance, ModuleMetrics, Interventions, RouterEdits, Calibration, Clustering, MergeCost)}


def get_analysis(name: str) -> Analysis:
    """An analysis by name (``router_alignment``), or a ConfigError listing the known ones."""
    if name not in ANALYSES:
        raise ConfigError(f"no analysis named {name!r}; known: {', '.join(ANALYSES)}")
    return ANALYSES[name]()


__all__ = ["ANALYSES", "get_analysis"]
