"""Per-module metrics of every layer (docs/methods.md §5, seed 002): single-model and pair metrics of each matrix."""

from moelens.analyses.module_metrics.analysis import ANALYSIS, ModuleMetrics, ModuleMetricsConfig, module_metrics

__all__ = ["ANALYSIS", "ModuleMetrics", "ModuleMetricsConfig", "module_metrics"]
