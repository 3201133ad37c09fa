"""Expert clustering (docs/methods.md §3, §7): which experts HC-SMoE and M-SMoE would merge, per MoE layer.

- HC-SMoE (Chen et al., ICML 2025): agglomerative clustering of the experts' features (each
  expert's mean output over ALL calibration tokens) into exactly G clusters, average linkage on
  Euclidean distances by default; ``dominant`` = the most used member of each cluster.
- M-SMoE (Li et al., ICLR 2024): the G most used experts are dominant; every other expert joins
  the dominant expert whose router-logit column over the calibration tokens has the highest cosine
  similarity with its own. ``budget="global"`` gives layer ℓ its own G_ℓ from MC-SMoE's one usage
  threshold across layers (G·L experts kept in all, each layer at least its most used one).

G = ``groups``, or E − round(R·E) from ``ratio`` R (the fraction of experts removed). The
algorithms themselves are :mod:`moelens.metrics.clustering`; this analysis feeds them a
calibration, in one of two ways:

- with a calibration text the run calibrates itself, with the units of
  :mod:`moelens.analyses.calibration` (one per MoE layer, or per shard of a layer's tokens; its
  tables and matrices are the run's, so a clustering run can be the calibration of the next one).
  Clustering a layer needs all of its shards, and the global budget every layer's usage, so the
  clusters are derived tables: :meth:`Clustering.finish` computes them from the matrices the
  runner assembled, one layer in memory at a time;
- with a calibration run directory every number it needs is there before the first unit: the plan
  fixes each layer's G (the global budget from the run's usage table), and one unit per layer
  clusters that layer from the run's matrices (pure: each worker reads them from the directory).

>>> run = cluster("zoo/base", "zoo/calibration.txt", method="m-smoe", groups=4, out="runs/m-smoe")
>>> run["clusters"]              # layer, expert, cluster, dominant, frequency
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pandas as pd

from moelens.analyses.arrays import RunArrays
from moelens.analyses.base import Analysis, Plan, Unit, UnitContext, chosen_layers, layer_unit_key, layer_units
from moelens.analyses.calibration.analysis import (
    UNIT_ARRAYS,
    CalibrationRun,
    assemble_matrices,
    calibrate_unit,
    calibration_extra,
    calibration_result,
    calibration_tables,
    calibration_units,
    load_calibration,
    plan_calibration,
)
from moelens.analyses.calibration.tables import LAYERS_SCHEMA, TOKENS_SCHEMA, USAGE_SCHEMA, token_rows
from moelens.analyses.clustering.config import BUDGETS, METHODS, ClusteringConfig
from moelens.analyses.clustering.tables import CLUSTER_LAYERS_SCHEMA, CLUSTERS_SCHEMA, cluster_rows, layer_summary
from moelens.analyses.executors import Executor
from moelens.analyses.runner import run_analysis
from moelens.calibration.store import MATRICES, MatrixStore, layer_key
from moelens.checkpoint.model import MoEModel
from moelens.errors import ConfigError, NotMoEError
from moelens.metrics.clustering import (
    global_group_budget,
    group_around_dominant,
    hc_smoe_clusters,
    m_smoe_clusters,
    most_used_members,
    resolve_groups,
    router_logit_similarity,
)
from moelens.progress import ProgressCallback
from moelens.ranges import compact_ranges
from moelens.results.run import MANIFEST, Run

if TYPE_CHECKING:
    from moelens.analyses.executors import Executor

ANALYSIS = "clustering"


@dataclass
class ClusteringState:
    model: MoEModel
    config: ClusteringConfig
    layers: list[int]
    groups: dict[int, int]                # G of each layer (a reused calibration's: after a global budget)
    source: Optional[CalibrationRun]      # a reused calibration, or None
    setup: Any = None                     # CalibrationSetup when calibrating here
    shards: Optional[list[tuple[int, int]]] = None  # [start, end) sequences of each unit of a layer, when calibrating here


def is_run_directory(value: Any) -> bool:
    return isinstance(value, str) and Path(value).is_dir() and (Path(value) / MANIFEST).is_file()


def check_same_model(run: Run, model: MoEModel, what: str, fix: str) -> None:
    """A run made from other weights than ``model``'s is refused, in one line.

    Evidence by content: every file the run hashed whole is hashed whole again (a Hugging Face
    cache file by its blob name, free), a file it fingerprinted by samples is compared so, and
    the tensors its units read are read and hashed again (``read_digests``)."""
    from moelens.checkpoint.store import is_sampled

    info = (run.manifest.get("inputs") or {}).get("a") or run.manifest.get("model") or {}
    recorded = info.get("files") or {}
    made = info.get("path") or info.get("name") or "another checkpoint"
    exact = [f for f, h in recorded.items() if isinstance(h, str) and not is_sampled(h)]
    current = model.file_hashes(whole_files=exact)
    differ = sorted(f for f in set(recorded) | set(current) if recorded.get(f) != current.get(f))
    if differ:
        raise ConfigError(f"{what} {run.path} was made from {made}, not from the weight files of {model.path} "
                          f"({differ[0]} differs); {fix}")
    digests = (run.manifest.get("read_digests") or {}).get("a") or {}
    why = model.store.verify_reads(digests, trusted_files=exact) if digests else ""
    if why:
        raise ConfigError(f"{what} {run.path} was made from other weights than {model.path} holds: {why}; {fix}")


def check_calibration_matrices(store: MatrixStore, layers: Sequence[int], model: MoEModel, where: str) -> None:
    """Every matrix a clustering reads from a calibration run opens (a truncated file is refused by
    the store) and has its shape, features [E, d] and router_logits [N, E], checked before the
    first unit: a damaged matrix found in :meth:`Clustering.finish` would come after every part."""
    for L in layers:
        e = model.layer(L).n_experts
        features, logits = store.read(L, "features"), store.read(L, "router_logits")
        problems = []
        if features.shape != (e, model.hidden_size):
            problems.append(f"features {list(features.shape)} where [E, d] = {[e, model.hidden_size]}")
        if logits.ndim != 2 or logits.shape[1] != e:
            problems.append(f"router_logits {list(logits.shape)} where [N, E] = [N, {e}]")
        problems += [f"{name} of dtype {a.dtype} where floats" for name, a in (("features", features), ("router_logits", logits))
                     if not np.issubdtype(a.dtype, np.floating)]
        if problems:
            raise ConfigError(f"{where}: layer {L} holds {problems[0]} is expected; the calibration run is damaged: "
                              "delete it and calibrate again")


def _resolve(model: MoEModel, config: ClusteringConfig) -> tuple[ClusteringState, dict[str, Any]]:
    if not model.is_moe:
        raise NotMoEError(f"{model.name} is a dense {model.family} model with no MoE layers; clustering needs an MoE checkpoint")
    c = config
    options: dict[str, Any] = {"method": c.method, "groups": c.groups, "ratio": c.ratio, "budget": c.budget if c.method == "m-smoe" else None,
                               "linkage": c.linkage if c.method == "hc-smoe" else None, "distance": c.distance if c.method == "hc-smoe" else None}
    source = None
    setup = None
    shards = None
    if is_run_directory(c.calibration):
        source = load_calibration(c.calibration)
        check_same_model(source, model, "calibration run", f"calibrate {model.name} itself (give the calibration text file)")
        layers = chosen_layers(c.layers, source.layers)
        missing = [L for L in layers if L not in set(source.layers)]
        if missing:
            raise ConfigError(f"layer {missing[0]} is not in the calibration run {c.calibration} (it has layers {compact_ranges(source.layers)})")
        check_calibration_matrices(source.matrices, layers, model, str(c.calibration))
        options.update({"calibration": str(Path(c.calibration).resolve()), "calibration_run": str(Path(source.path).resolve()),  # type: ignore[arg-type]
                        "calibration_texts_sha256": source.manifest["options"].get("texts_sha256"), "layers": list(layers)})
    else:
        planned = plan_calibration(model, c.calibration, c.max_tokens, c.layers, c.batch_tokens, c.device, c.dtype,
                                   shard_tokens=c.shard_tokens)
        setup, layers, shards = planned.setup, planned.layers, planned.shards
        options.update({"calibration": planned.options.pop("texts"), "calibration_run": None, **planned.options})
    groups = {}
    for L in layers:
        n = model.layer(L).n_experts
        try:
            groups[L] = resolve_groups(n, c.groups, c.ratio)
        except ConfigError as err:
            raise ConfigError(f"layer {L}: {err}") from None
    if source is not None:
        # every layer's usage is known now: the global budget is fixed in the plan
        groups = layer_groups(c, groups, {L: source.frequency(L) for L in layers})
    return ClusteringState(model, c, list(layers), groups, source, setup, shards), options


def layer_groups(c: ClusteringConfig, groups: Mapping[int, int], freq: Mapping[int, np.ndarray]) -> dict[int, int]:
    """G of each layer: as resolved, or MC-SMoE's global budget over the layers' usage."""
    if c.method == "m-smoe" and c.budget == "global":
        layers = list(groups)
        return dict(zip(layers, global_group_budget([freq[L] for L in layers], min(groups.values()))))
    return dict(groups)


def cluster_layer(c: ClusteringConfig, read: Any, frequency: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels [E], dominant [E] bool) of one layer; ``read(name)`` gives its calibration matrix."""
    if c.method == "hc-smoe":
        labels = hc_smoe_clusters(np.asarray(read("features")), groups, c.linkage, c.distance)
        return labels, most_used_members(labels, frequency)
    if groups < frequency.size:
        return m_smoe_clusters(np.asarray(read("router_logits")), frequency, groups)
    # a global budget may keep every expert of a layer: each its own cluster
    return group_around_dominant(router_logit_similarity(np.asarray(read("router_logits"))), frequency, groups)


