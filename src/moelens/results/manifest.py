"""The manifest of a run directory, typed: every field's JSON type, checked in one place.

A manifest is read here and nowhere else (:func:`read_manifest`), through
:mod:`moelens.textfiles`, and checked against :data:`MANIFEST_SPEC` before anything uses it, so a
damaged ``manifest.json`` (not UTF-8, not JSON, a JSON array, a list where an object belongs, a
string where a number belongs, a missing key) gives one line naming the file and the field path::

    runs/base/manifest.json: options.layers must be a list of integers, got "x"

The spec is a small tree of checkers. An object spec lists its known fields (required or not);
keys it does not know are kept unchecked, so an analysis may record more than is listed here
(``manifest_extra``) and a newer writer's fields do not break an older reader. Optional fields may
also be ``null`` where the writer records "none" that way (``seed``, ``label``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from moelens.errors import RunDirectoryError

#: The file that makes a directory a run.
MANIFEST = "manifest.json"
#: The layout this version writes and reads. 2: inputs by name only (no ``model`` copy of the
#: first input), units by key only (no ``completed_layers``), every table declared in ``tables``.
SCHEMA_VERSION = 2
#: The kinds a table column may have; the manifest declares each table as ``[[column, kind], …]``.
KINDS = ("int", "float", "str", "bool")


class ManifestFieldError(Exception):
    """One field that does not match its spec: ``path`` (``options.layers``) and what it must be."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path} {message}" if path else message)


def _shown(value: Any) -> str:
    """The value as a short JSON snippet for the message."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class Spec:
    """A checker of one JSON value; ``what`` is its name in messages ("an integer")."""

    what = "a value"

    def check(self, value: Any, path: str) -> None:
        if not self.accepts(value):
            raise ManifestFieldError(path, f"must be {self.what}, got {_shown(value)}")

    def accepts(self, value: Any) -> bool:
        return True


class AnyValue(Spec):
    what = "any JSON value"


class Str(Spec):
    what = "a string"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str)


class Int(Spec):
    """A whole number (``true``/``false`` are not integers, though Python counts them so)."""

    def __init__(self, minimum: int | None = None):
        self.minimum = minimum
        self.what = "an integer" if minimum is None else f"an integer ≥ {minimum}"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and (self.minimum is None or value >= self.minimum)


class Number(Spec):
    what = "a finite number"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Bool(Spec):
    what = "true or false"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)


class OneOf(Spec):
    """One of a finite set of strings."""

    def __init__(self, *values: str):
        self.values = values
        self.what = "one of " + ", ".join(f'"{v}"' for v in values)

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.values


class Nullable(Spec):
    def __init__(self, inner: Spec):
        self.inner = inner
        self.what = f"{inner.what} or null"

    def check(self, value: Any, path: str) -> None:
        if value is not None:
            try:
                self.inner.check(value, path)
            except ManifestFieldError:
                raise ManifestFieldError(path, f"must be {self.what}, got {_shown(value)}") from None


class _Each(Spec):
    """A JSON container whose entries share one spec; subclasses say which container and how an
    entry's path is written."""

    container: type
    kind: str

    def __init__(self, item: Spec, plural: str):
        self.item = item
        self.what = f"{self.kind} of {plural}"

    def entries(self, value: Any, path: str) -> Iterator[tuple[Any, str]]:
        raise NotImplementedError

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, self.container):
            raise ManifestFieldError(path, f"must be {self.what}, got {_shown(value)}")
        for item, item_path in self.entries(value, path):
            self.item.check(item, item_path)


class ListOf(_Each):
    """A list; a scalar entry of the wrong kind is named as the list's mistake (a list of numbers
    holding a string), a nested one at its own path."""

    container, kind = list, "a list"

    def entries(self, value: Any, path: str) -> Iterator[tuple[Any, str]]:
        for i, item in enumerate(value):
            if not self.item.accepts(item) and not isinstance(self.item, (_Each, Obj, Nullable)):
                raise ManifestFieldError(path, f"must be {self.what}, got {_shown(value)}")
            yield item, f"{path}[{i}]"


class MapOf(_Each):
    """An object whose keys are free (unit keys, file names) and whose values share one spec."""

    container, kind = dict, "an object"

    def entries(self, value: Any, path: str) -> Iterator[tuple[Any, str]]:
        for key, item in value.items():
            yield item, _join(path, key)


@dataclass(frozen=True)
class Key:
    spec: Spec
    required: bool = False


