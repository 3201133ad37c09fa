"""One report section per analysis, declared once: a builder from that analysis's runs to HTML.

A builder takes the runs of one analysis (in the order given) and the figure format and returns a
:class:`Section`: its anchor, title, table-of-contents entries, the HTML of its body, and a
one-line summary in numbers for the report's first screen. :data:`SECTION_BUILDERS` maps an
analysis name (the manifest's ``analysis``) to its builder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from markupsafe import Markup

from moelens.results import Run


@dataclass
class Section:
    id: str
    title: str
    html: Markup
    toc: list[tuple[str, str]] = field(default_factory=list)
    summary: str = ""


SectionBuilder = Callable[[Sequence[Run], str], Section]


def alignment_section(runs: Sequence[Run], fmt: str) -> Section:
    """Router–expert alignment: the seed report's body (explanations, comparison, one part per run)."""
    from moelens.figures.alignment_data import alignment_views
    from moelens.report.alignment_report import report_context
    from moelens.report.render import render

    views = alignment_views(list(runs))
    context = report_context(views, None, fmt)
    toc = [("plot-explanations", "Plot explanations"), ("comparison", "Comparison across all runs")]
    toc += [(r.id, f"Individual analysis: run {r.number}, {r.label}") for r in context["runs"]]
    means = [float(v.run["alignment_layers"].query("k == 1")["align"].mean()) for v in views if "alignment_layers" in v.run.tables]
    summary = f"{len(views)} run(s); mean cos²θ (k = 1) " + ", ".join(f"{m:.3f}" for m in means)
    return Section("router-alignment", "Router–expert alignment", Markup(render("alignment_body.html", **context)), toc, summary)


def _builders() -> dict[str, SectionBuilder]:
    from moelens.analyses.declaration import load
    from moelens.analyses.registry import declarations

    def lazy(target: str) -> SectionBuilder:
        def build(runs: Sequence[Run], fmt: str) -> Section:
            return load(target)(runs, fmt)

        build.__name__ = target.split(":")[1]
        return build

    return {name: lazy(d.section) for name, d in declarations().items()}


#: Every analysis's section builder by the analysis's name (from its declaration), imported when
#: first used.
SECTION_BUILDERS: dict[str, SectionBuilder] = _builders()
