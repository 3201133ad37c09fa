"""Router–expert alignment (SPEC.md §1, seed report 004).

How much of each router vector's energy falls in the top-k input subspace of its own expert,
against null models. For expert j with input-side matrix M_j (gate by default; up; down read
transposed) and singular vectors V_j = [v_1 … v_d] by descending σ, with r̂_i = r_i/‖r_i‖ and
c_{ij} = V_jᵀ r̂_i:

    A[i, j, k] = Σ_{m≤k} c_{ij,m}²          (every k = 1..d at once: a cumulative sum)
    align_e(k) = A[e, e, k],  cos²θ_e = A[e, e, 1],  effect_over_random = align − k/d
    delta_vs_shuffle = align − μ_k,  z_vs_shuffle = delta / σ_k   (μ, σ of the chosen null)
    margin_i(k) = A[i, i, k] − max_{j≠i} A[i, j, k],  argmax_accuracy(k) = mean_i 1[argmax_j A[i,j,k] = i]

The null models and the layer-level permutation test are in
:mod:`moelens.analyses.alignment_nulls`; the tables in :mod:`moelens.analyses.alignment_tables`.

Work per layer: read each expert once (stored dtype), decompose it on the chosen device (batched
Gram eigh by default), project all E routers at once, cumulative-sum the squares. Memory is one
layer's energies plus one chunk of spectra; nothing scales with the number of layers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from moelens.analyses.alignment_nulls import (
    MIN_P_DRAWS,
    check_null,
    exact_null_moments,
    galemoe_permutations,
    layer_permutation_test,
    sampled_null_moments,
    z_scores,
)
from moelens.analyses.alignment_tables import (
    TABLES,
    LayerStatistics,
    layer_tables,
    true_pair_energies,
)
from moelens.analyses.layer_runs import LayerRunDirectory
from moelens.checkpoint.model import ROLES, MoELayer, MoEModel
from moelens.errors import ConfigError, NotMoEError
from moelens.progress import ProgressCallback, report
from moelens.ranges import compact_ranges
from moelens.results.run import Run, package_versions
from moelens.spectral import (
    METHODS,
    SpectrumCache,
    cumulative_energies,
    full_precision,
    normalize_rows,
    project_experts,
    resolve_device,
    resolve_dtype,
)

ANALYSIS = "router_alignment"
MATRICES = (*ROLES, "all")
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
class RouterAlignmentConfig:
    """Options of :func:`router_alignment`. ``layers``/``k`` None mean every MoE layer and
    :func:`default_ks`; ``matrix`` is gate, up, down or all; ``null`` derangement (default),
    shuffle (exact moments) or shuffle-sampled (GaleMoE's procedure with ``shuffles`` and
    ``seed``); ``method`` eigh or svd; ``dtype`` of the arithmetic, float32 or float64;
    ``p_draws`` Monte Carlo draws of the layer test when E > 8; ``cache``/``cache_dir`` the
    on-disk spectrum cache (off unless ``cache=True`` or a ``cache_dir`` is given); ``chunk_bytes`` bounds the spectra held at once (None: per device)."""

    layers: tuple[int, ...] | None = None
    matrix: str = "gate"
    k: tuple[int, ...] | None = None
    null: str = "derangement"
    shuffles: int = 200
    seed: int = 0
    method: str = "eigh"
    device: str = "auto"
    dtype: str = "float32"
    p_draws: int = MIN_P_DRAWS
    cache: bool | None = None
    cache_dir: str | None = None
    chunk_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(_as_int(v, "layer") for v in _as_sequence(self.layers)))
        if self.k is not None:
            object.__setattr__(self, "k", tuple(_as_int(v, "k") for v in _as_sequence(self.k)))
            if not self.k:
                raise ConfigError("the k list is empty; give at least one k, e.g. 1,8,64")
        if self.matrix not in MATRICES:
            raise ConfigError(f"unknown matrix {self.matrix!r}; expected one of {', '.join(MATRICES)}")
        check_null(self.null)
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        resolve_dtype(self.dtype)
        if int(self.shuffles) < 1:
            raise ConfigError(f"shuffles={self.shuffles}: need at least 1 shuffle")
        if int(self.p_draws) < MIN_P_DRAWS:
            raise ConfigError(f"p_draws={self.p_draws} is too few for a Monte Carlo p-value; use at least {MIN_P_DRAWS}")
        object.__setattr__(self, "shuffles", int(self.shuffles))
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "p_draws", int(self.p_draws))


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
    generators: dict[str, torch.Generator] = field(default_factory=dict)

    def options(self) -> dict[str, Any]:
        c = self.config
        return {
            "layers": list(self.layers), "matrix": c.matrix, "matrices": list(self.matrices), "k": list(self.ks),
            "null": c.null, "shuffles": c.shuffles, "seed": c.seed, "method": c.method,
            "device": str(self.device), "dtype": c.dtype, "p_draws": c.p_draws,
        }


def _as_sequence(v: Any) -> Sequence[Any]:
    if isinstance(v, (int, np.integer)):
        return [v]
    if isinstance(v, str):
        from moelens.ranges import parse_ranges

        return parse_ranges(v)
    return list(v)


def _as_int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ConfigError(f"{what} {v!r} is not an integer")
    return int(v)


def resolve(config: RouterAlignmentConfig, model: MoEModel) -> AlignmentPlan:
    """Check the config against the model (layers, k ≤ d, matrices present) and fix every choice."""
    if not model.is_moe:
        raise NotMoEError(f"{model.name} is a dense {model.family} model with no MoE layers; router alignment needs an MoE checkpoint")
    layers = list(config.layers) if config.layers is not None else list(model.moe_layers)
    if not layers:
        raise ConfigError("the layer list is empty; give at least one MoE layer, e.g. --layers 0")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"layers {layers} name a layer twice; list each layer once")
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
        matrices = [m for m in ROLES if m != "gate" or _has_gate(model.layer(layers[0]))]
    else:
        matrices = [config.matrix]
        if config.matrix == "gate" and not _has_gate(model.layer(layers[0])):
            raise ConfigError(f"{model.name} ({model.family}) experts have no gate matrix; use --matrix up or down")
    device = resolve_device(config.device)
    chunk = config.chunk_bytes if config.chunk_bytes is not None else (CUDA_CHUNK_BYTES if device.type == "cuda" else 1)
    generators: dict[str, torch.Generator] = {}
    if config.null == "shuffle-sampled":
        # One stream per matrix, seeded like a GaleMoE run of that matrix, continued across the
        # layers in the order given (GaleMoE keeps one generator for all layers of a run).
        for m in matrices:
            g = torch.Generator()
            g.manual_seed(config.seed)
            generators[m] = g
    return AlignmentPlan(config, layers, matrices, ks, d, device, resolve_dtype(config.dtype), int(chunk), generators)


def _has_gate(layer: MoELayer) -> bool:
    try:
        layer.expert_matrix(0, "gate")
    except ConfigError:
        return False
    return True


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
) -> LayerStatistics:
    """Null moments, z-scores and the layer test of one (layer, matrix)."""
    c = plan.config
    if c.null == "shuffle-sampled":
        if permutations is None:
            raise ValueError("shuffle-sampled needs the drawn permutations")
        mu, sd = sampled_null_moments(energies, permutations)
    else:
        mu, sd = exact_null_moments(energies, c.null)
    align = true_pair_energies(energies)
    z = z_scores(align - mu[None, :], np.broadcast_to(sd, align.shape), c.null, c.dtype)
    rng = np.random.default_rng([c.seed, layer_index, ROLES.index(role)])
    z_layer, p_layer, p_method = layer_permutation_test(energies, c.p_draws, rng, c.dtype)
    return LayerStatistics(
        layer=layer_index, matrix=role, hidden_size=plan.hidden_size, ks=np.asarray(plan.ks, dtype=np.int64),
        energies=energies, shuffle_mean=mu, shuffle_std=sd, z=z, z_layer=z_layer, p_layer=p_layer,
        p_layer_method=p_method, sigma=sigma,
    )


# ----------------------------------------------------------------------------------------------
# The analysis
# ----------------------------------------------------------------------------------------------
def _manifest(model: MoEModel, plan: AlignmentPlan) -> dict[str, Any]:
    return {
        "analysis": ANALYSIS,
        "label": f"{model.name} L{compact_ranges(plan.layers)}",
        "status": "running",
        "completed_layers": [],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "source": model.source, "name": model.name, "path": str(model.path), "family": model.family,
            "n_layers": model.n_layers, "n_experts": model.n_experts, "top_k": model.top_k,
            "hidden_size": model.hidden_size, "expert_ffn": model.expert_ffn, "files": model.file_hashes(),
        },
        "options": plan.options(),
        "seed": plan.config.seed,
        "versions": package_versions(),
        "timings": {"total_s": 0.0, "per_layer_s": {}},
    }


def _concat(frames: Iterable[dict[str, pd.DataFrame]]) -> dict[str, pd.DataFrame]:
    frames = list(frames)
    return {name: pd.concat([f[name] for f in frames], ignore_index=True) for name in TABLES}


def run_router_alignment(
    model: MoEModel,
    config: RouterAlignmentConfig,
    out: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
) -> Run:
    """Run the analysis of ``config`` on ``model``; with ``out``, stream layers into that run
    directory (resuming it if it holds an unfinished run of the same options)."""
    plan = resolve(config, model)
    manifest = _manifest(model, plan)
    # Off by default (a Mixtral basis is 16 GiB per matrix); on when asked, or when a directory is given.
    use_cache = config.cache if config.cache is not None else config.cache_dir is not None
    cache = SpectrumCache(config.cache_dir) if use_cache else None
    stream: LayerRunDirectory | None = None
    completed: set[int] = set()
    if out is not None:
        stream = LayerRunDirectory(out, manifest, TABLES)
        completed = set(stream.open())
    started = time.perf_counter()
    collected: list[dict[str, pd.DataFrame]] = []
    total = len(plan.layers)
    report(progress, "layers", len(completed), total, "")
    for L in plan.layers:
        layer = model.layer(L)
        permutations = {
            role: galemoe_permutations(layer.n_experts, len(plan.ks), config.shuffles, plan.generators[role])
            for role in plan.matrices
        } if config.null == "shuffle-sampled" else {}
        if L in completed:
            continue  # the draws above keep the random stream where an uninterrupted run has it
        t0 = time.perf_counter()
        per_matrix = []
        for role in plan.matrices:
            energies, sigma = layer_energies(layer, role, plan, cache, progress)
            stats = layer_statistics(L, role, energies, sigma, plan, permutations.get(role))
            per_matrix.append(layer_tables(stats))
        tables = _concat(per_matrix)
        seconds = time.perf_counter() - t0
        if stream is not None:
            stream.write_layer(L, tables, seconds)
        else:
            collected.append(tables)
            manifest["timings"]["per_layer_s"][str(L)] = round(seconds, 6)
        completed.add(L)
        report(progress, "layers", len(completed), total, f"layer {L}")
    extra = {"spectra_cache": _cache_summary(cache)}
    if stream is not None:
        return stream.finish(extra)
    manifest.update(extra)
    manifest["status"] = "complete"
    manifest["completed_layers"] = list(plan.layers)
    manifest["timings"]["total_s"] = round(time.perf_counter() - started, 6)
    return Run(manifest=manifest, tables=_concat(collected))


def _cache_summary(cache: SpectrumCache | None) -> dict[str, Any]:
    if cache is None:
        return {"enabled": False}
    return {"enabled": True, "directory": str(cache.directory), "hits": cache.hits, "misses": cache.misses}


def router_alignment(
    model: MoEModel | str | os.PathLike[str],
    layers: Iterable[int] | str | None = None,
    matrix: str = "gate",
    k: Iterable[int] | int | str | None = None,
    null: str = "derangement",
    shuffles: int = 200,
    seed: int = 0,
    method: str = "eigh",
    device: str = "auto",
    dtype: str = "float32",
    *,
    p_draws: int = MIN_P_DRAWS,
    cache: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
    config: RouterAlignmentConfig | None = None,
) -> Run:
    """Router–expert alignment of ``model`` (an opened model or a checkpoint path).

    Returns a :class:`~moelens.results.Run` with tables ``alignment``, ``alignment_layers``,
    ``alignment_pairs`` and ``spectra``. With ``out``, each layer is written as soon as it is
    done and an interrupted run resumes at the next unfinished layer. ``config`` (a
    :class:`RouterAlignmentConfig`) replaces the keyword options when given.

    >>> run = router_alignment(model, layers=[0, 1], matrix="gate")
    >>> run["alignment_layers"][["layer", "k", "align", "z_vs_shuffle", "p_layer"]]
    """
    if not isinstance(model, MoEModel):
        from moelens.checkpoint import open_model

        model = open_model(model)
    if config is None:
        config = RouterAlignmentConfig(
            layers=None if layers is None else tuple(_as_sequence(layers)),
            matrix=matrix, k=None if k is None else tuple(_as_sequence(k)), null=null, shuffles=shuffles,
            seed=seed, method=method, device=device, dtype=dtype, p_draws=p_draws, cache=cache,
            cache_dir=None if cache_dir is None else str(Path(cache_dir)),
        )
    return run_router_alignment(model, config, out=out, progress=progress)


__all__ = [
    "ANALYSIS", "AlignmentPlan", "RouterAlignmentConfig", "default_ks", "layer_energies", "layer_statistics",
    "resolve", "router_alignment", "run_router_alignment",
]
