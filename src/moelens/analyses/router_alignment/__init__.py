"""Router–expert alignment (docs/methods.md §1, seed report 004): config, analysis, nulls and tables."""

from moelens.analyses.declaration import Command, CommandFlag, Declaration, FigureSpec
from moelens.lazy import lazy_package

#: Router–expert alignment, declared once (:mod:`moelens.analyses.declaration`).
DECLARATION = Declaration(
    name="router_alignment", title="Router–expert alignment", config="moelens.analyses.router_alignment.config:RouterAlignmentConfig",
    analysis="moelens.analyses.router_alignment.analysis:RouterAlignment", run="moelens.analyses.router_alignment.analysis:run",
    function="router_alignment",
    signature=("layers", "matrix", "k", "null", "shuffles", "seed", "method", "device", "dtype", "*", "p_draws", "cache", "cache_dir", "chunk_bytes"),
    tables=("alignment", "alignment_layers", "alignment_pairs", "spectra"),
    section="moelens.report.alignment_report:alignment_section",
    figures={
        "comparison_panels": FigureSpec("moelens.figures.alignment:comparison_panels", "Comparison plots"),
        "cos_squared_per_expert": FigureSpec("moelens.figures.alignment:cos_squared_per_expert", "cos²θ expert comparison"),
        "shuffle_statistics": FigureSpec("moelens.figures.alignment:shuffle_statistics", "Shuffle statistics"),
        "z_decomposition": FigureSpec("moelens.figures.alignment:z_decomposition", "z-score decomposition"),
        "null_distribution": FigureSpec("moelens.figures.alignment:null_distribution", "Distribution comparison", options=("k",)),
        "layer_permutation_test": FigureSpec("moelens.figures.alignment:layer_permutation_test", "Layer permutation test"),
        "per_expert_breakdown": FigureSpec("moelens.figures.alignment:per_expert_breakdown", "Per-expert breakdown", options=("k",)),
        "complete_analysis": FigureSpec("moelens.figures.alignment:complete_analysis", "Complete analysis", one_run=True, options=("k",)),
        "layer_k_heatmap": FigureSpec("moelens.figures.alignment:layer_k_heatmap", "Layers × k heat maps", one_run=True, options=("metric",)),
    },
    command=Command(
        "align", "Router–expert alignment: energy of each router vector in the top-k input subspace of its expert, against null models.",
        show="moelens.cli.analyses:show_alignment",
        flags=(CommandFlag("per_layer", False, "Print one summary table per layer instead of the mean over layers."),),
    ),
    atlas="moelens.atlas:alignment_calls",
)

_EXPORTS: dict[str, str] = DECLARATION.exports(analysis=("ANALYSIS", "AlignmentPlan", "default_ks", "layer_energies", "layer_statistics", "resolve", "run_router_alignment"))
__getattr__, __dir__ = lazy_package(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
