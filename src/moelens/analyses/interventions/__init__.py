"""Layer-wise interventions with JS divergence (docs/methods.md §4, seed 003)."""

from moelens.analyses.interventions.analysis import (
    ANALYSIS,
    SUMMARY_SCHEMA,
    TABLE_SCHEMA,
    Interventions,
    InterventionsConfig,
    summarise,
    trace,
)

__all__ = ["ANALYSIS", "Interventions", "InterventionsConfig", "SUMMARY_SCHEMA", "TABLE_SCHEMA", "summarise", "trace"]
