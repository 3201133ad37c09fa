"""Merging experts: usage-weighted averages of (permuted) cluster members, and merged
checkpoints that transformers loads (docs/methods.md §3, §7).

>>> from moelens.merge import export_merged, merge_cluster
>>> merged = merge_cluster([layer.expert(e) for e in (3, 5, 9)], usage=[0.2, 0.05, 0.1])
>>> export_merged("zoo/base", clusters_table, "merged/base-g4", export="compact")
"""

from moelens.merge.average import merge_cluster, merge_layer, merge_rows, usage_weights
from moelens.merge.export import EXPORTS, RECORD_NAME, export_merged, merge_on_load, plan_export
from moelens.merge.families import LAYOUTS, MergeLayout, merge_layout
from moelens.merge.table import CLUSTER_COLUMNS, LayerClusters, read_clusters

__all__ = [
    "CLUSTER_COLUMNS", "EXPORTS", "LAYOUTS", "LayerClusters", "MergeLayout", "RECORD_NAME", "export_merged", "merge_cluster",
    "merge_layer", "merge_layout", "merge_on_load", "merge_rows", "plan_export", "read_clusters", "usage_weights",
]
