"""Expert distance per layer (docs/methods.md §2, seeds 000 and 001): rel_l2 and sv_align of pairs of experts."""

from moelens.analyses.declaration import Command, Declaration, FigureSpec, ModelInput
from moelens.lazy import lazy_package

#: Expert distance, declared once (:mod:`moelens.analyses.declaration`).
DECLARATION = Declaration(
    name="expert_distance", title="Expert distance", config="moelens.analyses.expert_distance.config:ExpertDistanceConfig",
    analysis="moelens.analyses.expert_distance.analysis:ExpertDistance", run="moelens.analyses.expert_distance.analysis:run",
    function="expert_distance",
    signature=("layers", "pairing", "matrices", "gamma", "top_sv", "pool", "device", "*", "dtype", "clusters", "permute"),
    inputs=(
        ModelInput("model_a", "a", metavar="A", help="Model A (the base): checkpoint directory or cached repo id."),
        ModelInput("model_b", "b", required=False, cli_name="tuned", metavar="B",
                   help="Model B (the fine-tune), for base-tuned pairs; leave out for pairs within each layer of A."),
    ),
    tables=("expert_distance", "expert_distance_layers"),
    section="moelens.report.distance_report:distance_section",
    figures={
        "expert_distance": FigureSpec("moelens.figures.distance:expert_distance", "Expert distance per layer", options=("matrix",)),
        "expert_distance_heatmap": FigureSpec("moelens.figures.distance:expert_distance_heatmap", "Experts × experts heat maps", one_run=True,
                                              options=("layers", "measure", "matrix")),
    },
    command=Command(
        "distance", "Expert distance per layer: relative L2 and singular-vector alignment of base→tuned or within-layer pairs of experts.",
        show="moelens.cli.analyses:show_distance",
    ),
    atlas="moelens.atlas:distance_calls",
)

_EXPORTS: dict[str, str] = DECLARATION.exports(config=("PAIRINGS",), analysis=("ANALYSIS",))
__getattr__, __dir__ = lazy_package(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
