"""Run directories under abuse: bad options, damaged tables, leftovers, a second writer — every case
one line on stderr and exit status 2, and nothing half written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import moelens as ml
from moelens.errors import ConfigError, RunDirectoryError
from moelens.locks import DirectoryLock
from tests.cli.helpers import run_moelens
from tests.results.damage import MANIFEST_DAMAGE, assert_one_line_naming


def _moelens(*args: str | Path) -> subprocess.CompletedProcess:
    """``moelens *args`` through its entry point in this process (no import of torch per call)."""
    done = run_moelens(*args)
    return subprocess.CompletedProcess(["moelens", *map(str, args)], done.code, done.stdout, done.stderr)


def _moelens_process(*args: str | Path) -> subprocess.CompletedProcess:
    """``python -m moelens *args`` in a process of its own."""
    return subprocess.run([sys.executable, "-m", "moelens", *map(str, args)], capture_output=True, text=True, timeout=300)


def _one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr
    text = " ".join(lines)
    for needle in needles:
        assert needle in text, text
    return text


@pytest.fixture(scope="module")
def finished(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    ml.router_alignment(tiny_checkpoint("mixtral"), layers=[0], k=[1, 4], out=out, cache=False)
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


@pytest.mark.parametrize("seed", ["-5", "abc"])
def test_a_bad_seed_is_refused_before_anything_is_written(tiny_checkpoint, tmp_path, seed):
    out = tmp_path / "run"
    done = _moelens("align", tiny_checkpoint("mixtral"), "--out", out, "--seed", seed)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert not out.exists()


def test_a_directory_without_a_finished_unit_takes_the_corrected_command(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("mixtral")
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # interrupted before its first layer finished
        ml.router_alignment(model, layers=[0, 1], k=[1], seed=3, out=out, cache=False,
                            progress=lambda e: (_ for _ in ()).throw(KeyboardInterrupt) if e.task == "experts" else None)
    assert json.loads((out / "manifest.json").read_text())["completed_units"] == []
    run = ml.router_alignment(model, layers=[0, 1], k=[1], seed=4, out=out, cache=False)  # other options: fine
    assert run.manifest["options"]["seed"] == 4 and run.manifest["status"] == "complete"


def test_a_finished_run_is_not_overwritten_by_other_options(finished, tiny_checkpoint, tmp_path):
    out = _copy(finished, tmp_path)
    done = _moelens("align", tiny_checkpoint("mixtral"), "--out", out, "--layers", "0", "--k", "1,8")
    _one_line_error(done, str(out), "k=[1, 4]", "k=[1, 8]")


def test_a_second_process_is_refused_while_another_writes_the_directory(tiny_checkpoint, tmp_path):
    out = tmp_path / "busy"
    with DirectoryLock(out):
        done = _moelens_process("align", tiny_checkpoint("mixtral"), "--out", out, "--layers", "0", "--k", "1")
    import os

    _one_line_error(done, f"{out} is in use by another moelens process (pid {os.getpid()})")
    assert not (out / "manifest.json").exists()


def test_a_run_starting_elsewhere_before_its_manifest_is_in_use_not_foreign(tiny_checkpoint, tmp_path):
    """Another process holds the directory and has written its first file but not yet its
    manifest: the second is told the directory is in use, not that it is not a run directory."""
    out = tmp_path / "starting"
    with DirectoryLock(out):
        (out / "parts").mkdir()
        done = _moelens("align", tiny_checkpoint("mixtral"), "--out", out, "--layers", "0", "--k", "1")
        _one_line_error(done, f"{out} is in use by another moelens process")
    shutil.rmtree(out / "parts")
    (out / "notes.txt").write_text("mine")  # no holder: a folder of other files is refused as before
    _one_line_error(_moelens("align", tiny_checkpoint("mixtral"), "--out", out, "--layers", "0", "--k", "1"),
                    "is not a moelens run directory")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_two_concurrent_align_processes_one_wins_one_is_refused(tiny_checkpoint, tmp_path):
    out = tmp_path / "race"
    cmd = [sys.executable, "-m", "moelens", "align", str(tiny_checkpoint("mixtral")), "--out", str(out), "--matrix", "all"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    # Either the second started after the first finished (both succeed and the run is complete),
    # or it was refused with the one-line message; never a half-written or broken run.
    assert codes in ([0, 0], [0, 2]), results
    for code, err in results:
        if code == 2:
            assert "in use by another moelens process" in err and "Traceback" not in err
    run = ml.load_run(out)
    assert run.manifest["status"] == "complete" and not (out / "parts").exists()


def test_leftover_temporary_files_are_cleaned_by_the_next_run(finished, tiny_checkpoint, tmp_path):
    out = _copy(finished, tmp_path)
    stale = out / ".alignment.parquet.x1y2.tmp"
    stale.write_bytes(b"")
    ml.router_alignment(tiny_checkpoint("mixtral"), layers=[0], k=[1, 4], out=out, cache=False)
    assert not stale.exists()


@pytest.mark.parametrize("damage", ["truncate", "empty", "missing"])
def test_a_damaged_table_is_named_at_load(finished, tmp_path, damage):
    out = _copy(finished, tmp_path)
    table = out / "alignment_pairs.parquet"
    if damage == "truncate":
        table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])
    elif damage == "empty":
        table.write_bytes(b"")
    else:
        table.unlink()
    with pytest.raises(RunDirectoryError, match="alignment_pairs"):
        ml.load_run(out)
    for args in (("report", out, "--out", tmp_path / "r.html"), ("figure", "comparison_panels", out, "--out", tmp_path / "f.png")):
        _one_line_error(_moelens(*args), "alignment_pairs")
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "f.png").exists()


def test_a_table_missing_a_column_is_named_at_load(finished, tmp_path):
    import pandas as pd

    out = _copy(finished, tmp_path)
    table = pd.read_parquet(out / "spectra.parquet").drop(columns=["sigma"])
    table.to_parquet(out / "spectra.parquet", index=False)
    with pytest.raises(RunDirectoryError, match=r"spectra.*missing columns \['sigma'\]"):
        ml.load_run(out)


def test_report_out_naming_a_directory_is_refused_with_the_users_path(finished, tmp_path):
    target = tmp_path / "reports"
    target.mkdir()
    text = _one_line_error(_moelens("report", finished, "--out", target), str(target), "directory")
    assert ".partial" not in text
    assert list(target.iterdir()) == [] and not list(tmp_path.glob(".*partial*"))
    with pytest.raises(ConfigError):
        ml.report([finished], target)



RESUME_DAMAGE = [d for d in MANIFEST_DAMAGE if d.id in (
    "options=[]", "options.layers=\"x\"", "inputs.a=[1]", "timings.per_unit_s=[1]", "completed_units=\"L0\"", "warnings.L0=\"slow\"",
    "status=\"done\"", "non-utf8", "truncated", "top-level-array", "missing-analysis",
)]


@pytest.mark.parametrize("damage", RESUME_DAMAGE, ids=lambda d: d.id)
def test_resuming_over_a_damaged_manifest_is_one_line_and_writes_nothing(tiny_checkpoint, finished, tmp_path, damage):
    run = _copy(finished, tmp_path)
    damage.apply(run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and not p.name.startswith(".")}
    with pytest.raises(RunDirectoryError) as err:
        ml.router_alignment(tiny_checkpoint("mixtral"), layers=[0], k=[1, 4], out=run, cache=False)
    assert_one_line_naming(str(err.value), damage, run)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and not p.name.startswith(".")} == before
