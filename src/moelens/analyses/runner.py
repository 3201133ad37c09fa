"""One runner for every analysis: manifest, one writer per run directory, resume, timings, schemas.

A run directory while an analysis runs::

    DIR/manifest.json               status "running", completed_units, options, inputs, timings
    DIR/parts/<unit>/<table>.parquet  each finished unit's tables, written atomically
    DIR/parts/<unit>/<array>.npy      and its arrays, where its plan declares some
    DIR/.moelens.lock               held (flock) by the one process writing DIR

A unit's part files are written first and only then is the unit added to ``completed_units``, so a
run killed at any moment leaves whole units only. On resume, a completed unit is skipped and any
other is computed again (its leftovers removed), so nothing is lost or counted twice. When every
unit is done the parts are concatenated in plan order into ``DIR/<table>.parquet``, the units'
arrays are assembled into the run's own (``DIR/<path>.npy``, :mod:`moelens.analyses.arrays`), the
derived tables are added, the manifest says ``"complete"`` and the parts are removed.

Resuming checks that the directory holds the same analysis with the same options (fields that do
not change the numbers, like the device, aside) and the same input files. Large weight files are
fingerprinted by samples only, so the manifest also records what the units read
(``read_digests``: input -> read key -> SHA-256 of the bytes, cut to 128 bits, see :mod:`moelens.checkpoint.store`),
and a resume reads those tensors again and refuses a checkpoint whose bytes differ. A directory that holds no
finished unit is simply started afresh with the new options: there is nothing to protect.

Where units are computed is the executor's business (:mod:`moelens.analyses.executors`): in this
process, or as Ray tasks that return each unit's tables as they finish. This process remains the
one writer either way, so all of the above holds for both, and the executor is recorded in the
manifest (``"executor"``) as information only: a run begun on one may be resumed on the other.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import pandas as pd

from moelens.analyses.arrays import ArrayStore, RunArrays, checked_arrays, write_all
from moelens.analyses.base import Analysis, Plan, Unit, layer_unit_key, recorded_options, resumable_fields
from moelens.checkpoint.store import is_sampled
from moelens.errors import MoelensError, RunDirectoryError
from moelens.progress import ProgressCallback
from moelens.results.manifest import SCHEMA_VERSION, read_manifest
from moelens.results.run import MANIFEST, Run, load_run, package_versions, read_table_file, write_json, write_table
from moelens.results.schema import TableSchema, schemas_to_json
from moelens.safe_files import remove_tree

if TYPE_CHECKING:
    from moelens.analyses.executors import Executor

PARTS = "parts"


def model_info(model: Any, whole: bool = False) -> dict[str, Any]:
    """What the manifest records of an input model: enough to name it, find it and know its files
    (hashed whole when ``whole``: an analysis that loads the model through transformers reads
    every byte, so every byte is evidence)."""
    return {
        "source": model.source, "name": model.name, "path": str(model.path), "family": model.family,
        "n_layers": model.n_layers, "n_experts": model.n_experts, "top_k": model.top_k,
        "hidden_size": model.hidden_size, "expert_ffn": model.expert_ffn, "files": model.file_hashes(whole=whole),
    }


def new_manifest(analysis: Analysis, models: Mapping[str, Any], plan: Plan) -> dict[str, Any]:
    inputs = {name: model_info(m, analysis.reads_whole_model) for name, m in models.items() if m is not None}
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "analysis": analysis.name,
        "label": plan.label,
        "status": "running",
        "completed_units": [],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": inputs,
        "options": plan.options,
        "seed": plan.options.get("seed"),
        "versions": package_versions(),
        "timings": {"total_s": 0.0, "per_unit_s": {}},
        "tables": schemas_to_json(analysis.schemas()),
        "units": [u.key for u in plan.units],
        "warnings": {},
        "read_digests": {name: {} for name in inputs},
    }
    if plan.notes:
        manifest["notes"] = list(plan.notes)
    return manifest


def whole_layer_units(units: list[Unit]) -> bool:
    """Whether every unit is one whole layer (keyed ``L00005``): the manifest then also lists
    ``completed_layers``, as it did before units had keys."""
    return all(u.layer is not None and u.key == layer_unit_key(u.layer) for u in units)


def reads_by_input(reads: Mapping[str, Mapping[str, str]], models: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Digests logged per checkpoint directory, assigned to the run's inputs by directory (a
    worker on another host may see a checkpoint of the Hugging Face cache under another root,
    so the snapshot's last two path parts also match). Reads of other checkpoints are dropped."""
    out: dict[str, dict[str, str]] = {}
    for directory, digests in reads.items():
        d = Path(directory)
        for name, model in models.items():
            if getattr(model, "store", None) is None:
                continue
            path = Path(model.store.directory)
            if d == path or d.resolve() == path.resolve() or (len(d.parts) > 2 and d.parts[-2:] == path.parts[-2:]):
                out.setdefault(name, {}).update(digests)
                break
    return out


