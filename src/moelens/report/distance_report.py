"""The expert-distance section of a report: explanations, the seed figure, per-run tables.

Follows seeds 000/001: one figure with every pairing (solid = sv_align, dashed = rel_l2, band =
q25–q75 over pairs), then per run its setup, a summary per matrix, the per-layer spread, the
experts × experts heat maps of a within-layer run, and the warnings it recorded.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from markupsafe import Markup

from moelens.ranges import compact_ranges
from moelens.report.cells import Cell, Table, integer, number, settings_table, text
from moelens.report.embed import embed
from moelens.report.section import RunPart, Section, footer_items, run_warnings
from moelens.results import Run

MATRIX_ORDER = ("expert", "gate", "up", "down")
PAIRING_NAMES = {"base-tuned": "base → tuned (expert e with e)", "within": "within a layer (every pair i < j)",
                 "hc-smoe": "HC-SMoE clusters (every pair of members)", "m-smoe": "M-SMoE clusters (each member with its dominant expert)",
                 "hc-smoe-permuted": "HC-SMoE clusters, members permuted onto the dominant expert",
                 "m-smoe-permuted": "M-SMoE clusters, members permuted onto the dominant expert"}


def _matrices(runs: Sequence[Run]) -> list[str]:
    present = set().union(*(set(r["expert_distance_layers"]["matrix"]) for r in runs))
    return [m for m in MATRIX_ORDER if m in present]


def setup_table(run: Run) -> Table:
    m, o = run.manifest, run.manifest.get("options", {})
    inputs = m.get("inputs", {})
    items = [("model A", (inputs.get("a") or {}).get("name", ""))]
    if "b" in inputs:
        items.append(("model B", inputs["b"].get("name", "")))
    items += [
        ("family", (inputs.get("a") or {}).get("family", "")),
        ("pairing", PAIRING_NAMES.get(o.get("pairing"), o.get("pairing", ""))),
        ("layers", compact_ranges(o.get("layers", []))),
        ("matrices", ", ".join(o.get("matrices", []))),
        ("kept singular values", f"top {o['top_sv']}" if o.get("top_sv") else f"σ_i ≥ {o.get('gamma')}·σ_1"),
        ("sv_align of the expert", "mean over matrices" if o.get("pool") == "mean" else "Ito's pooled ratio Σ n_m R_m / Σ n_m"),
        ("dtype", o.get("dtype", "")), ("device", o.get("device", "")),
        *footer_items(run),
    ]
    return settings_table(items)


def summary_table(run: Run) -> Table:
    """Per matrix: the mean over layers of the per-layer mean, and the range of layer means."""
    layers = run["expert_distance_layers"]
    table = Table(headers=["matrix", "pairs per layer", "rel_l2 ↓ (mean)", "rel_l2 layer range", "sv_align ↑ (mean)", "sv_align layer range"],
                  caption="Means over layers of each layer's mean over pairs")
    for matrix in [m for m in MATRIX_ORDER if m in set(layers["matrix"])]:
        part = layers[layers["matrix"] == matrix]
        cells = [text(matrix), integer(part["n"].max())]
        for measure in ("rel_l2", "sv_align"):
            means = part[part["measure"] == measure]["mean"]
            cells += [number(means.mean(), 4), Cell(f"{means.min():.4f} – {means.max():.4f}" if means.notna().any() else "")]
        table.rows.append(cells)
    return table


def per_layer_table(run: Run, matrix: str = "expert") -> Table:
    layers = run["expert_distance_layers"]
    part = layers[layers["matrix"] == matrix]
    table = Table(headers=["layer", "pairs", "rel_l2 mean", "rel_l2 q25", "rel_l2 q75", "sv_align mean", "sv_align q25", "sv_align q75"],
                  caption=f"Spread over pairs per layer ({matrix})")
    for layer, group in part.groupby("layer", sort=True):
        by = {r.measure: r for r in group.itertuples(index=False)}
        row = [integer(layer), integer(by["rel_l2"].n)]
        for measure in ("rel_l2", "sv_align"):
            r = by[measure]
            row += [number(r.mean, 4), number(r.q25, 4), number(r.q75, 4)]
        table.rows.append(row)
    return table


def _summary_line(runs: Sequence[Run]) -> str:
    parts = []
    for run in runs:
        rows = run["expert_distance_layers"]
        rows = rows[rows["matrix"] == "expert"]
        means = rows.groupby("measure")["mean"].mean()
        pairing = run.manifest.get("options", {}).get("pairing", "")
        parts.append(f"{pairing}: rel_l2 {means.get('rel_l2', np.nan):.3f}, sv_align {means.get('sv_align', np.nan):.3f}")
    return "; ".join(parts) + " (mean over layers, whole experts)"


def distance_section(runs: Sequence[Run], fmt: str) -> Section:
    from moelens.figures import distance as figs
    from moelens.report.render import render

    runs = list(runs)
    n = len(runs)
    which = "the run" if n == 1 else f"all {n} runs"
    figures = [embed(figs.expert_distance(runs, matrix=m), "expert_distance", f"fig-expert-distance-{m}",
                     f"Expert distance per layer ({m if m != 'expert' else 'whole experts'})",
                     f"Mean sv_align (solid) and rel_l2 (dashed) per layer, band q25–q75 over pairs, for {which}", fmt)
               for m in _matrices(runs)]
    sections = []
    for i, run in enumerate(runs, start=1):
        heatmaps = []
        if "within" in set(run["expert_distance"]["pairing"]):
            for measure in ("sv_align", "rel_l2"):
                heatmaps.append(embed(figs.expert_distance_heatmap(run, measure=measure), "expert_distance_heatmap",
                                      f"distance-run-{i}-heatmap-{measure}", f"Experts × experts ({measure})",
                                      f"{measure} of every pair of experts in selected layers of {run.label}", fmt, run=run))
        sections.append(RunPart(i, f"distance-run-{i}", run.label, setup_table(run), [summary_table(run), per_layer_table(run)], heatmaps,
                                run_warnings(run.manifest)))
    html = render("distance_section.html", figures=figures, runs=sections, n_runs=n)
    toc = [("distance-explanations", "Plot explanations"), ("distance-comparison", "Distance per layer")]
    toc += [(s.id, f"Run {s.number}: {s.label}") for s in sections]
    return Section("expert-distance", "Expert distance", Markup(html), toc, _summary_line(runs))


__all__ = ["distance_section", "per_layer_table", "setup_table", "summary_table"]
