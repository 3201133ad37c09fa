"""The ``moelens`` command line: a thin skin over the Python API.

Each command parses its options, calls the API and prints with Rich. A :class:`MoelensError`
(a user's mistake: a missing path, an unsupported architecture, ...) is printed as one line on
stderr and exits with status 2, without a traceback.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Entry point: run the app, turning moelens errors into one line and exit status 2.
    ``moelens --help`` and ``moelens --version`` alone are answered without typer (moelens.cli.quick)."""
    if sys.argv[1:] == ["--version"]:
        from moelens.cli import quick

        return quick.print_version()
    if sys.argv[1:] == ["--help"]:
        from moelens.cli import quick

        if quick.print_root_help():
            return
    from rich.markup import escape

    from moelens.cli.app import app, err_console
    from moelens.errors import MoelensError

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
