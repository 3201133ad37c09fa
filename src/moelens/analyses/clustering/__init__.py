"""Expert clustering (docs/methods.md §3): HC-SMoE and M-SMoE clusters of every MoE layer, merged
checkpoints, and what merging costs.

Names are imported on first use (PEP 562, :mod:`moelens.lazy`): the configs (torch-free) without
the analyses that compute with them."""

from moelens.lazy import lazy_package

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("METHODS", "ClusteringConfig", "MergeCostConfig"), "moelens.analyses.clustering.config"),
    **dict.fromkeys(("ANALYSIS", "Clustering", "cluster"), "moelens.analyses.clustering.analysis"),
    **dict.fromkeys(("MergeCost", "merge_cost"), "moelens.analyses.clustering.merge_cost"),
    "merge_clusters": "moelens.analyses.clustering.merging",
}

__getattr__, __dir__ = lazy_package(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
