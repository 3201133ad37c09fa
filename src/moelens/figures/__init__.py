"""Figures: pure functions from result tables to matplotlib figures.

>>> from moelens import figures, load_runs
>>> fig = figures.comparison_panels(load_runs(["runs/base", "runs/tuned"]))
>>> figures.save(fig, "comparison.pdf")          # .png, .svg or .pdf

Every figure is also reachable by name: ``figures.draw("null_distribution", runs, k=128)``,
which is what ``moelens figure NAME RUN… --out FILE`` calls.
"""

from moelens.figures.alignment import (
    comparison_panels,
    complete_analysis,
    cos_squared_per_expert,
    layer_k_heatmap,
    layer_permutation_test,
    null_distribution,
    per_expert_breakdown,
    shuffle_statistics,
    z_decomposition,
)
from moelens.figures.catalog import FIGURES, draw
from moelens.figures.export import figure_bytes, save

__all__ = [
    "comparison_panels", "complete_analysis", "cos_squared_per_expert", "layer_k_heatmap",
    "layer_permutation_test", "null_distribution", "per_expert_breakdown", "shuffle_statistics",
    "z_decomposition", "FIGURES", "draw", "figure_bytes", "save",
]
