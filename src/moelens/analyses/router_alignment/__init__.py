"""Router–expert alignment (docs/methods.md §1, seed report 004): config, analysis, nulls and tables.

Names are imported on first use (PEP 562, :mod:`moelens.lazy`): the configs (torch-free) without
the analyses that compute with them."""

from moelens.lazy import lazy_package

_EXPORTS: dict[str, str] = {
    "RouterAlignmentConfig": "moelens.analyses.router_alignment.config",
    **dict.fromkeys(("ANALYSIS", "AlignmentPlan", "RouterAlignment", "default_ks", "layer_energies", "layer_statistics", "resolve", "router_alignment", "run_router_alignment"), "moelens.analyses.router_alignment.analysis"),
}

__getattr__, __dir__ = lazy_package(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
