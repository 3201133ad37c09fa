"""Per-module metrics of every layer (docs/methods.md §5, seed 002): single-model and pair metrics of each matrix.

Names are imported on first use (PEP 562, :mod:`moelens.lazy`): the configs (torch-free) without
the analyses that compute with them."""

from moelens.lazy import lazy_package

_EXPORTS: dict[str, str] = {
    "ModuleMetricsConfig": "moelens.analyses.module_metrics.config",
    **dict.fromkeys(("ANALYSIS", "ModuleMetrics", "module_metrics"), "moelens.analyses.module_metrics.analysis"),
}

__getattr__, __dir__ = lazy_package(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
