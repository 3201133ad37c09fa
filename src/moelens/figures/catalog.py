"""Every figure by name, for the command line and for reports: ``draw("null_distribution", runs, k=128)``.

An entry names the analysis whose runs it draws, whether it draws one run or many, and the
options it takes; :func:`draw` checks all three before drawing, so a wrong run or option is one
clear line, not a traceback from deep inside matplotlib.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from moelens.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from moelens.results import Run


@dataclass(frozen=True)
class FigureEntry:
    """A figure function (``"module:function"`` under moelens.figures, imported when first drawn,
    so listing the figures needs no matplotlib), the analysis it draws, its title (the heading of
    its explanation in a report, which every caption links to), whether it draws one run or many,
    and its options."""

    target: str
    analysis: str
    title: str
    one_run: bool = False
    options: tuple[str, ...] = ()

    @property
    def function(self) -> Callable[..., "Figure"]:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(f"moelens.figures.{module}"), name)

    @property
    def summary(self) -> str:
        return (self.function.__doc__ or "").strip().splitlines()[0]


_ALIGNMENT = "router_alignment"

FIGURES: dict[str, FigureEntry] = {
    "comparison_panels": FigureEntry("alignment:comparison_panels", _ALIGNMENT, "Comparison plots"),
    "cos_squared_per_expert": FigureEntry("alignment:cos_squared_per_expert", _ALIGNMENT, "cos²θ expert comparison"),
    "shuffle_statistics": FigureEntry("alignment:shuffle_statistics", _ALIGNMENT, "Shuffle statistics"),
    "z_decomposition": FigureEntry("alignment:z_decomposition", _ALIGNMENT, "z-score decomposition"),
    "null_distribution": FigureEntry("alignment:null_distribution", _ALIGNMENT, "Distribution comparison", options=("k",)),
    "layer_permutation_test": FigureEntry("alignment:layer_permutation_test", _ALIGNMENT, "Layer permutation test"),
    "per_expert_breakdown": FigureEntry("alignment:per_expert_breakdown", _ALIGNMENT, "Per-expert breakdown", options=("k",)),
    "complete_analysis": FigureEntry("alignment:complete_analysis", _ALIGNMENT, "Complete analysis", one_run=True, options=("k",)),
    "layer_k_heatmap": FigureEntry("alignment:layer_k_heatmap", _ALIGNMENT, "Layers × k heat maps", one_run=True, options=("metric",)),
    "expert_distance": FigureEntry("distance:expert_distance", "expert_distance", "Expert distance per layer", options=("matrix",)),
    "expert_distance_heatmap": FigureEntry("distance:expert_distance_heatmap", "expert_distance", "Experts × experts heat maps",
                                           one_run=True, options=("layers", "measure", "matrix")),
    "module_heatmap": FigureEntry("modules:module_heatmap", "module_metrics", "Layer × module heat maps", one_run=True,
                                  options=("metric", "model")),
    "module_lines": FigureEntry("modules:module_lines", "module_metrics", "Module lines", one_run=True, options=("metric", "model")),
    "trace_heatmap": FigureEntry("trace:trace_heatmap", "interventions", "Intervention heat maps", one_run=True,
                                 options=("mode", "measure", "token_kind")),
    "trace_knockout": FigureEntry("trace:trace_knockout", "interventions", "Knockout heat maps", one_run=True, options=("measure",)),
    "trace_restore": FigureEntry("trace:trace_restore", "interventions", "Restoration heat maps", one_run=True,
                                 options=("measure", "token_kind")),
    "trace_indirect_effect": FigureEntry("trace:trace_indirect_effect", "interventions", "Indirect effect (causal tracing)", one_run=True),
    "route_routed_share": FigureEntry("router_edits:route_routed_share", "router_edits", "Routed share after the edit", one_run=True),
    "route_jsd_heatmap": FigureEntry("router_edits:route_jsd_heatmap", "router_edits", "JSD of project_out by layer and k", one_run=True),
    "route_migration": FigureEntry("router_edits:route_migration", "router_edits", "Transplant migration matrix", one_run=True,
                                   options=("layers",)),
    "cluster_map": FigureEntry("clusters:cluster_map", "clustering", "Cluster map", one_run=True),
    "cluster_usage": FigureEntry("clusters:cluster_usage", "clustering", "Usage by cluster", one_run=True, options=("layers",)),
    "expert_usage": FigureEntry("clusters:expert_usage", "calibration", "Expert usage frequency", one_run=True, options=("layers",)),
}


def figures_of(analysis: str) -> list[str]:
    """The names of the figures that draw runs of ``analysis``."""
    return [name for name, entry in FIGURES.items() if entry.analysis == analysis]


def draw(name: str, runs: Sequence[Run], k: Optional[int] = None, metric: Optional[str] = None, **options: Any) -> "Figure":
    """Draw the figure called ``name`` (``-`` or ``_`` alike) for ``runs``; ``options`` are the
    figure's own (``k``, ``metric``, ``matrix``, ``measure``, ``layers``), None meaning its default."""
    key = name.replace("-", "_")
    if key not in FIGURES:
        raise ConfigError(f"no figure named {name!r}; choose one of {', '.join(FIGURES)}")
    entry = FIGURES[key]
    runs = list(runs)
    if not runs:
        raise ConfigError(f"{key} needs at least one run")
    for run in runs:
        analysis = run.manifest.get("analysis")
        if analysis != entry.analysis:
            where = f" {run.path}" if run.path else ""
            raise ConfigError(
                f"{key} draws {entry.analysis} runs, but run{where} is a run of {analysis}; its figures are {', '.join(figures_of(str(analysis))) or 'none'}"
            )
    if entry.one_run and len(runs) != 1:
        raise ConfigError(f"{key} draws one run; got {len(runs)} (draw it once per run)")
    given = {"k": k, "metric": metric, **options}
    given = {opt: value for opt, value in given.items() if value is not None}
    for opt in given:
        if opt not in entry.options:
            takers = [n for n, e in FIGURES.items() if opt in e.options]
            raise ConfigError(f"{key} takes no {opt}; only {', '.join(takers) or 'no figure'} do{'es' if len(takers) == 1 else ''}")
    target = runs[0] if entry.one_run else runs
    return entry.function(target, **given)
