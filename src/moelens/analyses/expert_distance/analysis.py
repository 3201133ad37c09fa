"""Expert distance per layer (docs/methods.md §2 and §7; seeds 000/001, after REAP's Fig. 4d).

For a pair of experts a, b with matrices of equal shape:

    rel_l2(a, b)   = ‖A/‖A‖_F − B/‖B‖_F‖_F                       ∈ [0, 2], unrelated ≈ √2
    sv_align(a, b) = ⟨U_nᴬ V_nᴬᵀ, U_nᴮ V_nᴮᵀ⟩_F / n,  n = min(n_A, n_B),  n_X = #{σ_i ≥ γσ_1}
                                                                  (or a fixed top-n); identical = 1

per matrix (gate, up, down) and for the whole expert (``matrix = "expert"``: rel_l2 of the
concatenation; sv_align the mean of the matrices' R, or Ito's pooled ratio with ``pool="ito"``).

Pairings: ``base-tuned`` (expert e of model A with expert e of model B) and ``within`` (every
unordered pair i < j of one layer of model A); with ``clusters`` (a clustering run), the pairs
inside its clusters, named after its method (``hc-smoe``, ``m-smoe``, ``…-permuted`` with
``permute``; :mod:`moelens.analyses.expert_distance.clusters`). One unit per layer; within it one matrix role at a
time, so memory holds one role of one layer of both models. Each expert is decomposed once per
role (:mod:`moelens.metrics`) whatever the number of pairs it is in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from moelens.analyses.base import Analysis, Plan, Unit, UnitContext, chosen_layers, layer_units
from moelens.analyses.executors import Executor
from moelens.analyses.expert_distance.config import PAIRINGS, ExpertDistanceConfig
from moelens.analyses.expert_distance.tables import LAYER_SCHEMA, PAIR_SCHEMA, layer_summary, pair_rows
from moelens.analyses.runner import run_analysis
from moelens.checkpoint.model import MoEModel
from moelens.errors import ConfigError, NotMoEError
from moelens.metrics import check_options, expert_distances, role_distances, same_index_pairs, within_pairs
from moelens.progress import ProgressCallback
from moelens.ranges import compact_ranges
from moelens.results.run import Run
from moelens.spectral import resolve_device

ANALYSIS = "expert_distance"


@dataclass(frozen=True)
class DistanceState:
    model_a: MoEModel
    model_b: MoEModel | None
    pairing: str
    layers: list[int]
    matrices: list[str]
    config: ExpertDistanceConfig
    device: Any
    clusters: Any = None  # a ClusterPairing with --clusters


def _check_same_shapes(a: MoEModel, b: MoEModel, layers: list[int]) -> None:
    """Base and tuned must be the same architecture: family, layers, experts and shapes."""
    if a.family != b.family:
        raise ConfigError(f"{a.name} is a {a.family} model and {b.name} a {b.family} model; base-tuned pairs experts of one architecture")
    if not b.is_moe:
        raise NotMoEError(f"{b.name} is a dense {b.family} model with no MoE layers; expert distance needs two MoE checkpoints")
    if list(a.moe_layers) != list(b.moe_layers):
        raise ConfigError(f"{a.name} has MoE layers {compact_ranges(a.moe_layers)} and {b.name} {compact_ranges(b.moe_layers)}; base-tuned needs the same layers")
    for L in layers:
        la, lb = a.layer(L), b.layer(L)
        lb.check()
        for what in ("n_experts", "hidden_size", "expert_ffn"):
            va, vb = getattr(la, what), getattr(lb, what)
            if va != vb:
                raise ConfigError(f"layer {L}: {a.name} has {what} = {va} and {b.name} {what} = {vb}; base-tuned needs experts of the same shapes")


def _check_matrices(a: MoEModel, layers: list[int], config: ExpertDistanceConfig) -> None:
    """The chosen matrix roles exist, and ``top_sv`` fits every chosen layer's matrices."""
    first = a.layer(layers[0])
    missing = [m for m in config.matrices if not first.has_role(m)]
    if missing:
        raise ConfigError(f"{a.name} ({a.family}) experts have no {missing[0]} matrix; choose --matrices among the others")
    if config.top_sv is not None:
        for L in layers:
            check_options(config.gamma, config.top_sv, (a.layer(L).expert_ffn, a.hidden_size))


def resolve(models: Mapping[str, MoEModel | None], config: ExpertDistanceConfig) -> DistanceState:
    """Check the config against the models and fix every choice (nothing is read but headers)."""
    a, b = models["a"], models.get("b")
    if not a.is_moe:
        raise NotMoEError(f"{a.name} is a dense {a.family} model with no MoE layers; expert distance needs an MoE checkpoint")
    if config.clusters is not None:
        return _resolve_clusters(a, b, config)
    pairing = config.pairing or ("base-tuned" if b is not None else "within")
    if pairing == "within" and b is not None:
        raise ConfigError("--pairing within compares the experts of one model; run each model alone (moelens distance A --pairing within)")
    if pairing == "base-tuned" and b is None:
        raise ConfigError("--pairing base-tuned needs two models: moelens distance BASE TUNED")
    layers = chosen_layers(config.layers, a.moe_layers)
    for L in layers:
        layer = a.layer(L)  # out of range -> IndexOutOfRangeError, dense -> NotMoEError
        layer.check()
        if pairing == "within" and layer.n_experts < 2:
            raise NotMoEError(f"layer {L} has {layer.n_experts} expert; within-layer pairs need at least 2")
    if b is not None:
        _check_same_shapes(a, b, layers)
    _check_matrices(a, layers, config)
    return DistanceState(a, b, pairing, layers, list(config.matrices), config, resolve_device(config.device))


