"""What a figure checks of the run it is handed before drawing: a run of its analysis, holding the
table it reads with the columns it reads and at least one row. Each failure is one line that
says what was found and what to do."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from moelens.errors import ConfigError
from moelens.results import Run

if TYPE_CHECKING:
    import pandas as pd


def checked_run(run: object, figure: str, analysis: str, command: str) -> Run:
    """``run`` if it is a :class:`Run` of ``analysis`` (made by ``command``), for ``figure``."""
    if not isinstance(run, Run):
        raise ConfigError(f"{figure} draws a moelens run; got a {type(run).__name__} (load one with moelens.load_run)")
    found = run.manifest.get("analysis")
    if found != analysis:
        raise ConfigError(f"run {run.label!r} is a {found or 'unnamed'} run; {figure} draws {analysis} runs ({command})")
    return run


def checked_table(run: Run, name: str, columns: Sequence[str], again: str, again_columns: str, empty: str) -> "pd.DataFrame":
    """The run's table ``name`` with ``columns``, not empty. ``again``: what to do when the table
    is missing, ``again_columns`` when columns are, ``empty``: why no row is a fault."""
    if name not in run.tables:
        found = ", ".join(sorted(run.tables)) or "none"
        raise ConfigError(f"run {run.label!r} has no {name} table (it has {found}); {again}")
    table = run.tables[name]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ConfigError(f"run {run.label!r}: its {name} table lacks column(s) {', '.join(missing)}; {again_columns}")
    if table.empty:
        raise ConfigError(f"run {run.label!r} has an empty {name} table: {empty}")
    return table


__all__ = ["checked_run", "checked_table"]
