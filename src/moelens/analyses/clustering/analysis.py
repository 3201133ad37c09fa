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
calibration. With a calibration text the run calibrates itself, one unit per MoE layer, exactly
as :mod:`moelens.analyses.calibration` does (its tables and matrices are the run's, so a
clustering run can be the calibration of the next one); with a calibration run directory it reuses
that run's records. The clustering itself needs every layer's usage (the global budget), so it
happens in :meth:`Clustering.finish`, one layer's matrices in memory at a time.

>>> run = cluster("zoo/base", "zoo/calibration.txt", method="m-smoe", groups=4, out="runs/m-smoe")
>>> run["clusters"]              # layer, expert, cluster, dominant, frequency
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pandas as pd

from moelens.analyses.base import Analysis, Plan, Unit, UnitContext, chosen_layers
from moelens.analyses.calibration.analysis import (
    CalibrationRun,
    calibrate_unit,
    calibration_extra,
    layer_units,
    load_calibration,
    plan_calibration,
)
from moelens.analyses.calibration.tables import LAYERS_SCHEMA, TOKENS_SCHEMA, USAGE_SCHEMA, token_rows
from moelens.analyses.clustering.config import BUDGETS, METHODS, ClusteringConfig
from moelens.analyses.clustering.tables import CLUSTER_LAYERS_SCHEMA, CLUSTERS_SCHEMA, cluster_rows, layer_summary
from moelens.analyses.runner import run_analysis
from moelens.calibration.store import MATRICES, MatrixStore
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
    groups: dict[int, int]                # G of each layer (before a global budget)
    source: Optional[CalibrationRun]      # a reused calibration, or None
    setup: Any = None                     # CalibrationSetup when calibrating here


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
        planned = plan_calibration(model, c.calibration, c.max_tokens, c.layers, c.batch_tokens, c.device, c.dtype)
        setup, layers = planned.setup, planned.layers
        options.update({"calibration": planned.options.pop("texts"), "calibration_run": None, **planned.options})
    groups = {}
    for L in layers:
        n = model.layer(L).n_experts
        try:
            groups[L] = resolve_groups(n, c.groups, c.ratio)
        except ConfigError as err:
            raise ConfigError(f"layer {L}: {err}") from None
    return ClusteringState(model, c, list(layers), groups, source, setup), options