def merge_reads(manifest: dict[str, Any], reads: Mapping[str, Mapping[str, str]], where: str) -> None:
    """Add ``reads`` (input -> key -> digest) to the manifest's ``read_digests``; a tensor read
    twice with other bytes (a worker that sees another checkpoint, a file changed while the run
    ran) is refused."""
    recorded = manifest.setdefault("read_digests", {})
    for name, digests in reads.items():
        mine = recorded.setdefault(name, {})
        for key, digest in digests.items():
            if mine.setdefault(key, digest) != digest:
                raise RunDirectoryError(
                    f"{where}: tensor {key} of input {name} was read with other bytes than before (the checkpoint changed "
                    "while the run ran, or a worker sees another copy); run again into a new --out directory"
                )


def _describe(options: Mapping[str, Any], keys: Iterable[str]) -> str:
    return ", ".join(f"{k}={options.get(k)!r}" for k in keys)


def _clean_leftovers(directory: Path) -> None:
    """Remove what a killed writer leaves: temporary files of interrupted atomic writes
    (``.NAME.*.tmp``, anywhere under the run) and scratch folders of dead processes. Called
    holding the directory's lock, so no live writer owns them."""
    from moelens.safe_files import remove_dead_scratch, remove_temporaries

    remove_temporaries(directory)
    remove_dead_scratch(directory)


