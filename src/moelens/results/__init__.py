"""A run is a directory: ``manifest.json`` plus tidy tables in Parquet. See :mod:`moelens.results.run`."""

from moelens.results.run import Run, load_run, load_runs

__all__ = ["Run", "load_run", "load_runs"]
