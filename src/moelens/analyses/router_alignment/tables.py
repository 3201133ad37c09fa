"""Tidy tables of one (layer, matrix) of router–expert alignment, from the energy tensor A.

Column names are those of docs/methods.md §1 and of the run-directory contract:

- ``alignment``: one row per (layer, matrix, expert, k).
- ``alignment_layers``: one row per (layer, matrix, k), means over experts plus the layer test.
- ``alignment_pairs``: one row per (layer, matrix, router, expert, k), ``energy`` = A[i, j, k].
- ``spectra``: one row per (layer, matrix, expert, index), ``sigma`` descending.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moelens.analyses.router_alignment.nulls import TIE_TOLERANCE
from moelens.results.schema import Bounds, TableSchema, within_model

ALIGNMENT_COLUMNS = [
    "layer", "matrix", "expert", "k", "align", "random_expect_k_over_d", "effect_over_random",
    "shuffle_mean", "shuffle_std", "delta_vs_shuffle", "z_vs_shuffle", "cos_squared", "margin",
]
LAYER_COLUMNS = [
    "layer", "matrix", "k", "align", "effect_over_random", "delta_vs_shuffle", "z_vs_shuffle",
    "margin", "argmax_accuracy", "shuffle_mean", "shuffle_std", "cos_squared", "z_layer", "p_layer",
    "p_layer_method", "n_experts",
]
PAIR_COLUMNS = ["layer", "matrix", "router", "expert", "k", "energy"]
SPECTRA_COLUMNS = ["layer", "matrix", "expert", "index", "sigma"]
TABLES = ("alignment", "alignment_layers", "alignment_pairs", "spectra")
_KINDS = {"layer": "int", "matrix": "str", "expert": "int", "k": "int", "router": "int", "index": "int",
          "p_layer_method": "str", "n_experts": "int"}


#: Indices are whole and within the model; every other value may be NaN (cos_squared off k = 1).
_BOUNDS = {"layer": Bounds(minimum=0), "expert": Bounds(minimum=0), "router": Bounds(minimum=0), "k": Bounds(minimum=1),
           "index": Bounds(minimum=0)}


def _schema(name: str, columns: list[str]) -> TableSchema:
    experts = tuple(c for c in ("router", "expert") if c in columns)
    return TableSchema(name, tuple((c, _KINDS.get(c, "float")) for c in columns),
                       bounds={c: b for c, b in _BOUNDS.items() if c in columns}, relations=(within_model(experts=experts),))


SCHEMAS = (
    _schema("alignment", ALIGNMENT_COLUMNS),
    _schema("alignment_layers", LAYER_COLUMNS),
    _schema("alignment_pairs", PAIR_COLUMNS),
    _schema("spectra", SPECTRA_COLUMNS),
)


@dataclass(frozen=True)
class LayerStatistics:
    """Everything the tables of one (layer, matrix) are made of. Arrays: ``energies`` A [E, E, K]
    (router, expert, k), ``ks`` [K], null ``shuffle_mean``/``shuffle_std`` [K], ``z`` [E, K] (the
    null's z-scores of the true pairs), ``z_layer``/``p_layer`` [K], ``sigma`` [E, r]."""

    layer: int
    matrix: str
    hidden_size: int
    ks: np.ndarray
    energies: np.ndarray
    shuffle_mean: np.ndarray
    shuffle_std: np.ndarray
    z: np.ndarray
    z_layer: np.ndarray
    p_layer: np.ndarray
    p_layer_method: str
    sigma: np.ndarray


def true_pair_energies(a: np.ndarray) -> np.ndarray:
    """align [E, K] = A[e, e, k]."""
    return np.einsum("eek->ek", a)


def margins(a: np.ndarray) -> np.ndarray:
    """margin [E, K] = A[i, i, k] − max_{j≠i} A[i, j, k]."""
    n = a.shape[0]
    others = np.where(np.eye(n, dtype=bool)[:, :, None], -np.inf, a)
    return true_pair_energies(a) - others.max(axis=1)


def argmax_accuracy(a: np.ndarray) -> np.ndarray:
    """[K] share of routers whose most aligned expert is their own: mean_i 1[argmax_j A[i,j,k] = i].

    The argmax must be unique beyond rounding (margin > 1e-6): at k = d every energy is 1 and a
    router that ties with every expert has not picked its own."""
    return (margins(a) > TIE_TOLERANCE).mean(axis=0)


def cos_squared_column(align: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """cos²θ_e = A[e, e, 1] in the k = 1 rows, NaN in every other row ([E, K])."""
    return np.where((ks == 1)[None, :], align, np.nan)


def alignment_table(s: LayerStatistics) -> pd.DataFrame:
    n, n_k = s.energies.shape[0], len(s.ks)
    align = true_pair_energies(s.energies)
    expect = np.broadcast_to(s.ks / s.hidden_size, (n, n_k))
    delta = align - s.shuffle_mean[None, :]
    return pd.DataFrame({
        "layer": np.full(n * n_k, s.layer, dtype=np.int64),
        "matrix": [s.matrix] * (n * n_k),
        "expert": np.repeat(np.arange(n, dtype=np.int64), n_k),
        "k": np.tile(s.ks.astype(np.int64), n),
        "align": align.ravel(),
        "random_expect_k_over_d": expect.ravel(),
        "effect_over_random": (align - expect).ravel(),
        "shuffle_mean": np.tile(s.shuffle_mean, n),
        "shuffle_std": np.tile(s.shuffle_std, n),
        "delta_vs_shuffle": delta.ravel(),
        "z_vs_shuffle": s.z.ravel(),
        "cos_squared": cos_squared_column(align, s.ks).ravel(),
        "margin": margins(s.energies).ravel(),
    }, columns=ALIGNMENT_COLUMNS)


def layer_table(s: LayerStatistics) -> pd.DataFrame:
    n, n_k = s.energies.shape[0], len(s.ks)
    align = true_pair_energies(s.energies)
    cos2 = cos_squared_column(align, s.ks)
    return pd.DataFrame({
        "layer": np.full(n_k, s.layer, dtype=np.int64),
        "matrix": [s.matrix] * n_k,
        "k": s.ks.astype(np.int64),
        "align": align.mean(axis=0),
        "effect_over_random": (align - s.ks[None, :] / s.hidden_size).mean(axis=0),
        "delta_vs_shuffle": (align - s.shuffle_mean[None, :]).mean(axis=0),
        "z_vs_shuffle": s.z.mean(axis=0),
        "margin": margins(s.energies).mean(axis=0),
        "argmax_accuracy": argmax_accuracy(s.energies),
        "shuffle_mean": s.shuffle_mean,
        "shuffle_std": s.shuffle_std,
        "cos_squared": cos2.mean(axis=0),
        "z_layer": s.z_layer,
        "p_layer": s.p_layer,
        "p_layer_method": [s.p_layer_method] * n_k,
        "n_experts": np.full(n_k, n, dtype=np.int64),
    }, columns=LAYER_COLUMNS)


def pairs_table(s: LayerStatistics) -> pd.DataFrame:
    n, _, n_k = s.energies.shape
    size = n * n * n_k
    return pd.DataFrame({
        "layer": np.full(size, s.layer, dtype=np.int32),
        "matrix": [s.matrix] * size,
        "router": np.repeat(np.arange(n, dtype=np.int32), n * n_k),
        "expert": np.tile(np.repeat(np.arange(n, dtype=np.int32), n_k), n),
        "k": np.tile(s.ks.astype(np.int32), n * n),
        "energy": s.energies.astype(np.float32).ravel(),
    }, columns=PAIR_COLUMNS)


def spectra_table(s: LayerStatistics) -> pd.DataFrame:
    n, r = s.sigma.shape
    return pd.DataFrame({
        "layer": np.full(n * r, s.layer, dtype=np.int64),
        "matrix": [s.matrix] * (n * r),
        "expert": np.repeat(np.arange(n, dtype=np.int64), r),
        "index": np.tile(np.arange(r, dtype=np.int64), n),
        "sigma": s.sigma.astype(np.float64).ravel(),
    }, columns=SPECTRA_COLUMNS)


def layer_tables(s: LayerStatistics) -> dict[str, pd.DataFrame]:
    """The four tables of one (layer, matrix)."""
    return {
        "alignment": alignment_table(s),
        "alignment_layers": layer_table(s),
        "alignment_pairs": pairs_table(s),
        "spectra": spectra_table(s),
    }


SUMMARY_COLUMNS = ["k", "align", "delta_vs_shuffle", "z_vs_shuffle", "effect_over_random", "cos_squared", "z_layer", "p_layer"]


def summary_by_k(layers: pd.DataFrame) -> pd.DataFrame:
    """The seed report's summary table from ``alignment_layers`` rows (already means over
    experts): per k, the mean over the given layers of align, delta_vs_shuffle, z_vs_shuffle,
    effect_over_random, cos_squared (NaN except at k = 1) and z_layer; ``p_layer`` is the largest
    p over those layers (each layer is significant at least at that level). One layer: its rows."""
    grouped = layers.groupby("k", sort=True)
    means = grouped[["align", "delta_vs_shuffle", "z_vs_shuffle", "effect_over_random", "cos_squared", "z_layer"]].mean()
    out = means.assign(p_layer=grouped["p_layer"].max()).reset_index()
    return out[SUMMARY_COLUMNS]
