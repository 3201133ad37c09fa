"""Router–expert alignment (docs/methods.md §1, seed report 004).

How much of each router vector's energy falls in the top-k input subspace of its own expert,
against null models. For expert j with input-side matrix M_j (gate by default; up; down read
transposed) and singular vectors V_j = [v_1 … v_d] by descending σ, with r̂_i = r_i/‖r_i‖ and
c_{ij} = V_jᵀ r̂_i:

    A[i, j, k] = Σ_{m≤k} c_{ij,m}²          (every k = 1..d at once: a cumulative sum)
    align_e(k) = A[e, e, k],  cos²θ_e = A[e, e, 1],  effect_over_random = align − k/d
    delta_vs_shuffle = align − μ_k,  z_vs_shuffle = delta / σ_k   (μ, σ of the chosen null)
    margin_i(k) = A[i, i, k] − max_{j≠i} A[i, j, k],  argmax_accuracy(k) = mean_i 1[argmax_j A[i,j,k] = i]

The null models and the layer-level permutation test are in
:mod:`moelens.analyses.router_alignment.nulls`; the tables in :mod:`moelens.analyses.router_alignment.tables`.

Seeds: every unit (a layer) carries the config's seed (:attr:`~moelens.analyses.base.Unit.seed`).
The layer permutation test draws from ``numpy.random.default_rng([unit seed, layer, matrix index])``.
The ``shuffle-sampled`` null is the named exception that GaleMoE's published runs need: its
permutations come from a ``torch.Generator`` seeded with the unit's seed itself at the start of
every (layer, matrix), as GaleMoE's ``main.py`` does (one layer per run, seed 42), so every layer
reproduces GaleMoE's numbers on its own.

Work per layer: read each expert once (stored dtype), decompose it on the chosen device (batched
Gram eigh by default), project all E routers at once, cumulative-sum the squares. Memory is one
layer's energies plus one chunk of spectra; nothing scales with the number of layers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from moelens.analyses.base import Analysis, Plan, Unit, UnitContext, chosen_layers, layer_units
from moelens.analyses.executors import Executor
from moelens.analyses.router_alignment.config import RouterAlignmentConfig
from moelens.analyses.router_alignment.nulls import (
    exact_null_moments,
    galemoe_permutations,
    layer_permutation_test,
    sampled_null_moments,
    z_scores,
)
from moelens.analyses.router_alignment.tables import (
    SCHEMAS,
    LayerStatistics,
    layer_tables,
    true_pair_energies,
)
from moelens.analyses.runner import run_analysis
from moelens.checkpoint.model import ROLES, MoELayer, MoEModel
from moelens.errors import ConfigError, NotMoEError
from moelens.progress import ProgressCallback, report
from moelens.ranges import compact_ranges
from moelens.results.run import Run
from moelens.spectral import (
    SpectrumCache,
    cumulative_energies,
    full_precision,
    normalize_rows,
    project_experts,
    resolve_device,
    resolve_dtype,
)

ANALYSIS = "router_alignment"
# On the CPU a batched eigh is a loop anyway, so experts are decomposed one at a time (memory =
# one expert, progress per expert); on CUDA, batching small eighs is where the speed comes from.
CUDA_CHUNK_BYTES = 512 * 2**20


def default_ks(d: int) -> list[int]:
    """Every power of two up to d, and d: d = 4096 -> 1, 2, 4, …, 4096; d = 48 -> 1, …, 32, 48."""
    ks, k = [], 1
    while k <= d:
        ks.append(k)
        k *= 2
    if ks[-1] != d:
        ks.append(d)
    return ks


@dataclass(frozen=True)
class AlignmentPlan:
    """A config resolved against one model: concrete layers, matrices, ks and device."""

    config: RouterAlignmentConfig
    layers: list[int]
    matrices: list[str]
    ks: list[int]
    hidden_size: int
    device: torch.device
    dtype: torch.dtype
    chunk_bytes: int
    model: MoEModel | None = None
    cache: SpectrumCache | None = None

    def options(self) -> dict[str, Any]:
        c = self.config
        return {
            "layers": list(self.layers), "matrix": c.matrix, "matrices": list(self.matrices), "k": list(self.ks),
            "null": c.null, "shuffles": c.shuffles, "seed": c.seed, "method": c.method,
            "device": str(self.device), "dtype": c.dtype, "p_draws": c.p_draws,
        }

    def generator(self, seed: int | None = None) -> torch.Generator:
        """The shuffle-sampled stream of one (layer, matrix): restarted at the unit's seed (the
        config's by default), as in a GaleMoE run."""
        g = torch.Generator()
        g.manual_seed(self.config.seed if seed is None else int(seed))
        return g


