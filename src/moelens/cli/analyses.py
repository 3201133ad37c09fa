"""Analysis commands, their options derived from each analysis's config."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from moelens.cli.app import app, check_sources, command_help, console, progress_bar
from moelens.cli.options import (
    command_from_parameters,
    config_from_cli,
    config_parameters,
    executor_from_cli,
    executor_parameters,
)


def cell(value: float, fmt: str) -> str:
    """A table cell: blank for NaN (cos² outside k = 1, z where the null has no spread), and no
    sign on a value that rounds to zero."""
    if value != value:
        return ""
    text = format(value, fmt)
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _open(source: str, revision: Optional[str]):
    from moelens.checkpoint import open_model

    return open_model(source, revision)


SOURCE = inspect.Parameter(
    "source", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str,
    default=typer.Argument(..., metavar="MODEL", help="Checkpoint directory, or a repo id in the local Hugging Face cache."),
)
OUT = inspect.Parameter(
    "out", inspect.Parameter.KEYWORD_ONLY, annotation=Path,
    default=typer.Option(..., "--out", help="Run directory to write; an unfinished run there is resumed."),
)
REVISION = inspect.Parameter(
    "revision", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
    default=typer.Option(None, help="Revision (branch, tag or commit) of a cached repo."),
)


def show_alignment(run, values: dict) -> None:
    """``align``: the summary by k of every matrix (of every layer with ``--per-layer``)."""
    from moelens.analyses.router_alignment.tables import TABLES, summary_by_k
    from moelens.ranges import compact_ranges

    out = values["out"]
    opts = run.manifest["options"]
    rows = run["alignment_layers"]
    per_layer = values["per_layer"]
    groups = [(m, [L]) for L in opts["layers"] for m in opts["matrices"]] if per_layer else [(m, opts["layers"]) for m in opts["matrices"]]
    for m, Ls in groups:
        part = rows[(rows["matrix"] == m) & rows["layer"].isin(Ls)]
        where = f"layer {Ls[0]}" if len(Ls) == 1 else f"layers {compact_ranges(Ls)}, mean over layers, p_layer = max over layers"
        title = f"{escape(run.label)} · {m} · null {opts['null']} · averaged across {int(part['n_experts'].iloc[0])} experts ({where})"
        table = Table(title=title, title_justify="left")
        for col in ("k", "align", "delta_vs_shuffle", "z_vs_shuffle", "effect_over_random", "cos_squared", "z_layer", "p_layer"):
            table.add_column(col, justify="right", no_wrap=True)
        for r in summary_by_k(part).itertuples(index=False):
            table.add_row(
                str(int(r.k)), cell(r.align, ".6f"), cell(r.delta_vs_shuffle, ".6f"), cell(r.z_vs_shuffle, ".6f"),
                cell(r.effect_over_random, ".6f"), cell(r.cos_squared, ".6f"), cell(r.z_layer, ".6f"), cell(r.p_layer, ".3g"),
            )
        print_wide(table, 112)  # the seed's eight columns need ~110 characters
    print_warnings(run)
    console.print(f"wrote [bold]{escape(str(out))}[/]: manifest.json, " + ", ".join(f"{t}.parquet" for t in TABLES), highlight=False)


def print_wide(table: Table, columns: int) -> None:
    """Print ``table`` at least ``columns`` wide: never crop numbers to an 80-column pipe."""
    width = console.width
    console.width = max(width, columns)
    try:
        console.print(table)
    finally:
        console.width = width


def print_warnings(run) -> None:
    """The run's warnings (degenerate inputs), one line each, on stderr."""
    from moelens.cli.app import err_console

    for _unit, messages in sorted((run.manifest.get("warnings") or {}).items()):
        for message in messages:
            err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)




