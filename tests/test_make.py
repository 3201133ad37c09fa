"""`make test` fails whenever pytest does, exit status 5 (no tests collected) included: a suite
that collected nothing must not pass CI silently."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize(("status", "fails"), [(0, False), (1, True), (5, True)])
def test_make_test_fails_with_pytests_status(tmp_path, status, fails):
    # A stand-in for the virtual environment's python that exits as pytest would; the install
    # step is taken as done (-o) and a chromium on PATH keeps the recipe from installing one.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f"#!/bin/sh\nexit {status}\n")
    python.chmod(0o755)
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "chromium").symlink_to(shutil.which("true") or "/bin/true")
    path = f"{tools}:{os.environ.get('PATH', '')}"
    done = subprocess.run(["make", "-s", "-C", str(ROOT), "-o", f"{venv}/.moelens-installed", "test", f"VENV={venv}"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PATH": path})
    assert (done.returncode != 0) == fails, (done.stdout, done.stderr)
    assert ("collected no tests" in done.stderr) == (status == 5), done.stderr
