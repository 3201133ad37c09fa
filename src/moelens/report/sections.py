"""One report section per analysis: where its builder lives.

A builder takes the runs of one analysis (in the order given) and the figure format and returns a
:class:`~moelens.report.section.Section`. Each analysis's declaration names its builder as
``"module:function"`` (:attr:`moelens.analyses.declaration.Declaration.section`);
:data:`SECTION_BUILDERS` collects them by analysis name (the manifest's ``analysis``), and
:func:`section_builder` imports one when a report needs it, so that naming the sections imports
none of them.
"""

from __future__ import annotations

from moelens.analyses.declaration import load
from moelens.analyses.registry import declarations
from moelens.report.section import SectionBuilder

#: Analysis name → its section builder as ``"module:function"``, from the declarations.
SECTION_BUILDERS: dict[str, str] = {name: d.section for name, d in declarations().items()}


def section_builder(analysis: str) -> SectionBuilder:
    """The builder of ``analysis``'s section (a KeyError for an analysis the report has none for)."""
    return load(SECTION_BUILDERS[analysis])


__all__ = ["SECTION_BUILDERS", "section_builder"]
