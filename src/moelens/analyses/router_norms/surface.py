"""What users see of the router-norms analysis: its figure, report section, command summary and
atlas runs. Each is named by the declaration (``"module:function"``) and imported only when
drawn, shown or run; this module may use the figure, report, atlas and command-line helpers,
which the computation in :mod:`.analysis` never imports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from moelens.analyses.router_norms.analysis import ANALYSIS
from moelens.ranges import compact_ranges
from moelens.results.run import Run

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from moelens.atlas import AtlasInputs, Call
    from moelens.report.section import Section


def router_norm_heatmap(run: Run) -> Figure:
    """Relative router norm ‖r_e‖ / mean over the layer's experts, per MoE layer and expert."""
    import matplotlib.colors as mcolors

    from moelens.errors import ConfigError
    from moelens.figures.style import new_figure, style_context

    if run.manifest.get("analysis") != ANALYSIS:
        raise ConfigError(f"router_norm_heatmap draws router_norms runs, not {run.manifest.get('analysis')} runs")
    grid = run["router_norms"].pivot(index="layer", columns="expert", values="relative_norm")  # [layers, E]
    values = grid.to_numpy(dtype=np.float64)
    spread = float(np.nanmax(np.abs(values - 1.0))) if np.isfinite(values).any() else 0.0
    spread = max(spread, 1e-3)
    with style_context():
        fig = new_figure(min(9.0, 3.0 + 0.25 * values.shape[1]), min(8.0, 1.8 + 0.3 * values.shape[0]))
        ax = fig.add_subplot(1, 1, 1)
        image = ax.imshow(values, aspect="auto", cmap="RdBu_r", norm=mcolors.TwoSlopeNorm(1.0, 1.0 - spread, 1.0 + spread),
                          interpolation="nearest")
        ax.grid(False)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(grid.index)), [str(L) for L in grid.index])
        bar = fig.colorbar(image, ax=ax)
        bar.set_label("‖r_e‖ / layer mean")
        ax.set_title(f"Relative router norm · {run.label}")
    return fig


_SECTION = """{% from "macros.html" import figure, run_section, table %}
{% from "explanations.html" import explained %}
<section id="router-norms-explanations">
<h2>What is measured</h2>
{% call explained("router_norm_heatmap") %}
<p>The router's logit for expert <i>e</i> is
r<sub>e</sub> · x, so the L2 norm of its row r<sub>e</sub> scales every logit it gives. The heat map shows each row's norm divided
by the mean over its layer's experts: 1 (white) is an average row; red rows are longer and score every token more strongly,
blue rows shorter. The table gives each layer's mean, spread (coefficient of variation = std / mean) and extremes.</p>
{% endcall %}
</section>
{% for run in runs %}
{% call run_section(run) %}
<h3>Per layer</h3>
{{ table(run.layers, "summary") }}
{{ figure(run.figure) }}
{% endcall %}
{% endfor %}
"""


@dataclass
class _RunPart:
    number: int
    id: str
    label: str
    setup: Any
    layers: Any
    figure: Any
    warnings: list[str]


def section(runs: Sequence[Run], fmt: str) -> Section:
    """The report's router-norms section: what is measured, then per run its setup, a table per
    layer and the heat map."""
    from markupsafe import Markup

    from moelens.report.cells import Cell, Table, integer, number, text
    from moelens.report.embed import embed
    from moelens.report.render import environment
    from moelens.report.section import Section

    parts = []
    for i, run in enumerate(runs, start=1):
        m = run.manifest
        setup = Table(headers=["setting", "value"], rows=[
            [Cell("model", "key"), text((m.get("inputs", {}).get("a") or {}).get("name", ""))],
            [Cell("layers", "key"), text(compact_ranges(m.get("options", {}).get("layers", [])))],
            [Cell("moelens version", "key"), text((m.get("versions") or {}).get("moelens", ""))],
            [Cell("run directory", "key"), text(str(run.path) if run.path else "")],
        ])
        layers = Table(headers=["layer", "experts", "mean ‖r_e‖", "std", "cv", "min", "max"])
        for r in run["router_norms_layers"].itertuples(index=False):
            layers.rows.append([integer(r.layer), integer(r.n_experts), number(r.mean_norm, 4), number(r.std_norm, 4), number(r.norm_cv, 4),
                                number(r.min_norm, 4), number(r.max_norm, 4)])
        fig = embed(router_norm_heatmap(run), "router_norm_heatmap", f"router-norms-run-{i}-heat", "Relative router norm",
                    f"router row norm over the layer mean, per layer and expert, {run.label}", fmt, run=run)
        warnings = [w for unit in sorted((m.get("warnings") or {})) for w in m["warnings"][unit]]
        parts.append(_RunPart(i, f"router-norms-run-{i}", run.label, setup, layers, fig, warnings))
    html = environment().from_string(_SECTION).render(runs=parts)
    toc = [("router-norms-explanations", "What is measured")] + [(p.id, f"Run {p.number}: {p.label}") for p in parts]
    summary = "; ".join(f"{run.label}: cv of router norms {run['router_norms_layers']['norm_cv'].mean():.3f} (mean over layers)" for run in runs)
    return Section("router-norms", "Router norms", Markup(html), toc, summary)


def show(run: Run, values: Mapping[str, Any]) -> None:
    """``moelens norms``: the spread of the router norms per layer."""
    from rich.markup import escape
    from rich.table import Table

    from moelens.cli.analyses import cell, console, print_warnings

    table = Table(title=escape(f"{run.label} · router row norms ‖r_e‖₂ per layer"), title_justify="left")
    for col in ("layer", "experts", "mean", "std", "cv", "min", "max"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in run["router_norms_layers"].itertuples(index=False):
        table.add_row(str(int(r.layer)), str(int(r.n_experts)), *[cell(float(v), ".4f") for v in (r.mean_norm, r.std_norm, r.norm_cv, r.min_norm, r.max_norm)])
    console.print(table)
    print_warnings(run)
    console.print(f"wrote [bold]{escape(str(values['out']))}[/]: manifest.json, router_norms.parquet, router_norms_layers.parquet", highlight=False)


def atlas_calls(given: AtlasInputs) -> list[Call]:
    """The atlas measures the router norms of every MoE model."""
    from moelens.atlas import Call

    return [Call(f"router-norms-{key}", ANALYSIS, {"model": m}, cost=0.5) for key, m in given.models.items()] if given.moe else []


__all__ = ["atlas_calls", "router_norm_heatmap", "section", "show"]
