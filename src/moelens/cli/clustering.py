"""``merge``, and what ``calibrate``, ``cluster`` and ``merge-cost`` print (their commands derive from their
declarations: :mod:`moelens.cli.analyses`)."""

from __future__ import annotations

import inspect
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from moelens.cli.analyses import REVISION, SOURCE, _open, cell, print_warnings, print_wide
from moelens.cli.app import app, check_sources, command_help, console
from moelens.cli.options import (
    command_from_parameters,
    threads_from_cli,
    threads_parameter,
)


def _wrote(out: Path, tables: list[str], matrices: bool) -> None:
    extra = ", matrices/" if matrices else ""
    console.print(f"wrote [bold]{escape(str(out))}[/]: manifest.json, " + ", ".join(f"{t}.parquet" for t in tables) + extra, highlight=False)


# ----------------------------------------------------------------------------------------------
# calibrate
# ----------------------------------------------------------------------------------------------
def _usage_table(run, title: str) -> Table:
    layers = run["calibration_layers"]
    table = Table(title=escape(title), title_justify="left")
    for col in ("layer", "tokens", "experts used", "max f", "min f", "entropy (bits)", "routing from"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in layers.itertuples(index=False):
        table.add_row(str(int(r.layer)), str(int(r.n_tokens)), f"{int(r.used_experts)}/{int(r.n_experts)}", cell(r.max_frequency, ".4f"),
                      cell(r.min_frequency, ".4f"), cell(r.usage_entropy, ".3f"), str(r.routing))
    return table


def show_calibration(run, values: dict) -> None:
    """``calibrate``: usage per layer."""
    print_wide(_usage_table(run, f"{run.label} · usage frequency f_e = share of the layer's top-k selections"), 90)
    print_warnings(run)
    _wrote(values["out"], ["calibration_usage", "calibration_layers", "calibration_tokens"], True)




# ----------------------------------------------------------------------------------------------
# cluster
# ----------------------------------------------------------------------------------------------
def show_clustering(run, values: dict) -> None:
    """``cluster``: the clusters of every layer."""
    from moelens.report.clustering_report import cluster_text

    clusters = run["clusters"]
    table = Table(title=escape(f"{run.label} · clusters ({{…}} one cluster, * its dominant expert)"), title_justify="left")
    for col, justify in (("layer", "right"), ("G", "right"), ("largest", "right"), ("singletons", "right"), ("clusters", "left")):
        table.add_column(col, justify=justify, no_wrap=col != "clusters")
    for r in run["cluster_layers"].itertuples(index=False):
        table.add_row(str(int(r.layer)), str(int(r.groups)), str(int(r.largest)), str(int(r.singletons)),
                      escape(cluster_text(clusters[clusters["layer"] == r.layer], sep=",")))
    print_wide(table, 100)
    print_warnings(run)
    own = not run.manifest["options"].get("calibration_run")
    _wrote(values["out"], ["clusters", "cluster_layers", "calibration_usage", "calibration_layers", "calibration_tokens"], own)




# ----------------------------------------------------------------------------------------------
# merge
# ----------------------------------------------------------------------------------------------
def _merge(values: dict) -> None:
    from moelens.choices import EXPORTS
    from moelens.errors import ConfigError

    if values["export"] not in EXPORTS:
        raise ConfigError(f"unknown export {values['export']!r}; choose compact or shared")
    check_sources(values, "source")
    from moelens.analyses.clustering import merge_clusters
    from moelens.merge import RECORD_NAME

    threads_from_cli(values)
    model = _open(values["source"], values["revision"])
    from moelens.threads import use_threads_for

    use_threads_for([model])
    out = merge_clusters(model, values["clusters"], values["out"], export=values["export"], permute=values["permute"], device=values["device"])
    from moelens.errors import RunDirectoryError
    from moelens.textfiles import read_json

    record = read_json(Path(out) / RECORD_NAME, "merge record", RunDirectoryError)
    table = Table(title=escape(f"{model.name} → {out} · {record['export']} · permutation {'on' if record['permute'] else 'off'}"), title_justify="left")
    for col in ("layer", "experts", "groups"):
        table.add_column(col, justify="right", no_wrap=True)
    for layer, info in sorted(record["layers"].items(), key=lambda kv: int(kv[0])):
        table.add_row(str(layer), str(info["experts"]), str(info["groups"]))
    console.print(table)
    console.print(f"wrote [bold]{escape(str(out))}[/]: a {escape(record['family'])} checkpoint transformers loads, with {RECORD_NAME}", highlight=False)


def _register_merge() -> None:
    def param(name: str, annotation, default) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)

    params = [
        SOURCE,
        param("clusters", str, typer.Option(..., "--clusters", metavar="RUN", help="Clustering run of this model (the --out directory of moelens cluster).")),
        param("out", Path, typer.Option(..., "--out", help="Directory of the merged checkpoint (new or empty).")),
        param("export", str, typer.Option("compact", "--export", help="compact (G experts per layer, router rows the members' usage-weighted mean) or shared (E router rows kept, members given their cluster's merged weights).")),
        param("permute", bool, typer.Option(True, "--permute/--no-permute", help="Align each member's neurons onto its cluster's dominant expert (weight matching) before averaging.")),
        param("device", str, typer.Option("cpu", "--device", help="Where the permutation costs are computed: cpu, auto, cuda or cuda:N.")),
        REVISION,
        threads_parameter(),
    ]
    app.command("merge")(command_from_parameters(params, _merge, command_help("merge"), "merge"))


_register_merge()


# ----------------------------------------------------------------------------------------------
# merge-cost
# ----------------------------------------------------------------------------------------------
def show_merge_cost(run, values: dict) -> None:
    """``merge-cost``: recall and perplexity of every variant."""
    summary = run["merge_cost_summary"]
    table = Table(title=escape(f"{run.label} · fact recall and held-out perplexity, before and after merging"), title_justify="left")
    for col in ("variant", "recall ↑", "Δ recall", "perplexity ↓", "× perplexity"):
        table.add_column(col, justify="left" if col == "variant" else "right", no_wrap=True)
    for r in summary.itertuples(index=False):
        table.add_row(escape(str(r.variant)), cell(r.recall, ".3f"), cell(r.recall_delta, "+.3f"), cell(r.perplexity, ".3f"),
                      cell(r.perplexity_ratio, ".3f"))
    print_wide(table, 90)
    print_warnings(run)
    _wrote(values["out"], ["merge_cost", "merge_cost_summary"], False)
