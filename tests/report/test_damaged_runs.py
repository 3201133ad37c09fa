"""`moelens report` and `moelens figure` refuse a damaged run directory in one line on stderr,
with exit status 2, no traceback and nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.results.damage import MANIFEST_DAMAGE, TABLE_DAMAGE, Damage, assert_refused, run_cli, save_clustering_run

DAMAGE = MANIFEST_DAMAGE + TABLE_DAMAGE


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda d: d.id)
def test_report_refuses_a_damaged_run(tmp_path, capsys, damage: Damage):
    run = save_clustering_run(tmp_path / "run")
    damage.apply(run)
    out = tmp_path / "report.html"
    code, _, err = run_cli(["report", str(run), "--out", str(out)], capsys)
    assert_refused(code, err, damage, run)
    assert not out.exists()


@pytest.mark.parametrize("damage", [d for d in DAMAGE if d.id in (
    "options=[]", "options.layers=\"x\"", "inputs.a=[1]", "status=\"done\"", "non-utf8", "truncated", "top-level-array",
    "missing-status", "missing-column", "wrong-dtype", "missing-dominant", "nan-frequency", "expert-beyond-model", "truncated-parquet",
)], ids=lambda d: d.id)
def test_figure_refuses_a_damaged_run(tmp_path, capsys, damage: Damage):
    run = save_clustering_run(tmp_path / "run")
    damage.apply(run)
    out = tmp_path / "map.png"
    code, _, err = run_cli(["figure", "cluster_map", str(run), "--out", str(out)], capsys)
    assert_refused(code, err, damage, run)
    assert not out.exists()


def test_the_undamaged_run_makes_a_report_and_a_figure(tmp_path, capsys):
    """The same fixture undamaged: the refusals above are the damage's doing."""
    run = save_clustering_run(tmp_path / "run")
    code, _, err = run_cli(["report", str(run), "--out", str(tmp_path / "r.html")], capsys)
    assert code == 0, err
    code, _, err = run_cli(["figure", "cluster_map", str(run), "--out", str(tmp_path / "m.png")], capsys)
    assert code == 0, err
    assert (tmp_path / "r.html").is_file() and (tmp_path / "m.png").is_file()


def test_a_damaged_manifest_from_the_shell(tmp_path):
    """The real entry point: one line on stderr, status 2, no traceback."""
    run = save_clustering_run(tmp_path / "run")
    (run / "manifest.json").write_text('{"analysis": "clustering", "status": "complete", "options": ["layers"]}')
    done = subprocess.run([sys.executable, "-m", "moelens", "report", str(run), "--out", str(tmp_path / "r.html")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "options must be an object" in done.stderr and not (tmp_path / "r.html").exists()
