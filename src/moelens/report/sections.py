"""One report section per analysis: where its builder lives.

A builder takes the runs of one analysis (in the order given) and the figure format and returns a
:class:`~moelens.report.section.Section`. :data:`SECTION_BUILDERS` maps an analysis name (the
manifest's ``analysis``) to its builder as ``"module:function"`` under :mod:`moelens.report`,
imported when a report needs it, so that naming the sections imports none of them.
"""

from __future__ import annotations

import importlib

from moelens.report.section import SectionBuilder

SECTION_BUILDERS: dict[str, str] = {
    "router_alignment": "alignment_report:alignment_section",
    "expert_distance": "distance_report:distance_section",
    "module_metrics": "modules_report:modules_section",
    "interventions": "trace_report:trace_section",
    "router_edits": "router_edits_report:route_section",
    "calibration": "clustering_report:calibration_section",
    "clustering": "clustering_report:clustering_section",
    "merge_cost": "clustering_report:merge_cost_section",
}


def section_builder(analysis: str) -> SectionBuilder:
    """The builder of ``analysis``'s section (a KeyError for an analysis the report has none for)."""
    module, function = SECTION_BUILDERS[analysis].split(":")
    return getattr(importlib.import_module(f"moelens.report.{module}"), function)


__all__ = ["SECTION_BUILDERS", "section_builder"]
