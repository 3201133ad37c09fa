"""The matrix store writes and deletes only real folders of its run, never through a link."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moelens.calibration.store import MATRICES, MatrixStore, layer_key
from moelens.errors import RunDirectoryError


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "features.npy").write_bytes(b"someone's array")
    return folder


def test_writes_and_reads_back_with_no_temporary_left(tmp_path):
    store = MatrixStore(tmp_path / "run" / MATRICES)
    array = np.arange(12, dtype=np.float64).reshape(3, 4)
    store.write(2, "features", array)
    np.testing.assert_array_equal(store.read(2, "features"), array)
    assert sorted(p.name for p in (tmp_path / "run" / MATRICES).rglob("*")) == [layer_key(2), "features.npy"]


@pytest.mark.parametrize("linked", ["matrices", "layer"])
def test_a_linked_folder_is_refused_and_its_files_untouched(tmp_path, outside, linked):
    root = tmp_path / "run" / MATRICES
    if linked == "matrices":
        root.parent.mkdir(parents=True)
        root.symlink_to(outside, target_is_directory=True)
    else:
        root.mkdir(parents=True)
        (root / layer_key(0)).symlink_to(outside, target_is_directory=True)
    with pytest.raises(RunDirectoryError, match="symbolic link"):
        MatrixStore(root).write(0, "features", np.zeros((2, 2)))
    assert (outside / "features.npy").read_bytes() == b"someone's array"
    assert sorted(p.name for p in outside.iterdir()) == ["features.npy"]


def test_removing_other_layers_removes_a_link_as_a_link(tmp_path, outside):
    root = tmp_path / "run" / MATRICES
    store = MatrixStore(root)
    store.write(0, "features", np.zeros((2, 2)))
    store.write(1, "features", np.zeros((2, 2)))
    (root / layer_key(5)).symlink_to(outside, target_is_directory=True)
    store.remove_other_layers([0])
    assert sorted(p.name for p in root.iterdir()) == [layer_key(0)]
    assert (outside / "features.npy").read_bytes() == b"someone's array"


def test_removing_other_layers_of_a_linked_store_is_refused(tmp_path, outside):
    root = tmp_path / "run" / MATRICES
    root.parent.mkdir(parents=True)
    root.symlink_to(outside, target_is_directory=True)
    (outside / layer_key(3)).mkdir()
    with pytest.raises(RunDirectoryError, match="symbolic link"):
        MatrixStore(root).remove_other_layers([0])
    assert (outside / layer_key(3)).is_dir()