class Clustering(Analysis):
    """docs/methods.md §3's HC-SMoE and M-SMoE clusters: one unit per MoE layer (its calibration), the
    clusters of every layer in :meth:`finish`.

    ``matrices`` is where a self-calibrating run puts its arrays (:func:`cluster` gives it the run
    directory's ``matrices/``; in memory without one)."""
    reads_whole_model = True

    name = ANALYSIS
    title = "Expert clustering"
    config_type = ClusteringConfig
    inputs = ("a",)
    unit_tables = (USAGE_SCHEMA, LAYERS_SCHEMA)
    derived_tables = (CLUSTERS_SCHEMA, CLUSTER_LAYERS_SCHEMA, TOKENS_SCHEMA)

    def __init__(self, matrices: MatrixStore | None = None):
        self.matrices = matrices if matrices is not None else MatrixStore(None)

    def plan(self, models: Mapping[str, Any], config: ClusteringConfig) -> Plan:
        model: MoEModel = models["a"]
        state, options = _resolve(model, config)
        size = f"G = {config.groups}" if config.groups is not None else f"ratio {config.ratio:g}"
        budget = " (global budget)" if options.get("budget") == "global" else ""
        label = f"{model.name} · {config.method} {size}{budget} · L{compact_ranges(state.layers)}"
        return Plan(options=options, units=layer_units(state.layers), label=label, state=state)

    def compute(self, plan: Plan, unit: Unit, context: UnitContext) -> dict[str, pd.DataFrame]:
        s: ClusteringState = plan.state
        if s.source is None:
            return calibrate_unit(s.setup, self.matrices, unit, context)
        tables = {}
        for schema in (USAGE_SCHEMA, LAYERS_SCHEMA):
            t = s.source[schema.name]
            tables[schema.name] = t[t["layer"] == unit.layer].reset_index(drop=True)
        return tables

    def _matrices(self, s: ClusteringState) -> MatrixStore:
        return s.source.matrices if s.source is not None else self.matrices

    def finish(self, plan: Plan, tables: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        s: ClusteringState = plan.state
        c = s.config
        usage = tables[USAGE_SCHEMA.name]
        freq = {L: usage[usage["layer"] == L].sort_values("expert")["frequency"].to_numpy(np.float64) for L in s.layers}
        store = self._matrices(s)
        groups = dict(s.groups)
        if c.method == "m-smoe" and c.budget == "global":
            budget = global_group_budget([freq[L] for L in s.layers], min(groups.values()))
            groups = dict(zip(s.layers, budget))
        frames, summary = [], []
        for L in s.layers:
            f = freq[L]
            if c.method == "hc-smoe":
                labels = hc_smoe_clusters(np.asarray(store.read(L, "features")), groups[L], c.linkage, c.distance)
                dominant = most_used_members(labels, f)
            elif groups[L] < f.size:
                labels, dominant = m_smoe_clusters(np.asarray(store.read(L, "router_logits")), f, groups[L])
            else:  # a global budget may keep every expert of a layer: each its own cluster
                labels, dominant = group_around_dominant(router_logit_similarity(np.asarray(store.read(L, "router_logits"))), f, groups[L])
            frames.append(cluster_rows(L, labels, dominant, f))
            summary.append(layer_summary(L, c.method, labels, dominant, f))
        tokens = token_rows(s.setup.tokens) if s.source is None else s.source[TOKENS_SCHEMA.name]
        return {
            CLUSTERS_SCHEMA.name: pd.concat(frames, ignore_index=True),
            CLUSTER_LAYERS_SCHEMA.name: pd.DataFrame(summary, columns=CLUSTER_LAYERS_SCHEMA.column_names),
            TOKENS_SCHEMA.name: tokens.reset_index(drop=True),
        }

    def manifest_extra(self, plan: Plan) -> dict[str, Any]:
        s: ClusteringState = plan.state
        return calibration_extra(s.setup) if s.setup is not None else {"activation": s.source.manifest.get("activation")}


def run(models: Mapping[str, Any], config: ClusteringConfig, *, out: str | os.PathLike[str] | None = None,
        progress: ProgressCallback | None = None, executor: str | Executor | None = None) -> CalibrationRun:
    """Cluster each MoE layer's experts as HC-SMoE or M-SMoE would merge them (docs/methods.md §3).

    ``calibration``: a text file (calibrated here, one sequence per non-empty line, the last 10 %
    held out), a list of strings or token-id lists, or a calibration run directory. Give exactly
    one of ``groups`` (G per layer) and ``ratio`` (the fraction of experts removed). Returns a
    run with tables ``clusters`` (layer, expert, cluster, dominant, frequency), ``cluster_layers``
    and the calibration's; with ``out`` every layer's calibration is written when done and an
    interrupted run resumes at the next layer."""
    store = MatrixStore(None if out is None else os.path.join(os.fspath(out), MATRICES))
    run = run_analysis(Clustering(store), {"a": models["a"]}, config, out=out, progress=progress, executor=executor)
    source = (run.manifest.get("options") or {}).get("calibration_run")
    if source:
        return CalibrationRun.of(run, load_calibration(source).matrices)
    if out is not None:
        store.remove_other_layers(run["calibration_layers"]["layer"].tolist())
    result = CalibrationRun.of(run, store)
    result.check_matrices()
    return result


__all__ = ["run", "ANALYSIS", "BUDGETS", "METHODS", "Clustering", "ClusteringConfig", "check_same_model", "is_run_directory"]
