"""Analysis commands, their options derived from each analysis's config."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

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
    threads_from_cli,
    threads_parameter,
)


def _cell(value: float, fmt: str) -> str:
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


def _align(values: dict) -> None:
    from moelens.analyses.router_alignment.config import RouterAlignmentConfig

    config = config_from_cli(RouterAlignmentConfig, values)  # every option checked before anything is opened
    check_sources(values, "source")
    from moelens.analyses.router_alignment import router_alignment
    from moelens.analyses.router_alignment.tables import TABLES, summary_by_k
    from moelens.ranges import compact_ranges

    executor = executor_from_cli(values)
    model = _open(values["source"], values["revision"])
    out = values["out"]
    with progress_bar() as callback:
        run = router_alignment(model, config=config, out=out, progress=callback, executor=executor)
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
                str(int(r.k)), _cell(r.align, ".6f"), _cell(r.delta_vs_shuffle, ".6f"), _cell(r.z_vs_shuffle, ".6f"),
                _cell(r.effect_over_random, ".6f"), _cell(r.cos_squared, ".6f"), _cell(r.z_layer, ".6f"), _cell(r.p_layer, ".3g"),
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


def _register_align() -> None:
    from moelens.analyses.router_alignment.config import RouterAlignmentConfig

    per_layer = inspect.Parameter(
        "per_layer", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
        default=typer.Option(False, "--per-layer", help="Print one summary table per layer instead of the mean over layers."),
    )
    params = [SOURCE, OUT, *config_parameters(RouterAlignmentConfig), per_layer, REVISION, *executor_parameters()]
    app.command("align")(command_from_parameters(params, _align, command_help("align"), "align"))


_register_align()


def _distance(values: dict) -> None:
    from moelens.analyses.expert_distance.config import ExpertDistanceConfig

    config = config_from_cli(ExpertDistanceConfig, values)  # every option checked before anything is opened
    check_sources(values, "source", "tuned")
    from moelens.analyses.expert_distance import expert_distance

    executor = executor_from_cli(values)
    a = _open(values["source"], values["revision"])
    b = _open(values["tuned"], values["revision"]) if values.get("tuned") else None
    out = values["out"]
    with progress_bar() as callback:
        run = expert_distance(a, b, config=config, out=out, progress=callback, executor=executor)
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


def _register_distance() -> None:
    from moelens.analyses.expert_distance.config import ExpertDistanceConfig

    source = inspect.Parameter(
        "source", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str,
        default=typer.Argument(..., metavar="A", help="Model A (the base): checkpoint directory or cached repo id."),
    )
    tuned = inspect.Parameter(
        "tuned", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[str],
        default=typer.Argument(None, metavar="B", help="Model B (the fine-tune), for base-tuned pairs; leave out for pairs within each layer of A."),
    )
    params = [source, tuned, OUT, *config_parameters(ExpertDistanceConfig), REVISION, *executor_parameters()]
    app.command("distance")(command_from_parameters(params, _distance, command_help("distance"), "distance"))


_register_distance()


def _modules(values: dict) -> None:
    from moelens.analyses.module_metrics.config import ModuleMetricsConfig

    config = config_from_cli(ModuleMetricsConfig, values)  # every option checked before anything is opened
    check_sources(values, "source", "model_b", "base")
    from moelens.analyses.module_metrics import module_metrics

    executor = executor_from_cli(values)
    a = _open(values["source"], values["revision"])
    b = _open(values["model_b"], values["revision"]) if values.get("model_b") else None
    base = _open(values["base"], values["revision"]) if values.get("base") else None
    out = values["out"]
    with progress_bar() as callback:
        run = module_metrics(a, b, base, config=config, out=out, progress=callback, executor=executor)
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
        out_table.add_row(module, *[_cell(float(grid.loc[module, m]), ".4f") for m in metrics])
    print_wide(out_table, 16 + 16 * len(metrics))
    print_warnings(run)
    console.print(f"wrote [bold]{escape(str(out))}[/]: manifest.json, module_metrics.parquet, module_metrics_experts.parquet", highlight=False)


def _register_modules() -> None:
    from moelens.analyses.module_metrics.config import ModuleMetricsConfig

    source = inspect.Parameter(
        "source", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str,
        default=typer.Argument(..., metavar="A", help="Model A: checkpoint directory or cached repo id (dense or MoE)."),
    )
    model_b = inspect.Parameter(
        "model_b", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[str],
        default=typer.Argument(None, metavar="B", help="Model B, of the same architecture, for pair metrics."),
    )
    base = inspect.Parameter(
        "base", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
        default=typer.Option(None, "--base", help="Their base model: pair metrics of the deltas A − base and B − base (with B), or A against its base (without B)."),
    )
    params = [source, model_b, OUT, base, *config_parameters(ModuleMetricsConfig), REVISION, *executor_parameters()]
    app.command("modules")(command_from_parameters(params, _modules, command_help("modules"), "modules"))


_register_modules()


def _trace(values: dict) -> None:
    from moelens.analyses.interventions.config import InterventionsConfig

    config = config_from_cli(InterventionsConfig, values)  # every option checked before anything is opened
    check_sources(values, "source")
    from moelens.analyses.interventions import trace

    threads_from_cli(values)
    model = _open(values["source"], values["revision"])
    out = values["out"]
    with progress_bar() as callback:
        run = trace(model, config.prompts, config=config, out=out, progress=callback)
    summary = run["interventions_summary"]
    measure = "indirect_effect" if config.mode == "restore" else "jsd"
    shown = summary[summary["measure"] == measure]
    if config.mode == "restore":
        shown = shown.groupby(["site", "layer"], as_index=False)["mean"].max()
    grid = shown.pivot_table(index="site", columns="layer", values="mean", aggfunc="mean")
    sites = [s for s in run.manifest["options"]["sites"] if s in grid.index]
    what = "max over token groups of the mean indirect effect" if config.mode == "restore" else "mean JSD (bits)"
    out_table = Table(title=escape(f"{run.label} · {what} over {run.manifest['options']['n_prompts']} prompts"), title_justify="left")
    out_table.add_column("site", no_wrap=True)
    for layer in grid.columns:
        out_table.add_column(f"L{layer}", justify="right", no_wrap=True)
    for site in sites:
        out_table.add_row(site, *[_cell(float(grid.loc[site, L]), ".3f") for L in grid.columns])
    print_wide(out_table, 16 + 8 * len(grid.columns))
    print_warnings(run)
    console.print(f"wrote [bold]{escape(str(out))}[/]: manifest.json, interventions.parquet, interventions_summary.parquet", highlight=False)


def _register_trace() -> None:
    from moelens.analyses.interventions.config import InterventionsConfig

    source = inspect.Parameter(
        "source", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str,
        default=typer.Argument(..., metavar="MODEL", help="Causal LM: checkpoint directory (with its tokenizer) or cached repo id, MoE or dense."),
    )
    params = [source, OUT, *config_parameters(InterventionsConfig), REVISION, threads_parameter()]
    app.command("trace")(command_from_parameters(params, _trace, command_help("trace"), "trace"))


_register_trace()


def _route(values: dict) -> None:
    from moelens.analyses.router_edits.config import RouterEditsConfig

    config = config_from_cli(RouterEditsConfig, values)  # every option checked before anything is opened
    check_sources(values, "source")
    from moelens.analyses.router_edits.analysis import router_edits
    from moelens.figures.router_edits import headline

    threads_from_cli(values)
    model = _open(values["source"], values["revision"])
    out = values["out"]
    with progress_bar() as callback:
        run = router_edits(model, config.prompts, config=config, out=out, progress=callback)
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
        out_table.add_row(r.edit, str(int(r.k)) if r.k else "", _cell(r.removed, ".4f"), _cell(r.change, ".4f"), _cell(r.changed, ".4f"), _cell(r.jsd, ".5f"))
    print_wide(out_table, 90)
    for k, (aligned, random, ratio) in headline(table).items():
        times = f"{ratio:.2f}×" if ratio == ratio else "(random: no change)"
        console.print(f"k={k}: removing the aligned part changes routing to its expert by {aligned:.4f} (mean |Δ share|), "
                      f"{times} as much as a random part of equal norm ({random:.4f})", highlight=False, soft_wrap=True)
    print_warnings(run)
    console.print(f"wrote [bold]{escape(str(out))}[/]: manifest.json, router_edits.parquet, router_edits_summary.parquet, router_edits_migration.parquet", highlight=False)


def _register_route() -> None:
    from moelens.analyses.router_edits.config import RouterEditsConfig

    source = inspect.Parameter(
        "source", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str,
        default=typer.Argument(..., metavar="MODEL", help="MoE causal LM: checkpoint directory (with its tokenizer) or cached repo id."),
    )
    params = [source, OUT, *config_parameters(RouterEditsConfig), REVISION, threads_parameter()]
    app.command("route")(command_from_parameters(params, _route, command_help("route"), "route"))


_register_route()
