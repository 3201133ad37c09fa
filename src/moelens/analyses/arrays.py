"""Arrays that units return beside their tables, and the run-wide arrays assembled from them.

A unit's :meth:`~moelens.analyses.base.Analysis.compute` returns plain NumPy arrays under the
names its plan declares (:attr:`~moelens.analyses.base.Plan.unit_arrays`); the runner, the one
writer, keeps them while the run goes on::

    DIR/parts/<unit>/<name>.npy     a finished unit's arrays (written before the unit is recorded)

and, once every unit is done, hands them to :meth:`~moelens.analyses.base.Analysis.assemble`,
which yields the run's own arrays one at a time (so memory holds one of them, e.g. one layer's
matrix, not all), each written to ``DIR/<path>.npy``. Without a run directory both live in
memory, and the assembled ones come back as :attr:`moelens.results.Run.arrays`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from moelens.errors import RunDirectoryError


class ArrayStore:
    """Arrays by relative path (``"L00005/features"``): ``<root>/<path>.npy`` written atomically
    (never through a link below ``guard``), or a dictionary when ``root`` is None."""

    def __init__(self, root: str | os.PathLike[str] | None = None, guard: str | os.PathLike[str] | None = None):
        self.root = None if root is None else Path(root)
        self.guard = None if guard is None else Path(guard)
        self.memory: dict[str, np.ndarray] = {}

    def file(self, path: str) -> Path:
        assert self.root is not None
        return self.root / f"{path}.npy"

    def write(self, path: str, array: np.ndarray) -> None:
        from moelens.safe_files import atomic_write

        array = np.asarray(array)  # (np.ascontiguousarray would make a 0-d array 1-d)
        if self.root is None:
            self.memory[path] = array
            return
        atomic_write(self.file(path), lambda fh: np.save(fh, array, allow_pickle=False), root=self.guard or self.root)

    def has(self, path: str) -> bool:
        return path in self.memory if self.root is None else self.file(path).is_file()

    def read(self, path: str, mmap: bool = True) -> np.ndarray:
        """The array at ``path`` (memory-mapped, read-only, from disk)."""
        if self.root is None:
            try:
                return self.memory[path]
            except KeyError:
                raise RunDirectoryError(f"no array {path!r} in this run") from None
        file = self.file(path)
        try:
            return np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
        except FileNotFoundError:
            raise RunDirectoryError(f"{file} is missing; delete the run directory and run the analysis again") from None
        except (OSError, ValueError) as exc:
            raise RunDirectoryError(f"{file} cannot be read ({exc}); delete the run directory and run the analysis again") from None


class RunArrays:
    """What :meth:`Analysis.assemble` and :meth:`Analysis.finish` read: the finished units'
    arrays (:meth:`unit`) and the run's assembled ones (:meth:`read`, once assembled)."""

    def __init__(self, units: ArrayStore, run: ArrayStore):
        self.units = units
        self.run = run

    def unit(self, key: str, name: str) -> np.ndarray:
        """Array ``name`` of the unit ``key``."""
        return self.units.read(f"{key}/{name}")

    def read(self, path: str) -> np.ndarray:
        """The run's array at ``path`` (as :meth:`Analysis.assemble` yielded it)."""
        return self.run.read(path)


def checked_arrays(result: dict, names: tuple[str, ...], where: str) -> dict[str, np.ndarray]:
    """The arrays ``names`` a unit returned; a missing one, or one that is no array, is a bug of
    the analysis."""
    out = {}
    for name in names:
        value = result.get(name)
        if not isinstance(value, np.ndarray):
            raise RunDirectoryError(f"{where}: the analysis returned no {name!r} array")
        out[name] = value
    return out


def write_all(store: ArrayStore, arrays: Iterator[tuple[str, np.ndarray]]) -> list[str]:
    """Write what :meth:`Analysis.assemble` yields, one array at a time; the paths written."""
    written = []
    for path, array in arrays:
        store.write(path, array)
        written.append(path)
    return written


__all__ = ["ArrayStore", "RunArrays", "checked_arrays", "write_all"]
