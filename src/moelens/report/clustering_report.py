"""Report sections of calibration, expert clustering and merge cost (docs/methods.md §3).

- calibration runs: what usage frequency and the expert features are, each run's setup, its
  usage figure and per-layer table;
- clustering runs: HC-SMoE and M-SMoE explained, each run's setup, cluster map, usage by cluster
  and per-layer clusters;
- merge-cost runs: fact recall and held-out perplexity of the original model and of every merged
  variant (each clustering with and without permutation alignment), with their changes.
"""

from __future__ import annotations

import math
from typing import Sequence

from markupsafe import Markup

from moelens.ranges import compact_ranges
from moelens.report.cells import Cell, Table, integer, number, settings_table, text
from moelens.report.embed import embed
from moelens.report.section import RunPart, Section, footer_items, run_warnings
from moelens.results import Run

METHOD_NAMES = {"hc-smoe": "HC-SMoE", "m-smoe": "M-SMoE", "none": "original (not merged)"}
#: Clusters are listed member by member up to this many experts per layer.
LIST_UP_TO = 16


def _calibration_items(run: Run) -> list[tuple[str, object]]:
    o = run.manifest.get("options", {})
    if o.get("calibration_run"):
        return [("calibration", f"reused from the run {o['calibration_run']}")]
    texts = o.get("texts") or o.get("calibration") or ""
    return [
        ("calibration text", texts),
        ("lines", f"{o.get('lines', '')} non-empty ({o.get('heldout_lines', '')} held out for perplexity)"),
        ("calibration tokens", f"{o.get('tokens', '')} in {o.get('sequences', '')} sequences (at most {o.get('max_tokens', '')})"),
        ("forward pass", f"{o.get('dtype', '')} on {o.get('device', '')}"),
        ("expert nonlinearity", run.manifest.get("activation", "")),
    ]


def _model_items(run: Run) -> list[tuple[str, object]]:
    model = run.model
    return [("model", model.get("name", "")), ("family", model.get("family", "")),
            ("experts, top-k", f"{model.get('n_experts', '')}, {model.get('top_k', '')}")]


# ----------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------
def usage_layers_table(run: Run) -> Table:
    table = Table(headers=["layer", "tokens", "experts used", "max f", "min f", "entropy (bits)", "top-k read from"],
                  caption="Usage per layer (f = share of the layer's top-k selections; uniform use has entropy log₂ E)")
    for r in run["calibration_layers"].itertuples(index=False):
        table.rows.append([integer(r.layer), integer(r.n_tokens), Cell(f"{int(r.used_experts)}/{int(r.n_experts)}"),
                           number(r.max_frequency, 4), number(r.min_frequency, 4), number(r.usage_entropy, 3), text(r.routing)])
    return table


def calibration_section(runs: Sequence[Run], fmt: str) -> Section:
    from moelens.figures import clusters as figs
    from moelens.report.render import render

    parts = []
    for i, run in enumerate(runs, start=1):
        o = run.manifest.get("options", {})
        setup = settings_table(_model_items(run) + [("layers", compact_ranges(o.get("layers", [])))] + _calibration_items(run) + footer_items(run))
        fig = embed(figs.expert_usage(run), "expert_usage", f"calibration-run-{i}-usage", "Expert usage frequency",
                    f"Share of each layer's top-k selections per expert in {run.label}", fmt, run=run)
        parts.append(RunPart(i, f"calibration-run-{i}", run.label, setup, [usage_layers_table(run)], [fig], run_warnings(run.manifest)))
    html = render("parts_section.html", analysis="calibration", heading="Usage", table_class="detail", runs=parts)
    toc = [("calibration-explanations", "What calibration records")] + [(p.id, f"Run {p.number}: {p.label}") for p in parts]
    summary = "; ".join(f"{r.manifest.get('options', {}).get('tokens', '?')} tokens, mean usage entropy "
                        f"{r['calibration_layers']['usage_entropy'].mean():.2f} bits" for r in runs)
    return Section("calibration", "Calibration", Markup(html), toc, summary)


