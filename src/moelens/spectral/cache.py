"""An on-disk cache of spectra, keyed by what the spectrum depends on.

The key is the SHA-256 of: the tensor's content hash (its bytes as stored, its dtype and shape),
the matrix role (down is read transposed, so the same bytes give another spectrum), the method
and the compute dtype. A tensor that changes by one bit gets a new key, so a stale spectrum is
never reused; nothing else (paths, layer numbers, model names) enters the key.

One file per matrix: ``<dir>/<key[:2]>/<key>.safetensors`` holding ``sigma`` [r] and ``basis``
[n, r] (fp32 or fp64) with ``rank``, ``side`` and ``digest`` (the :func:`content_hash` of sigma
and basis) as metadata; written atomically. An entry is verified by content when read: one whose
arrays no longer match its digest (a damaged or edited file) is a miss, recomputed and rewritten,
never a wrong answer. A full-size
spectrum is as large as the Gram matrix (Mixtral-8x7B: 64 MiB per expert and role, 16 GiB for
one role of the whole model); pass ``cache=False`` (``--no-cache``) to skip it, or point
``MOELENS_CACHE`` elsewhere.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

FORMAT = "moelens-spectrum-2"


def default_cache_dir() -> Path:
    """``$MOELENS_CACHE/spectra`` if ``MOELENS_CACHE`` is set, else ``~/.cache/moelens/spectra``."""
    root = os.environ.get("MOELENS_CACHE")
    if root:
        return Path(root).expanduser() / "spectra"
    return Path.home() / ".cache" / "moelens" / "spectra"


def content_hash(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (as stored, on the CPU)."""
    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        # A uint8 view exposes the raw bytes of any dtype (bf16 and fp8 have no numpy type).
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def entry_digest(sigma: torch.Tensor, basis: torch.Tensor, rank: int, side: str) -> str:
    """What an entry's ``digest`` metadata holds: the content hashes of its arrays and its fields."""
    return hashlib.sha256(f"{content_hash(sigma)}|{content_hash(basis)}|{int(rank)}|{side}".encode()).hexdigest()


class SpectrumCache:
    """Spectra on disk under ``directory`` (default :func:`default_cache_dir`)."""

    #: A temporary entry older than this was left by a writer that died (a live one finishes in
    #: seconds): the next cache opened on the directory removes it.
    STALE_TEMPORARY_S = 3600.0

    def __init__(self, directory: str | os.PathLike[str] | None = None):
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0
        self.remove_stale_temporaries()

    def remove_stale_temporaries(self) -> int:
        """Delete ``.<entry>.*.tmp`` files that a killed writer left (older than
        :attr:`STALE_TEMPORARY_S`); return how many."""
        import time

        removed = 0
        if not self.directory.is_dir():
            return 0
        cutoff = time.time() - self.STALE_TEMPORARY_S
        for tmp in self.directory.glob("*/.*.tmp"):
            try:
                if tmp.parent.is_symlink() or tmp.is_symlink():
                    continue  # not a folder of this cache: never delete through a link
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
            except OSError:
                pass  # another process removed or finished it
        return removed

    def __repr__(self) -> str:
        return f"SpectrumCache({str(self.directory)!r})"

    @staticmethod
    def key(tensor_hash: str, role: str, method: str, dtype: str) -> str:
        return hashlib.sha256(f"{FORMAT}|{tensor_hash}|{role}|{method}|{dtype}".encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def load(self, key: str) -> tuple[torch.Tensor, torch.Tensor, int, str] | None:
        """``(sigma, basis, rank, side)`` or None when absent or unreadable (then recomputed)."""
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError("format")
                sigma, basis = fh.get_tensor("sigma"), fh.get_tensor("basis")
                rank, side = int(meta["rank"]), meta["side"]
                if meta.get("digest") != entry_digest(sigma, basis, rank, side):
                    raise ValueError("digest")
        except Exception:  # noqa: BLE001 - safetensors raises its own error types
            # A truncated or foreign file is a miss: the spectrum is recomputed and rewritten.
            self.misses += 1
            return None
        self.hits += 1
        return sigma, basis, rank, side

    def store(self, key: str, sigma: torch.Tensor, basis: torch.Tensor, rank: int, side: str) -> None:
        from safetensors.torch import save

        from moelens.safe_files import atomic_write_bytes

        data = save(
            {"sigma": sigma.detach().cpu().contiguous(), "basis": basis.detach().cpu().contiguous()},
            metadata={"format": FORMAT, "rank": str(int(rank)), "side": side, "digest": entry_digest(sigma, basis, rank, side)},
        )
        # atomic, and never through a link (a prefix folder linked elsewhere is refused)
        atomic_write_bytes(self.path(key), data, root=self.directory)
