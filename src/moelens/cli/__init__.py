"""The ``moelens`` command line: a thin skin over the Python API.

Each command parses its options, calls the API and prints with Rich. A :class:`MoelensError`
(a user's mistake: a missing path, an unsupported architecture, ...) is printed as one line on
stderr and exits with status 2, without a traceback.
"""

from __future__ import annotations

import sys

from rich.markup import escape

# inspect, tiny, families and zoo register here; the other commands' modules (which import torch,
# pandas or matplotlib) are imported when their command runs: see moelens.cli.app.LAZY_COMMANDS
from moelens.cli import checkpoint, zoo  # noqa: F401  (each registers its commands)
from moelens.cli.app import app, err_console
from moelens.errors import MoelensError


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
