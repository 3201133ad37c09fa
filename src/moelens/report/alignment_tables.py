"""The tables of the router–expert alignment section, as formatted text cells (:mod:`moelens.report.cells`).

Numbers print with 6 decimals, as in the seed report. A value that does not exist prints as
an empty cell: cos²θ at k ≠ 1 (it is a k = 1 quantity, not 0), and z where σ = 0 (at k = d
every energy is 1, so z is undefined); the table's note says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from moelens.figures.alignment_data import NULL_DESCRIPTIONS, AlignmentView
from moelens.ranges import compact_ranges
from moelens.report.cells import Cell, Table, integer, number, settings_table, text


def _mean_by_k(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    present = [c for c in columns if c in frame.columns]
    return frame.groupby("k")[present].mean()


SUMMARY_COLUMNS = ("align", "delta_vs_shuffle", "z_vs_shuffle", "effect_over_random")


def summary_table(view: AlignmentView, layer: Optional[int] = None) -> Table:
    """The seed's summary: per k, align, Δ, z and effect averaged over experts (and layers), and
    the mean cos²θ on the k = 1 row only."""
    experts = view.experts if layer is None else view.experts[view.experts["layer"] == layer]
    means = _mean_by_k(experts, SUMMARY_COLUMNS)
    cos = view.cos_squared()
    if cos is not None and layer is not None:
        cos = cos[cos["layer"] == layer]
    table = Table(headers=["k", *SUMMARY_COLUMNS, "cos_squared"])
    for k, row in means.iterrows():
        cos_cell = number(cos["cos_squared"].mean()) if (k == 1 and cos is not None) else Cell("", "num empty", "cos²θ is the k = 1 value")
        table.rows.append([integer(k), *(number(row.get(c)) for c in SUMMARY_COLUMNS), cos_cell])
    over = "experts" if layer is not None or not view.multi_layer else f"experts and the {len(view.layer_ids)} layers"
    table.caption = f"Averaged across {over}" + (f" (layer {layer})" if layer is not None else "")
    if means["z_vs_shuffle"].isna().any():
        table.note = "An empty z: σ = 0 at that k (every energy equals 1 at k = d), so z is undefined. cos_squared is a k = 1 quantity."
    else:
        table.note = "cos_squared is a k = 1 quantity, left empty on the other rows."
    return table


@dataclass
class CosSquaredStats:
    mean: Cell
    max: Cell
    min: Cell
    std: Cell
    per_expert: Table


def cos_squared_stats(view: AlignmentView) -> Optional[CosSquaredStats]:
    """Mean, max, min and (sample) std of cos²θ over the run's experts, and the per-expert values."""
    cos = view.cos_squared()
    if cos is None:
        return None
    values = cos["cos_squared"]
    headers = (["layer"] if view.multi_layer else []) + ["expert", "cos²θ", "align (k = 1)"]
    per_expert = Table(headers=headers)
    for _, row in cos.iterrows():
        cells = ([integer(row["layer"])] if view.multi_layer else []) + [integer(row["expert"]), number(row["cos_squared"]), number(row.get("align"))]
        per_expert.rows.append(cells)
    return CosSquaredStats(number(values.mean()), number(values.max()), number(values.min()), number(values.std(ddof=1)), per_expert)


def permutation_table(view: AlignmentView, by_layer: bool) -> Table:
    """The z of the run's null (mean over experts) beside the layer permutation test, per k (and layer)."""
    layers = view.layers
    if by_layer or not view.multi_layer:
        table = Table(headers=(["layer"] if view.multi_layer else []) + ["k", "mean z_vs_shuffle", "z_layer", "p_layer", "argmax accuracy"])
        for _, row in layers.sort_values(["layer", "k"]).iterrows():
            table.rows.append(([integer(row["layer"])] if view.multi_layer else []) + [
                integer(row["k"]), number(row["z_vs_shuffle"]), number(row["z_layer"]), number(row["p_layer"]), number(row["argmax_accuracy"])])
        return table
    table = Table(headers=["k", "mean z_vs_shuffle", "mean z_layer", "median p_layer", "layers with p_layer < 0.05", "mean argmax accuracy"])
    for k, group in layers.groupby("k"):
        significant = int((group["p_layer"] < 0.05).sum())
        p_known = bool(group["p_layer"].notna().any())
        table.rows.append([integer(k), number(group["z_vs_shuffle"].mean()), number(group["z_layer"].mean()),
                           number(group["p_layer"].median()), Cell(f"{significant} of {len(group)}" if p_known else ""),
                           number(group["argmax_accuracy"].mean())])
    table.caption = f"Over the run's {len(view.layer_ids)} layers; every layer below."
    return table