# ----------------------------------------------------------------------------------------------
# Clustering
# ----------------------------------------------------------------------------------------------
def cluster_text(rows, sep: str = ", ") -> str:
    """``{0*, 2, 5} {1*}`` (``*`` the dominant expert; members joined by ``sep``) or, for layers
    of more than ``LIST_UP_TO`` experts, the cluster sizes."""
    rows = rows.sort_values("expert")
    if len(rows) > LIST_UP_TO:
        sizes = rows.groupby("cluster").size().sort_values(ascending=False)
        return "sizes " + " ".join(str(int(s)) for s in sizes)
    parts = []
    for _, members in rows.groupby("cluster", sort=True):
        parts.append("{" + sep.join(f"{int(m.expert)}{'*' if m.dominant else ''}" for m in members.itertuples(index=False)) + "}")
    return " ".join(parts)


def clusters_table(run: Run) -> Table:
    clusters = run["clusters"]
    table = Table(headers=["layer", "G", "largest", "singletons", "dominant share", "clusters (* dominant)"],
                  caption="Clusters per layer (dominant share = usage of the dominant experts)")
    for r in run["cluster_layers"].itertuples(index=False):
        table.rows.append([integer(r.layer), integer(r.groups), integer(r.largest), integer(r.singletons),
                           number(r.dominant_frequency, 3), Cell(cluster_text(clusters[clusters["layer"] == r.layer]), "text")])
    return table


def clustering_setup(run: Run) -> Table:
    o = run.manifest.get("options", {})
    method = o.get("method", "")
    items = _model_items(run) + [
        ("method", METHOD_NAMES.get(method, method)),
        ("groups per layer", f"G = {o['groups']}" if o.get("groups") is not None else f"G = E − round({o.get('ratio')}·E)"),
    ]
    if method == "hc-smoe":
        items += [("linkage, distance", f"{o.get('linkage')}, {o.get('distance')}"), ("dominant", "the most used member of each cluster")]
    else:
        items += [("budget", "global (MC-SMoE's usage threshold across layers)" if o.get("budget") == "global" else "G in every layer"),
                  ("dominant", "the G most used experts")]
    items += [("layers", compact_ranges(o.get("layers", [])))] + _calibration_items(run) + footer_items(run)
    return settings_table(items)


def clustering_section(runs: Sequence[Run], fmt: str) -> Section:
    from moelens.figures import clusters as figs
    from moelens.report.render import render

    parts = []
    for i, run in enumerate(runs, start=1):
        figures = [
            embed(figs.cluster_map(run), "cluster_map", f"clustering-run-{i}-map", "Cluster map",
                  f"Experts × layers of {run.label}, coloured by cluster, dominant experts dotted", fmt, run=run),
            embed(figs.cluster_usage(run), "cluster_usage", f"clustering-run-{i}-usage", "Usage by cluster",
                  f"Usage frequency per expert in selected layers of {run.label}, coloured by cluster", fmt, run=run),
        ]
        parts.append(RunPart(i, f"clustering-run-{i}", run.label, clustering_setup(run), [clusters_table(run)], figures,
                             run_warnings(run.manifest)))
    html = render("parts_section.html", analysis="clustering", heading="Clusters", table_class="detail", runs=parts)
    toc = [("clustering-explanations", "Plot explanations")] + [(p.id, f"Run {p.number}: {p.label}") for p in parts]
    summary = "; ".join(
        f"{METHOD_NAMES.get(r.manifest.get('options', {}).get('method'), '?')} G "
        f"{compact_ranges(sorted(set(int(g) for g in r['cluster_layers']['groups'])))} over {len(r['cluster_layers'])} layer(s), "
        f"largest cluster {int(r['cluster_layers']['largest'].max())}" for r in runs)
    return Section("expert-clustering", "Expert clustering", Markup(html), toc, summary)


# ----------------------------------------------------------------------------------------------
# Merge cost
# ----------------------------------------------------------------------------------------------
def _signed(value: float, digits: int) -> Cell:
    if value is None or not math.isfinite(float(value)):
        return Cell("", "num empty")
    v = float(value)
    return Cell(f"{v:+.{digits}f}".replace("-", "−") if round(v, digits) != 0 else f"{0:.{digits}f}")


