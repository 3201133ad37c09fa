"""Layer-wise interventions with JS divergence (docs/methods.md §4, seed 003).

Names are imported on first use (PEP 562, :mod:`moelens.lazy`): the configs (torch-free) without
the analyses that compute with them."""

from moelens.lazy import lazy_package

_EXPORTS: dict[str, str] = {
    "InterventionsConfig": "moelens.analyses.interventions.config",
    **dict.fromkeys(("ANALYSIS", "Interventions", "SUMMARY_SCHEMA", "TABLE_SCHEMA", "summarise", "trace"), "moelens.analyses.interventions.analysis"),
}

__getattr__, __dir__ = lazy_package(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
