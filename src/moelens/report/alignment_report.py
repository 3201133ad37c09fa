"""Everything the alignment report shows, gathered from runs: sections, tables, figures.

The layout follows the seed report (plot explanations; comparison across runs; one section per
run with setup, summary, cos²θ, detailed results by k and the complete-analysis figure) and
adds the layer permutation test beside the expert z-scores, and layers × k heat maps for runs that
cover several layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional, Sequence

from moelens.figures import alignment as figs
from moelens.figures.alignment_data import AlignmentView, distribution_ks
from moelens.report.embed import EmbeddedFigure, embed
from moelens.report.tables import (
    CosSquaredStats,
    KDetail,
    Table,
    cos_squared_stats,
    detail_by_k,
    permutation_table,
    runs_overview,
    setup_table,
    summary_table,
)

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


def run_warnings(manifest: dict) -> list[str]:
    """The warnings a run recorded (degenerate inputs), in unit order."""
    found = manifest.get("warnings") or {}
    return [message for key in sorted(found) for message in found[key]]


def default_title(views: Sequence[AlignmentView]) -> str:
    if len(views) == 1:
        return f"Router–expert alignment: {views[0].label}"
    return f"Router–expert alignment: {len(views)} runs compared"


def report_context(views: Sequence[AlignmentView], title: Optional[str], fmt: str) -> dict:
    """The template's variables."""
    from moelens import __version__

    comparison = comparison_section(views, fmt)
    runs = [run_section(view, i, fmt) for i, view in enumerate(views, start=1)]
    return {
        "title": title or default_title(views),
        "comparison": comparison,
        "runs": runs,
        "n_runs": len(views),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "version": __version__,
        "z_caps": sorted({round(v.z_cap, 2) for v in views}),
        "experts": sorted({v.n_experts for v in views}),
    }
