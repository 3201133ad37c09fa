"""Calibration pass (docs/methods.md §3): routing, usage and expert features of every MoE layer."""

from moelens.analyses.declaration import Command, Declaration, FigureSpec
from moelens.lazy import lazy_package

#: The calibration pass, declared once (:mod:`moelens.analyses.declaration`).
DECLARATION = Declaration(
    name="calibration", title="Calibration", config="moelens.analyses.calibration.config:CalibrationConfig",
    analysis="moelens.analyses.calibration.analysis:Calibration", run="moelens.analyses.calibration.analysis:run",
    function="calibrate",
    signature=("texts", "max_tokens", "layers", "batch_tokens", "device", "dtype", "*", "stream", "shard_tokens"),
    tables=("calibration_usage", "calibration_layers", "calibration_tokens"),
    section="moelens.report.clustering_report:calibration_section",
    figures={"expert_usage": FigureSpec("moelens.figures.clusters:expert_usage", "Expert usage frequency", one_run=True, options=("layers",))},
    command=Command(
        "calibrate", "Calibration pass: per MoE layer, every token's router logits and top-k experts, each expert's usage frequency "
                     "and its mean output over all tokens (HC-SMoE's feature).",
        show="moelens.cli.clustering:show_calibration",
    ),
    reads_whole_model=True,
)

_EXPORTS: dict[str, str] = DECLARATION.exports(analysis=("ANALYSIS", "CalibrationRun", "load_calibration"))
__getattr__, __dir__ = lazy_package(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
