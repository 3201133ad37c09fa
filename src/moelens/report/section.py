"""What every report section is, whichever analysis it shows: a :class:`Section`, and the parts
of a run every section lists (its recorded warnings, its date, version and directory).

A section builder (one per analysis, see :mod:`moelens.report.sections`) takes the runs of one
analysis and the figure format and returns a :class:`Section`: its anchor, title,
table-of-contents entries, the HTML of its body, and a one-line summary in numbers for the
report's first screen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from markupsafe import Markup

from moelens.report.cells import Table
from moelens.results import Run

if TYPE_CHECKING:
    from moelens.report.embed import EmbeddedFigure


@dataclass
class Section:
    id: str
    title: str
    html: Markup
    toc: list[tuple[str, str]] = field(default_factory=list)
    summary: str = ""


SectionBuilder = Callable[[Sequence[Run], str], Section]


@dataclass
class RunPart:
    """One run's part of a section: its number and anchor, label, setup table, tables, figures and
    the warnings it recorded."""

    number: int
    id: str
    label: str
    setup: Table
    tables: list[Table] = field(default_factory=list)
    figures: list[EmbeddedFigure] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def run_warnings(manifest: dict[str, Any]) -> list[str]:
    """The warnings a run recorded (degenerate inputs), in unit order."""
    found = manifest.get("warnings") or {}
    return [message for key in sorted(found) for message in found[key]]


def footer_items(run: Run) -> list[tuple[str, object]]:
    """The last rows of every run's setup: when, with which moelens, and where."""
    m = run.manifest
    return [("date", m.get("created", "")), ("moelens version", (m.get("versions") or {}).get("moelens", "")),
            ("run directory", str(run.path) if run.path else "")]


__all__ = ["RunPart", "Section", "SectionBuilder", "footer_items", "run_warnings"]
