"""The read side of a router-alignment run: what figures and reports take from its tables.

A run of ``router_alignment`` (docs/methods.md §1) holds, each with a ``matrix`` column:

``alignment``         one row per (layer, matrix, expert, k): ``align``, ``random_expect_k_over_d``,
                      ``effect_over_random``, ``shuffle_mean``, ``shuffle_std``,
                      ``delta_vs_shuffle``, ``z_vs_shuffle``, ``cos_squared`` (k = 1 rows only),
                      ``margin``.
``alignment_layers``  one row per (layer, matrix, k): the same averaged over experts, plus
                      ``argmax_accuracy``, ``z_layer``, ``p_layer``, ``p_layer_method``.
``alignment_pairs``   one row per (layer, matrix, router, expert, k): ``energy`` = A[router, expert, k].

``shuffle_mean``/``shuffle_std`` are μ and σ of the run's null (``options.null``: derangement,
shuffle or shuffle-sampled), and ``delta_vs_shuffle``/``z_vs_shuffle`` are measured against it.
A run with ``matrix = "all"`` becomes one view per matrix. Nothing is recomputed: every number
a figure or a table shows is the one the analysis stored (load_run has checked the columns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import pandas as pd

from moelens.errors import ConfigError, RunDirectoryError
from moelens.results import Run

EXPERT_TABLE = "alignment"
LAYER_TABLE = "alignment_layers"
PAIR_TABLE = "alignment_pairs"
#: Nulls whose pool contains the true pairs (the mean z over experts is then at most √(E−1)).
POOLED_NULLS = ("shuffle", "shuffle-sampled")
DEFAULT_NULL = "derangement"
NULL_DESCRIPTIONS = {
    "derangement": "derangement: mismatched pairs i ≠ j only",
    "shuffle": "shuffle: all E² pairs, exact moments (GaleMoE-compatible)",
    "shuffle-sampled": "shuffle-sampled: GaleMoE's sampled permutations",
}


@dataclass(frozen=True)
class Metric:
    """How a metric is named on an axis: ``axis`` carries an arrow where a direction is better."""

    name: str
    axis: str
    title: str


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("align", "align = A[e,e,k]  ↑", "Alignment"),
    Metric("effect_over_random", "align − k/d  ↑", "Effect over random"),
    Metric("delta_vs_shuffle", "Δ = align − μ  ↑", "Delta vs the null"),
    Metric("z_vs_shuffle", "z = Δ / σ  ↑", "z-score vs the null"),
    Metric("cos_squared", "cos²θ = A[e,e,1]  ↑", "cos²θ"),
    Metric("margin", "margin = A[e,e,k] − max A[e,j≠e,k]  ↑", "Margin"),
    Metric("shuffle_mean", "μ = null mean of A[i,j,k]", "Null mean μ"),
    Metric("shuffle_std", "σ = null std of A[i,j,k]", "Null std σ"),
    Metric("z_layer", "z_layer  ↑", "Layer permutation z"),
    Metric("p_layer", "p_layer  ↓", "Layer permutation p"),
    Metric("argmax_accuracy", "argmax accuracy  ↑", "Argmax accuracy"),
)}


@dataclass(frozen=True, eq=False)
class AlignmentView:
    """One (run, matrix) as figures read it. Build with :func:`alignment_views`."""

    run: Run
    label: str
    matrix: Optional[str]
    experts: pd.DataFrame
    layers: pd.DataFrame
    pairs: Optional[pd.DataFrame]
    n_experts: int
    hidden_size: int
    _energy_cache: dict = field(default_factory=dict, repr=False)

    @property
    def manifest(self) -> dict:
        return self.run.manifest

    @property
    def options(self) -> dict:
        return self.manifest.get("options", {}) or {}

    @property
    def null(self) -> str:
        return str(self.options.get("null") or DEFAULT_NULL)

    @property
    def null_pools_true_pairs(self) -> bool:
        return self.null in POOLED_NULLS

    @cached_property
    def ks(self) -> list[int]:
        return sorted(int(k) for k in self.experts["k"].unique())

    @cached_property
    def layer_ids(self) -> list[int]:
        return sorted(int(layer) for layer in self.experts["layer"].unique())

    @property
    def multi_layer(self) -> bool:
        return len(self.layer_ids) > 1

    @property
    def z_cap(self) -> float:
        """√(E − 1): the most the mean z over experts can reach under a null that pools all E²
        pairs (1/E of them are the true pairs)."""
        return math.sqrt(max(self.n_experts - 1, 0))

    @property
    def model_name(self) -> str:
        model = self.run.model
        return str(model.get("name") or model.get("source") or "model")

    def nearest_k(self, k: float, below_d: bool = False) -> int:
        """The stored k nearest to ``k`` on a log scale (``below_d``: never k = d, where every
        energy is 1 and nothing can be told apart)."""
        candidates = [x for x in self.ks if not below_d or x < self.hidden_size] or self.ks
        return min(candidates, key=lambda x: (abs(math.log2(x) - math.log2(max(k, 1))), -x))

    def per_layer(self, metric: str) -> pd.DataFrame:
        """Columns layer, k, ``metric``: the layer table's value, or the mean over the layer's
        experts for a metric only the expert table has."""
        if metric in self.layers.columns:
            return self.layers[["layer", "k", metric]]
        if metric in self.experts.columns:
            return self.experts.groupby(["layer", "k"], as_index=False)[metric].mean()
        raise ConfigError(f"{self.label!r} has no {metric!r}; it has {sorted(set(self.experts) | set(self.layers))}")

    def curve(self, metric: str) -> pd.DataFrame:
        """``metric`` against k: ``mean`` over layers of the per-layer value, ``low`` and ``high``
        (min and max over layers)."""
        grouped = self.per_layer(metric).groupby("k")[metric]
        return pd.DataFrame({"mean": grouped.mean(), "low": grouped.min(), "high": grouped.max()})

    def has(self, metric: str) -> bool:
        for table in (self.layers, self.experts):
            if metric in table.columns:
                return bool(table[metric].notna().any())
        return False

    def at_k(self, k: int) -> pd.DataFrame:
        """Per-expert rows at ``k`` (each with ``shuffle_mean``/``shuffle_std`` of its layer)."""
        return self.experts[self.experts["k"] == k]

    def cos_squared(self) -> Optional[pd.DataFrame]:
        """layer, expert, cos_squared, align (at k = 1); None when k = 1 was not computed."""
        at_one = self.experts[self.experts["k"] == 1]
        if at_one.empty:
            return None
        table = pd.DataFrame({"layer": at_one["layer"], "expert": at_one["expert"],
                              "cos_squared": at_one["cos_squared"], "align": at_one["align"]})
        return table.sort_values(["layer", "expert"], ignore_index=True)

    def energies(self, layer: int, k: int) -> np.ndarray:
        """The E×E matrix A[router, expert, k] of one layer (needs ``alignment_pairs``)."""
        if self.pairs is None:
            raise RunDirectoryError(f"{self.label!r} has no {PAIR_TABLE} table; re-run the alignment analysis to write it")
        key = (layer, k)
        if key not in self._energy_cache:
            rows = self.pairs[(self.pairs["layer"] == layer) & (self.pairs["k"] == k)]
            matrix = np.full((self.n_experts, self.n_experts), np.nan)
            matrix[rows["router"].to_numpy(int), rows["expert"].to_numpy(int)] = rows["energy"].to_numpy(float)
            self._energy_cache[key] = matrix
        return self._energy_cache[key]

    def true_and_mismatched(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Energies of true pairs (i = j) and mismatched pairs (i ≠ j) at ``k``, over all layers."""
        true, mismatched = [], []
        off = ~np.eye(self.n_experts, dtype=bool)
        for layer in self.layer_ids:
            a = self.energies(layer, k)
            true.append(np.diag(a))
            mismatched.append(a[off])
        return np.concatenate(true), np.concatenate(mismatched)

    def null_at(self, k: int) -> tuple[float, float, float]:
        """(μ, σ, mean z over experts) stored at ``k``, averaged over layers."""
        rows = self.layers[self.layers["k"] == k]
        z = self.experts.loc[self.experts["k"] == k, "z_vs_shuffle"].mean()
        return float(rows["shuffle_mean"].mean()), float(rows["shuffle_std"].mean()), float(z)


