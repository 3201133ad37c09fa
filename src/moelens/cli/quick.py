"""``moelens --help`` and ``moelens --version`` without typer.

Typer renders help with ``typer.rich_utils``, which imports Rich's Markdown and traceback machinery
(markdown-it, Pygments, attrs: about half of the start-up time of ``moelens --help``) although the
root's help uses neither. This module draws the very same screen with the few Rich parts it needs:
the usage line, the root's help, the Options panel and the Commands panel, with typer's styles and
the same environment switches (``TERMINAL_WIDTH``, ``FORCE_COLOR``, ...).
tests/cli/test_quick_help.py compares it with typer's own rendering, so a typer upgrade that changes
the look fails there rather than drifting.
"""

from __future__ import annotations

import os
import sys

from moelens.cli.commands import HELP_HELP, ROOT_HELP, VERSION_HELP, command_help, listed_commands
from moelens.version import package_version

# typer.rich_utils's styles and switches (typer 0.2x).
_THEME = {"option": "bold cyan", "switch": "bold green", "negative_option": "bold magenta", "negative_switch": "bold red",
          "types": "bold yellow", "types_sep": "dim", "usage": "yellow"}
_OPTION_PATTERNS = [r"(^|\W)(?P<switch>\-\w+)(?![a-zA-Z0-9])", r"(^|\W)(?P<option>\-\-[\w\-]+)(?![a-zA-Z0-9])",
                    r"(?P<types>\<[^\>]+\>)", r"(?P<usage>Usage: )"]


def program_name() -> str:
    """What click calls the program: ``moelens`` for the script, ``python -m moelens`` for the module."""
    main = sys.modules.get("__main__")
    path = sys.argv[0]
    package = getattr(main, "__package__", None)
    if package in (None, ""):
        return os.path.basename(path)
    name = os.path.splitext(os.path.basename(path))[0]
    module = package if name == "__main__" else f"{package}.{name}"
    return f"python -m {module.lstrip('.')}"


def _console():
    from rich.console import Console
    from rich.highlighter import RegexHighlighter
    from rich.theme import Theme

    class OptionHighlighter(RegexHighlighter):
        highlights = _OPTION_PATTERNS

    force = True if os.getenv("GITHUB_ACTIONS") or os.getenv("FORCE_COLOR") or os.getenv("PY_COLORS") else None
    if os.getenv("_TYPER_FORCE_DISABLE_TERMINAL"):
        force = False
    width = os.getenv("TERMINAL_WIDTH")
    highlighter = OptionHighlighter()
    console = Console(theme=Theme(_THEME), highlighter=highlighter, color_system="auto", force_terminal=force,
                      width=int(width) if width else None)
    return console, highlighter


def usage_fits(usage: str) -> bool:
    """Whether click writes ``usage`` on one line: its help formatter is max(min(columns, 80) − 2, 50)
    wide; a longer usage line is wrapped by click's own rules, which are left to typer."""
    import shutil

    return len(usage) <= max(min(shutil.get_terminal_size().columns, 80) - 2, 50)


def print_root_help(prog: str | None = None) -> bool:
    """Print the screen of ``moelens --help``; False (nothing printed) where the usage line would
    wrap (a very narrow terminal), for typer to draw it."""
    from rich.align import Align
    from rich.columns import Columns
    from rich.console import Group
    from rich.padding import Padding
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    usage = f"Usage: {prog or program_name()} [OPTIONS] COMMAND [ARGS]..."
    if not usage_fits(usage):
        return False
    console, highlighter = _console()
    console.print(Padding(highlighter(usage), 1), style="bold")
    console.print(Padding(Align(Group(highlighter(Text.from_markup(ROOT_HELP, style=""))), pad=False), (0, 1, 1, 1)))

    options = Table(highlight=True, show_header=False, expand=True, box=None, show_lines=False, leading=0,
                    border_style=None, row_styles=None, pad_edge=False, padding=(0, 1))
    for flag, text in (("--version", VERSION_HELP), ("--help", HELP_HELP)):
        options.add_row(highlighter(flag), highlighter(""), Text(""), Text(""), Text(style="bold yellow", overflow="fold"),
                        Columns([highlighter(Text.from_markup(text, style=""))]))
    console.print(Panel(options, border_style="dim", title="Options", title_align="left"))

    names = listed_commands()
    commands = Table(highlight=False, show_header=False, expand=True, box=None, show_lines=False, leading=0,
                     border_style=None, row_styles=None, pad_edge=False, padding=(0, 1))
    commands.add_column(style="bold cyan", no_wrap=True, width=max(len(n) for n in names))
    commands.add_column("Description", justify="left", no_wrap=False, ratio=10)
    for name in names:
        commands.add_row(Text(name), highlighter(Text.from_markup(command_help(name).split("\n\n")[0].strip(), style="")))
    console.print(Panel(commands, border_style="dim", title="Commands", title_align="left"))
    print()  # click echoes the (empty) remainder of its formatter after typer's panels
    return True


def print_version() -> None:
    print(f"moelens {package_version()}")