def show_distance(run, values: dict) -> None:
    """``distance``: whole experts' rel_l2 and sv_align per layer."""
    out = values["out"]
    layers = run["expert_distance_layers"]
    rows = layers[layers["matrix"] == "expert"]
    title = f"{run.label} · whole experts (pool {run.manifest['options']['pool']}) · mean [q25–q75] over pairs"
    table = Table(title=escape(title), title_justify="left")
    for col in ("layer", "pairs", "rel_l2 ↓", "sv_align ↑"):
        table.add_column(col, justify="right", no_wrap=True)
    for L, group in rows.groupby("layer", sort=True):
        by = {r.measure: r for r in group.itertuples(index=False)}
        cells = [f"{by[m].mean:.4f} [{by[m].q25:.4f}–{by[m].q75:.4f}]" if by[m].n else "" for m in ("rel_l2", "sv_align")]
        table.add_row(str(int(L)), str(int(by["rel_l2"].n)), *cells)
    console.print(table)
    print_warnings(run)
    console.print(f"wrote [bold]{escape(str(out))}[/]: manifest.json, expert_distance.parquet, expert_distance_layers.parquet", highlight=False)




def show_modules(run, values: dict) -> None:
    """``modules``: every metric's mean over layers per module."""
    out = values["out"]
    table = run["module_metrics"]
    pair = table[table["model"] == "pair"]
    shown, model = (pair, "pair") if len(pair) else (table[table["model"] == "a"], "a")
    metrics = list(dict.fromkeys(shown["metric"]))
    grid = shown.pivot_table(index="module", columns="metric", values="value", aggfunc="mean")
    from moelens.module_names import module_rank

    title = f"{run.label} · mean over layers ({'A vs B' if model == 'pair' else 'model A'})"
    out_table = Table(title=escape(title), title_justify="left")
    out_table.add_column("module", no_wrap=True)
    for metric in metrics:
        out_table.add_column(metric, justify="right", no_wrap=True)
    for module in sorted(grid.index, key=module_rank):
        out_table.add_row(module, *[cell(float(grid.loc[module, m]), ".4f") for m in metrics])
    print_wide(out_table, 16 + 16 * len(metrics))
    print_warnings(run)
    console.print(f"wrote [bold]{escape(str(out))}[/]: manifest.json, module_metrics.parquet, module_metrics_experts.parquet", highlight=False)




def show_trace(run, values: dict) -> None:
    """``trace``: the mean JSD (or indirect effect) per site and layer."""
    out = values["out"]
    mode = run.manifest["options"]["mode"]
    summary = run["interventions_summary"]
    measure = "indirect_effect" if mode == "restore" else "jsd"
    shown = summary[summary["measure"] == measure]
    if mode == "restore":
        shown = shown.groupby(["site", "layer"], as_index=False)["mean"].max()
    grid = shown.pivot_table(index="site", columns="layer", values="mean", aggfunc="mean")
    sites = [s for s in run.manifest["options"]["sites"] if s in grid.index]
    what = "max over token groups of the mean indirect effect" if mode == "restore" else "mean JSD (bits)"
    out_table = Table(title=escape(f"{run.label} · {what} over {run.manifest['options']['n_prompts']} prompts"), title_justify="left")
    out_table.add_column("site", no_wrap=True)
    for layer in grid.columns:
        out_table.add_column(f"L{layer}", justify="right", no_wrap=True)
    for site in sites:
        out_table.add_row(site, *[cell(float(grid.loc[site, L]), ".3f") for L in grid.columns])
    print_wide(out_table, 16 + 8 * len(grid.columns))
    print_warnings(run)
    console.print(f"wrote [bold]{escape(str(out))}[/]: manifest.json, interventions.parquet, interventions_summary.parquet", highlight=False)




