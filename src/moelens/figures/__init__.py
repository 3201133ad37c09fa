"""Figures: pure functions from result tables to matplotlib figures.

>>> from moelens import figures, load_runs
>>> fig = figures.comparison_panels(load_runs(["runs/base", "runs/tuned"]))
>>> figures.save(fig, "comparison.pdf")          # .png, .svg or .pdf
>>> figures.expert_distance(load_runs(["runs/distance-base-tuned", "runs/distance-within"]))

Every figure is also reachable by name: ``figures.draw("null_distribution", runs, k=128)``,
which is what ``moelens figure NAME RUN… --out FILE`` calls; ``figures.FIGURES`` lists them with
the analysis whose runs they draw. Names resolve on first use, so importing this package does not
import matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    **{name: "moelens.figures.alignment" for name in (
        "comparison_panels", "complete_analysis", "cos_squared_per_expert", "layer_k_heatmap", "layer_permutation_test",
        "null_distribution", "per_expert_breakdown", "shuffle_statistics", "z_decomposition",
    )},
    "expert_distance": "moelens.figures.distance",
    "expert_distance_heatmap": "moelens.figures.distance",
    "module_heatmap": "moelens.figures.modules",
    "module_lines": "moelens.figures.modules",
    "trace_heatmap": "moelens.figures.trace",
    "trace_indirect_effect": "moelens.figures.trace",
    "trace_knockout": "moelens.figures.trace",
    "trace_restore": "moelens.figures.trace",
    "route_jsd_heatmap": "moelens.figures.router_edits",
    "route_migration": "moelens.figures.router_edits",
    "route_routed_share": "moelens.figures.router_edits",
    "cluster_map": "moelens.figures.clusters",
    "cluster_usage": "moelens.figures.clusters",
    "expert_usage": "moelens.figures.clusters",
    "FIGURES": "moelens.figures.catalog",
    "draw": "moelens.figures.catalog",
    "figures_of": "moelens.figures.catalog",
    "figure_bytes": "moelens.figures.export",
    "save": "moelens.figures.export",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'moelens.figures' has no attribute {name!r}")


__all__ = sorted(_WHERE)
