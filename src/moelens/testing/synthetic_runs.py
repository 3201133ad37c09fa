"""Fake router-alignment runs with the shape and statistics of real ones (plain numpy, seeded).

Figures and reports are built and tested against these, beside runs of real (tiny)
checkpoints. Each synthetic layer draws a projection-energy tensor ``A[i, j, k]`` (router i on
the top-k input subspace of expert j) whose true pairs ``i = j`` carry more energy in the
leading singular directions than mismatched pairs, every curve rising to 1 at ``k = d``. The
tables and the manifest are then those ``moelens.router_alignment`` writes, derived from ``A``
with the formulas of docs/methods.md §1:

``alignment`` (one row per layer, matrix, expert, k)
    align, random_expect_k_over_d, effect_over_random, shuffle_mean, shuffle_std,
    delta_vs_shuffle, z_vs_shuffle, cos_squared (k = 1 rows, else NaN), margin
``alignment_layers`` (one row per layer, matrix, k)
    the same averaged over experts, argmax_accuracy, z_layer, p_layer, p_layer_method, n_experts
``alignment_pairs`` (one row per layer, matrix, router, expert, k)
    energy = A[router, expert, k]

``shuffle_mean``/``shuffle_std`` are the moments of the chosen null (``derangement``: the
E(E−1) mismatched pairs; ``shuffle``: all E² pairs).
"""

from __future__ import annotations

import itertools
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from moelens.analyses.base import layer_unit_key
from moelens.analyses.router_alignment.tables import SCHEMAS
from moelens.ranges import compact_ranges
from moelens.results import Run
from moelens.results.manifest import SCHEMA_VERSION
from moelens.results.schema import schemas_to_json

#: Above this many experts the layer-level p-value is estimated from random permutations.
EXACT_PERMUTATION_LIMIT = 8
MONTE_CARLO_DRAWS = 10_000
#: Energies closer than this are ties (every energy is 1 at k = d).
TIE = 1e-9


def powers_of_two_up_to(d: int) -> list[int]:
    """1, 2, 4, … up to d, and d itself when it is no power of two."""
    ks = [2**p for p in range(int(math.log2(d)) + 1)]
    return ks if ks[-1] == d else ks + [d]


def synthetic_energies(n_experts: int, hidden_size: int, rng: np.random.Generator, strength: float = 0.1) -> np.ndarray:
    """A ``(E, E, d)`` tensor of cumulative projection energies, ``A[..., d-1] = 1``.

    Energy per singular direction m is ``g_m (1 + b m^-0.8)``: ``g`` a mild positive noise,
    ``b`` a per-pair boost of the leading directions, ``strength·d`` for true pairs and a
    widely spread ~20 % of that for mismatched ones (routers of a layer share directions, as
    in trained models, so a few mismatched pairs beat true ones).
    """
    e, d = n_experts, hidden_size
    m = np.arange(1, d + 1, dtype=np.float64)
    boost = 0.2 * strength * d * rng.lognormal(0.0, 0.8, size=(e, e))
    boost[np.arange(e), np.arange(e)] = strength * d * rng.lognormal(0.0, 0.25, size=e)
    energy = rng.gamma(4.0, 0.25, size=(e, e, d)) * (1.0 + boost[..., None] / m**0.8)
    cumulative = np.cumsum(energy, axis=-1)
    return cumulative / cumulative[..., -1:]


