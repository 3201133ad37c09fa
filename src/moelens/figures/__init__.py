"""Figures: pure functions from result tables to matplotlib figures.

>>> from moelens import figures, load_runs
>>> fig = figures.comparison_panels(load_runs(["runs/base", "runs/tuned"]))
>>> figures.save(fig, "comparison.pdf")          # .png, .svg or .pdf
>>> figures.expert_distance(load_runs(["runs/distance-base-tuned", "runs/distance-within"]))

Every figure is also reachable by name: ``figures.draw("null_distribution", runs, k=128)``,
which is what ``moelens figure NAME RUN… --out FILE`` calls; ``figures.FIGURES`` lists them with
the analysis whose runs they draw. Names resolve on first use, so importing this package does not
import matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Where each public name is defined: every analysis's figures (from its declaration, without
#: importing matplotlib) and the catalog's and export's helpers.
_HELPERS = {
    "FIGURES": "moelens.figures.catalog",
    "draw": "moelens.figures.catalog",
    "figures_of": "moelens.figures.catalog",
    "figure_bytes": "moelens.figures.export",
    "save": "moelens.figures.export",
}


def _where() -> dict[str, str]:
    from moelens.analyses.registry import declarations

    figures = {name: spec.target.split(":")[0] for d in declarations().values() for name, spec in d.figures.items()}
    return {**figures, **_HELPERS}


_WHERE = _where()


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'moelens.figures' has no attribute {name!r}")


__all__ = sorted(_WHERE)
