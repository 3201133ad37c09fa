"""The router–expert alignment section of a report: explanations, comparison, one part per run.

The layout follows the seed report (plot explanations; comparison across runs; one part per
run with setup, summary, cos²θ, detailed results by k and the complete-analysis figure) and
adds the layer permutation test beside the expert z-scores, and layers × k heat maps for runs that
cover several layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from markupsafe import Markup

from moelens.figures import alignment as figs
from moelens.figures.alignment_data import AlignmentView, alignment_views, distribution_ks
from moelens.report.alignment_tables import (
    CosSquaredStats,
    KDetail,
    cos_squared_stats,
    detail_by_k,
    permutation_table,
    runs_overview,
    setup_table,
    summary_table,
)
from moelens.report.cells import Table
from moelens.report.embed import EmbeddedFigure, embed
from moelens.report.section import Section, run_warnings
from moelens.results import Run

#: Metrics drawn as layers × k heat maps for a run with two layers or more.
LAYER_HEATMAPS = (("align", "Mean align per layer and k"), ("delta_vs_shuffle", "Mean Δ vs shuffle per layer and k"))


@dataclass
class RunSection:
    number: int
    id: str
    label: str
    multi_layer: bool
    setup: Table
    summary: Table
    layer_summaries: list[tuple[int, Table]]
    cos_squared: Optional[CosSquaredStats]
    permutation: Table
    permutation_by_layer: Optional[Table]
    details: list[KDetail]
    complete: EmbeddedFigure
    layer_figures: list[EmbeddedFigure] = field(default_factory=list)
    z_cap: float = 0.0
    n_experts: int = 0
    null: str = ""
    null_pools: bool = False
    warnings: list[str] = field(default_factory=list)


@dataclass
class Comparison:
    panels: EmbeddedFigure
    cos_squared: EmbeddedFigure
    shuffle: EmbeddedFigure
    z_decomposition: EmbeddedFigure
    null_distributions: list[EmbeddedFigure]
    permutation: EmbeddedFigure
    per_expert: EmbeddedFigure
    overview: Table
    multi_layer_runs: int

    @property
    def figures(self) -> list[EmbeddedFigure]:
        return [self.panels, self.cos_squared, self.shuffle, self.z_decomposition, *self.null_distributions,
                self.permutation, self.per_expert]


def comparison_section(views: Sequence[AlignmentView], fmt: str) -> Comparison:
    """The figures that put every run side by side."""
    n = len(views)
    runs_text = "the run" if n == 1 else f"all {n} runs"
    null_figures = [
        embed(figs.null_distribution(views, k), "null_distribution", f"fig-null-distribution-k{k}",
              f"Distribution comparison (k = {k})", f"Histogram of the E² projection energies at k = {k}, true pairs against the null, for {runs_text}", fmt)
        for k in distribution_ks(views)
    ]
    return Comparison(
        panels=embed(figs.comparison_panels(views), "comparison_panels", "fig-comparison-panels", "Comparison plots",
                     f"align, z vs shuffle, effect over random and delta vs shuffle against k for {runs_text}", fmt),
        cos_squared=embed(figs.cos_squared_per_expert(views), "cos_squared_per_expert", "fig-cos-squared",
                          "cos²θ expert comparison", f"cos²θ per expert for {runs_text}", fmt),
        shuffle=embed(figs.shuffle_statistics(views), "shuffle_statistics", "fig-shuffle-statistics", "Shuffle statistics",
                      f"Null mean μ and standard deviation σ against k for {runs_text}", fmt),
        z_decomposition=embed(figs.z_decomposition(views), "z_decomposition", "fig-z-decomposition", "z-score decomposition",
                              f"Delta, sigma and z against k for {runs_text}", fmt),
        null_distributions=null_figures,
        permutation=embed(figs.layer_permutation_test(views), "layer_permutation_test", "fig-permutation-test",
                          "Layer permutation test", f"Mean expert z, z_layer and p_layer against k for {runs_text}", fmt),
        per_expert=embed(figs.per_expert_breakdown(views), "per_expert_breakdown", "fig-per-expert", "Per-expert breakdown",
                         f"align and delta heat maps of experts by k and align per expert for {runs_text}", fmt),
        overview=runs_overview(views),
        multi_layer_runs=sum(v.multi_layer for v in views),
    )


def run_section(view: AlignmentView, number: int, fmt: str) -> RunSection:
    """Setup, tables and figures of one run."""
    section_id = f"run-{number}"
    complete = embed(figs.complete_analysis(view), "complete_analysis", f"{section_id}-fig-complete",
                     "Complete analysis", f"Twelve panels of the alignment of {view.label}", fmt, run=view.run)
    layer_figures = []
    if view.multi_layer:
        for metric, title in LAYER_HEATMAPS:
            layer_figures.append(embed(figs.layer_k_heatmap(view, metric), "layer_k_heatmap", f"{section_id}-fig-layers-{metric}",
                                       title, f"{title} for {view.label}", fmt, run=view.run))
    return RunSection(
        number=number, id=section_id, label=view.label, multi_layer=view.multi_layer,
        setup=setup_table(view), summary=summary_table(view),
        layer_summaries=[(layer, summary_table(view, layer)) for layer in view.layer_ids] if view.multi_layer else [],
        cos_squared=cos_squared_stats(view),
        permutation=permutation_table(view, by_layer=False),
        permutation_by_layer=permutation_table(view, by_layer=True) if view.multi_layer else None,
        details=detail_by_k(view), complete=complete, layer_figures=layer_figures,
        z_cap=view.z_cap, n_experts=view.n_experts, null=view.null, null_pools=view.null_pools_true_pairs,
        warnings=run_warnings(view.manifest),
    )


def alignment_section(runs: Sequence[Run], fmt: str) -> Section:
    """Router–expert alignment: explanations, the comparison across runs, one part per run."""
    from moelens.report.render import render

    views = alignment_views(list(runs))
    comparison = comparison_section(views, fmt)
    parts = [run_section(view, i, fmt) for i, view in enumerate(views, start=1)]
    html = render("alignment_section.html", comparison=comparison, runs=parts, n_runs=len(views),
                  z_caps=sorted({round(v.z_cap, 2) for v in views}), experts=sorted({v.n_experts for v in views}))
    toc = [("plot-explanations", "Plot explanations"), ("comparison", "Comparison across all runs")]
    toc += [(r.id, f"Individual analysis: run {r.number}, {r.label}") for r in parts]
    means = [float(v.run["alignment_layers"].query("k == 1")["align"].mean()) for v in views]
    summary = f"{len(views)} run(s); mean cos²θ (k = 1) " + ", ".join(f"{m:.3f}" for m in means)
    return Section("router-alignment", "Router–expert alignment", Markup(html), toc, summary)


__all__ = ["alignment_section", "comparison_section", "run_section"]