def resolve(config: RouterAlignmentConfig, model: MoEModel) -> AlignmentPlan:
    """Check the config against the model (layers, k ≤ d, matrices present) and fix every choice."""
    if not model.is_moe:
        raise NotMoEError(f"{model.name} is a dense {model.family} model with no MoE layers; router alignment needs an MoE checkpoint")
    layers = chosen_layers(config.layers, model.moe_layers)
    for L in layers:
        layer = model.layer(L)  # out of range -> IndexOutOfRangeError, dense -> NotMoEError
        layer.check()  # a partial or inconsistent layer fails here, from headers, before any work
        if layer.n_experts < 2:
            raise NotMoEError(f"layer {L} has {layer.n_experts} expert; alignment against other experts needs at least 2")
    d = model.hidden_size
    ks = sorted(set(config.k)) if config.k is not None else default_ks(d)
    bad = [k for k in ks if not 1 <= k <= d]
    if bad:
        raise ConfigError(f"k={bad[0]} is outside 1..d: {model.name} has hidden size d={d}; pick every k in 1..{d}")
    if config.matrix == "all":
        matrices = [m for m in ROLES if m != "gate" or model.layer(layers[0]).has_role("gate")]
    else:
        matrices = [config.matrix]
        if config.matrix == "gate" and not model.layer(layers[0]).has_role("gate"):
            raise ConfigError(f"{model.name} ({model.family}) experts have no gate matrix; use --matrix up or down")
    device = resolve_device(config.device)
    chunk = config.chunk_bytes if config.chunk_bytes is not None else (CUDA_CHUNK_BYTES if device.type == "cuda" else 1)
    # Off by default (a Mixtral basis is 16 GiB per matrix); on when asked, or when a directory is given.
    use_cache = config.cache if config.cache is not None else config.cache_dir is not None
    cache = SpectrumCache(config.cache_dir) if use_cache else None
    return AlignmentPlan(config, layers, matrices, ks, d, device, resolve_dtype(config.dtype), int(chunk), model, cache)


