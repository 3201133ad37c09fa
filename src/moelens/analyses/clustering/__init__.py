"""Expert clustering (docs/methods.md §3): HC-SMoE and M-SMoE clusters of every MoE layer, merged
checkpoints, and what merging costs."""

from moelens.analyses.clustering.analysis import ANALYSIS, METHODS, Clustering, ClusteringConfig, cluster
from moelens.analyses.clustering.merge_cost import MergeCost, MergeCostConfig, merge_cost
from moelens.analyses.clustering.merging import merge_clusters

__all__ = ["ANALYSIS", "METHODS", "Clustering", "ClusteringConfig", "MergeCost", "MergeCostConfig", "cluster", "merge_clusters", "merge_cost"]
