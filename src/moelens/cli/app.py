"""The Typer app, its consoles, and what every command shares (errors, progress bars, numbers)."""

from __future__ import annotations

import importlib
import time
from contextlib import contextmanager
from typing import Any, Iterator

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

# LAZY_COMMANDS: commands whose module is imported only when the command runs (or shows its own
# help); every command's help lives in moelens.cli.commands, once, so that ``moelens --help`` lists
# them without importing anything heavy.
from moelens.cli.commands import COMMAND_ORDER, LAZY_COMMANDS, ROOT_HELP, VERSION_HELP, command_help
from moelens.progress import ProgressEvent
from moelens.version import package_version


def placeholder(param: Any) -> str:
    """What a user types for ``param`` in help (typer would show its Python type, ``<int>``):
    nothing for a flag, ``N`` for a whole number, ``X`` for a number, ``PATH`` for a path, else
    the option's own name in capitals (``--device DEVICE``)."""
    if getattr(param, "is_flag", False):
        return ""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    name = getattr(annotation, "__name__", str(annotation))
    if name == "int":
        return "N"
    if name == "float":
        return "X"
    if name in ("Path", "PosixPath", "WindowsPath"):
        return "PATH"
    return (param.name or "value").upper()


def _no_type(ctx: Any) -> None:
    return None


def readable_placeholders(command: Any, ctx: Any) -> None:
    """Give every parameter of ``command`` (its ``--help`` included, and its sub-commands') a
    placeholder a user can read where it declares none."""
    for param in [*command.params, command.get_help_option(ctx)]:
        if param is None:
            continue
        if param.metavar is None:
            param.metavar = placeholder(param)
        if param.param_type_name == "argument":
            # its name column already shows the placeholder; typer's type column would add <str>
            param.display_type_rich = _no_type
    for sub in getattr(command, "commands", {}).values():
        if not isinstance(sub, LazyCommand):
            readable_placeholders(sub, ctx)


class LazyCommand(TyperCommand):
    """A command listed by name and help; its module is imported when it is run or asked for
    its own ``--help`` (the group hands :meth:`make_context` the command's arguments)."""

    def __init__(self, name: str, group: "LazyGroup"):
        super().__init__(name, help=command_help(name))
        self.group = group

    def make_context(self, info_name: Any, args: list[str], parent: Any = None, **extra: Any) -> Any:
        return self.group.load(self.name or "", parent).make_context(info_name, args, parent=parent, **extra)


class LazyGroup(TyperGroup):
    """The ``moelens`` group: commands of :data:`LAZY_COMMANDS` are built when first used, and
    every command's help shows placeholders a user can read."""

    def get_params(self, ctx: Any) -> list:
        readable_placeholders(self, ctx)
        return super().get_params(ctx)

    def list_commands(self, ctx: Any) -> list[str]:
        names = dict.fromkeys([*self.commands, *LAZY_COMMANDS])
        return sorted(names, key=lambda n: COMMAND_ORDER.index(n) if n in COMMAND_ORDER else len(COMMAND_ORDER))

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name in self.commands:
            command = self.commands[cmd_name]
            readable_placeholders(command, ctx)
            return command
        if cmd_name in LAZY_COMMANDS:
            return LazyCommand(cmd_name, self)
        return None

    def load(self, name: str, ctx: Any) -> Any:
        """Import the module that registers ``name`` on :data:`app` and build its command."""
        if name not in self.commands:
            importlib.import_module(LAZY_COMMANDS[name][0])
            info = next(c for c in app.registered_commands if c.name == name)
            self.commands[name] = typer.main.get_command_from_info(
                info, pretty_exceptions_short=app.pretty_exceptions_short, rich_markup_mode=app.rich_markup_mode,
            )
        return self.get_command(ctx, name)


app = typer.Typer(
    name="moelens",
    help=ROOT_HELP,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=LazyGroup,
)
console = Console()


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"moelens {package_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help=VERSION_HELP),
) -> None:
    """moelens: the geometry of routers and experts, interventions, and shareable reports."""

err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def check_sources(values: dict[str, Any], *names: str) -> None:
    """Find every model the command names (``values[name]``, a directory or a repo id in the local
    cache) before torch is imported, so that a mistyped path costs no start-up time: the same
    check, and the same one-line error, as :func:`~moelens.checkpoint.open_model` makes first."""
    from moelens.checkpoint.source import resolve_source

    for name in names:
        if values.get(name) is not None:
            resolve_source(values[name], values.get("revision"))


def clock(seconds: float) -> str:
    """``H:MM:SS``, as Rich's elapsed column shows it."""
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class PlainProgress:
    """Progress for a log file or a pipe (stderr not a terminal): one plain line per finished
    step of an outer loop (``event.step``: a unit, an atlas run), ``layers 3/8  layer 2  0:00:05``
    (task, steps done of total, the message, the time since the command began), never cut to the
    console's width. A task's first event is printed too when it says something (the atlas names
    the run it starts), or when it starts past zero (a resumed run). Inner loops (experts,
    batches, training steps) print at most one line every ``interval`` seconds."""

    def __init__(self, console: Console, interval: float = 10.0):
        self.console = console
        self.interval = interval
        self.started = time.monotonic()
        self.seen: dict[str, tuple[int, int]] = {}
        self.last_line: dict[str, float] = {}

    def __call__(self, event: ProgressEvent) -> None:
        previous = self.seen.get(event.task)
        # a task seen again from a lower count or another total is a new loop (the atlas's next run)
        fresh = previous is None or event.done < previous[0] or event.total != previous[1]
        self.seen[event.task] = (event.done, event.total)
        now = time.monotonic()
        if not event.step and now - self.last_line.get(event.task, self.started) < self.interval:
            return
        if (event.done > 0 or event.message) if fresh else event.done > previous[0]:
            self.last_line[event.task] = now
            message = f"  {event.message}" if event.message else ""
            line = f"{event.task} {event.done}/{event.total}{message}  {clock(now - self.started)}"
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)


@contextmanager
def progress_bar(transient: bool = False) -> Iterator:
    """The callback analyses report progress to: a Rich progress display (one bar per task name)
    on a terminal, :class:`PlainProgress` lines otherwise. A command that fails clears its bars,
    so that the error is the one line it leaves on stderr."""
    if not err_console.is_terminal:
        yield PlainProgress(err_console)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

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

    failed = True
    try:
        yield callback
        failed = False
    finally:
        if progress.live.is_started:
            if failed:
                progress.live.transient = True  # erase the bars: the error line follows alone
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




# inspect, tiny, families and zoo register on ``app`` here: their modules import this one (a
# command module depends on the app, never the reverse), so they are loaded by name, as the other
# commands' modules (which import torch, pandas or matplotlib) are when their command runs: see
# moelens.cli.commands.LAZY_COMMANDS.
for _module in ("moelens.cli.checkpoint", "moelens.cli.zoo"):
    importlib.import_module(_module)
