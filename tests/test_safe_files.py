"""Writes and deletions under an output directory never go through a link (moelens.safe_files)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moelens.errors import RunDirectoryError
from moelens.safe_files import (
    SCRATCH,
    LinkRefusedError,
    atomic_write_bytes,
    check_no_links,
    is_temporary,
    refuse_links_inside,
    remove_dead_scratch,
    remove_temporaries,
    remove_tree,
    scratch_dir,
)


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder of someone's files beside the output directory."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious\n")
    return folder


def test_atomic_write_replaces_a_link_at_the_name_and_leaves_its_target(tmp_path, outside):
    out = tmp_path / "out"
    out.mkdir()
    (out / "table.parquet").symlink_to(outside / "keep.txt")
    atomic_write_bytes(out / "table.parquet", b"new", root=out)
    assert (outside / "keep.txt").read_text() == "precious\n"
    assert not (out / "table.parquet").is_symlink() and (out / "table.parquet").read_bytes() == b"new"
    assert [p.name for p in out.iterdir()] == ["table.parquet"]  # no temporary left


def test_atomic_write_into_a_linked_folder_is_refused(tmp_path, outside):
    out = tmp_path / "out"
    out.mkdir()
    (out / "parts").symlink_to(outside, target_is_directory=True)
    with pytest.raises(LinkRefusedError, match="parts is a symbolic link"):
        atomic_write_bytes(out / "parts" / "L0" / "x.parquet", b"new", root=out)
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]


def test_check_no_links_refuses_paths_outside_the_root(tmp_path):
    with pytest.raises(RunDirectoryError, match="outside the output directory"):
        check_no_links(tmp_path / "out", tmp_path / "elsewhere")
    with pytest.raises(RunDirectoryError, match="leaves the output directory"):
        check_no_links(tmp_path / "out", tmp_path / "out" / ".." / "elsewhere")


def test_remove_tree_removes_a_link_as_a_link(tmp_path, outside):
    link = tmp_path / "parts"
    link.symlink_to(outside, target_is_directory=True)
    remove_tree(link)
    assert not link.is_symlink() and (outside / "keep.txt").read_text() == "precious\n"
    folder = tmp_path / "real"
    folder.mkdir()
    (folder / "inner").symlink_to(outside, target_is_directory=True)
    remove_tree(folder)  # a link inside is unlinked, never descended into
    assert not folder.exists() and (outside / "keep.txt").is_file()


def test_refuse_links_inside_names_the_link(tmp_path, outside):
    out = tmp_path / "out"
    (out / "matrices").mkdir(parents=True)
    refuse_links_inside(out)  # no link: fine
    (out / "matrices" / "L00000").symlink_to(outside, target_is_directory=True)
    with pytest.raises(LinkRefusedError, match="L00000 is a symbolic link"):
        refuse_links_inside(out)


def test_temporaries_are_only_moelens_names_and_removed_at_any_depth(tmp_path, outside):
    assert is_temporary(".features.npy.123-ab.tmp") and is_temporary(".manifest.json.x.tmp")
    assert not is_temporary("notes.tmp") and not is_temporary(".tmp") and not is_temporary("a.b.tmp")
    deep = tmp_path / "out" / "matrices" / "L00003"
    deep.mkdir(parents=True)
    (deep / ".features.npy.1-ab.tmp").write_bytes(b"x")
    (deep / "features.npy").write_bytes(b"x")
    (tmp_path / "out" / "mine.tmp").write_bytes(b"x")
    (outside / ".other.npy.1-ab.tmp").write_bytes(b"x")
    (tmp_path / "out" / "linked").symlink_to(outside, target_is_directory=True)
    removed = remove_temporaries(tmp_path / "out")
    assert removed == [deep / ".features.npy.1-ab.tmp"]
    assert (deep / "features.npy").exists() and (tmp_path / "out" / "mine.tmp").exists()
    assert (outside / ".other.npy.1-ab.tmp").exists()  # behind a link: not ours


def test_scratch_of_dead_processes_is_removed_and_live_scratch_kept(tmp_path):
    out = tmp_path / "out"
    mine = scratch_dir(out)
    assert mine.parent == out / SCRATCH and mine.name.startswith(f"{os.getpid()}-")
    dead = out / SCRATCH / f"{dead_pid()}-0123abcd"
    (dead / "merged").mkdir(parents=True)
    (dead / "merged" / "model.safetensors").write_bytes(b"x")
    foreign = out / SCRATCH / "notes"
    foreign.mkdir()
    assert remove_dead_scratch(out) == [dead]
    assert mine.is_dir() and foreign.is_dir() and not dead.exists()
    remove_tree(mine)
    remove_tree(foreign)
    remove_dead_scratch(out)
    assert not (out / SCRATCH).exists()  # emptied: the folder goes too
