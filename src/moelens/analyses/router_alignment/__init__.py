"""Router–expert alignment (docs/methods.md §1, seed report 004): config, analysis, nulls and tables."""

from moelens.analyses.router_alignment.analysis import (
    ANALYSIS,
    AlignmentPlan,
    RouterAlignment,
    RouterAlignmentConfig,
    default_ks,
    layer_energies,
    layer_statistics,
    resolve,
    router_alignment,
    run_router_alignment,
)

__all__ = [
    "ANALYSIS", "AlignmentPlan", "RouterAlignment", "RouterAlignmentConfig", "default_ks", "layer_energies",
    "layer_statistics", "resolve", "router_alignment", "run_router_alignment",
]
