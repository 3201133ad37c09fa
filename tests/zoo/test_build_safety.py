"""A zoo build never deletes a directory it cannot show to be a zoo: a damaged or foreign
``zoo.json`` is refused with one line, the files left as they were."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moelens import zoo
from moelens.errors import OutputExistsError, SourceNotFoundError

DAMAGES = {
    "not UTF-8": lambda p: p.write_bytes(b'{"recipe_hash": "\xff\xfe"}'),
    "not JSON": lambda p: p.write_text("{ this is my own file"),
    "not an object": lambda p: p.write_text("[1, 2, 3]"),
    "no recipe hash": lambda p: p.write_text('{"files": {}}'),
    "a folder": lambda p: p.mkdir(),
    "a link": lambda p: p.symlink_to(p.parent / "notes.txt"),
}


def _user_dir(tmp_path: Path, damage: str) -> tuple[Path, dict[str, bytes]]:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    (out / "data").mkdir()
    (out / "data" / "table.csv").write_text("a,b\n1,2\n")
    DAMAGES[damage](out / "zoo.json")
    return out, _snapshot(out)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_directory_with_a_damaged_zoo_json_is_not_deleted(tmp_path, damage):
    out, before = _user_dir(tmp_path, damage)
    with pytest.raises(OutputExistsError, match="--force"):
        zoo.build(out=out, small=True)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no build begun beside it


def test_an_unfinished_zoo_holding_other_files_is_not_replaced(tmp_path):
    out = tmp_path / "zoo"
    out.mkdir()
    (out / "zoo.json").write_text(json.dumps({"recipe_hash": "x", "files": {"base/model.safetensors": 10}}))
    (out / "thesis.tex").write_text("chapter 1\n")
    with pytest.raises(OutputExistsError, match=r"files that are not a zoo's \(thesis.tex\)"):
        zoo.build(out=out, small=True)
    assert (out / "thesis.tex").read_text() == "chapter 1\n"


def test_load_zoo_of_a_damaged_zoo_json_says_so_in_one_error(tmp_path):
    out, _ = _user_dir(tmp_path, "not UTF-8")
    with pytest.raises(SourceNotFoundError, match="not a finished zoo"):
        zoo.load_zoo(out)


def test_the_command_line_gives_one_line_and_exit_2(tmp_path):
    out, before = _user_dir(tmp_path, "not UTF-8")
    done = subprocess.run([sys.executable, "-m", "moelens", "zoo", "build", "--small", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    assert "not UTF-8" in lines[0] and str(out / "zoo.json") in lines[0]
    assert _snapshot(out) == before
