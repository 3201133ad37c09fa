"""``moelens tiny --out DIR`` (``build_tiny_checkpoint``) writes only into a new or empty
directory: anything already there is refused before a byte is written."""

from __future__ import annotations

import sys

import pytest

import moelens as ml
from moelens import cli
from moelens.errors import MoelensError, OutputExistsError
from moelens.locks import LOCK_NAME
from moelens.testing.tiny import TinySpec, build_tiny_checkpoint


def listing(directory):
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir())


def test_a_non_empty_directory_is_refused_untouched(tiny_checkpoint, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=f"{mine} exists and is not empty; choose an empty or new --out directory"):
        build_tiny_checkpoint(TinySpec("mixtral"), mine)
    assert listing(mine)[0][0] == "notes.txt" and len(listing(mine)) == 1

    # an earlier checkpoint is not overwritten either (nor mixed with a different one)
    earlier = tiny_checkpoint("mixtral")
    before = listing(earlier)
    with pytest.raises(OutputExistsError, match="not empty"):
        build_tiny_checkpoint(TinySpec("qwen3_moe"), earlier)
    assert listing(earlier) == before
    assert issubclass(OutputExistsError, MoelensError)


def test_a_file_is_refused(tmp_path):
    file = tmp_path / "checkpoint"
    file.write_text("not a directory")
    with pytest.raises(OutputExistsError, match="exists and is not a directory"):
        build_tiny_checkpoint(TinySpec("mixtral"), file)
    assert file.read_text() == "not a directory"


def test_new_and_empty_directories_are_written(tmp_path):
    new = build_tiny_checkpoint(TinySpec("olmoe"), tmp_path / "a" / "new")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / LOCK_NAME).write_text("")  # a lock file is bookkeeping, not content
    build_tiny_checkpoint(TinySpec("olmoe"), empty)
    assert ml.open_model(new).family == ml.open_model(empty).family == "olmoe"


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.bin").write_bytes(b"\0")
    monkeypatch.setattr(sys, "argv", ["moelens", "tiny", "mixtral", "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert lines[0] == f"error: {out} exists and is not empty; choose an empty or new --out directory"
    assert [p.name for p in out.iterdir()] == ["keep.bin"]