def merge_cost_table(run: Run) -> Table:
    cost = run["merge_cost"].set_index("variant")
    table = Table(headers=["variant", "method", "permutation", "form", "G", "fact recall ↑", "Δ recall", "perplexity ↓", "× perplexity"],
                  caption="Before (original) and after merging")
    for r in run["merge_cost_summary"].itertuples(index=False):
        c = cost.loc[r.variant]
        groups = str(int(c.groups_min)) if c.groups_min == c.groups_max else f"{int(c.groups_min)}–{int(c.groups_max)}"
        table.rows.append([
            Cell(variant_name(r.method, bool(r.permute)) if r.method != "none" else "original", "text", title=r.variant),
            text(METHOD_NAMES.get(r.method, r.method)), text("—" if r.method == "none" else ("on" if r.permute else "off")),
            text("—" if r.method == "none" else c.export), Cell(groups), number(r.recall, 3), _signed(r.recall_delta, 3),
            number(r.perplexity, 3), number(r.perplexity_ratio, 3),
        ])
    o = run.manifest.get("options", {})
    table.note = (f"Fact recall over {o.get('n_facts', 0)} facts; perplexity over {int(run['merge_cost']['n_tokens'].iloc[0])} predicted "
                  f"tokens of {o.get('heldout_lines', 0)} held-out lines.")
    return table


def _measures(recall: float, perplexity: float) -> str:
    """``recall 0.839, perplexity 2.69``, leaving out what a run did not measure (NaN)."""
    parts = [f"recall {recall:.3f}"] if math.isfinite(recall) else []
    parts += [f"perplexity {perplexity:.2f}"] if math.isfinite(perplexity) else []
    return ", ".join(parts)


def variant_name(method: str, permute: bool) -> str:
    """How a merged variant is named for a reader: ``HC-SMoE``, ``HC-SMoE, permuted``."""
    return METHOD_NAMES.get(method, method) + (", permuted" if permute and method != "none" else "")


def merge_cost_headline(run: Run) -> str:
    """The original's recall and perplexity, each merged variant's (display names), and which keeps
    the most recall and which the lowest perplexity, each criterion named (they may differ)."""
    s = run["merge_cost_summary"]
    base = s[s["variant"] == "original"].iloc[0]
    merged = s[s["variant"] != "original"]
    line = "original " + _measures(base.recall, base.perplexity)
    if merged.empty:
        return line
    names = {r.variant: variant_name(r.method, bool(r.permute)) for r in merged.itertuples(index=False)}
    each = []
    for r in merged.itertuples(index=False):
        ratio = f" (×{r.perplexity_ratio:.2f})" if math.isfinite(r.perplexity_ratio) else ""
        each.append(f"{names[r.variant]} {_measures(r.recall, r.perplexity)}{ratio}")
    line += "; merged: " + "; ".join(each)
    best = []
    if merged["recall"].notna().any():
        top = merged.loc[merged["recall"].idxmax()]
        best.append(("most recall kept", names[top.variant]))
    if merged["perplexity"].notna().any():
        low = merged.loc[merged["perplexity"].idxmin()]
        best.append(("lowest perplexity", names[low.variant]))
    if len(best) == 2 and best[0][1] == best[1][1]:
        line += f"; most recall kept and lowest perplexity: {best[0][1]}"
    elif best:
        line += "; " + ", ".join(f"{what}: {who}" for what, who in best)
    return line


def merge_cost_section(runs: Sequence[Run], fmt: str) -> Section:
    from moelens.report.render import render

    parts = []
    for i, run in enumerate(runs, start=1):
        o = run.manifest.get("options", {})
        items = _model_items(run) + [
            ("clustering runs", ", ".join(o.get("clusters", []))),
            ("merged form", {"shared": "shared: E experts, every member given its cluster's merged weights (router unchanged)",
                             "compact": "compact: G experts per layer, router rows the members' usage-weighted mean"}.get(o.get("export"), o.get("export"))),
            ("facts", o.get("facts") or "none"), ("perplexity text", o.get("texts") or "none"),
            ("forward pass", f"{o.get('dtype', '')} on {o.get('device', '')}"),
        ] + footer_items(run)
        parts.append(RunPart(i, f"merge-cost-run-{i}", run.label, settings_table(items), [merge_cost_table(run)], [], run_warnings(run.manifest)))
    html = render("parts_section.html", analysis="merge_cost", heading="Before and after merging", table_class="summary", runs=parts)
    toc = [("merge-cost-explanations", "What is measured")] + [(p.id, f"Run {p.number}: {p.label}") for p in parts]
    pieces = [merge_cost_headline(run) for run in runs]
    return Section("merge-cost", "Merge cost", Markup(html), toc, "; ".join(pieces))


__all__ = ["calibration_section", "cluster_text", "clustering_section", "clusters_table", "merge_cost_section", "merge_cost_table"]
