"""The module-metrics section of a report (seed 002): explanations, per run the layer × module heat
map of each metric, line plots per module, setup and warnings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from markupsafe import Markup

from moelens.ranges import compact_ranges
from moelens.report.cells import Table, settings_table
from moelens.report.embed import EmbeddedFigure, embed
from moelens.report.section import Section, footer_items, run_warnings
from moelens.results import Run

PAIR_ORDER = ("corr", "cos", "rel_l2", "cka", "changed_frac")
SINGLE_ORDER = ("stable_rank", "effective_rank", "alpha", "spectral_norm", "fro_norm")
MODEL_TITLES = {"pair": "A vs B", "pair_delta": "deltas: (A − base) vs (B − base)", "a": "model A", "b": "model B"}
GROUP_TITLES = {"pair": "A vs B", "pair_delta": "Deltas: (A − base) vs (B − base)", "a": "Model A", "b": "Model B"}


@dataclass
class FigureGroup:
    title: str
    heatmaps: list[EmbeddedFigure]
    lines: list[EmbeddedFigure] = field(default_factory=list)


@dataclass
class ModulesRun:
    number: int
    id: str
    label: str
    setup: Table
    groups: list[FigureGroup]
    warnings: list[str]


def setup_table(run: Run) -> Table:
    m, o = run.manifest, run.manifest.get("options", {})
    inputs = m.get("inputs", {})
    items = [(f"model {name}", (info or {}).get("name", "")) for name, info in inputs.items()]
    items += [
        ("family", (inputs.get("a") or {}).get("family", "")),
        ("layers", compact_ranges(o.get("layers", []))),
        ("pair metrics", ", ".join(o.get("metrics", [])) or "none (one model)"),
        ("single-model metrics", ", ".join(o.get("single", []))),
        ("changed_frac tolerance", o.get("tol", "")),
        ("device", o.get("device", "")), *footer_items(run),
    ]
    return settings_table(items)


def _groups(run: Run, number: int, fmt: str) -> list[FigureGroup]:
    from moelens.figures import modules as figs

    table = run["module_metrics"]
    groups = []
    for model in ("pair", "pair_delta", "a", "b"):
        present = set(table.loc[table["model"] == model, "metric"])
        order = PAIR_ORDER if model.startswith("pair") else SINGLE_ORDER
        metrics = [m for m in order if m in present] + sorted(present - set(order))
        if not metrics:
            continue
        heat, lines = [], []
        for metric in metrics:
            anchor = f"modules-run-{number}-{model}-{metric}".replace("_", "-")
            heat.append(embed(figs.module_heatmap(run, metric, model), "module_heatmap", f"{anchor}-heat",
                              f"{metric} ({MODEL_TITLES[model]})", f"{metric} of every module in every layer, {MODEL_TITLES[model]}, {run.label}", fmt, run=run))
            lines.append(embed(figs.module_lines(run, metric, model), "module_lines", f"{anchor}-lines",
                               f"{metric} against layer ({MODEL_TITLES[model]})", f"{metric} per module against layer, {MODEL_TITLES[model]}, {run.label}", fmt, run=run))
        groups.append(FigureGroup(GROUP_TITLES[model], heat, lines))
    return groups


def _summary_line(runs: Sequence[Run]) -> str:
    parts = []
    for run in runs:
        t = run["module_metrics"]
        pair = t[(t["model"] == "pair") & (t["metric"] == "corr")]
        if len(pair):
            lo = pair.groupby("module")["value"].mean().sort_values()
            parts.append(f"{run.label}: corr A vs B from {lo.iloc[0]:.3f} ({lo.index[0]}) to {lo.iloc[-1]:.3f} ({lo.index[-1]}), mean over layers")
        else:
            sr = t[(t["model"] == "a") & (t["metric"] == "stable_rank")]["value"]
            parts.append(f"{run.label}: mean stable rank {sr.mean():.2f} over {t['module'].nunique()} modules")
    return "; ".join(parts)


def modules_section(runs: Sequence[Run], fmt: str) -> Section:
    from moelens.report.render import render

    runs = list(runs)
    sections = [ModulesRun(i, f"modules-run-{i}", run.label, setup_table(run), _groups(run, i, fmt), run_warnings(run.manifest))
                for i, run in enumerate(runs, start=1)]
    html = render("modules_section.html", runs=sections)
    toc = [("modules-explanations", "Plot explanations")] + [(s.id, f"Run {s.number}: {s.label}") for s in sections]
    return Section("module-metrics", "Module metrics", Markup(html), toc, _summary_line(runs))


__all__ = ["modules_section", "setup_table"]