class RunDirectory:
    """One analysis streaming its units into ``path``, the only writer while it is open."""

    def __init__(self, path: str | os.PathLike[str], analysis: Analysis, manifest: dict[str, Any],
                 models: Mapping[str, Any] | None = None, arrays: tuple[str, ...] = ()):
        self.path = Path(path)
        #: names of the arrays every unit returns (kept as parts/<unit>/<name>.npy)
        self.arrays = tuple(arrays)
        self.parts = ArrayStore(self.path / PARTS, guard=self.path)
        self.run_arrays = ArrayStore(self.path)
        self.models = dict(models or {})
        self.analysis = analysis
        self.manifest = dict(manifest)
        self.schemas: dict[str, TableSchema] = analysis.schemas()
        self.completed: list[str] = []
        self._lock = None
        self._started = time.perf_counter()
        self._previous_total = 0.0

    # -- opening -----------------------------------------------------------------------------
    def __enter__(self) -> "RunDirectory":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> list[str]:
        """Take the directory (create it, or lock and validate an existing one); return the keys of
        the units already done."""
        from moelens.locks import LOCK_NAME, DirectoryLock
        from moelens.safe_files import SCRATCH, is_temporary, refuse_links_inside

        if self.path.exists() and not self.path.is_dir():
            raise RunDirectoryError(f"{self.path} is a file, not a directory; choose a new --out directory")
        if self.path.is_dir() and not (self.path / MANIFEST).is_file():
            content = [p for p in self.path.iterdir() if p.name not in (LOCK_NAME, SCRATCH) and not is_temporary(p.name)]
            if content:
                if (self.path / LOCK_NAME).exists():
                    # another process may be starting a run here (its manifest not yet written): say so
                    DirectoryLock(self.path).acquire().release()
                raise RunDirectoryError(
                    f"{self.path} exists and is not a moelens run directory (no {MANIFEST}); choose an empty or new --out directory"
                )
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = DirectoryLock(self.path)
        self._lock.acquire()
        try:
            # a run directory holds only files moelens wrote: a link (parts -> elsewhere) would
            # have files outside it written or deleted
            refuse_links_inside(self.path)
            self._adopt_existing()
        except BaseException:
            self.close()
            raise
        return list(self.completed)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _adopt_existing(self) -> None:
        manifest_path = self.path / MANIFEST
        _clean_leftovers(self.path)
        if not manifest_path.is_file():
            self._start_fresh()
            return
        old = read_manifest(manifest_path)  # typed: every field read below has its JSON type
        if old.get("analysis") != self.analysis.name:
            raise RunDirectoryError(
                f"{self.path} holds a {old.get('analysis')!r} run, not {self.analysis.name!r}; choose another --out directory"
            )
        done = self._completed_keys(old)
        finished = old.get("status") == "complete"
        mismatch = self._mismatch(old)
        if mismatch and not finished and not done:
            self._start_fresh()  # nothing finished there: the corrected command simply takes the directory
            return
        if mismatch:
            raise RunDirectoryError(mismatch)
        changed = self._changed_reads(old)
        if changed:
            raise RunDirectoryError(changed)
        old_reads = old.get("read_digests")
        if isinstance(old_reads, Mapping):
            merge_reads(self.manifest, {k: dict(v) for k, v in old_reads.items() if isinstance(v, Mapping)}, str(self.path))
        self.manifest["created"] = old.get("created", self.manifest.get("created"))
        timings = old.get("timings") or {}
        self._previous_total = float(timings.get("total_s", 0.0) or 0.0)
        per_unit = timings.get("per_unit_s") or {}
        self.manifest["timings"] = {"total_s": self._previous_total, "per_unit_s": {str(k): v for k, v in per_unit.items()}}
        self.manifest["warnings"] = dict(old.get("warnings") or {})
        wanted = {u for u in self.manifest["units"]}
        if finished and all((self.path / f"{t}.parquet").is_file() for t in self.schemas):
            self.completed = [k for k in done if k in wanted]
            self.manifest.update({k: old[k] for k in ("status", "completed_units", "timings") if k in old})
            remove_tree(self.path / PARTS)
            return
        self.completed = [
            k for k in done
            if k in wanted and all((self._part(k) / f"{t}.parquet").is_file() for t in self._unit_table_names())
            and all(self.parts.has(f"{k}/{a}") for a in self.arrays)
        ]
        self._remove_unfinished_parts()
        self._mark_running()

    def _completed_keys(self, old: Mapping[str, Any]) -> list[str]:
        return [str(k) for k in old.get("completed_units") or []]

    def _mismatch(self, old: Mapping[str, Any]) -> str:
        """Why ``old`` cannot be resumed by this run ("" when it can)."""
        mine, theirs = self.manifest.get("options", {}), old.get("options", {}) or {}
        skip = resumable_fields(self.analysis.config_type) | {"device"}
        keys = sorted((set(mine) | set(theirs)) - skip)
        differ = [k for k in keys if mine.get(k) != theirs.get(k)]
        if differ:
            return (f"{self.path} was written with {_describe(theirs, differ)} but this run asks for "
                    f"{_describe(mine, differ)}; resume with the same options, or choose another --out directory")
        old_inputs = old.get("inputs") or {}
        for name, info in self.manifest.get("inputs", {}).items():
            theirs_files = (old_inputs.get(name) or {}).get("files")
            mine_files = info.get("files") or {}
            if theirs_files is not None and theirs_files != mine_files:
                differ = sorted(f for f in set(theirs_files) | set(mine_files) if theirs_files.get(f) != mine_files.get(f)) \
                    if isinstance(theirs_files, Mapping) else ["its files"]
                return (f"{self.path} was written from other weight files than {info.get('path')} ({differ[0]} differs); "
                        "choose another --out directory for this checkpoint")
        return ""

    def _changed_reads(self, old: Mapping[str, Any]) -> str:
        """Why the tensors the finished units read are not what the checkpoints hold now ("" when
        they are). Files whose whole hash is recorded and unchanged are not read again."""
        recorded = old.get("read_digests")
        if not isinstance(recorded, Mapping):
            return ""
        for name, model in self.models.items():
            digests = recorded.get(name)
            if getattr(model, "store", None) is None or not isinstance(digests, Mapping) or not digests:
                continue
            files = (self.manifest.get("inputs", {}).get(name) or {}).get("files") or {}
            exact = [f for f, h in files.items() if isinstance(h, str) and not is_sampled(h)]
            why = model.store.verify_reads(digests, trusted_files=exact)
            if why:
                return (f"{self.path} was computed from other weights than {model.path} holds now: {why}; "
                        "choose a new --out directory for this checkpoint")
        return ""

    def _start_fresh(self) -> None:
        remove_tree(self.path / PARTS)
        for name in self.schemas:
            remove_tree(self.path / f"{name}.parquet")
        self.completed = []
        self._mark_running()

    def _remove_unfinished_parts(self) -> None:
        parts = self.path / PARTS
        if not parts.is_dir():
            return
        keep = set(self.completed)
        for child in parts.iterdir():
            if child.name not in keep:
                remove_tree(child)

    def _mark_running(self) -> None:
        self.manifest["status"] = "running"
        self._set_completed()
        self._write_manifest()

    # -- writing -----------------------------------------------------------------------------
    def _part(self, key: str) -> Path:
        return self.path / PARTS / key

    def _unit_table_names(self) -> list[str]:
        return [s.name for s in self.analysis.unit_tables]

    def _set_completed(self) -> None:
        order = {k: i for i, k in enumerate(self.manifest["units"])}
        self.completed.sort(key=lambda k: order.get(k, len(order)))
        self.manifest["completed_units"] = list(self.completed)

    def write_unit(self, unit: Unit, tables: Mapping[str, pd.DataFrame], seconds: float, warnings: list[str],
                   reads: Mapping[str, Mapping[str, str]] | None = None, arrays: Mapping[str, Any] | None = None) -> None:
        """Persist one finished unit: part files (tables, then arrays) first, then the manifest
        entry (with the digests of what it read, input -> read key -> digest)."""
        merge_reads(self.manifest, reads or {}, str(self.path))
        part = self._part(unit.key)
        for name in self._unit_table_names():
            write_table(part / f"{name}.parquet", tables[name], root=self.path)
        for name in self.arrays:
            self.parts.write(f"{unit.key}/{name}", (arrays or {})[name])
        if unit.key not in self.completed:
            self.completed.append(unit.key)
        self._set_completed()
        self.manifest["timings"].setdefault("per_unit_s", {})[unit.key] = round(float(seconds), 6)
        if warnings:
            self.manifest.setdefault("warnings", {})[unit.key] = list(warnings)
        self._write_manifest()

    def _write_manifest(self) -> None:
        timings = self.manifest.setdefault("timings", {})
        timings.setdefault("per_unit_s", {})
        timings["total_s"] = round(self._previous_total + time.perf_counter() - self._started, 6)
        write_json(self.path / MANIFEST, self.manifest, root=self.path)

    def read_units(self, units: list[Unit]) -> dict[str, pd.DataFrame]:
        return {
            name: pd.concat([read_table_file(self._part(u.key) / f"{name}.parquet", self.path) for u in units], ignore_index=True)
            for name in self._unit_table_names()
        }

    def finish(self, plan: Plan, extra: Mapping[str, Any]) -> Run:
        """Concatenate the parts, derive the run-wide tables, mark the run complete, return it."""
        if self.manifest.get("status") == "complete":
            return load_run(self.path)
        not_done = [u.key for u in plan.units if u.key not in set(self.completed)]
        if not_done:
            raise RunDirectoryError(f"{self.path}: units {not_done} are not finished; run the analysis again to resume")
        tables = self.read_units(plan.units)
        tables.update(_finished(self.analysis, plan, tables, self.parts, self.run_arrays, str(self.path)))
        for name in self.schemas:
            write_table(self.path / f"{name}.parquet", tables[name], root=self.path)
        _add_warnings(self.manifest, plan)
        self.manifest.update(extra)
        self.manifest["status"] = "complete"
        self._write_manifest()
        remove_tree(self.path / PARTS)
        _clean_leftovers(self.path)  # a finished run holds no temporary file
        return load_run(self.path)


