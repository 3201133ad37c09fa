"""Per-module metrics of every layer (docs/methods.md §5, seed 002): single-model and pair metrics of each matrix."""

from moelens.analyses.declaration import Command, Declaration, FigureSpec, ModelInput
from moelens.lazy import lazy_package

#: Module metrics, declared once (:mod:`moelens.analyses.declaration`).
DECLARATION = Declaration(
    name="module_metrics", title="Module metrics", config="moelens.analyses.module_metrics.config:ModuleMetricsConfig",
    analysis="moelens.analyses.module_metrics.analysis:ModuleMetrics", run="moelens.analyses.module_metrics.analysis:run",
    function="module_metrics",
    signature=("layers", "metrics", "device", "*", "single", "tol"),
    inputs=(
        ModelInput("model_a", "a", metavar="A", help="Model A: checkpoint directory or cached repo id (dense or MoE)."),
        ModelInput("model_b", "b", required=False, cli_name="model_b", metavar="B", help="Model B, of the same architecture, for pair metrics."),
        ModelInput("base", "base", required=False, cli_name="base", flag="--base",
                   help="Their base model: pair metrics of the deltas A − base and B − base (with B), or A against its base (without B)."),
    ),
    tables=("module_metrics", "module_metrics_experts"),
    section="moelens.report.modules_report:modules_section",
    figures={
        "module_heatmap": FigureSpec("moelens.figures.modules:module_heatmap", "Layer × module heat maps", one_run=True, options=("metric", "model")),
        "module_lines": FigureSpec("moelens.figures.modules:module_lines", "Module lines", one_run=True, options=("metric", "model")),
    },
    command=Command(
        "modules", "Per-module metrics of every layer: norms, ranks and α of each matrix; correlation, cosine, rel_l2, CKA and changed share between two models.",
        show="moelens.cli.analyses:show_modules",
    ),
    atlas="moelens.atlas:modules_calls",
)

_EXPORTS: dict[str, str] = DECLARATION.exports(analysis=("ANALYSIS",))
__getattr__, __dir__ = lazy_package(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
