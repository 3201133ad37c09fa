"""Reports: one self-contained HTML file from one or many runs.

>>> import moelens as ml
>>> ml.report(["runs/base", "runs/tuned"], "report.html", title="Base vs tuned")

The file carries its figures (as ``data:`` URIs) and its styles inline and names no external
resource, so it opens offline and can be sent as it is. Heavy imports (matplotlib, Jinja2)
wait until a report is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Union

from moelens.results import Run

RunLike = Union[Run, str, "os.PathLike[str]"]
FIGURE_FORMATS = ("svg", "png")


def _as_runs(runs: Union[RunLike, Iterable[RunLike]]) -> list[Run]:
    from moelens.errors import ConfigError
    from moelens.results import load_run

    items = [runs] if isinstance(runs, (Run, str, os.PathLike)) else list(runs)
    if not items:
        raise ConfigError("a report needs at least one run; pass run directories or Run objects")
    return [item if isinstance(item, Run) else load_run(item) for item in items]


def build_report(runs: Union[RunLike, Iterable[RunLike]], title: Optional[str] = None, figure_format: str = "svg") -> str:
    """The HTML text of the router-alignment report of ``runs`` (Run objects or run directories).

    ``figure_format``: ``"svg"`` (sharp at any zoom, the default) or ``"png"``.
    """
    from moelens.errors import ConfigError
    from moelens.figures.alignment_data import alignment_views
    from moelens.report.alignment_report import report_context
    from moelens.report.render import render

    if figure_format not in FIGURE_FORMATS:
        raise ConfigError(f"report figures are {' or '.join(FIGURE_FORMATS)}, not {figure_format!r}")
    views = alignment_views(_as_runs(runs))
    return render("alignment_report.html", **report_context(views, title, figure_format))


def write_report(html: str, out: Union[str, "os.PathLike[str]"]) -> Path:
    """Write ``html`` to ``out`` (parent folders created; replaced in one step, never half-written)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(html, encoding="utf-8")
    os.replace(partial, out)
    return out


def report(runs: Union[RunLike, Iterable[RunLike]], out: Union[str, "os.PathLike[str]"], title: Optional[str] = None,
           figure_format: str = "svg") -> Path:
    """Build the report of ``runs`` and write it to ``out``; returns the path."""
    return write_report(build_report(runs, title, figure_format), out)


__all__ = ["build_report", "write_report", "report"]