def clusters_tables(c: ClusteringConfig, layers: list[int], labelled: Mapping[int, tuple[np.ndarray, np.ndarray]],
                    freq: Mapping[int, np.ndarray]) -> dict[str, pd.DataFrame]:
    frames = [cluster_rows(L, *labelled[L], freq[L]) for L in layers]
    summary = [layer_summary(L, c.method, *labelled[L], freq[L]) for L in layers]
    return {
        CLUSTERS_SCHEMA.name: pd.concat(frames, ignore_index=True),
        CLUSTER_LAYERS_SCHEMA.name: pd.DataFrame(summary, columns=CLUSTER_LAYERS_SCHEMA.column_names),
    }


class Clustering(Analysis):
    """docs/methods.md §3's HC-SMoE and M-SMoE clusters (see the module docstring): calibration units
    and the clusters derived in :meth:`finish`, or, reusing a calibration run, one clustering unit
    per layer."""

    name = ANALYSIS
    unit_tables = ()
    derived_tables = (USAGE_SCHEMA, LAYERS_SCHEMA, CLUSTERS_SCHEMA, CLUSTER_LAYERS_SCHEMA, TOKENS_SCHEMA)

    def plan(self, models: Mapping[str, Any], config: ClusteringConfig) -> Plan:
        model: MoEModel = models["a"]
        state, options = _resolve(model, config)
        size = f"G = {config.groups}" if config.groups is not None else f"ratio {config.ratio:g}"
        budget = " (global budget)" if options.get("budget") == "global" else ""
        label = f"{model.name} · {config.method} {size}{budget} · L{compact_ranges(state.layers)}"
        if state.source is None:
            assert state.shards is not None
            units, arrays = calibration_units(state.layers, state.shards), UNIT_ARRAYS
        else:
            units, arrays = layer_units(state.layers), CLUSTER_ARRAYS
        return Plan(options=options, units=units, label=label, state=state, unit_arrays=arrays)

    def compute(self, plan: Plan, unit: Unit, context: UnitContext) -> dict[str, np.ndarray]:
        s: ClusteringState = plan.state
        if s.source is None:
            return calibrate_unit(s.setup, unit, context)
        L = int(unit.layer)  # type: ignore[arg-type]
        source = s.source
        labels, dominant = cluster_layer(s.config, lambda name: source.matrices.read(L, name), source.frequency(L), s.groups[L])
        return {"labels": np.asarray(labels, dtype=np.int64), "dominant": np.asarray(dominant, dtype=bool)}

    def assemble(self, plan: Plan, arrays: RunArrays) -> Iterator[tuple[str, np.ndarray]]:
        s: ClusteringState = plan.state
        return assemble_matrices(plan, arrays) if s.source is None else iter(())

    def finish(self, plan: Plan, tables: Mapping[str, pd.DataFrame], arrays: RunArrays | None = None) -> dict[str, pd.DataFrame]:
        assert arrays is not None
        s: ClusteringState = plan.state
        c = s.config
        if s.source is not None:
            calibration = {schema.name: _layers_of(s.source[schema.name], s.layers) for schema in (USAGE_SCHEMA, LAYERS_SCHEMA)}
            tokens = s.source[TOKENS_SCHEMA.name]
            labelled = {L: (arrays.unit(layer_unit_key(L), "labels"), arrays.unit(layer_unit_key(L), "dominant")) for L in s.layers}
            freq = {L: s.source.frequency(L) for L in s.layers}
        else:
            calibration = calibration_tables(plan, arrays, s.setup.tokens.n_tokens)
            tokens = token_rows(s.setup.tokens)
            usage = calibration[USAGE_SCHEMA.name]
            freq = {L: usage[usage["layer"] == L].sort_values("expert")["frequency"].to_numpy(np.float64) for L in s.layers}
            groups = layer_groups(c, s.groups, freq)
            labelled = {}
            for L in s.layers:  # one layer's matrices in memory at a time
                labelled[L] = cluster_layer(c, lambda name, L=L: arrays.read(f"{MATRICES}/{layer_key(L)}/{name}"), freq[L], groups[L])
        return {**calibration, **clusters_tables(c, s.layers, labelled, freq), TOKENS_SCHEMA.name: tokens.reset_index(drop=True)}

    def manifest_extra(self, plan: Plan) -> dict[str, Any]:
        s: ClusteringState = plan.state
        return calibration_extra(s.setup) if s.setup is not None else {"activation": s.source.manifest.get("activation")}


