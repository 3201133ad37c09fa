"""The router-edits section of a report (docs/methods.md §8): the headline (how many times more the
aligned part moves routing than a random part of equal norm), a table per (edit, k) and the
figures: routed share against k, the JSD heat map and the transplant migration matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from markupsafe import Markup

from moelens.report.cells import Cell, Table, settings_table, text
from moelens.report.embed import EmbeddedFigure, embed
from moelens.report.section import Section, run_warnings
from moelens.results import Run


@dataclass
class RouteRun:
    number: int
    id: str
    label: str
    headline: str
    summary: Table
    figures: list[EmbeddedFigure]
    warnings: list[str]
    setup: Table | None = None


def setup_table(run: Run) -> Table:
    from moelens.ranges import compact_ranges

    m, o = run.manifest, run.manifest.get("options", {})
    items = [("model", (m.get("inputs", {}).get("a") or {}).get("name", "")), ("prompts", f"{o.get('n_prompts', '')} from {o.get('prompts', '')}"),
             ("layers", compact_ranges(o.get("layers", []))), ("experts", compact_ranges(o.get("experts", []))),
             ("edits", ", ".join(o.get("edits", []))), ("k", ", ".join(str(k) for k in o.get("k", []))), ("matrix", o.get("matrix", "")),
             ("random samples", o.get("samples", "")), ("seed", o.get("seed", "")), ("device", o.get("device", "")), ("dtype", o.get("dtype", "")),
             ("date", m.get("created", "")), ("run directory", str(run.path) if run.path else "")]
    return settings_table(items)


def summary_table(run: Run) -> Table:
    """Mean over layers, experts (and samples) per (edit, k)."""
    t = run["router_edits"]
    t = t.assign(change=(t["routed_before"] - t["routed_after"]).abs())
    grid = t.groupby(["edit", "k"], sort=False).agg(removed=("removed_norm", "mean"), change=("change", "mean"),
                                                   changed=("topk_changed", "mean"), jsd=("jsd", "mean"), kl=("kl", "mean")).reset_index()
    table = Table(headers=["edit", "k", "removed_norm", "|Δ routed share|", "topk_changed", "JSD (bits)", "KL (bits)"])
    for r in grid.itertuples(index=False):
        table.rows.append([Cell(r.edit, "key"), text(str(int(r.k)) if r.k else "–"), text(f"{r.removed:.4f}"), text(f"{r.change:.4f}"),
                           text(f"{r.changed:.4f}"), text(f"{r.jsd:.2e}"), text(f"{r.kl:.2e}")])
    return table


def _figures(run: Run, number: int, fmt: str) -> list[EmbeddedFigure]:
    from moelens.figures import router_edits as figs

    edits = set(run["router_edits"]["edit"])
    out = []
    if "project_out" in edits:
        out.append(embed(figs.route_routed_share(run), "route_routed_share", f"route-run-{number}-share", "Routed share after project_out vs random",
                         f"share of top-k slots to the edited expert against k, {run.label}", fmt, run=run))
        out.append(embed(figs.route_jsd_heatmap(run), "route_jsd_heatmap", f"route-run-{number}-jsd", "JSD of project_out by layer and k",
                         f"mean JSD in bits of project_out per layer and k with random's mean, {run.label}", fmt, run=run))
    if "transplant" in edits and len(run["router_edits_migration"]):
        out.append(embed(figs.route_migration(run), "route_migration", f"route-run-{number}-migration", "Transplant migration matrix",
                         f"where the edited expert's former tokens go after a transplant, {run.label}", fmt, run=run))
    return out


def route_section(runs: Sequence[Run], fmt: str) -> Section:
    from moelens.figures.router_edits import headline_text
    from moelens.report.render import render

    runs = list(runs)
    parts = [RouteRun(i, f"route-run-{i}", run.label, headline_text(run), summary_table(run), _figures(run, i, fmt), run_warnings(run.manifest), setup_table(run))
             for i, run in enumerate(runs, start=1)]
    html = render("router_edits_section.html", runs=parts)
    toc = [("route-explanations", "Plot explanations")] + [(p.id, f"Run {p.number}: {p.label}") for p in parts]
    return Section("router-edits", "Router edits", Markup(html), toc, " ".join(p.headline for p in parts))


__all__ = ["route_section", "setup_table", "summary_table"]
