"""A run = a directory holding ``manifest.json`` and one Parquet file per table.

The manifest records what is needed to trust and reproduce the numbers: the model (source,
family, input file hashes), the analysis and its options, the seed, package versions and timings.
Tables are written atomically (temporary file, then rename) so an interrupted run never leaves a
half-written file behind.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from moelens.errors import RunDirectoryError
from moelens.ranges import compact_ranges
from moelens.results.manifest import MANIFEST, primary_input


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour can change a number."""
    from moelens.version import UNINSTALLED, package_version

    out = {"python": platform.python_version()}
    for name in ("moelens", "torch", "numpy", "scipy", "pandas", "safetensors", "transformers"):
        found = package_version(name)
        if found != UNINSTALLED:
            out[name] = found
    return out


def write_json(path: Path, obj: Any, root: Path | None = None) -> None:
    """Write JSON atomically (sorted keys, indented, NaN-free values expected), never through a
    link; with ``root``, no folder from ``root`` down may be a link (:mod:`moelens.safe_files`)."""
    from moelens.safe_files import atomic_write_bytes

    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), root)


def write_table(path: Path, table: pd.DataFrame, root: Path | None = None) -> None:
    """Write one Parquet table atomically, never through a link (``root`` as in :func:`write_json`)."""
    from moelens.safe_files import atomic_write

    atomic_write(Path(path), lambda fh: table.to_parquet(fh, index=False), root)


@dataclass
class Run:
    """The result of one analysis: a manifest and named tidy tables.

    ``tables`` maps a table name (``"alignment"``) to a DataFrame; it is saved as
    ``<name>.parquet``. ``path`` is set once the run is saved or loaded.
    """

    manifest: dict[str, Any]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    path: Path | None = None
    #: Arrays of a run kept in memory (relative path -> array; a saved run holds them as
    #: ``<path>.npy`` files instead), e.g. a calibration's ``matrices/L00005/features``.
    arrays: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> pd.DataFrame:
        try:
            return self.tables[name]
        except KeyError:
            raise KeyError(f"run has no table {name!r}; it has {sorted(self.tables)}") from None

    @property
    def model(self) -> dict[str, Any]:
        """What the manifest records of the run's first input model (name, family, n_layers,
        n_experts, hidden_size, …); empty when it records none."""
        return primary_input(self.manifest)

    @property
    def label(self) -> str:
        """A short human label: the manifest's ``label`` or ``model name · layers``."""
        if self.manifest.get("label"):
            return str(self.manifest["label"])
        model = self.model
        name = model.get("name") or Path(str(model.get("source", "run"))).name
        layers = self.manifest.get("options", {}).get("layers")
        if isinstance(layers, list) and layers:
            return f"{name} L{compact_ranges(layers)}"
        return str(name)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the manifest, every table and every array under ``path`` (created if needed)."""
        import numpy as np

        from moelens.safe_files import atomic_write

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name, table in self.tables.items():
            write_table(path / f"{name}.parquet", table)
        for rel, array in self.arrays.items():
            atomic_write(path / f"{rel}.npy", lambda fh, a=np.ascontiguousarray(array): np.save(fh, a, allow_pickle=False), root=path)
        write_json(path / MANIFEST, self.manifest)
        self.path = path
        return path


def _read_table(path: Path, name: str) -> pd.DataFrame:
    file = path / f"{name}.parquet"
    if not file.is_file():
        raise RunDirectoryError(f"{path} lacks its table {name}.parquet; the run is incomplete: run the analysis again on this directory to finish it")
    return read_table_file(file, path)


def read_table_file(file: Path, path: Path) -> pd.DataFrame:
    """One Parquet table of the run directory ``path``; a truncated or foreign file is one line naming it."""
    import pyarrow as pa

    try:
        return pd.read_parquet(file)
    except (pa.ArrowException, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunDirectoryError(
            f"{file} cannot be read as Parquet ({reason}); the file is truncated or damaged: delete {path} and run the analysis again"
        ) from None


def load_run(path: str | os.PathLike[str]) -> Run:
    """Read a run directory written by :meth:`Run.save` or by the runner.

    The manifest must be of this version's layout (:data:`~moelens.results.manifest.SCHEMA_VERSION`),
    and every table it declares must be present and readable and match its declared
    columns; anything else is a :class:`~moelens.errors.RunDirectoryError` that names the file."""
    from moelens.results.manifest import check_run_directory, read_manifest
    from moelens.results.schema import schemas_from_json

    path = check_run_directory(path)
    manifest = read_manifest(path / MANIFEST)
    if manifest.get("status") == "running":
        done = len(manifest.get("completed_units") or [])
        raise RunDirectoryError(
            f"{path} holds an unfinished {manifest.get('analysis', 'analysis')} run ({done} unit(s) done); "
            "run the same command again to resume it, then use the run"
        )
    schemas = schemas_from_json(manifest.get("tables") or {})
    tables = {name: schema.check(_read_table(path, name), str(path / f"{name}.parquet")) for name, schema in schemas.items()}
    for name, table in tables.items():
        _check_values(path / f"{name}.parquet", str(manifest["analysis"]), name, table, manifest)
    return Run(manifest=manifest, tables=tables, path=path)


def _check_values(file: Path, analysis: str, name: str, table: pd.DataFrame, manifest: dict[str, Any]) -> None:
    """The bounds and relations the analysis declares for this table (missing values, ranges,
    clusters without their dominant expert, indices beyond the model), checked before any use."""
    from moelens.results.schema import registered_schema

    schema = registered_schema(analysis, name)
    if schema is None:
        return
    present = [c for c in schema.column_names if c in table.columns]
    problems = schema.value_problems(table) or (schema.relation_problems(table, manifest) if len(present) == len(schema.columns) else [])
    if problems:
        raise RunDirectoryError(f"{file}: {'; '.join(problems)}; the table is damaged: run the analysis again into a new --out directory")


def load_runs(paths: Iterable[str | os.PathLike[str]]) -> list[Run]:
    """Load several run directories, in the order given."""
    return [load_run(p) for p in paths]
