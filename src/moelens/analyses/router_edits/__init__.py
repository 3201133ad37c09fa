"""Router edits (docs/methods.md §8): does the router–expert alignment matter for routing and
predictions? Project the aligned part out of a router row, against matched controls.

Names are imported on first use (PEP 562, :mod:`moelens.lazy`): the config (torch-free) without
the analysis that computes with it."""

from moelens.lazy import lazy_package

_EXPORTS: dict[str, str] = {
    "RouterEditsConfig": "moelens.analyses.router_edits.config",
    **dict.fromkeys(("ANALYSIS", "RouterEdits", "MIGRATION_SCHEMA", "SUMMARY_SCHEMA", "TABLE_SCHEMA", "router_edits", "summarise"),
                    "moelens.analyses.router_edits.analysis"),
}

__getattr__, __dir__ = lazy_package(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
