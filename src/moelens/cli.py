"""The ``moelens`` command line: a thin skin over the Python API.

Each command parses its options, calls the API and prints with Rich. A :class:`MoelensError`
(a user's mistake: a missing path, an unsupported architecture, ...) is printed as one line on
stderr and exits with status 2, without a traceback.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from moelens.errors import MoelensError
from moelens.progress import ProgressEvent

app = typer.Typer(
    name="moelens",
    help="Look inside Mixture-of-Experts language models.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()


@app.callback()
def _root() -> None:
    """moelens: the geometry of routers and experts, interventions, and shareable reports."""

err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def progress_bar(transient: bool = False) -> Iterator:
    """A Rich progress display and the callback analyses report to (one bar per task name)."""
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[message]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=err_console, transient=transient,
    )
    tasks: dict[str, int] = {}

    def callback(event: ProgressEvent) -> None:
        # Started on the first event, so an error raised before any work prints one line only.
        if not progress.live.is_started:
            progress.start()
        if event.task not in tasks:
            tasks[event.task] = progress.add_task(event.task, total=event.total, message=event.message)
        progress.update(tasks[event.task], completed=event.done, total=event.total, message=event.message)

    try:
        yield callback
    finally:
        if progress.live.is_started:
            progress.stop()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


@app.command()
def inspect(
    source: str = typer.Argument(..., help="Checkpoint directory, or a repo id in the local Hugging Face cache."),
    revision: Optional[str] = typer.Option(None, help="Revision (branch, tag or commit) of a cached repo."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Summarise a checkpoint: family, layers, experts, top-k, sizes."""
    from moelens.checkpoint import open_model
    from moelens.ranges import compact_ranges

    model = open_model(source, revision)
    info = model.summary()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    table = Table(title=f"{model.name}", show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    rows = [
        ("family", f"{info['family']} ({info['architecture']})"),
        ("layers", str(info["n_layers"])),
        ("MoE layers", compact_ranges(info["moe_layers"]) or "none (dense model)"),
        ("dense layers", compact_ranges(info["dense_layers"]) or "none"),
        ("experts E", str(info["n_experts"])),
        ("top-k", str(info["top_k"])),
        ("hidden size d", str(info["hidden_size"])),
        ("expert FFN F", str(info["expert_ffn"])),
        ("shared experts", str(info["shared_experts"])),
        ("expert layout", str(info["expert_layout"])),
        ("expert dtype", str(info["dtype"])),
        ("tensor dtypes", ", ".join(f"{k}×{v}" for k, v in sorted(info["dtypes"].items()))),
        ("parameters", f"{human_count(info['parameters_total'])} total, {human_count(info['parameters_experts'])} in routed experts"),
        ("size on disk", human_bytes(info["size_on_disk_bytes"])),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


@app.command()
def tiny(
    family: str = typer.Argument(..., help="Family name, e.g. mixtral, qwen3_moe, gpt_oss (see `moelens families`)."),
    out: Path = typer.Option(..., "--out", help="Directory to write the checkpoint into."),
    layout: Optional[str] = typer.Option(None, help="On-disk layout (default: the family's first): per_expert or hub (published), fused (transformers v5), fp8, mxfp4, multimodal — see `moelens families`."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16."),
    sharded: bool = typer.Option(False, help="Split into several safetensors shards."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
) -> None:
    """Write a tiny random checkpoint of a family (for trying moelens without downloads)."""
    from moelens.checkpoint.registry import families
    from moelens.testing.tiny import DTYPES, TinySpec, build_tiny_checkpoint

    fams = families()
    if family not in fams:
        fail(f"unknown family {family!r}; known: {', '.join(fams)}")
    layouts = tuple(fams[family].tiny_layouts) + tuple(getattr(fams[family], "tiny_custom_layouts", ()))
    layout = layout or layouts[0]
    if dtype not in DTYPES:
        fail(f"unknown dtype {dtype!r}; tiny checkpoints are written in {' or '.join(DTYPES)}")
    if layout not in layouts:
        fail(f"{family} has no tiny {layout!r} layout; it has {', '.join(dict.fromkeys(layouts))}")
    path = build_tiny_checkpoint(TinySpec(family, layout, dtype, sharded), out, seed=seed)
    console.print(f"wrote tiny {family} ({layout}, {dtype}) to [bold]{path}[/]")


@app.command("families")
def list_families() -> None:
    """List the model families and architectures moelens reads."""
    from moelens.checkpoint.registry import families

    table = Table("family", "architectures", "tiny layouts")
    for name, cls in families().items():
        layouts = dict.fromkeys(tuple(cls.tiny_layouts) + tuple(getattr(cls, "tiny_custom_layouts", ())))
        table.add_row(name, ", ".join(cls.architectures), ", ".join(layouts))
    console.print(table)


def _cell(value: float, fmt: str) -> str:
    """A table cell: blank for NaN (cos² outside k = 1, z where the null has no spread), and no
    sign on a value that rounds to zero."""
    if value != value:
        return ""
    text = format(value, fmt)
    return text[1:] if text.startswith("-") and float(text) == 0 else text


@app.command()
def align(
    source: str = typer.Argument(..., help="Checkpoint directory, or a repo id in the local Hugging Face cache."),
    out: Path = typer.Option(..., "--out", help="Run directory to write; an unfinished run there is resumed."),
    layers: Optional[str] = typer.Option(None, help="MoE layers, e.g. 0,5,10-13 (default: every MoE layer)."),
    matrix: str = typer.Option("gate", help="Expert matrix: gate, up, down or all."),
    k: Optional[str] = typer.Option(None, "--k", help="Subspace sizes, e.g. 1,2,4,8 (default: powers of two up to d, and d)."),
    null: str = typer.Option("derangement", help="Null model: derangement, shuffle (exact) or shuffle-sampled (GaleMoE's)."),
    shuffles: int = typer.Option(200, help="Permutations per k for --null shuffle-sampled."),
    seed: int = typer.Option(0, help="Seed of every random draw."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    method: str = typer.Option("eigh", help="eigh (Gram eigendecomposition) or svd (slower, for checking)."),
    dtype: str = typer.Option("float32", help="Arithmetic: float32 or float64."),
    cache: Optional[bool] = typer.Option(None, "--cache/--no-cache", help="Keep spectra on disk, keyed by tensor content, and reuse them (a basis is d·min(F,d)·4 bytes per expert: 16 GiB per matrix for Mixtral-8x7B)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Spectrum cache directory; implies --cache (default $MOELENS_CACHE/spectra or ~/.cache/moelens/spectra)."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Print one summary table per layer instead of the mean over layers."),
    revision: Optional[str] = typer.Option(None, help="Revision (branch, tag or commit) of a cached repo."),
) -> None:
    """Router–expert alignment: energy of each router vector in the top-k input subspace of its expert, against null models."""
    from moelens.analyses import router_alignment
    from moelens.analyses.alignment_tables import TABLES, summary_by_k
    from moelens.checkpoint import open_model
    from moelens.ranges import compact_ranges, parse_ranges

    model = open_model(source, revision)
    with progress_bar() as callback:
        run = router_alignment(
            model, layers=parse_ranges(layers) if layers else None, matrix=matrix, k=parse_ranges(k) if k else None,
            null=null, shuffles=shuffles, seed=seed, method=method, device=device, dtype=dtype, cache=cache,
            cache_dir=cache_dir, out=out, progress=callback,
        )
    opts = run.manifest["options"]
    rows = run["alignment_layers"]
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
        # the seed's eight columns need ~110 characters: never crop them to an 80-column pipe
        width = console.width
        console.width = max(width, 112)
        try:
            console.print(table)
        finally:
            console.width = width
    console.print(f"wrote [bold]{escape(str(out))}[/]: manifest.json, " + ", ".join(f"{t}.parquet" for t in TABLES), highlight=False)


@app.command("report")
def report_command(
    runs: list[Path] = typer.Argument(..., help="Run directories (the --out of `moelens align`), compared in this order."),
    out: Path = typer.Option(Path("report.html"), "--out", help="HTML file to write (self-contained, opens offline)."),
    title: Optional[str] = typer.Option(None, help="Title of the report (default: from the runs)."),
    figure_format: str = typer.Option("svg", "--figures", help="Figure format inside the report: svg or png."),
) -> None:
    """Write one self-contained HTML report comparing alignment runs (figures and styles inline)."""
    from moelens.report import report

    path = report(runs, out, title=title, figure_format=figure_format)
    console.print(f"wrote [bold]{escape(str(path))}[/] ({human_bytes(path.stat().st_size)}, {len(runs)} run{'s' if len(runs) != 1 else ''})", highlight=False)


@app.command("figure")
def figure_command(
    name: str = typer.Argument(..., help="Figure name: comparison_panels, cos_squared_per_expert, shuffle_statistics, z_decomposition, "
                                          "null_distribution, layer_permutation_test, per_expert_breakdown, complete_analysis, layer_k_heatmap."),
    runs: list[Path] = typer.Argument(..., help="Run directories (one for complete_analysis and layer_k_heatmap)."),
    out: Path = typer.Option(..., "--out", help="File to write; the suffix picks the format: .png, .svg or .pdf."),
    k: Optional[int] = typer.Option(None, "--k", help="k of null_distribution, per_expert_breakdown and complete_analysis (nearest stored k)."),
    metric: Optional[str] = typer.Option(None, help="Metric of layer_k_heatmap: align, delta_vs_shuffle, z_vs_shuffle, z_layer, …"),
    dpi: int = typer.Option(300, help="Resolution of PNG output (and of heat maps inside SVG and PDF)."),
) -> None:
    """Draw one figure of alignment runs and save it as PNG, SVG or PDF."""
    from moelens import figures
    from moelens.results import load_runs

    fig = figures.draw(name, load_runs(runs), k=k, metric=metric)
    path = figures.save(fig, out, dpi=dpi)
    console.print(f"wrote [bold]{escape(str(path))}[/]", highlight=False)


zoo_app = typer.Typer(help="Tiny MoE language models trained here on invented facts (base and tuned).", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("build")
def zoo_build(
    out: Optional[Path] = typer.Option(None, "--out", help="Zoo directory (default: $MOELENS_CACHE/zoo/<family>-<seed>[-small], else ~/.cache/moelens/zoo/…)."),
    seed: int = typer.Option(0, help="Seed of the world, the initialisation and the data order."),
    family: str = typer.Option("mixtral", help="Model family: mixtral, qwen3_moe or olmoe."),
    small: bool = typer.Option(False, "--small", help="The small recipe (2 layers, under 200 facts, seconds to build; for tests)."),
    dtype: str = typer.Option("float32", help="dtype of the saved weights: float32 or bfloat16."),
    threads: int = typer.Option(1, help="CPU threads for training (part of the recipe: the weights depend on it)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the directory already holds this zoo."),
) -> None:
    """Train the zoo's base and tuned models (or find them built) and print the paths written."""
    from moelens import zoo

    with progress_bar() as callback:
        built = zoo.build(out=out, seed=seed, family=family, small=small, dtype=dtype, threads=threads, force=force, progress=callback)
    info = built.info
    state = "found in cache" if built.cached else f"built in {info['seconds']:.0f} s"
    console.print(
        f"zoo {info['family']} seed {info['seed']}{' (small)' if info['recipe'].get('small') else ''}: {state}; "
        f"{info['sizes']['facts']} facts; recall base {info['base']['recall']:.3f}, tuned {info['tuned']['recall']:.3f} "
        f"(questions), {info['tuned']['recall_plain']:.3f} (plain prompts)",
        highlight=False, soft_wrap=True,
    )
    # one "name  path" line each, never wrapped, so scripts can read them
    for name, path in built.paths().items():
        console.print(f"[bold cyan]{name:<12}[/] {escape(str(path))}", highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point: run the app, turning moelens errors into one line and exit status 2."""
    try:
        app()
    except MoelensError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as exc:  # an output directory that cannot be written, a full disk, ...
        where = f" {exc.filename}" if exc.filename else ""
        err_console.print(f"[bold red]error:[/] cannot use{escape(str(where))}: {escape(exc.strerror or str(exc))}; check the path and its permissions", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