@dataclass
class Obj(Spec):
    """An object with known fields; unknown keys are allowed and left unchecked."""

    fields: Mapping[str, Key] = field(default_factory=dict)
    what: str = "an object"

    def check(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise ManifestFieldError(path, f"must be {self.what}, got {_shown(value)}")
        for key, spec in self.fields.items():
            if key not in value:
                if spec.required:
                    raise ManifestFieldError(_join(path, key), "is missing")
                continue
            spec.spec.check(value[key], _join(path, key))


def _opt(spec: Spec) -> Key:
    return Key(spec)


def _nullable(spec: Spec) -> Key:
    return Key(Nullable(spec))


INTS = ListOf(Int(), "integers")
STRS = ListOf(Str(), "strings")

#: What the manifest records of an input model (``model_info`` in the runner).
MODEL_SPEC = Obj({
    "source": _nullable(Str()), "name": _nullable(Str()), "path": _nullable(Str()), "family": _nullable(Str()),
    "n_layers": _nullable(Int(0)), "n_experts": _nullable(Int(0)), "top_k": _nullable(Int(0)),
    "hidden_size": _nullable(Int(0)), "expert_ffn": _nullable(Int(0)),
    "files": _opt(MapOf(Str(), "strings (file → hash)")),
}, "an object (the model: source, name, n_experts, …)")

#: Options many readers use; every other option is kept as written.
OPTIONS_SPEC = Obj({
    "layers": _opt(INTS), "seed": _nullable(Int()), "device": _nullable(Str()), "dtype": _nullable(Str()),
    "k": _nullable(INTS), "matrix": _nullable(Str()), "matrices": _nullable(STRS), "null": _nullable(Str()),
    "shuffles": _nullable(Int(0)), "method": _nullable(Str()), "groups": _nullable(Int(1)), "tokens": _nullable(Int(0)),
    "limit": _nullable(Int(0)), "calibration_run": _nullable(Str()), "sites": _nullable(STRS), "n_prompts": _nullable(Int(0)),
    "pool": _nullable(Str()), "mode": _nullable(Str()), "pairing": _nullable(Str()), "texts_sha256": _nullable(Str()),
}, "an object (option → value)")

#: A table's declared columns: ``[[column, kind], …]`` (or an object column → kind).
COLUMNS_SPEC = ListOf(ListOf(Str(), "strings"), "[column, kind] pairs")

TIMINGS_SPEC = Obj({
    "total_s": _opt(Number()),
    "per_unit_s": _opt(MapOf(Number(), "numbers (unit → seconds)")),
}, "an object (total_s, per_unit_s)")

MANIFEST_SPEC = Obj({
    "schema_version": _opt(Int(1)),  # checked apart (check_schema_version): an old run is not a damaged one
    "analysis": Key(Str(), required=True),
    "status": Key(OneOf("running", "complete"), required=True),
    "label": _nullable(Str()),
    "created": _nullable(Str()),
    "completed_units": _opt(STRS),
    "units": _opt(STRS),
    "inputs": _opt(MapOf(MODEL_SPEC, "models (input name → model)")),
    "options": _opt(OPTIONS_SPEC),
    "seed": _nullable(Int()),
    "versions": _opt(MapOf(Str(), "strings (package → version)")),
    "timings": _opt(TIMINGS_SPEC),
    "tables": _opt(MapOf(COLUMNS_SPEC, "table schemas (table → [[column, kind], …])")),
    "warnings": _opt(MapOf(STRS, "lists of strings (unit → warnings)")),
    "notes": _opt(STRS),
    "executor": _opt(Obj({"name": _opt(OneOf("local", "ray")), "threads": _nullable(Int(1))}, "an object (name, threads, …)")),
    "threads": _nullable(Int(1)),
    # what analyses add when they finish (``manifest_extra``)
    "activation": _nullable(Str()),
    "matrices": _opt(Obj({"dir": _opt(Str())}, "an object (dir, features, router_logits, topk)")),
    "architecture": _nullable(Str()),
    "n_layers": _nullable(Int(0)),
    "noise_std": _nullable(Number()),
    "spectra_cache": _opt(Obj({"enabled": _opt(Bool()), "hits": _opt(Int(0)), "misses": _opt(Int(0))}, "an object (enabled, hits, misses)")),
}, "a JSON object (a run manifest)")


def _check_table_pairs(tables: Mapping[str, Any], file: str) -> None:
    for name, columns in tables.items():
        for i, pair in enumerate(columns):
            if len(pair) != 2 or pair[1] not in KINDS:
                raise RunDirectoryError(f"{file}: tables.{name}[{i}] must be a [column, kind] pair with kind one of "
                                        f"{', '.join(KINDS)}, got {_shown(pair)}; the manifest is damaged: run the analysis again")


def check_manifest(manifest: Any, file: str | os.PathLike[str]) -> dict[str, Any]:
    """``manifest`` itself when it matches :data:`MANIFEST_SPEC`, else a one-line
    :class:`~moelens.errors.RunDirectoryError` naming ``file`` and the field path."""
    try:
        MANIFEST_SPEC.check(manifest, "")
    except ManifestFieldError as err:
        raise RunDirectoryError(f"{file}: {err}; the manifest is damaged: run the analysis again into a new --out directory") from None
    _check_table_pairs(manifest.get("tables") or {}, str(file))
    check_schema_version(manifest, file)
    return manifest


def check_schema_version(manifest: Mapping[str, Any], file: str | os.PathLike[str]) -> None:
    """A manifest of another layout (a run written by an older moelens) is one line saying so;
    such a run is neither read nor resumed: its tables are computed again by this version."""
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        found = "no schema version" if version is None else f"manifest schema {version}"
        raise RunDirectoryError(f"{file}: this run was written by another moelens version ({found}; this version reads schema "
                                f"{SCHEMA_VERSION}); run the analysis again into a new --out directory")


def primary_input(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What the manifest records of the run's first input model (``inputs.a``: name, family,
    n_layers, n_experts, hidden_size, …); empty when it records none."""
    return dict((manifest.get("inputs") or {}).get("a") or {})


def check_run_directory(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path, if it is a run directory (it holds a :data:`MANIFEST`), else a
    :class:`RunDirectoryError` saying what it is instead. Reads nothing, imports nothing heavy: the
    command line checks its RUN arguments with it before loading any table."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirectoryError(f"run directory {path} does not exist; pass the --out directory of an analysis")
    if not (path / MANIFEST).is_file():
        raise RunDirectoryError(f"{path} has no {MANIFEST}; it is not a moelens run directory (or the run never started)")
    return path


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked manifest at ``path`` (the ``manifest.json`` file itself)."""
    from moelens.textfiles import read_json

    path = Path(path)
    return check_manifest(read_json(path, "manifest", RunDirectoryError), path)


__all__ = ["KINDS", "MANIFEST", "MANIFEST_SPEC", "SCHEMA_VERSION", "check_manifest", "check_run_directory", "check_schema_version",
           "primary_input", "read_manifest"]