def _checked(analysis: Analysis, tables: Mapping[str, pd.DataFrame], derived: bool, where: str) -> dict[str, pd.DataFrame]:
    """Tables in schema order; a missing or malformed table is a bug of the analysis."""
    schemas = analysis.derived_tables if derived else analysis.unit_tables
    out = {}
    for schema in schemas:
        if schema.name not in tables:
            raise RunDirectoryError(f"{where}: the {analysis.name} analysis returned no {schema.name!r} table")
        out[schema.name] = schema.check(tables[schema.name], where).reset_index(drop=True)
    return out


def _finished(analysis: Analysis, plan: Plan, tables: dict[str, pd.DataFrame], units: ArrayStore, store: ArrayStore,
              where: str) -> dict[str, pd.DataFrame]:
    """The run's arrays assembled from its units' (written one at a time into ``store``), then
    the derived tables (which may read both)."""
    if plan.unit_arrays:
        arrays = RunArrays(units, store)
        write_all(store, analysis.assemble(plan, arrays))
        derived = analysis.finish(plan, tables, arrays)
    else:
        derived = analysis.finish(plan, tables)
    return _checked(analysis, derived, derived=True, where=where)


def _add_warnings(manifest: dict[str, Any], plan: Plan) -> None:
    """The warnings :meth:`Analysis.finish` found, beside the units' own."""
    for key, messages in plan.warnings.items():
        mine = manifest.setdefault("warnings", {}).setdefault(key, [])
        mine.extend(m for m in messages if m not in mine)


