"""Figures by name, for the command line and for reports: ``draw("null_distribution", runs, k=128)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from matplotlib.figure import Figure

from moelens.errors import ConfigError
from moelens.figures import alignment
from moelens.results import Run


@dataclass(frozen=True)
class FigureEntry:
    """A figure function, whether it draws one run or many, and which options it takes."""

    function: Callable[..., Figure]
    one_run: bool = False
    takes_k: bool = False
    takes_metric: bool = False

    @property
    def summary(self) -> str:
        return (self.function.__doc__ or "").strip().splitlines()[0]


FIGURES: dict[str, FigureEntry] = {
    "comparison_panels": FigureEntry(alignment.comparison_panels),
    "cos_squared_per_expert": FigureEntry(alignment.cos_squared_per_expert),
    "shuffle_statistics": FigureEntry(alignment.shuffle_statistics),
    "z_decomposition": FigureEntry(alignment.z_decomposition),
    "null_distribution": FigureEntry(alignment.null_distribution, takes_k=True),
    "layer_permutation_test": FigureEntry(alignment.layer_permutation_test),
    "per_expert_breakdown": FigureEntry(alignment.per_expert_breakdown, takes_k=True),
    "complete_analysis": FigureEntry(alignment.complete_analysis, one_run=True, takes_k=True),
    "layer_k_heatmap": FigureEntry(alignment.layer_k_heatmap, one_run=True, takes_metric=True),
}


def draw(name: str, runs: Sequence[Run], k: Optional[int] = None, metric: Optional[str] = None) -> Figure:
    """Draw the figure called ``name`` (``-`` or ``_`` alike) for ``runs``."""
    key = name.replace("-", "_")
    if key not in FIGURES:
        raise ConfigError(f"no figure named {name!r}; choose one of {', '.join(FIGURES)}")
    entry = FIGURES[key]
    if entry.one_run and len(runs) != 1:
        raise ConfigError(f"{key} draws one run; got {len(runs)} (draw it once per run)")
    if k is not None and not entry.takes_k:
        raise ConfigError(f"{key} takes no k; only {', '.join(n for n, e in FIGURES.items() if e.takes_k)} do")
    if metric is not None and not entry.takes_metric:
        raise ConfigError(f"{key} takes no metric; only layer_k_heatmap does")
    target = runs[0] if entry.one_run else list(runs)
    kwargs = {}
    if k is not None:
        kwargs["k"] = k
    if metric is not None:
        kwargs["metric"] = metric
    return entry.function(target, **kwargs)
