"""``atlas --out`` takes only a new, empty or atlas directory: somebody's files (a report.html of
their own, figures, anything) are refused with one line before anything is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moelens.atlas import ATLAS_MARKER, check_atlas_out, is_atlas_directory, plan_atlas
from moelens.errors import OutputExistsError, RunDirectoryError


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("files", [
    {"notes.txt": "mine"},
    {"report.html": "<html>my own report</html>"},
    {"report.html": "<html>mine</html>", "figures/fig1.png": "png"},
    {"runs/notes.txt": "not a run"},
])
def test_a_directory_of_somebodys_files_is_refused_and_left_as_it_was(tiny_checkpoint, tmp_path, files):
    out = tmp_path / "atlas"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = _snapshot(out)
    with pytest.raises(OutputExistsError, match="holds files that are not an atlas"):
        plan_atlas(tiny_checkpoint("mixtral"), out)
    assert _snapshot(out) == before


def test_new_empty_marked_and_older_atlas_directories_are_taken(tmp_path):
    check_atlas_out(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_atlas_out(tmp_path / "empty")
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / ATLAS_MARKER).write_text("moelens atlas\n")
    (marked / "report.html").write_text("<html></html>")
    assert is_atlas_directory(marked)
    older = tmp_path / "older"  # written before the marker existed: runs with manifests, the report
    (older / "runs" / "modules").mkdir(parents=True)
    (older / "runs" / "modules" / "manifest.json").write_text("{}")
    (older / "report.html").write_text("<html></html>")
    assert is_atlas_directory(older)
    check_atlas_out(older)


def test_a_link_inside_an_atlas_directory_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "fig.png").write_bytes(b"someone's figure")
    out = tmp_path / "atlas"
    out.mkdir()
    (out / ATLAS_MARKER).write_text("moelens atlas\n")
    (out / "figures").symlink_to(outside, target_is_directory=True)
    with pytest.raises(RunDirectoryError, match="figures is a symbolic link"):
        check_atlas_out(out)
    assert (outside / "fig.png").read_bytes() == b"someone's figure"


def test_the_command_line_refuses_with_one_line_and_exit_2(tiny_checkpoint, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.html").write_text("<html>my own report</html>")
    done = subprocess.run([sys.executable, "-m", "moelens", "atlas", str(tiny_checkpoint("mixtral")), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr and len(lines) == 1 and str(out) in lines[0], done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["report.html"]
    assert (out / "report.html").read_text() == "<html>my own report</html>"


def test_the_atlas_takes_the_planners_inputs_declared_once(tmp_path):
    """``atlas``'s inputs are :func:`plan_atlas`'s (one declaration, one set of defaults): its
    signature shows them with the planner's defaults, and a misspelt one is refused before
    anything is written."""
    import inspect

    from moelens.atlas import atlas

    shown = inspect.signature(atlas).parameters
    planned = {n: p for n, p in inspect.signature(plan_atlas).parameters.items() if n != "checks"}
    for name, parameter in planned.items():
        assert shown[name].default == parameter.default, name
    assert {"title", "progress", "command", "jobs"} <= set(shown)
    out = tmp_path / "atlas"
    for wrong in ({"tunde": "x"}, {"checks": False}):
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            atlas("model", out, **wrong)
    assert not out.exists()
