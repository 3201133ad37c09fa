"""A run directory holds only files moelens wrote: links inside it are refused, never followed,
and what a killed run leaves (temporary files, scratch) is removed by the next run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import moelens as ml
from moelens.errors import RunDirectoryError
from moelens.locks import LOCK_NAME
from moelens.safe_files import SCRATCH
from tests.test_safe_files import dead_pid


@pytest.fixture(scope="module")
def finished(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    ml.router_alignment(tiny_checkpoint("mixtral"), layers=[0], k=[1, 4], out=out, cache=False)
    return out


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "keep.parquet").write_bytes(b"someone's table")
    (folder / "L00000").mkdir()
    (folder / "L00000" / "alignment.parquet").write_bytes(b"someone's part")
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


@pytest.mark.parametrize("name", ["parts", "alignment.parquet", "manifest.json", LOCK_NAME])
def test_a_link_in_a_run_directory_is_refused_and_its_target_untouched(finished, tiny_checkpoint, tmp_path, outside, name):
    out = _copy(finished, tmp_path)
    link = out / name
    if link.exists():
        link.unlink()
    link.symlink_to(outside if name == "parts" else outside / "keep.parquet", target_is_directory=name == "parts")
    before = _snapshot(outside)
    with pytest.raises(RunDirectoryError, match="symbolic link"):
        ml.router_alignment(tiny_checkpoint("mixtral"), layers=[0], k=[1, 4], out=out, cache=False)
    assert _snapshot(outside) == before


def test_a_linked_parts_folder_is_refused_on_the_command_line_with_one_line(finished, tiny_checkpoint, tmp_path, outside):
    model = tiny_checkpoint("mixtral")
    out = _copy(finished, tmp_path)
    (out / "parts").symlink_to(outside, target_is_directory=True)
    before = _snapshot(outside)
    done = subprocess.run([sys.executable, "-m", "moelens", "align", str(model), "--out", str(out), "--layers", "0", "--k", "1,4",
                           "--no-cache"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr and "parts is a symbolic link" in " ".join(lines)
    assert _snapshot(outside) == before


def test_leftovers_of_a_killed_run_are_removed_by_the_next_run(finished, tiny_checkpoint, tmp_path):
    out = _copy(finished, tmp_path)
    pid = dead_pid()
    (out / LOCK_NAME).write_text(f"{pid}\n")  # the lock file a killed holder leaves (its flock died with it)
    stale = [out / ".alignment.parquet.7-ab.tmp", out / "parts" / "L00000" / ".alignment.parquet.7-cd.tmp"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    scratch = out / SCRATCH / f"{pid}-00ff00ff" / "merged"
    scratch.mkdir(parents=True)
    (scratch / "model.safetensors").write_bytes(b"half")
    run = ml.router_alignment(tiny_checkpoint("mixtral"), layers=[0], k=[1, 4], out=out, cache=False)
    assert run.manifest["status"] == "complete"
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert not any(p.endswith(".tmp") for p in left) and SCRATCH not in left and "parts" not in left, left
    assert not (out / LOCK_NAME).exists()