def _hidden_size(run: Run, experts: pd.DataFrame) -> int:
    """d: the model's hidden size as recorded, else k / (k/d) from a row with k < d."""
    if run.model.get("hidden_size"):
        return int(run.model["hidden_size"])
    row = experts[experts["random_expect_k_over_d"] > 0].iloc[0]
    return round(row["k"] / row["random_expect_k_over_d"])


def _check(run: Run) -> pd.DataFrame:
    where = f" at {run.path}" if run.path else ""
    if EXPERT_TABLE not in run.tables:
        manifest = run.manifest
        if manifest.get("status") == "running":
            done = len(manifest.get("completed_units", []) or [])
            total = len(manifest.get("units", []) or [])
            raise RunDirectoryError(
                f"the run{where} is unfinished ({done} of {total} layers); run `moelens align` again with the same --out to finish it"
            )
        raise RunDirectoryError(
            f"the run{where} has no {EXPERT_TABLE!r} table (analysis {manifest.get('analysis', 'unknown')!r}); "
            "pass the --out directory of `moelens align`"
        )
    return run.tables[EXPERT_TABLE]


def _for_matrix(table: Optional[pd.DataFrame], matrix: Optional[str]) -> Optional[pd.DataFrame]:
    if table is None or matrix is None or "matrix" not in table.columns:
        return table
    return table[table["matrix"] == matrix].drop(columns=["matrix"])


