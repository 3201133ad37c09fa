"""A run directory filled one layer at a time, that resumes after an interruption.

While an analysis runs, each finished layer's tables are written atomically to
``parts/L<layer>/<table>.parquet`` and only then is the layer added to ``completed_layers`` in
``manifest.json`` (status ``"running"``). A run killed at any moment therefore leaves whole layers
only; on resume a layer listed as completed is skipped, any other is computed again and its part
files replaced, so nothing is lost or counted twice. When every layer is done the parts are
concatenated (in the order of the ``layers`` option) into ``<table>.parquet`` at the top of the
directory, the manifest says ``"complete"`` and the parts are removed.

Resuming checks that the directory was written by the same analysis with the same options (the
device aside: it does not change the numbers beyond rounding) and the same input files; anything
else is a :class:`~moelens.errors.RunDirectoryError`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from moelens.errors import RunDirectoryError
from moelens.results.run import MANIFEST, Run, load_run, write_json, write_table

PARTS = "parts"
# Options that may differ between the first run and its resumption.
RESUMABLE_DIFFERENCES = ("device",)


def _part_dir(root: Path, layer: int) -> Path:
    return root / PARTS / f"L{layer:05d}"


def _describe(options: dict[str, Any], keys: Iterable[str]) -> str:
    return ", ".join(f"{k}={options.get(k)!r}" for k in keys)


class LayerRunDirectory:
    """Streams per-layer tables of one analysis into ``path``.

    ``manifest`` is the manifest of a fresh run (with ``analysis``, ``model``, ``options``);
    ``tables`` names the tables every layer writes."""

    def __init__(self, path: str | Path, manifest: dict[str, Any], tables: Iterable[str]):
        self.path = Path(path)
        self.tables = tuple(tables)
        self.manifest = dict(manifest)
        self.completed: list[int] = []
        self._started = time.perf_counter()
        self._previous_total = 0.0

    # -- opening -----------------------------------------------------------------------------
    def open(self) -> list[int]:
        """Create the directory, or validate an existing one; return the layers already done."""
        manifest_path = self.path / MANIFEST
        if manifest_path.is_file():
            old = self._read_manifest(manifest_path)
            self._check_same_run(old)
            self.manifest["created"] = old.get("created", self.manifest.get("created"))
            timings = old.get("timings") or {}
            self._previous_total = float(timings.get("total_s", 0.0) or 0.0)
            self.manifest.setdefault("timings", {})["per_layer_s"] = dict(timings.get("per_layer_s") or {})
            wanted = set(self.manifest["options"]["layers"])
            if old.get("status") == "complete" and all((self.path / f"{t}.parquet").is_file() for t in self.tables):
                self.completed = [int(L) for L in old.get("completed_layers", []) if int(L) in wanted]
                self.manifest.update({k: old[k] for k in ("status", "completed_layers", "timings") if k in old})
                return list(self.completed)
            self.completed = [
                int(L) for L in old.get("completed_layers", [])
                if int(L) in wanted and all((_part_dir(self.path, int(L)) / f"{t}.parquet").is_file() for t in self.tables)
            ]
        else:
            if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
                raise RunDirectoryError(
                    f"{self.path} exists and is not a moelens run directory (no {MANIFEST}); choose an empty or new --out directory"
                )
            self.path.mkdir(parents=True, exist_ok=True)
        self.manifest["status"] = "running"
        self.manifest["completed_layers"] = list(self.completed)
        self._write_manifest()
        return list(self.completed)

    def _read_manifest(self, path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise RunDirectoryError(f"{path} is not valid JSON ({exc.msg}); delete {self.path} and run again") from None

    def _check_same_run(self, old: dict[str, Any]) -> None:
        analysis = self.manifest.get("analysis")
        if old.get("analysis") != analysis:
            raise RunDirectoryError(
                f"{self.path} holds a {old.get('analysis')!r} run, not {analysis!r}; choose another --out directory"
            )
        mine, theirs = self.manifest.get("options", {}), old.get("options", {})
        keys = sorted((set(mine) | set(theirs)) - set(RESUMABLE_DIFFERENCES))
        differ = [k for k in keys if mine.get(k) != theirs.get(k)]
        if differ:
            raise RunDirectoryError(
                f"{self.path} was written with {_describe(theirs, differ)} but this run asks for "
                f"{_describe(mine, differ)}; resume with the same options, or choose another --out directory"
            )
        old_files = (old.get("model") or {}).get("files")
        new_files = (self.manifest.get("model") or {}).get("files")
        if old_files is not None and new_files is not None and old_files != new_files:
            raise RunDirectoryError(
                f"{self.path} was written from other weight files than {self.manifest['model'].get('path')}; "
                "choose another --out directory for this checkpoint"
            )

    # -- writing -----------------------------------------------------------------------------
    def write_layer(self, layer: int, tables: dict[str, pd.DataFrame], seconds: float) -> None:
        """Persist one finished layer: part files first, then the manifest entry."""
        missing = set(self.tables) - set(tables)
        if missing:
            raise ValueError(f"layer {layer} lacks tables {sorted(missing)}")
        part = _part_dir(self.path, layer)
        for name in self.tables:
            write_table(part / f"{name}.parquet", tables[name])
        if layer not in self.completed:
            self.completed.append(layer)
        self.manifest["completed_layers"] = list(self.completed)
        self.manifest["timings"].setdefault("per_layer_s", {})[str(layer)] = round(float(seconds), 6)
        self._write_manifest()

    def _write_manifest(self) -> None:
        timings = self.manifest.setdefault("timings", {})
        timings.setdefault("per_layer_s", {})
        timings["total_s"] = round(self._previous_total + time.perf_counter() - self._started, 6)
        write_json(self.path / MANIFEST, self.manifest)

    def finish(self, extra: dict[str, Any] | None = None) -> Run:
        """Concatenate the parts into the final tables, mark the run complete, return it."""
        if self.manifest.get("status") == "complete":
            shutil.rmtree(self.path / PARTS, ignore_errors=True)
            return load_run(self.path)
        layers = [L for L in self.manifest["options"]["layers"]]
        not_done = [L for L in layers if L not in set(self.completed)]
        if not_done:
            raise RunDirectoryError(f"{self.path}: layers {not_done} are not finished; run the analysis again to resume")
        for name in self.tables:
            frames = [pd.read_parquet(_part_dir(self.path, L) / f"{name}.parquet") for L in layers]
            write_table(self.path / f"{name}.parquet", pd.concat(frames, ignore_index=True))
        if extra:
            self.manifest.update(extra)
        self.manifest["status"] = "complete"
        self.manifest["completed_layers"] = list(layers)
        self._write_manifest()
        shutil.rmtree(self.path / PARTS, ignore_errors=True)
        return load_run(self.path)
