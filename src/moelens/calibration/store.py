"""The matrices of a calibration run, by layer, beside its Parquet tables.

Tables hold what a reader wants as rows (usage per expert, tokens); the large per-layer arrays are
NumPy files a reader maps into memory one layer at a time::

    RUN/matrices/L00005/features.npy        [E, d]  float64  mean output of every expert (HC-SMoE)
    RUN/matrices/L00005/router_logits.npy   [N, E]  float32  router logits of every token (M-SMoE)
    RUN/matrices/L00005/topk.npy            [N, k]  int32    the experts each token was routed to

Row t of ``router_logits`` and ``topk`` is token t of the run's ``calibration_tokens`` table. The
runner writes each file atomically (a temporary file renamed into place) when the run completes,
from the arrays its units returned (a layer's shards added up, see
:mod:`moelens.analyses.calibration`). Without a directory (a run kept in memory) the arrays stay
in a dictionary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from moelens.errors import RunDirectoryError
from moelens.safe_files import atomic_write, link_refused, remove_tree

MATRICES = "matrices"
NAMES = ("features", "router_logits", "topk")


def layer_key(layer: int) -> str:
    return f"L{int(layer):05d}"


class MatrixStore:
    """Per-layer arrays under ``root`` (``RUN/matrices``), or in memory when ``root`` is None."""

    def __init__(self, root: Optional[str | os.PathLike[str]] = None):
        self.root = None if root is None else Path(root)
        self._memory: dict[tuple[int, str], np.ndarray] = {}

    def __repr__(self) -> str:
        return f"MatrixStore({str(self.root) if self.root is not None else 'in memory'})"

    def _file(self, layer: int, name: str) -> Path:
        assert self.root is not None
        return self.root / layer_key(layer) / f"{name}.npy"

    def write(self, layer: int, name: str, array: np.ndarray) -> None:
        """Store ``array`` as ``name`` of ``layer`` (replacing what was there, atomically)."""
        array = np.ascontiguousarray(array)
        if self.root is None:
            self._memory[(int(layer), name)] = array
            return
        # never through a link: matrices/ and its layer folders must be real directories of the run
        atomic_write(self._file(layer, name), lambda fh: np.save(fh, array, allow_pickle=False), root=self.root.parent)

    def read(self, layer: int, name: str, mmap: bool = True) -> np.ndarray:
        """The array ``name`` of ``layer`` (memory-mapped, read-only, from disk)."""
        if self.root is None:
            try:
                return self._memory[(int(layer), name)]
            except KeyError:
                raise RunDirectoryError(f"no {name} matrix of layer {layer} in this calibration") from None
        path = self._file(layer, name)
        if not path.is_file():
            raise RunDirectoryError(f"{path} is missing: the calibration run lacks its {name} matrix of layer {layer}; "
                                    "delete the run directory and calibrate again")
        try:
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise RunDirectoryError(f"{path} cannot be read ({exc}); delete the run directory and calibrate again") from None

    def has(self, layer: int, names: Iterable[str] = NAMES) -> bool:
        if self.root is None:
            return all((int(layer), n) in self._memory for n in names)
        return all(self._file(layer, n).is_file() for n in names)

    def missing(self, layers: Iterable[int], names: Iterable[str] = NAMES) -> list[int]:
        names = tuple(names)
        return [int(L) for L in layers if not self.has(L, names)]

    def remove_other_layers(self, layers: Iterable[int]) -> None:
        """Delete the matrices of layers not in ``layers`` (left by an earlier, abandoned run)."""
        keep = {layer_key(L) for L in layers}
        if self.root is None:
            self._memory = {k: v for k, v in self._memory.items() if layer_key(k[0]) in keep}
            return
        if self.root.is_symlink():
            raise link_refused(self.root)
        if not self.root.is_dir():
            return
        for child in self.root.iterdir():
            if child.name not in keep and (child.is_symlink() or child.is_dir()):
                remove_tree(child)  # a link is removed as a link: what it points at is not ours


__all__ = ["MATRICES", "NAMES", "MatrixStore", "layer_key"]
