"""``moelens --help`` drawn without typer (moelens.cli.quick) is the screen typer draws, byte for
byte, in colour and without, at several widths (where the usage line would wrap, typer draws it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import moelens

# typer's own rendering of the root help, named as `python -m moelens` names itself
TYPER_HELP = """
import sys
sys.argv = ["moelens", "--help"]
from moelens.cli.app import app
try:
    app(prog_name="python -m moelens")  # what click calls `python -m moelens`
except SystemExit:
    pass
"""


def _stdout(args: list[str], env: dict[str, str]) -> str:
    display = ("COLUMNS", "LINES", "TERMINAL_WIDTH", "FORCE_COLOR", "PY_COLORS", "GITHUB_ACTIONS", "NO_COLOR", "TERM")
    full = {k: v for k, v in os.environ.items() if k not in display}
    full.update(PYTHONPATH=str(Path(moelens.__file__).parents[1]), **env)
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("env", [{"COLUMNS": "80"}, {"COLUMNS": "50"}, {"COLUMNS": "20"}, {"COLUMNS": "132"},
                                 {"COLUMNS": "100", "FORCE_COLOR": "1"}, {"TERMINAL_WIDTH": "70", "FORCE_COLOR": "1"}])
def test_quick_root_help_is_typers(env):
    quick = _stdout(["-m", "moelens", "--help"], env)
    assert "merge-cost" in quick
    assert quick == _stdout(["-c", TYPER_HELP], env)


def test_quick_version_is_typers():
    typer_version = "import sys\nsys.argv=['moelens', '--version']\nfrom moelens.cli.app import app\ntry:\n    app()\nexcept SystemExit:\n    pass\n"
    assert _stdout(["-m", "moelens", "--version"], {}) == _stdout(["-c", typer_version], {}) == f"moelens {moelens.__version__}\n"
