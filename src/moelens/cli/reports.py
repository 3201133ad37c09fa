"""``report`` and ``figure``: runs in, HTML and figure files out."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from moelens.cli.app import app, command_help, console, human_bytes


def check_runs(runs: list[Path]) -> None:
    """Every RUN is a run directory, checked before pandas and matplotlib are imported, so that a
    mistyped path costs no start-up time (the same one-line error that loading it would give)."""
    from moelens.results.manifest import check_run_directory

    for run in runs:
        check_run_directory(run)


@app.command("report", help=command_help("report"))
def report_command(
    runs: list[Path] = typer.Argument(..., metavar="RUN", help="Run directories (the --out of `moelens align`, `distance`, …), in this order; one section per analysis."),
    out: Path = typer.Option(Path("report.html"), "--out", help="HTML file to write (self-contained, opens offline)."),
    title: Optional[str] = typer.Option(None, help="Title of the report (default: from the runs)."),
    figure_format: str = typer.Option("svg", "--figures", help="Figure format inside the report: svg or png."),
) -> None:
    """The ``report`` command (its help: :data:`moelens.cli.commands.LAZY_COMMANDS`)."""
    check_runs(runs)
    from moelens.report import report

    path = report(runs, out, title=title, figure_format=figure_format)
    console.print(f"wrote [bold]{escape(str(path))}[/] ({human_bytes(path.stat().st_size)}, {len(runs)} run{'s' if len(runs) != 1 else ''})", highlight=False)


def _figure_help() -> str:
    from moelens.figures.catalog import FIGURES

    by_analysis: dict[str, list[str]] = {}
    for name, entry in FIGURES.items():
        by_analysis.setdefault(entry.analysis, []).append(name + (" (one run)" if entry.one_run else ""))
    return "Figure name. " + "; ".join(f"{analysis} runs: {', '.join(names)}" for analysis, names in by_analysis.items()) + "."


@app.command("figure", help=command_help("figure"))
def figure_command(
    name: str = typer.Argument(..., metavar="FIGURE", help=_figure_help()),
    runs: list[Path] = typer.Argument(..., metavar="RUN", help="Run directories (one for the figures marked 'one run')."),
    out: Path = typer.Option(..., "--out", help="File to write; the suffix picks the format: .png, .svg or .pdf."),
    k: Optional[int] = typer.Option(None, "--k", help="k of null_distribution, per_expert_breakdown and complete_analysis (nearest stored k)."),
    metric: Optional[str] = typer.Option(None, help="Metric of layer_k_heatmap (align, delta_vs_shuffle, z_vs_shuffle, z_layer, …) or of module_heatmap / module_lines (corr, cos, rel_l2, cka, changed_frac, fro_norm, spectral_norm, stable_rank, effective_rank, alpha)."),
    model: Optional[str] = typer.Option(None, help="Rows of module_heatmap / module_lines: pair, pair_delta, a or b (default: pair for a pair metric, a otherwise)."),
    matrix: Optional[str] = typer.Option(None, help="Matrix of the expert_distance figures: expert (default), gate, up or down."),
    measure: Optional[str] = typer.Option(None, help="Measure of expert_distance_heatmap: sv_align (default) or rel_l2."),
    layers: Optional[str] = typer.Option(None, help="Layers of expert_distance_heatmap, e.g. 0,12,23 (default: first, middle, last); the one layer of route_migration."),
    mode: Optional[str] = typer.Option(None, help="Mode of trace_heatmap: knockout, restore or block (default: the run's)."),
    token_kind: Optional[str] = typer.Option(None, "--token-kind", help="Token group of trace_heatmap for restore runs (default: last_subject)."),
    dpi: int = typer.Option(300, help="Resolution of PNG output (and of heat maps inside SVG and PDF)."),
) -> None:
    """The ``figure`` command (its help: :data:`moelens.cli.commands.LAZY_COMMANDS`)."""
    check_runs(runs)
    from moelens import figures
    from moelens.ranges import parse_ranges
    from moelens.results import load_runs

    options = {"matrix": matrix, "measure": measure, "layers": parse_ranges(layers) if layers else None, "model": model,
               "mode": mode, "token_kind": token_kind}
    fig = figures.draw(name, load_runs(runs), k=k, metric=metric, **options)
    path = figures.save(fig, out, dpi=dpi)
    console.print(f"wrote [bold]{escape(str(path))}[/]", highlight=False)