#: Per-expert columns of the detailed tables, in this order, where the run has them.
DETAIL_COLUMNS = ("align", "random_expect_k_over_d", "effect_over_random", "delta_vs_shuffle", "z_vs_shuffle", "margin")


@dataclass
class KDetail:
    k: int
    headline: str
    table: Table


def detail_by_k(view: AlignmentView) -> list[KDetail]:
    """One per-expert table per k, headed by the null's μ, σ and the layer test."""
    out = []
    for k, rows in view.experts.groupby("k", sort=True):
        table = Table(headers=(["layer"] if view.multi_layer else []) + ["expert", *DETAIL_COLUMNS])
        for _, row in rows.sort_values(["layer", "expert"]).iterrows():
            cells = ([integer(row["layer"])] if view.multi_layer else []) + [integer(row["expert"])] + [number(row[c]) for c in DETAIL_COLUMNS]
            table.rows.append(cells)
        stats = view.layers[view.layers["k"] == k]
        parts = [f"mean align {rows['align'].mean():.6f}", f"null μ {stats['shuffle_mean'].mean():.6f}", f"σ {stats['shuffle_std'].mean():.6f}"]
        if stats["z_layer"].notna().any():
            parts.append(f"z_layer {stats['z_layer'].mean():.3f}")
        if stats["p_layer"].notna().any():
            parts.append(f"p_layer {stats['p_layer'].median():.6f}")
        headline = ", ".join(parts) + (" (means over layers; p: median)" if view.multi_layer else "")
        out.append(KDetail(int(k), headline, table))
    return out


def _short_hash(files: Any) -> str:
    if isinstance(files, dict) and files:
        return f"{len(files)} file(s), sha256 {str(next(iter(files.values())))[:12]}…"
    return ""


def setup_table(view: AlignmentView) -> Table:
    """What the run is: model, layers, matrix, method, k list, null, shuffles, seed, experts, date."""
    manifest, options = view.manifest, view.options
    model = view.run.model
    versions = manifest.get("versions", {}) or {}
    ks = options.get("k") or view.ks
    items = [
        ("model", view.model_name),
        ("source", model.get("source", "")),
        ("family", model.get("family", "")),
        ("layers", compact_ranges(view.layer_ids)),
        ("matrix", view.matrix or options.get("matrix", "")),
        ("method", options.get("method", "")),
        ("k values", ", ".join(str(int(k)) for k in ks)),
        ("null", NULL_DESCRIPTIONS.get(view.null, view.null)),
        ("shuffles", f"{options.get('shuffles')} sampled permutations per k" if view.null == "shuffle-sampled" else "none: exact moments"),
        ("layer test p-value", ", ".join(sorted(set(view.layers["p_layer_method"].dropna()))) if "p_layer_method" in view.layers.columns else ""),
        ("seed", manifest.get("seed", options.get("seed", ""))),
        ("experts E", view.n_experts),
        ("hidden size d", view.hidden_size),
        ("expert FFN F", model.get("expert_ffn", "")),
        ("status", manifest.get("status", "")),
        ("date", manifest.get("created") or ""),
        ("moelens version", versions.get("moelens", "")),
        ("input files", _short_hash(model.get("files"))),
        ("run directory", str(view.run.path) if view.run.path else ""),
    ]
    return settings_table(items, skip_empty=True)


def runs_overview(views: Sequence[AlignmentView]) -> Table:
    """One line per run for the report's opening: label, layers, matrix, E, d and align at k = 1."""
    table = Table(headers=["run", "model", "layers", "matrix", "null", "E", "d", "mean cos²θ", "mean z_vs_shuffle (k nearest 128)"])
    for i, view in enumerate(views, start=1):
        cos = view.cos_squared()
        k = view.nearest_k(128, below_d=True)
        z = view.experts.loc[view.experts["k"] == k, "z_vs_shuffle"].mean()
        table.rows.append([Cell(f"{i}. {view.label}", "text"), text(view.model_name), text(compact_ranges(view.layer_ids)),
                           text(view.matrix or view.options.get("matrix", "")), text(view.null), integer(view.n_experts),
                           integer(view.hidden_size),
                           number(cos["cos_squared"].mean() if cos is not None else np.nan),
                           Cell(f"{z:.6f} (k = {k})" if math.isfinite(z) else "")])
    return table