def show_route(run, values: dict) -> None:
    """``route``: mean routing and prediction changes per edit and k, and the headline ratio."""
    from moelens.figures.router_edits import headline

    out = values["out"]
    table = run["router_edits"]
    t = table.assign(change=(table["routed_before"] - table["routed_after"]).abs())
    grid = t.groupby(["edit", "k"], sort=False).agg(removed=("removed_norm", "mean"), change=("change", "mean"),
                                                  changed=("topk_changed", "mean"), jsd=("jsd", "mean")).reset_index()
    opts = run.manifest["options"]
    title = f"{run.label} · mean over layers, experts and samples · {opts['n_prompts']} prompts"
    out_table = Table(title=escape(title), title_justify="left")
    for col in ("edit", "k", "removed_norm", "|Δ routed to e|", "topk_changed", "jsd (bits)"):
        out_table.add_column(col, justify="right", no_wrap=True)
    for r in grid.itertuples(index=False):
        out_table.add_row(r.edit, str(int(r.k)) if r.k else "", cell(r.removed, ".4f"), cell(r.change, ".4f"), cell(r.changed, ".4f"), cell(r.jsd, ".5f"))
    print_wide(out_table, 90)
    for k, (aligned, random, ratio) in headline(table).items():
        times = f"{ratio:.2f}×" if ratio == ratio else "(random: no change)"
        console.print(f"k={k}: removing the aligned part changes routing to its expert by {aligned:.4f} (mean |Δ share|), "
                      f"{times} as much as a random part of equal norm ({random:.4f})", highlight=False, soft_wrap=True)
    print_warnings(run)
    console.print(f"wrote [bold]{escape(str(out))}[/]: manifest.json, router_edits.parquet, router_edits_summary.parquet, router_edits_migration.parquet", highlight=False)


# ----------------------------------------------------------------------------------------------
# One command per registered analysis, derived from its declaration
# ----------------------------------------------------------------------------------------------
def input_parameters(declaration: Any) -> tuple[list[inspect.Parameter], list[inspect.Parameter]]:
    """The command's models: positional arguments (``MODEL``, ``A [B]``) and options (``--base``)."""
    P = inspect.Parameter
    arguments, options = [], []
    for i in declaration.inputs:
        annotation = str if i.required else Optional[str]
        if i.flag:
            options.append(P(i.cli_name, P.KEYWORD_ONLY, annotation=annotation, default=typer.Option(... if i.required else None, i.flag, help=i.help)))
        else:
            default = typer.Argument(... if i.required else None, metavar=i.metavar, help=i.help)
            arguments.append(P(i.cli_name, P.POSITIONAL_OR_KEYWORD, annotation=annotation, default=default))
    return arguments, options


def flag_parameters(declaration: Any) -> list[inspect.Parameter]:
    """The command's own options beside the config's (``--per-layer``)."""
    from moelens.analyses.fields import flag_name

    P = inspect.Parameter
    return [P(f.name, P.KEYWORD_ONLY, annotation=type(f.default), default=typer.Option(f.default, flag_name(f.name), help=f.help))
            for f in declaration.command.flags]


def command_parameters(declaration: Any) -> list[inspect.Parameter]:
    """``COMMAND MODEL… --out DIR [model options] [config options] [own options] [--revision]``
    then the executor's options (``--executor``, ``--threads``, ...) or ``--threads`` alone."""
    arguments, options = input_parameters(declaration)
    return [*arguments, OUT, *options, *config_parameters(declaration.config_type), *flag_parameters(declaration), REVISION,
            *executor_parameters()]


def analysis_command(declaration: Any) -> Any:
    """The command of ``declaration``: check every option and find every model (before torch is
    imported), open the models, run with a progress bar, print the run's summary."""
    from moelens.analyses.declaration import load

    def body(values: dict) -> None:
        config = config_from_cli(declaration.config_type, values)  # every option checked before anything is opened
        check_sources(values, *(i.cli_name for i in declaration.inputs))
        run_analysis = load(declaration.run)
        executor = executor_from_cli(values)
        models = {i.role: _open(values[i.cli_name], values["revision"]) if values.get(i.cli_name) else None for i in declaration.inputs}
        with progress_bar() as callback:
            run = run_analysis(models, config, out=values["out"], progress=callback, executor=executor)
        load(declaration.command.show)(run, values)

    name = declaration.command.name
    return command_from_parameters(command_parameters(declaration), body, command_help(name), name)


def _register_analyses() -> None:
    from moelens.analyses.registry import declarations

    for declaration in declarations().values():
        app.command(declaration.command.name)(analysis_command(declaration))


_register_analyses()
