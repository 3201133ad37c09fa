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
    """A figure function (``"module:function"``, imported when first drawn, so listing the figures
    needs no matplotlib), the analysis it draws, its title (the heading of its explanation in a
    report, which every caption links to), whether it draws one run or many, and its options."""

    target: str
    analysis: str
    title: str
    one_run: bool = False
    options: tuple[str, ...] = ()

    @property
    def function(self) -> Callable[..., "Figure"]:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)

    @property
    def summary(self) -> str:
        return (self.function.__doc__ or "").strip().splitlines()[0]


def _catalog() -> dict[str, FigureEntry]:
    """Every registered analysis's figures, from its declaration, in the registry's order."""
    from moelens.analyses.registry import declarations

    out: dict[str, FigureEntry] = {}
    for declaration in declarations().values():
        for name, spec in declaration.figures.items():
            if name in out:
                raise ValueError(f"two figures are called {name!r} ({out[name].analysis} and {declaration.name})")
            out[name] = FigureEntry(spec.target, declaration.name, spec.title, spec.one_run, spec.options)
    return out


#: Every figure by name (from the analyses' declarations).
FIGURES: dict[str, FigureEntry] = _catalog()


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
