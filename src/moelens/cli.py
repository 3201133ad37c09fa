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
        console=err_console, transient=transient, disable=not err_console.is_terminal and False,
    )
    tasks: dict[str, int] = {}

    def callback(event: ProgressEvent) -> None:
        if event.task not in tasks:
            tasks[event.task] = progress.add_task(event.task, total=event.total, message=event.message)
        progress.update(tasks[event.task], completed=event.done, total=event.total, message=event.message)

    with progress:
        yield callback


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
    layout: str = typer.Option("per_expert", help="On-disk layout: per_expert (Hub) or fused (transformers v5)."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16."),
    sharded: bool = typer.Option(False, help="Split into several safetensors shards."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
) -> None:
    """Write a tiny random checkpoint of a family (for trying moelens without downloads)."""
    from moelens.checkpoint.registry import families
    from moelens.testing.tiny import TinySpec, build_tiny_checkpoint

    fams = families()
    if family not in fams:
        fail(f"unknown family {family!r}; known: {', '.join(fams)}")
    layouts = tuple(fams[family].tiny_layouts) + tuple(getattr(fams[family], "tiny_custom_layouts", ()))
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
        table.add_row(name, ", ".join(cls.architectures), ", ".join(cls.tiny_layouts))
    console.print(table)


def main() -> None:
    """Entry point: run the app, turning moelens errors into one line and exit status 2."""
    try:
        app()
    except MoelensError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
