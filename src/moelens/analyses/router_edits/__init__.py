"""Router edits (docs/methods.md §8): does the router–expert alignment matter for routing and
predictions? Project the aligned part out of a router row, against matched controls."""

from moelens.analyses.declaration import Command, Declaration, FigureSpec, ModelInput
from moelens.lazy import lazy_package

#: Router edits, declared once (:mod:`moelens.analyses.declaration`).
DECLARATION = Declaration(
    name="router_edits", title="Router edits", config="moelens.analyses.router_edits.config:RouterEditsConfig",
    analysis="moelens.analyses.router_edits.analysis:RouterEdits", run="moelens.analyses.router_edits.analysis:run",
    function="router_edits",
    signature=("prompts", "edits", "k", "matrix", "layers", "experts", "pairs", "samples", "seed", "batch_size", "device", "dtype", "limit", "*", "stream"),
    inputs=(ModelInput(help="MoE causal LM: checkpoint directory (with its tokenizer) or cached repo id."),),
    tables=("router_edits", "router_edits_migration", "router_edits_summary"),
    section="moelens.report.router_edits_report:route_section",
    figures={
        "route_routed_share": FigureSpec("moelens.figures.router_edits:route_routed_share", "Routed share after the edit", one_run=True),
        "route_jsd_heatmap": FigureSpec("moelens.figures.router_edits:route_jsd_heatmap", "JSD of project_out by layer and k", one_run=True),
        "route_migration": FigureSpec("moelens.figures.router_edits:route_migration", "Transplant migration matrix", one_run=True, options=("layers",)),
    },
    command=Command(
        "route", "Router edits: project the part of a router row aligned with its expert's top-k singular directions out (against random "
                 "parts of equal norm, zero and transplant controls) and measure routing to the expert and the next-token distribution.",
        show="moelens.cli.analyses:show_route",
    ),
    atlas="moelens.atlas:route_calls",
    reads_whole_model=True,
)

_EXPORTS: dict[str, str] = DECLARATION.exports(analysis=("ANALYSIS", "MIGRATION_SCHEMA", "SUMMARY_SCHEMA", "TABLE_SCHEMA", "summarise"))
__getattr__, __dir__ = lazy_package(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
