"""Layer-wise interventions with JS divergence (docs/methods.md §4, seed 003)."""

from moelens.analyses.declaration import Command, Declaration, FigureSpec, ModelInput
from moelens.lazy import lazy_package

#: Layer-wise interventions, declared once (:mod:`moelens.analyses.declaration`).
DECLARATION = Declaration(
    name="interventions", title="Layer-wise interventions", config="moelens.analyses.interventions.config:InterventionsConfig",
    analysis="moelens.analyses.interventions.analysis:Interventions", run="moelens.analyses.interventions.analysis:run",
    function="trace",
    signature=("prompts", "mode", "sites", "ablation", "layers", "window", "batch_size", "device", "seed",
               "*", "limit", "noise_samples", "noise_scale", "noise_draw", "correct_only", "dtype", "stream"),
    inputs=(ModelInput(help="Causal LM: checkpoint directory (with its tokenizer) or cached repo id, MoE or dense."),),
    tables=("interventions", "interventions_summary"),
    section="moelens.report.trace_report:trace_section",
    figures={
        "trace_heatmap": FigureSpec("moelens.figures.trace:trace_heatmap", "Intervention heat maps", one_run=True, options=("mode", "measure", "token_kind")),
        "trace_knockout": FigureSpec("moelens.figures.trace:trace_knockout", "Knockout heat maps", one_run=True, options=("measure",)),
        "trace_restore": FigureSpec("moelens.figures.trace:trace_restore", "Restoration heat maps", one_run=True, options=("measure", "token_kind")),
        "trace_indirect_effect": FigureSpec("moelens.figures.trace:trace_indirect_effect", "Indirect effect (causal tracing)", one_run=True),
    },
    command=Command(
        "trace", "Layer-wise interventions (seed 003): knock out, restore (causal tracing) or block one site at one layer "
                 "and measure how the next-token distribution changes (JS divergence, bits).",
        show="moelens.cli.analyses:show_trace",
    ),
    atlas="moelens.atlas:trace_calls",
    unit_noun="prompt groups", reads_whole_model=True,
)

_EXPORTS: dict[str, str] = DECLARATION.exports(analysis=("ANALYSIS", "SUMMARY_SCHEMA", "TABLE_SCHEMA", "summarise"))
__getattr__, __dir__ = lazy_package(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
