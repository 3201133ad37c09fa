"""A run is a directory: ``manifest.json`` plus tidy tables in Parquet. See :mod:`moelens.results.run`.

Names are imported on first use (PEP 562, :mod:`moelens.lazy`), so that :mod:`moelens.results.manifest`
(checking a run directory, reading its manifest) costs no pandas."""

from moelens.lazy import lazy_package

_EXPORTS: dict[str, str] = dict.fromkeys(("Run", "load_run", "load_runs"), "moelens.results.run")

__getattr__, __dir__ = lazy_package(__name__, _EXPORTS)

__all__ = ["Run", "load_run", "load_runs"]