def views_of_run(run: Run) -> list[AlignmentView]:
    """One view per matrix the run holds (gate, up, down), in the run's order."""
    experts = _check(run)
    matrices: list[Optional[str]] = list(dict.fromkeys(experts["matrix"])) if "matrix" in experts.columns else [None]
    views = []
    for matrix in matrices:
        rows = _for_matrix(experts, matrix).sort_values(["layer", "expert", "k"], ignore_index=True)
        layers = _for_matrix(run.tables[LAYER_TABLE], matrix).sort_values(["layer", "k"], ignore_index=True)
        label = run.label if len(matrices) == 1 else f"{run.label} · {matrix}"
        views.append(AlignmentView(
            run=run, label=label, matrix=matrix, experts=rows, layers=layers,
            pairs=_for_matrix(run.tables.get(PAIR_TABLE), matrix),
            n_experts=int(run.model.get("n_experts") or rows["expert"].nunique()), hidden_size=_hidden_size(run, rows),
        ))
    return views


def _relabel(view: AlignmentView, label: str) -> AlignmentView:
    return AlignmentView(run=view.run, label=label, matrix=view.matrix, experts=view.experts, layers=view.layers,
                         pairs=view.pairs, n_experts=view.n_experts, hidden_size=view.hidden_size,
                         _energy_cache=view._energy_cache)


def alignment_views(runs: Union[Run, AlignmentView, Iterable[Union[Run, AlignmentView]]]) -> list[AlignmentView]:
    """Views of one or many runs (one per run and matrix), labelled so that no two share a label."""
    if isinstance(runs, (Run, AlignmentView)):
        runs = [runs]
    views: list[AlignmentView] = []
    for item in runs:
        views.extend([item] if isinstance(item, AlignmentView) else views_of_run(item))
    if not views:
        raise ConfigError("no runs given; pass at least one run directory")
    labels = unique_labels(views)
    return [v if v.label == lab else _relabel(v, lab) for v, lab in zip(views, labels)]


def unique_labels(views: Sequence[AlignmentView]) -> list[str]:
    """Labels made distinct: by the matrix where runs differ in it, then by the null, then by
    a run number."""
    labels = [v.label for v in views]
    for attribute in ("matrix", "null"):
        if len(set(labels)) == len(labels):
            return labels
        counts = pd.Series(labels).value_counts()
        labels = [f"{lab} · {getattr(v, attribute)}" if counts[lab] > 1 and getattr(v, attribute) and not lab.endswith(f"· {getattr(v, attribute)}") else lab
                  for lab, v in zip(labels, views)]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} #{i + 1}" for i, lab in enumerate(labels)]
    return labels


def distribution_ks(views: Sequence[AlignmentView]) -> list[int]:
    """The k values at which the null distribution is drawn: 32, 128, 512 and 2048 (the seed's)
    where runs have them, else the stored k nearest to d/128, d/32, d/8 and d/2 (a small model,
    e.g. d = 64: 1, 2, 8, 32), never k = d, where all energies are 1."""
    available = sorted({k for v in views for k in v.ks if k < v.hidden_size})
    if not available:
        return []
    seed_targets = [32, 128, 512, 2048]
    present = [k for k in seed_targets if k in available]
    if len(present) == len(seed_targets):
        return present
    d = max(v.hidden_size for v in views)
    targets = [d / 128, d / 32, d / 8, d / 2]
    nearest = [min(available, key=lambda x: (abs(math.log2(x) - math.log2(max(t, 1))), -x)) for t in targets]
    return sorted(set(nearest))