# ----------------------------------------------------------------------------------------------
# One layer
# ----------------------------------------------------------------------------------------------
def layer_energies(
    layer: MoELayer,
    role: str,
    plan: AlignmentPlan,
    cache: SpectrumCache | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(A [E, E, K] float64 (router, expert, k), σ [E, min(F, d)]) of one layer and matrix."""
    router = layer.router().weight
    n = int(router.shape[0])
    n_k = len(plan.ks)
    energies = np.empty((n, n, n_k), dtype=np.float64)
    sigma: np.ndarray | None = None
    done = 0
    with full_precision():
        probes = normalize_rows(router.to(device=plan.device, dtype=plan.dtype))
        chunks = project_experts(
            layer.iter_experts(role), probes, role, method=plan.config.method, dtype=plan.dtype,
            device=plan.device, cache=cache, chunk_bytes=plan.chunk_bytes,
            # without a cache to fill, the CPU may skip forming V (2.3× on a Mixtral layer)
            keep_basis=cache is not None,
        )
        for chunk in chunks:
            a = cumulative_energies(chunk.coefficients, plan.ks)  # [c, K, routers]
            energies[:, chunk.experts, :] = a.permute(2, 0, 1).numpy()
            s = chunk.spectra.sigma.detach().to("cpu", torch.float64).numpy()
            if sigma is None:
                sigma = np.zeros((n, s.shape[1]), dtype=np.float64)
            sigma[chunk.experts] = s
            done += len(chunk.experts)
            report(progress, "experts", done, n, f"layer {layer.index} {role}")
    if done != n:
        raise ValueError(f"layer {layer.index}: read {done} experts, its router has {n} rows")
    assert sigma is not None
    return energies, sigma


def layer_statistics(
    layer_index: int,
    role: str,
    energies: np.ndarray,
    sigma: np.ndarray,
    plan: AlignmentPlan,
    permutations: np.ndarray | None = None,
    seed: int | None = None,
) -> LayerStatistics:
    """Null moments, z-scores and the layer test of one (layer, matrix); the test draws from
    ``seed`` (the unit's; the config's by default), the layer and the matrix."""
    c = plan.config
    if c.null == "shuffle-sampled":
        if permutations is None:
            raise ValueError("shuffle-sampled needs the drawn permutations")
        mu, sd = sampled_null_moments(energies, permutations)
    else:
        mu, sd = exact_null_moments(energies, c.null)
    align = true_pair_energies(energies)
    z = z_scores(align - mu[None, :], np.broadcast_to(sd, align.shape), c.null, c.dtype)
    rng = np.random.default_rng([c.seed if seed is None else int(seed), layer_index, ROLES.index(role)])
    z_layer, p_layer, p_method = layer_permutation_test(energies, c.p_draws, rng, c.dtype)
    return LayerStatistics(
        layer=layer_index, matrix=role, hidden_size=plan.hidden_size, ks=np.asarray(plan.ks, dtype=np.int64),
        energies=energies, shuffle_mean=mu, shuffle_std=sd, z=z, z_layer=z_layer, p_layer=p_layer,
        p_layer_method=p_method, sigma=sigma,
    )


def degenerate_warnings(layer: MoELayer, role: str, sigma: np.ndarray) -> list[str]:
    """An all-zero router row or expert matrix has no direction: its align is 0 at every k < d
    (and 1 at k = d by the cumulative sum's convention), which is no measurement. Say so."""
    out = []
    norms = layer.router().weight.float().norm(dim=-1)
    zero_rows = [int(i) for i in torch.nonzero(norms == 0).flatten()]
    if zero_rows:
        out.append(f"layer {layer.index}: router rows {zero_rows} are all zero; their align is 0, not a measurement")
    zero_experts = [int(e) for e in np.nonzero(~(sigma.max(axis=1) > 0))[0]]
    if zero_experts:
        out.append(f"layer {layer.index}: {role} matrices of experts {zero_experts} are all zero; their align is 0, not a measurement")
    return out


# ----------------------------------------------------------------------------------------------
# The analysis
# ----------------------------------------------------------------------------------------------
def _concat(frames: Iterable[dict[str, pd.DataFrame]]) -> dict[str, pd.DataFrame]:
    frames = list(frames)
    return {s.name: pd.concat([f[s.name] for f in frames], ignore_index=True) for s in SCHEMAS}


class RouterAlignment(Analysis):
    """docs/methods.md §1: one unit per MoE layer, every matrix of the layer in it."""

    name = ANALYSIS
    unit_tables = SCHEMAS

    def plan(self, models: Mapping[str, Any], config: RouterAlignmentConfig) -> Plan:
        model = models["a"]
        resolved = resolve(config, model)
        units = layer_units(resolved.layers, config.seed)
        return Plan(options=resolved.options(), units=units, label=f"{model.name} L{compact_ranges(resolved.layers)}", state=resolved)

    def compute(self, plan: Plan, unit: Unit, context: UnitContext) -> dict[str, pd.DataFrame]:
        state: AlignmentPlan = plan.state
        assert state.model is not None and unit.layer is not None
        layer = state.model.layer(unit.layer)
        per_matrix = []
        cache = state.cache
        before = (cache.hits, cache.misses) if cache is not None else (0, 0)
        for role in state.matrices:
            energies, sigma = layer_energies(layer, role, state, cache, context.progress)
            permutations = None
            if state.config.null == "shuffle-sampled":
                permutations = galemoe_permutations(layer.n_experts, len(state.ks), state.config.shuffles, state.generator(unit.seed))
            for message in degenerate_warnings(layer, role, sigma):
                context.warn(message)
            per_matrix.append(layer_tables(layer_statistics(unit.layer, role, energies, sigma, state, permutations, seed=unit.seed)))
        if cache is not None:
            # counted per unit, so the run's totals are right whichever process held the cache
            context.count("spectra_cache_hits", cache.hits - before[0])
            context.count("spectra_cache_misses", cache.misses - before[1])
        return _concat(per_matrix)

    def manifest_extra(self, plan: Plan) -> dict[str, Any]:
        cache = plan.state.cache
        summary = {"enabled": False} if cache is None else {
            "enabled": True, "directory": str(cache.directory),
            "hits": int(plan.counters.get("spectra_cache_hits", 0)), "misses": int(plan.counters.get("spectra_cache_misses", 0)),
        }
        return {"spectra_cache": summary}


def run_router_alignment(
    model: MoEModel,
    config: RouterAlignmentConfig,
    out: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
    executor: str | Executor | None = None,
) -> Run:
    """Run the analysis of ``config`` on ``model``; with ``out``, stream layers into that run
    directory (resuming it if it holds an unfinished run of the same options); ``executor``
    says where layers are computed (``"local"``, ``"ray"`` or an executor object)."""
    return run_analysis(RouterAlignment(), {"a": model}, config, out=out, progress=progress, executor=executor)


def run(models: Mapping[str, Any], config: RouterAlignmentConfig, *, out: str | os.PathLike[str] | None = None,
        progress: ProgressCallback | None = None, executor: str | Executor | None = None) -> Run:
    """Router–expert alignment of ``model`` (an opened model or a checkpoint path).

    Returns a :class:`~moelens.results.Run` with tables ``alignment``, ``alignment_layers``,
    ``alignment_pairs`` and ``spectra``. With ``out``, each layer is written as soon as it is
    done and an interrupted run resumes at the next unfinished layer. ``config`` (a
    :class:`RouterAlignmentConfig`) replaces the keyword options when given. ``executor``:
    ``"local"`` (default, this process), ``"ray"`` (a local Ray cluster) or a
    :class:`~moelens.analyses.executors.RayExecutor` (an existing cluster, workers, GPUs).

    >>> run = router_alignment(model, layers=[0, 1], matrix="gate")
    >>> run["alignment_layers"][["layer", "k", "align", "z_vs_shuffle", "p_layer"]]
    """
    return run_router_alignment(models["a"], config, out=out, progress=progress, executor=executor)


__all__ = ["run",
    "ANALYSIS", "AlignmentPlan", "RouterAlignment", "RouterAlignmentConfig", "default_ks", "layer_energies",
    "layer_statistics", "resolve", "run_router_alignment",
]
