"""Expert clustering (docs/methods.md §3): HC-SMoE and M-SMoE clusters of every MoE layer, merged
checkpoints, and what merging costs."""

from moelens.analyses.declaration import Command, Declaration, FigureSpec
from moelens.lazy import lazy_package

#: Expert clustering, declared once (:mod:`moelens.analyses.declaration`).
CLUSTERING = Declaration(
    name="clustering", title="Expert clustering", config="moelens.analyses.clustering.config:ClusteringConfig",
    analysis="moelens.analyses.clustering.analysis:Clustering", run="moelens.analyses.clustering.analysis:run",
    function="cluster",
    signature=("calibration", "method", "groups", "ratio", "linkage", "distance", "budget", "layers", "*", "max_tokens", "batch_tokens", "device", "dtype",
               "shard_tokens"),
    tables=("calibration_usage", "calibration_layers", "clusters", "cluster_layers", "calibration_tokens"),
    section="moelens.report.clustering_report:clustering_section",
    figures={
        "cluster_map": FigureSpec("moelens.figures.clusters:cluster_map", "Cluster map", one_run=True),
        "cluster_usage": FigureSpec("moelens.figures.clusters:cluster_usage", "Usage by cluster", one_run=True, options=("layers",)),
    },
    command=Command(
        "cluster", "Expert clustering per MoE layer as HC-SMoE (agglomerative, on the experts' mean outputs) or M-SMoE (around the G "
                   "most used experts, by router-logit similarity) would merge them; calibrates first unless given a calibration run.",
        show="moelens.cli.clustering:show_clustering",
    ),
    atlas="moelens.atlas:clustering_calls",
    reads_whole_model=True,
)

#: What merging costs, declared once (:mod:`moelens.analyses.declaration`).
MERGE_COST = Declaration(
    name="merge_cost", title="Merge cost", config="moelens.analyses.clustering.config:MergeCostConfig",
    analysis="moelens.analyses.clustering.merge_cost:MergeCost", run="moelens.analyses.clustering.merge_cost:run",
    function="merge_cost",
    signature=("clusters", "facts", "texts", "export", "permute", "*", "batch_tokens", "device", "dtype", "stream"),
    tables=("merge_cost", "merge_cost_summary"),
    section="moelens.report.clustering_report:merge_cost_section",
    command=Command(
        "merge-cost", "What merging costs: fact recall and held-out perplexity of the model as it is and merged by each clustering run, "
                      "with and without permutation alignment.",
        show="moelens.cli.clustering:show_merge_cost",
    ),
    atlas="moelens.atlas:merge_cost_calls",
    unit_noun="variants", reads_whole_model=True,
)

_EXPORTS: dict[str, str] = {
    **CLUSTERING.exports(config=("METHODS",), analysis=("ANALYSIS",)),
    **MERGE_COST.exports(),
    "merge_clusters": "moelens.analyses.clustering.merging",
}
__getattr__, __dir__ = lazy_package(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