@contextlib.contextmanager
def _removed_if_nothing_done(directory: RunDirectory, made_here: bool) -> Iterator[None]:
    """A directory this call created is removed again when bad input found at run time (overflowing
    logits, a NaN weight) stops the run before any unit finished: it would hold nothing, and the
    corrected command should find no trace of the failed one. An interrupted run keeps its
    directory, which a later command resumes or, holding no finished unit, simply takes."""
    try:
        yield
    except MoelensError:
        if made_here and not directory.completed:
            remove_tree(directory.path)
        raise


def _unit_name(unit: Unit) -> str:
    return f"layer {unit.layer}" if unit.layer is not None and unit.key == layer_unit_key(unit.layer) else unit.key


def _add_counters(plan: Plan, counters: Mapping[str, float]) -> None:
    for name, n in counters.items():
        plan.counters[name] = plan.counters.get(name, 0) + n


def run_analysis(
    analysis: Analysis,
    models: Mapping[str, Any],
    config: Any,
    out: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
    executor: "str | Executor | None" = None,
) -> Run:
    """Plan ``analysis`` on ``models`` with ``config`` and compute every unit; with ``out``, stream
    each unit into that run directory (resuming it if it holds an unfinished run of the same
    options; refusing it while another process writes it).

    ``executor`` says where units run: ``None``/``"local"`` in this process, ``"ray"`` or a
    :class:`~moelens.analyses.executors.RayExecutor` as Ray tasks. The tables are the same
    either way, and a run begun on one executor may be finished on the other."""
    from moelens.analyses.executors import Job, resolve_executor
    from moelens.checkpoint.store import take_read_digests
    from moelens.progress import report as progress_report
    from moelens.threads import use_threads_for

    executor = resolve_executor(executor)
    plan = executor.plan(analysis, models, config)  # every check of the user's input: nothing is written before
    # the manifest's options: the config's recorded fields, overridden by what the plan resolved
    plan.options = {**recorded_options(config), **plan.options}
    manifest = new_manifest(analysis, models, plan)
    total = len(plan.units)
    noun = analysis.unit_noun
    job = Job(analysis, models, config, plan, progress)

    def report(done: int, unit: Unit | None = None) -> None:
        progress_report(progress, noun, done, total, "" if unit is None else _unit_name(unit), step=True)

    if executor.name == "local":
        # one thread for tiny matrices, every usable core for large ones (see moelens.threads)
        use_threads_for(models)
    # the executor connects (a Ray cluster, its resources checked) before the directory is touched
    with executor.session(job) as session:
        manifest["executor"] = session.info()
        # the count its units computed with (a Ray run's: each worker's), as information
        manifest["threads"] = int(manifest["executor"].get("threads", 1))
        by_key = {u.key: u for u in plan.units}
        if out is None:
            started = time.perf_counter()
            collected: dict[str, dict[str, pd.DataFrame]] = {}
            parts = ArrayStore(None)
            report(0)
            with closing(session.run(plan.units)) as results:
                for result in results:
                    unit = by_key[result.key]
                    collected[unit.key] = _checked(analysis, result.tables, derived=False, where=f"unit {unit.key}")
                    for name, array in checked_arrays(result.tables, plan.unit_arrays, f"unit {unit.key}").items():
                        parts.write(f"{unit.key}/{name}", array)
                    manifest["timings"]["per_unit_s"][unit.key] = round(result.seconds, 6)
                    if result.warnings:
                        manifest["warnings"][unit.key] = list(result.warnings)
                    _add_counters(plan, result.counters)
                    merge_reads(manifest, reads_by_input(result.reads, models), "run")
                    report(len(collected), unit)
            merge_reads(manifest, reads_by_input(take_read_digests(), models), "run")
            manifest["completed_units"] = [u.key for u in plan.units]
            merged = {
                s.name: pd.concat([collected[u.key][s.name] for u in plan.units], ignore_index=True) for s in analysis.unit_tables
            }
            arrays = ArrayStore(None)
            merged.update(_finished(analysis, plan, merged, parts, arrays, "run"))
            _add_warnings(manifest, plan)
            manifest.update(analysis.manifest_extra(plan))
            manifest["executor"] = session.info()
            manifest["status"] = "complete"
            manifest["timings"]["total_s"] = round(time.perf_counter() - started, 6)
            return Run(manifest=manifest, tables=merged, arrays=arrays.memory)

        # what the driver read while planning (Ray: the units' reads come from the workers)
        merge_reads(manifest, reads_by_input(take_read_digests(), models), str(out))
        made_here = not Path(out).exists()
        with RunDirectory(out, analysis, manifest, models, plan.unit_arrays) as directory, _removed_if_nothing_done(directory, made_here):
            done = set(directory.completed)
            report(len(done))
            todo = [u for u in plan.units if u.key not in done]
            with closing(session.run(todo)) as results:
                for result in results:
                    unit = by_key[result.key]
                    tables = _checked(analysis, result.tables, derived=False, where=f"unit {unit.key}")
                    arrays = checked_arrays(result.tables, plan.unit_arrays, f"unit {unit.key}")
                    _add_counters(plan, result.counters)
                    directory.manifest["executor"] = session.info()
                    directory.write_unit(unit, tables, result.seconds, result.warnings, reads_by_input(result.reads, models), arrays)
                    done.add(unit.key)
                    report(len(done), unit)
            directory.manifest["executor"] = session.info()
            return directory.finish(plan, analysis.manifest_extra(plan))


__all__ = ["PARTS", "SCHEMA_VERSION", "RunDirectory", "merge_reads", "model_info", "new_manifest", "reads_by_input", "run_analysis"]
