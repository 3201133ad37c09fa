"""Table cells of a report, as formatted text (the templates only lay them out).

Every section builds its tables from these: a :class:`Table` of :class:`Cell` rows, numbers
printed with a fixed number of decimals, a missing or undefined value printed as an empty cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import pandas as pd


@dataclass(frozen=True)
class Cell:
    text: str
    css: str = "num"
    title: Optional[str] = None


@dataclass
class Table:
    """Headers, rows of cells, an optional caption and note (both plain text)."""

    headers: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    caption: str = ""
    note: str = ""


def number(value: Any, digits: int = 6) -> Cell:
    """A number with ``digits`` decimals; empty for a missing or undefined value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or pd.isna(value):
        return Cell("", "num empty")
    return Cell(f"{float(value):.{digits}f}")


def integer(value: Any) -> Cell:
    return Cell(str(int(value)))


def text(value: Any) -> Cell:
    return Cell("" if value is None else str(value), "text")


def settings_table(items: Sequence[tuple[str, object]], skip_empty: bool = False) -> Table:
    """A run's setup: one ``setting | value`` row per item (``skip_empty``: items whose value is
    ``""`` or None are left out)."""
    table = Table(headers=["setting", "value"])
    for key, value in items:
        if not (skip_empty and value in ("", None)):
            table.rows.append([Cell(key, "key"), text(value)])
    return table


__all__ = ["Cell", "Table", "integer", "number", "settings_table", "text"]
