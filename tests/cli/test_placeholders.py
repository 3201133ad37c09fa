"""Every command's --help shows what a user types (N, PATH, LAYERS), never a Python type."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from moelens.cli.app import LAZY_COMMANDS, app

PYTHON_TYPES = re.compile(r"<(bool|int|float|str|text|path|Path|file|directory|list\[?[^>]*|tuple[^>]*|[a-z]+ range)>")
COMMANDS = [*LAZY_COMMANDS, "inspect", "tiny", "families", "zoo", "zoo build"]


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_has_no_python_types(command: str):
    result = CliRunner().invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert PYTHON_TYPES.findall(result.output) == [], result.output
    assert "--help" in result.output


def test_placeholders_name_the_value():
    out = CliRunner().invoke(app, ["distance", "--help"], env={"COLUMNS": "200"}).output
    assert re.search(r"--layers\s+LAYERS", out)
    assert re.search(r"--threads\s+N\b", out)
    assert re.search(r"--gamma\s+X\b", out)
    assert re.search(r"--out\s+PATH", out)
    assert re.search(r"--device\s+DEVICE", out)
    assert re.search(r"--permute\s+--no-permute\s+With", out)  # a flag: no placeholder


def test_lazy_commands_use_the_listed_help():
    for name in LAZY_COMMANDS:
        out = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "400"}).output
        assert " ".join(LAZY_COMMANDS[name][1].split()[:6]) in " ".join(out.split()), name