def _resolve_clusters(a: MoEModel, b: MoEModel | None, config: ExpertDistanceConfig) -> DistanceState:
    """The state of a run over the clusters of ``config.clusters`` (one model, its clustered layers)."""
    from moelens.analyses.expert_distance.clusters import load_cluster_pairing

    if b is not None:
        raise ConfigError("--clusters pairs experts within one model; give only the model that was clustered")
    clusters = load_cluster_pairing(config.clusters, a, config.permute)
    clustered = sorted(clusters.layers)
    layers = chosen_layers(config.layers, clustered)
    missing = [L for L in layers if L not in clusters.layers]
    if missing:
        raise ConfigError(f"layer {missing[0]} is not in the clusters run {config.clusters} (it clusters layers {compact_ranges(clustered)})")
    _check_matrices(a, layers, config)
    return DistanceState(a, None, clusters.pairing, layers, list(config.matrices), config, resolve_device(config.device), clusters)


class ExpertDistance(Analysis):
    """docs/methods.md §2: one unit per MoE layer; one table row per (pair, matrix)."""

    name = ANALYSIS
    unit_tables = (PAIR_SCHEMA,)
    derived_tables = (LAYER_SCHEMA,)

    def plan(self, models: Mapping[str, Any], config: ExpertDistanceConfig) -> Plan:
        state = resolve(models, config)
        c = config
        options = {
            "layers": list(state.layers), "pairing": state.pairing, "matrices": list(state.matrices), "gamma": c.gamma,
            "top_sv": c.top_sv, "pool": c.pool, "device": str(state.device), "dtype": c.dtype,
        }
        if state.clusters is not None:  # only then: runs without clusters keep their options as they were
            options.update({"clusters": state.clusters.path, "clusters_sha256": state.clusters.digest, "permute": state.clusters.permute})
        names = state.model_a.name + (f" → {state.model_b.name}" if state.model_b is not None else "")
        label = f"{names} · {state.pairing} · L{compact_ranges(state.layers)}"
        units = layer_units(state.layers)  # seed 0: nothing random
        return Plan(options=options, units=units, label=label, state=state)

    def compute(self, plan: Plan, unit: Unit, context: UnitContext) -> dict[str, pd.DataFrame]:
        s: DistanceState = plan.state
        c = s.config
        assert unit.layer is not None
        la = s.model_a.layer(unit.layer)
        lb = s.model_b.layer(unit.layer) if s.model_b is not None else None
        pairs = same_index_pairs(la.n_experts) if s.pairing == "base-tuned" else within_pairs(la.n_experts)
        perms = None
        if s.clusters is not None:
            from moelens.analyses.expert_distance.clusters import cluster_pairs, layer_permutations, permute_role

            lc = s.clusters.layers[unit.layer]
            pairs = cluster_pairs(s.clusters.method, lc.labels, lc.anchors)
            if s.clusters.permute:
                perms = layer_permutations(la, lc.anchors, s.device)  # [E, F]
        per_role = {}
        for i, role in enumerate(s.matrices):
            stack_a = la.expert_stack(role)  # [E, out, in], one role of one layer of each model in memory
            if perms is not None:
                stack_a = permute_role(stack_a, role, perms)
            stack_b = lb.expert_stack(role) if lb is not None else None
            per_role[role] = role_distances(stack_a, stack_b, pairs, c.gamma, c.top_sv, s.device, c.dtype)
            del stack_a, stack_b
            undefined = int(per_role[role].undefined.sum())
            if undefined:
                context.warn(f"layer {unit.layer}: {undefined} pair(s) of {role} matrices include an all-zero matrix; their sv_align is NaN")
            context.report("matrices", i + 1, len(s.matrices), f"layer {unit.layer} {role}")
        frames = [pair_rows(unit.layer, s.pairing, role, d) for role, d in per_role.items()]
        frames.append(pair_rows(unit.layer, s.pairing, "expert", expert_distances(per_role, c.pool)))
        return {"expert_distance": pd.concat(frames, ignore_index=True)}

    def finish(self, plan: Plan, tables: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        return {"expert_distance_layers": layer_summary(tables["expert_distance"])}


def run(models: Mapping[str, Any], config: ExpertDistanceConfig, *, out: str | os.PathLike[str] | None = None,
        progress: ProgressCallback | None = None, executor: str | Executor | None = None) -> Run:
    """Distances between experts per layer: base→tuned (two models) or within a layer (one).

    Returns a :class:`~moelens.results.Run` with tables ``expert_distance`` (one row per layer,
    pairing, expert_a, expert_b, matrix: rel_l2, sv_align, n_sv) and ``expert_distance_layers``
    (their spread per layer). With ``out`` each layer is written when done and an interrupted run
    resumes at the next unfinished layer. ``executor``: ``"local"`` (default), ``"ray"`` or a
    :class:`~moelens.analyses.executors.RayExecutor`.

    >>> run = expert_distance("zoo/base", "zoo/tuned")                 # base-tuned
    >>> run["expert_distance_layers"].query("matrix == 'expert'")
    >>> run = expert_distance("zoo/base", clusters="runs/m-smoe", permute=True)   # m-smoe-permuted
    """
    return run_analysis(ExpertDistance(), {"a": models["a"], "b": models.get("b")}, config, out=out, progress=progress, executor=executor)


__all__ = ["run", "ANALYSIS", "PAIRINGS", "ExpertDistance", "ExpertDistanceConfig", "resolve"]
