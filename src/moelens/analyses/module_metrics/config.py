"""The options of module metrics (docs/methods.md §5): a frozen config, checked when made.

Torch-free (the standard library and moelens' leaf modules only), so that the command line shows
and checks these options without importing the analysis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moelens.analyses.fields import as_index_tuple, comma_names, option
from moelens.choices import DEFAULT_DEVICE, DEVICE_HELP, PAIR_METRICS, SINGLE_METRICS, check_metric_names
from moelens.errors import ConfigError
from moelens.ranges import parse_ranges


@dataclass(frozen=True)
class ModuleMetricsConfig:
    """Options of :func:`module_metrics` (each field's help says what it does)."""

    layers: tuple[int, ...] | None = option(None, "Layers, e.g. 0,5,10-13 (default: every layer).", parse=parse_ranges, metavar="LIST")
    metrics: tuple[str, ...] | None = option(None, f"Pair metrics: {','.join(PAIR_METRICS)} (default: all, when a second model or a base is given).", parse=comma_names, metavar="LIST")
    single: tuple[str, ...] | None = option(None, f"Single-model metrics: {','.join(SINGLE_METRICS)} (default: all).", parse=comma_names, metavar="LIST")
    tol: float = option(1e-3, "changed_frac counts entries with |A − B| > tol·std(A).")
    device: str = option(DEFAULT_DEVICE, f"{DEVICE_HELP}.", changes_numbers=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", as_index_tuple(self.layers, "layer"))
        # None: every metric that applies; an empty list: none of that kind
        for name, kind in (("metrics", "pair"), ("single", "single")):
            value = getattr(self, name)
            if value is not None:
                names = as_names(value)
                object.__setattr__(self, name, check_metric_names(names, kind) if names else ())
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or not 0 < float(self.tol) < float("inf"):
            raise ConfigError(f"tol={self.tol!r}: give a positive number, e.g. 1e-3")
        object.__setattr__(self, "tol", float(self.tol))


def as_names(value: Any) -> tuple[str, ...]:
    """A metric list: ``"corr,cka"``, ``"cka"`` or any iterable of names."""
    return comma_names(value) if isinstance(value, str) else tuple(value)



__all__ = ["ModuleMetricsConfig", "as_names"]
