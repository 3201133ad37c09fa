"""The one shape every analysis has (like a scikit-learn estimator).

- A frozen **config** dataclass, declared once. Its fields carry their help text, how the command
  line spells and parses them, and whether a resumed run may change them
  (:func:`option`); the API's keyword arguments, the manifest's options and the CLI's options all
  derive from it.
- :meth:`Analysis.plan` checks the config against the input models and returns a :class:`Plan`: the
  resolved options and a list of independent :class:`Unit` s (a layer, a shard of one layer's
  calibration tokens, a group of prompts, a merged variant), each carrying the seed its draws
  start from, so no result depends on the executor or the order of work. Every check of the
  user's input happens here, before anything is written.
- :meth:`Analysis.compute` does one unit's pure work and returns tidy tables and, where the plan
  declares them (:attr:`Plan.unit_arrays`), NumPy arrays: no printing, no writing, no change to
  the plan; progress through one callback. So every unit runs on every executor.
- :meth:`Analysis.assemble` turns the finished units' arrays into the run's own (one at a time);
  :meth:`Analysis.finish` derives tables that need every unit (a summary across layers, the
  statistics of a layer whose tokens were split into shards).

The runner (:mod:`moelens.analyses.runner`) does the rest for every analysis alike: manifest,
one writer per run directory (tables and arrays), resume at the next unfinished unit, timings,
schemas.

Seeds (docs/methods.md, "Seeds"): a unit's :attr:`Unit.seed` is the config's ``seed`` (0 for an
analysis that draws nothing), and every random draw of a unit starts from it, keyed by what the
draw is about (layer, matrix, prompt id, expert, k, sample) and never by the unit's key or
position, so the same numbers come out however the work is split into units (shards, prompt
groups) and wherever they run. :func:`stream_seed` is the one hash used for such keys.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from moelens.analyses.declaration import Declaration
from moelens.analyses.fields import (
    FORWARD_DTYPES,
    MAX_SEED,
    as_index_tuple,
    check_seed,
    config_fields,
    make_config,
    option,
    positive_int,
    recorded_fields,
    resumable_fields,
)
from moelens.errors import ConfigError
from moelens.progress import ProgressCallback
from moelens.results.schema import TableSchema

if TYPE_CHECKING:
    from moelens.analyses.arrays import RunArrays

# The config helpers (option, the checks) live in the leaf module moelens.analyses.fields, so that
# configs import neither torch nor pandas; they stay importable from here as before.


def stream_seed(seed: int, key: str) -> int:
    """The seed of one named random stream drawn from ``seed`` (a unit's seed):
    the first 63 bits of numpy's ``SeedSequence([seed, crc32(key)])``. ``key`` names what is
    drawn (``"L3E5k8s0"``), never where or in which order it is computed."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(key.encode())]).generate_state(1, np.uint64)[0] >> 1)


def config_seed(config: Any) -> int:
    """The seed every unit of a run carries: the config's ``seed``, or 0 for a config without
    one (an analysis that draws nothing)."""
    return int(getattr(config, "seed", 0) or 0)


@dataclass(frozen=True)
class Unit:
    """One independent piece of work. ``key`` names it in the run directory and the manifest
    (``"L00005"``); ``layer`` is set when the unit belongs to one layer; ``seed`` is the seed
    every random draw of its computation starts from (see the module docstring); ``data``
    anything else the analysis planned for it (small and picklable: a Ray task receives it)."""

    key: str
    seed: int
    layer: int | None = None
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """A config resolved against its input models.

    ``options``: JSON values recorded in the manifest and compared on resume (concrete layers,
    the device actually used, …); ``units`` in the order their tables are concatenated;
    ``label`` a short human name of the run; ``state`` whatever the analysis needs in ``compute``
    (devices, dtypes, opened models)."""

    options: dict[str, Any]
    units: list[Unit]
    label: str
    state: Any = None
    notes: list[str] = field(default_factory=list)
    #: Names of the arrays every unit's :meth:`Analysis.compute` returns beside its tables.
    unit_arrays: tuple[str, ...] = ()
    #: Warnings :meth:`Analysis.finish` finds (key, e.g. a layer's ``"L00005"`` -> messages),
    #: kept in the manifest's ``warnings`` beside the units' own.
    warnings: dict[str, list[str]] = field(default_factory=dict)
    #: Totals of the units' :meth:`UnitContext.count` s, added up by the runner as units finish
    #: (wherever they ran), for :meth:`Analysis.manifest_extra`.
    counters: dict[str, float] = field(default_factory=dict)


@dataclass
class UnitContext:
    """What a unit's computation may say while it works: progress events and warnings. Warnings
    are kept in the run's manifest (``warnings``: unit key -> messages) and shown in the report."""

    progress: ProgressCallback | None = None
    warnings: list[str] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)

    def report(self, task: str, done: int, total: int, message: str = "") -> None:
        from moelens.progress import report

        report(self.progress, task, done, total, message)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def count(self, name: str, n: float = 1) -> None:
        """Add ``n`` to a counter of this unit (cache hits, …); the runner sums them over units
        into :attr:`Plan.counters`, so a count is right whichever process computed the unit."""
        self.counters[name] = self.counters.get(name, 0) + n