def layer_permutation_test(a_k: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    """z_layer, p_layer and the p method for ``a_k`` of shape ``(E, E, K)`` (Hoeffding's CLT;
    p counts the permutations, identity included, with S(π) ≥ S(id))."""
    e = a_k.shape[0]
    row, col = a_k.mean(axis=1, keepdims=True), a_k.mean(axis=0, keepdims=True)
    grand = a_k.mean(axis=(0, 1), keepdims=True)
    variance = ((a_k - row - col + grand) ** 2).sum(axis=(0, 1)) / (e * e * (e - 1))
    observed = np.einsum("iik->k", a_k) / e
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(variance > TIE, (observed - grand[0, 0]) / np.sqrt(variance), np.nan)
    if e <= EXACT_PERMUTATION_LIMIT:
        perms, method = np.array(list(itertools.permutations(range(e)))), "exact"
    else:
        perms, method = np.argsort(rng.random((MONTE_CARLO_DRAWS, e)), axis=1), "monte_carlo"
    s = a_k[np.arange(e)[None, :], perms].mean(axis=1)  # (P, K)
    hits = (s >= observed[None, :] - TIE).sum(axis=0)
    p = hits / len(perms) if method == "exact" else (hits + 1) / (len(perms) + 1)
    return z, p, method


def layer_tables(layer: int, matrix: str, a_full: np.ndarray, ks: Sequence[int], null: str,
                 rng: np.random.Generator) -> dict[str, pd.DataFrame]:
    """The three tables of one (layer, matrix) from its full energy tensor ``(E, E, d)``."""
    e, _, d = a_full.shape
    kk = np.asarray(ks)
    a_k = a_full[:, :, kk - 1]  # (E, E, K)
    align = np.einsum("iik->ik", a_k)  # (E, K)
    pool = a_k.reshape(e * e, -1) if null == "shuffle" else a_k[~np.eye(e, dtype=bool)]
    mu, sigma = pool.mean(axis=0), pool.std(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(sigma > TIE, (align - mu) / sigma, np.nan)
    others = np.where(np.eye(e, dtype=bool)[..., None], -np.inf, a_k)
    margin = align - others.max(axis=1)
    cos2 = np.where(kk[None, :] == 1, align, np.nan)
    z_layer, p_layer, method = layer_permutation_test(a_k, rng)
    n_k = len(kk)
    expert_table = pd.DataFrame({
        "layer": layer, "matrix": matrix, "expert": np.repeat(np.arange(e), n_k), "k": np.tile(kk, e),
        "align": align.ravel(), "random_expect_k_over_d": np.tile(kk / d, e),
        "effect_over_random": (align - kk / d).ravel(), "shuffle_mean": np.tile(mu, e), "shuffle_std": np.tile(sigma, e),
        "delta_vs_shuffle": (align - mu).ravel(), "z_vs_shuffle": z.ravel(), "cos_squared": cos2.ravel(),
        "margin": margin.ravel(),
    })
    layer_table = pd.DataFrame({
        "layer": layer, "matrix": matrix, "k": kk, "align": align.mean(axis=0),
        "effect_over_random": (align - kk / d).mean(axis=0), "delta_vs_shuffle": (align - mu).mean(axis=0),
        "z_vs_shuffle": z.mean(axis=0), "margin": margin.mean(axis=0), "argmax_accuracy": (margin > TIE).mean(axis=0),
        "shuffle_mean": mu, "shuffle_std": sigma, "cos_squared": cos2.mean(axis=0), "z_layer": z_layer,
        "p_layer": p_layer, "p_layer_method": method, "n_experts": e,
    })
    router, expert, k = np.meshgrid(np.arange(e), np.arange(e), kk, indexing="ij")
    pair_table = pd.DataFrame({"layer": layer, "matrix": matrix, "router": router.ravel(), "expert": expert.ravel(),
                               "k": k.ravel(), "energy": a_k.ravel()})
    return {"alignment": expert_table, "alignment_layers": layer_table, "alignment_pairs": pair_table}


def synthetic_alignment_run(
    model_name: str = "synthetic-mixtral",
    layers: Sequence[int] = (5,),
    n_experts: int = 8,
    hidden_size: int = 4096,
    ks: Optional[Sequence[int]] = None,
    matrices: Sequence[str] = ("gate",),
    null: str = "derangement",
    strength: float = 0.1,
    seed: int = 0,
    created: Optional[str] = None,
) -> Run:
    """One fake router-alignment run (not saved; call ``.save(dir)``).

    ``strength`` scales how much more energy true pairs put in the leading directions
    (0 gives a run with no alignment beyond chance). Several ``matrices`` make a
    ``matrix = "all"`` run.
    """
    ks = list(ks) if ks is not None else powers_of_two_up_to(hidden_size)
    rng = np.random.default_rng(seed)
    frames: dict[str, list[pd.DataFrame]] = {"alignment": [], "alignment_layers": [], "alignment_pairs": [], "spectra": []}
    for layer in layers:
        for matrix in matrices:
            tables = layer_tables(int(layer), matrix, synthetic_energies(n_experts, hidden_size, rng, strength), ks, null, rng)
            for name, table in tables.items():
                frames[name].append(table)
            frames["spectra"].append(synthetic_spectra(int(layer), matrix, n_experts, hidden_size, rng))
    layer_list = [int(x) for x in layers]
    units = [layer_unit_key(layer) for layer in layer_list]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "analysis": "router_alignment",
        "label": f"{model_name} L{compact_ranges(layer_list)}",
        "status": "complete",
        "completed_units": units,
        "units": units,
        "created": created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": {"a": {
            "source": f"synthetic/{model_name}", "name": model_name, "family": "mixtral", "n_layers": max(layer_list) + 1,
            "n_experts": n_experts, "top_k": 2, "hidden_size": hidden_size, "expert_ffn": 4 * hidden_size, "files": {},
        }},
        "options": {
            "layers": layer_list, "matrix": matrices[0] if len(matrices) == 1 else "all", "matrices": list(matrices),
            "k": ks, "null": null, "shuffles": 200, "seed": seed, "method": "eigh", "device": "cpu", "dtype": "float32",
        },
        "seed": seed,
        "versions": {"moelens": "synthetic"},
        "timings": {},
        "tables": schemas_to_json({schema.name: schema for schema in SCHEMAS}),
    }
    return Run(manifest=manifest, tables={name: pd.concat(parts, ignore_index=True) for name, parts in frames.items()})


def synthetic_spectra(layer: int, matrix: str, n_experts: int, hidden_size: int, rng: np.random.Generator) -> pd.DataFrame:
    """Descending singular values (a Marchenko–Pastur-like bulk) of every expert: the run's ``spectra`` table."""
    sigma = np.sort(rng.uniform(0.2, 1.0, size=(n_experts, hidden_size)) ** 0.5, axis=1)[:, ::-1] * 3.0
    return pd.DataFrame({
        "layer": np.full(sigma.size, layer, dtype=np.int64),
        "matrix": [matrix] * sigma.size,
        "expert": np.repeat(np.arange(n_experts, dtype=np.int64), hidden_size),
        "index": np.tile(np.arange(hidden_size, dtype=np.int64), n_experts),
        "sigma": sigma.ravel(),
    })


def write_synthetic_runs(root: str | Path, n_runs: int = 6, layers: Sequence[int] = (5,), hidden_size: int = 4096,
                         seed: int = 0) -> list[Path]:
    """Write ``n_runs`` synthetic runs under ``root``: two models, gate/up/down, both exact nulls,
    alignment strength rising from run to run."""
    root = Path(root)
    paths = []
    for i in range(n_runs):
        run = synthetic_alignment_run(
            model_name=("synthetic-mixtral", "synthetic-mixtral-tuned")[i % 2], layers=layers, hidden_size=hidden_size,
            matrices=(("gate", "up", "down")[(i // 2) % 3],), null=("derangement", "shuffle")[(i // 3) % 2],
            strength=0.03 + 0.035 * i, seed=seed + i,
        )
        paths.append(run.save(root / f"run-{i + 1}"))
    return paths
