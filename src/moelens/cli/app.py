"""The Typer app, its consoles, and what every command shares (errors, progress bars, numbers)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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