#: What a clustering unit returns when it reuses a calibration run: its layer's clusters.
CLUSTER_ARRAYS = ("labels", "dominant")


def _layers_of(table: pd.DataFrame, layers: Sequence[int]) -> pd.DataFrame:
    """The rows of ``layers``, in that order (a reused calibration may hold more layers)."""
    return pd.concat([table[table["layer"] == L] for L in layers], ignore_index=True)


def run(models: Mapping[str, Any], config: ClusteringConfig, *, out: str | os.PathLike[str] | None = None,
        progress: ProgressCallback | None = None, executor: str | Executor | None = None) -> CalibrationRun:
    """Cluster each MoE layer's experts as HC-SMoE or M-SMoE would merge them (docs/methods.md §3).

    ``calibration``: a text file (calibrated here, one sequence per non-empty line, the last 10 %
    held out), a list of strings or token-id lists, or a calibration run directory. Give exactly
    one of ``groups`` (G per layer) and ``ratio`` (the fraction of experts removed). Returns a
    run with tables ``clusters`` (layer, expert, cluster, dominant, frequency), ``cluster_layers``
    and the calibration's; with ``out`` every layer's calibration is written when done and an
    interrupted run resumes at the next unit. ``shard_tokens`` splits each layer's calibration
    tokens into units of at most that many; ``executor``: ``"local"`` (default), ``"ray"`` or a
    :class:`~moelens.analyses.executors.RayExecutor`."""
    run = run_analysis(Clustering(), {"a": models["a"]}, config, out=out, progress=progress, executor=executor)
    source = (run.manifest.get("options") or {}).get("calibration_run")
    if source:
        return CalibrationRun.of(run, load_calibration(source).matrices)
    return calibration_result(run, out)


__all__ = ["run", "ANALYSIS", "BUDGETS", "METHODS", "Clustering", "ClusteringConfig", "check_same_model", "is_run_directory"]
