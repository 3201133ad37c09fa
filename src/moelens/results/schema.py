"""Declared table schemas: every table an analysis writes has named, typed columns.

A schema is checked when a unit's table is written and again when a run is loaded, so a table
with a missing column or a column of the wrong kind is named at once rather than discovered as an
empty panel in a report. Kinds are coarse on purpose (Parquet round trips may widen an int32 to
an int64, or turn a string column into an Arrow string type): ``int``, ``float``, ``str``, ``bool``.

A schema may also declare what its values must be (:class:`Bounds`: no missing value, a closed
range) and relations between rows and the run's manifest (``relations``: a function returning
what is wrong, such as a cluster without its dominant expert or an expert index beyond the
model's). Those are checked when a table is written and when a run is loaded
(:func:`registered_schema` finds the schema an analysis declared for a table name, since a
manifest records only the columns).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import pandas as pd

from moelens.errors import RunDirectoryError
from moelens.results.manifest import KINDS, primary_input


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
class Bounds:
    """What a column's values must be: present (no NaN/None) unless ``nullable``, and within
    ``[minimum, maximum]`` where given (NaN values of a nullable column are not compared)."""

    nullable: bool = False
    minimum: float | None = None
    maximum: float | None = None

    def describe(self) -> str:
        lo = "−∞" if self.minimum is None else f"{self.minimum:g}"
        hi = "∞" if self.maximum is None else f"{self.maximum:g}"
        return f"[{lo}, {hi}]"


#: ``relation(table, manifest) -> problems``: a check across rows (and the run's model).
Relation = Callable[[pd.DataFrame, Mapping[str, Any]], list[str]]


def _value_problems(column: str, series: pd.Series, bounds: Bounds) -> list[str]:
    missing = series.isna()
    if missing.any() and not bounds.nullable:
        return [f"column {column!r} has {int(missing.sum())} missing value(s) (first at row {int(missing.to_numpy().argmax())}); "
                "every row needs one"]
    if bounds.minimum is None and bounds.maximum is None:
        return []
    values = pd.to_numeric(series[~missing], errors="coerce").to_numpy(dtype=float)
    bad = ~((values >= (-math.inf if bounds.minimum is None else bounds.minimum))
            & (values <= (math.inf if bounds.maximum is None else bounds.maximum)))
    if bad.any():
        return [f"column {column!r} holds {values[bad][0]:g}, outside {bounds.describe()} ({int(bad.sum())} value(s))"]
    return []


_REGISTRY: dict[str, "TableSchema"] = {}

#: The modules that declare each analysis's table schemas (imported on demand by :func:`registered_schema`).
SCHEMA_MODULES = {
    "calibration": ("moelens.analyses.calibration.tables",),
    "clustering": ("moelens.analyses.calibration.tables", "moelens.analyses.clustering.tables"),
    "expert_distance": ("moelens.analyses.expert_distance.tables",),
    "router_alignment": ("moelens.analyses.router_alignment.tables",),
}


def registered_schema(analysis: str, name: str) -> "TableSchema | None":
    """The schema ``analysis`` declares for its table ``name``, with its bounds and relations
    (None for a table no analysis declares with more than columns)."""
    for module in SCHEMA_MODULES.get(analysis, ()):
        importlib.import_module(module)
    return _REGISTRY.get(name)


@dataclass(frozen=True)
class TableSchema:
    """A table's name and its columns in order, each with a kind (``int``, ``float``, ``str``, ``bool``).

    An integer column may also be read as float (NaN-free ints are written as ints; nothing is lost
    either way), so ``float`` accepts ``int``."""

    name: str
    columns: tuple[tuple[str, str], ...]
    #: column → what its values must be; a column not named here may hold anything of its kind
    bounds: Mapping[str, Bounds] = field(default_factory=dict, compare=False)
    #: checks across rows, given the run's manifest (run on load, where the manifest is known)
    relations: tuple[Relation, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        bad = [kind for _, kind in self.columns if kind not in KINDS]
        if bad:
            raise ValueError(f"table {self.name}: unknown column kinds {bad}; use {KINDS}")
        unknown = [c for c in self.bounds if c not in self.column_names]
        if unknown:
            raise ValueError(f"table {self.name}: bounds for unknown columns {unknown}")
        if self.bounds or self.relations:
            _REGISTRY[self.name] = self

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
        return out or self.value_problems(table)

    def value_problems(self, table: pd.DataFrame) -> list[str]:
        """Values outside the declared :class:`Bounds` (missing, out of range) in the columns present."""
        return [p for column, bounds in self.bounds.items() if column in table.columns
                for p in _value_problems(column, table[column], bounds)]

    def relation_problems(self, table: pd.DataFrame, manifest: Mapping[str, Any]) -> list[str]:
        """What the relations find wrong in ``table`` (run only on a table whose values conform)."""
        return [p for relation in self.relations for p in relation(table, manifest)]

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


def _model_of(manifest: Mapping[str, Any]) -> Mapping[str, Any]:
    return primary_input(manifest)


def within_model(layers: tuple[str, ...] = ("layer",), experts: tuple[str, ...] = ("expert",)) -> Relation:
    """A relation: every index in the ``layers`` columns is below the model's ``n_layers`` and every
    one in the ``experts`` columns below its ``n_experts`` (where the manifest records them)."""

    def check(table: pd.DataFrame, manifest: Mapping[str, Any]) -> list[str]:
        model = _model_of(manifest)
        out = []
        for columns, key, noun in ((layers, "n_layers", "layers"), (experts, "n_experts", "experts")):
            limit = model.get(key)
            if not isinstance(limit, int) or isinstance(limit, bool):
                continue
            for column in columns:
                values = pd.to_numeric(table[column], errors="coerce")
                beyond = values[values >= limit]
                if len(beyond):
                    out.append(f"column {column!r} holds {beyond.iloc[0]:g}, but the model has {limit} {noun} (0..{limit - 1})")
        return out

    return check
