"""Declared table schemas: every table an analysis writes has named, typed columns.

A schema is checked when a unit's table is written and again when a run is loaded, so a table
with a missing column or a column of the wrong kind is named at once rather than discovered as an
empty panel in a report. Kinds are coarse on purpose (Parquet round trips may widen an int32 to
an int64, or turn a string column into an Arrow string type): ``int``, ``float``, ``str``, ``bool``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import pandas as pd

from moelens.errors import RunDirectoryError

KINDS = ("int", "float", "str", "bool")


def _kind_of(series: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(series):
        return "bool"
    if pd.api.types.is_integer_dtype(series):
        return "int"
    if pd.api.types.is_float_dtype(series):
        return "float"
    if pd.api.types.is_string_dtype(series) or series.map(lambda v: isinstance(v, str)).all():
        return "str"
    return str(series.dtype)


@dataclass(frozen=True)
class TableSchema:
    """A table's name and its columns in order, each with a kind (``int``, ``float``, ``str``, ``bool``).

    An integer column may also be read as float (NaN-free ints are written as ints; nothing is lost
    either way), so ``float`` accepts ``int``."""

    name: str
    columns: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        bad = [kind for _, kind in self.columns if kind not in KINDS]
        if bad:
            raise ValueError(f"table {self.name}: unknown column kinds {bad}; use {KINDS}")

    @property
    def column_names(self) -> list[str]:
        return [name for name, _ in self.columns]

    def to_json(self) -> list[list[str]]:
        # a list of [column, kind] pairs: the manifest's JSON sorts object keys, not lists
        return [[c, k] for c, k in self.columns]

    @classmethod
    def from_json(cls, name: str, columns: Any) -> "TableSchema":
        pairs = columns.items() if isinstance(columns, Mapping) else columns
        return cls(name, tuple((str(c), str(k)) for c, k in pairs))

    def problems(self, table: pd.DataFrame) -> list[str]:
        """What in ``table`` disagrees with the schema (empty when it conforms)."""
        out = []
        missing = [c for c in self.column_names if c not in table.columns]
        if missing:
            out.append(f"missing columns {missing}")
        extra = [c for c in table.columns if c not in self.column_names]
        if extra:
            out.append(f"unexpected columns {extra}")
        for column, kind in self.columns:
            if column not in table.columns or len(table) == 0:
                continue
            found = _kind_of(table[column])
            if found != kind and not (kind == "float" and found == "int"):
                out.append(f"column {column!r} holds {found}, expected {kind}")
        return out

    def check(self, table: pd.DataFrame, where: str) -> pd.DataFrame:
        """Return ``table`` with its columns in schema order, or raise naming what is wrong."""
        problems = self.problems(table)
        if problems:
            raise RunDirectoryError(f"{where}: table {self.name!r} does not match its schema: {'; '.join(problems)}")
        return table[self.column_names]


def schemas_to_json(schemas: Mapping[str, TableSchema]) -> dict[str, Any]:
    return {name: s.to_json() for name, s in schemas.items()}


def schemas_from_json(obj: Mapping[str, Any]) -> dict[str, TableSchema]:
    return {str(name): TableSchema.from_json(str(name), cols) for name, cols in obj.items()}