class _Declared:
    """A class attribute of an analysis that its declaration (:mod:`moelens.analyses.declaration`,
    found by the analysis's ``name``) already states: read from there on first use, so it is
    written once."""

    def __init__(self, read: Callable[[Declaration], Any]) -> None:
        self.read = read

    def __set_name__(self, owner: type, attribute: str) -> None:
        self.attribute = attribute

    def __get__(self, instance: Any, owner: type) -> Any:
        from moelens.analyses.registry import declaration

        value = self.read(declaration(owner.name))
        setattr(owner, self.attribute, value)  # the analysis class keeps it: later reads are plain
        return value


class Analysis:
    """Base class of every analysis; subclasses set ``name``, the class attributes their
    declaration does not state, and the three methods."""

    #: Registry key, the manifest's ``analysis`` and the report section's id.
    name: ClassVar[str]
    #: Human title (report section, CLI help): the declaration's.
    title: ClassVar[str] = _Declared(lambda d: d.title)
    #: The frozen config dataclass: the declaration's.
    config_type: ClassVar[type] = _Declared(lambda d: d.config_type)
    #: Named inputs, the declaration's models by role: the first is required, the others optional
    #: (``("a", "b")``).
    inputs: ClassVar[tuple[str, ...]] = _Declared(lambda d: tuple(i.role for i in d.inputs))
    #: Whether the analysis runs the model through transformers (its manifest then records
    #: whole-file hashes): the declaration's.
    reads_whole_model: ClassVar[bool] = _Declared(lambda d: d.reads_whole_model)
    #: What a unit is, for progress bars ("layers", "prompt groups"): the declaration's.
    unit_noun: ClassVar[str] = _Declared(lambda d: d.unit_noun)
    #: Tables every unit writes.
    unit_tables: ClassVar[tuple[TableSchema, ...]]
    #: Tables :meth:`finish` derives from all units.
    derived_tables: ClassVar[tuple[TableSchema, ...]] = ()

    @classmethod
    def schemas(cls) -> dict[str, TableSchema]:
        return {s.name: s for s in (*cls.unit_tables, *cls.derived_tables)}

    def plan(self, models: Mapping[str, Any], config: Any) -> Plan:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute(self, plan: Plan, unit: Unit, context: "UnitContext") -> dict[str, Any]:  # pragma: no cover
        """One unit's tables (by schema name) and arrays (by the names of :attr:`Plan.unit_arrays`).
        Pure: it reads the plan and the unit, writes nothing and changes nothing."""
        raise NotImplementedError

    def assemble(self, plan: Plan, arrays: "RunArrays") -> Iterator[tuple[str, np.ndarray]]:
        """The run's own arrays from its units' (``arrays.unit(key, name)``), yielded one at a
        time as (path relative to the run directory, without ``.npy``; array); none by default."""
        return iter(())

    def finish(self, plan: Plan, tables: Mapping[str, pd.DataFrame], arrays: "RunArrays | None" = None) -> dict[str, pd.DataFrame]:
        """Tables that need every unit; none by default. ``arrays`` (given when the plan declares
        unit arrays) reads the units' arrays and what :meth:`assemble` yielded."""
        return {}

    def for_workers(self) -> "Analysis":
        """The analysis as a remote worker runs it (an executor sends this copy): itself, unless
        it holds something that only makes sense in the driver's process."""
        return self

    def manifest_extra(self, plan: Plan) -> dict[str, Any]:
        """Anything else the manifest should record once the run is complete."""
        return {}


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
def jsonable(value: Any) -> Any:
    """Tuples as lists, numpy scalars as Python numbers: what the manifest stores."""
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def config_options(config: Any) -> dict[str, Any]:
    """Every field of a config as JSON values."""
    return {f.name: jsonable(getattr(config, f.name)) for f in config_fields(type(config))}


def recorded_options(config: Any) -> dict[str, Any]:
    """The fields of a config the manifest's options hold as given (``option(recorded=True)``,
    the default), as JSON values; a plan's own options (resolved layers, the device used) override
    them, and record the fields declared ``recorded=False`` where they apply."""
    options = config_options(config)
    return {name: options[name] for name in recorded_fields(type(config))}


def chosen_layers(requested: tuple[int, ...] | None, default: Sequence[int], what: str = "MoE layer") -> list[int]:
    """The layers a config asks for (``default`` when None), refusing an empty list or a layer named twice."""
    layers = list(requested) if requested is not None else list(default)
    if not layers:
        raise ConfigError(f"the layer list is empty; give at least one {what}, e.g. --layers 0")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"layers {layers} name a layer twice; list each layer once")
    return layers


def layer_unit_key(layer: int) -> str:
    return f"L{int(layer):05d}"


def layer_units(layers: Sequence[int], seed: int = 0) -> list[Unit]:
    """One unit per layer, keyed ``L00005``, each carrying ``seed``."""
    return [Unit(key=layer_unit_key(L), seed=int(seed), layer=int(L)) for L in layers]


__all__ = [
    "FORWARD_DTYPES", "Analysis", "MAX_SEED", "Plan", "Unit", "UnitContext", "as_index_tuple", "check_seed", "chosen_layers", "config_fields", "config_options",
    "config_seed", "jsonable", "layer_unit_key", "layer_units", "make_config", "option", "positive_int", "recorded_options",
    "resumable_fields", "stream_seed",
]
