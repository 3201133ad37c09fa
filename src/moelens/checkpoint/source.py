"""Find a checkpoint: a local directory, or a repo id already in the local Hugging Face cache.

Nothing is downloaded: moelens works offline. The cache root is ``$HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``; a repo ``org/name`` lives in
``models--org--name/snapshots/<commit>/``, and ``refs/<revision>`` names the commit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from moelens.errors import SourceNotFoundError


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _looks_like_repo_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~"))


def resolve_source(source: str | os.PathLike[str], revision: Optional[str] = None) -> Path:
    """Return the directory holding ``config.json`` for ``source``.

    Raises :class:`SourceNotFoundError` with what was looked for."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceNotFoundError(f"{path} is a file; pass the checkpoint directory that holds config.json")
        if not (path / "config.json").is_file():
            raise SourceNotFoundError(f"{path} has no config.json; pass a Hugging Face checkpoint directory")
        return path
    source = str(source)
    if not _looks_like_repo_id(source):
        raise SourceNotFoundError(f"path {source} does not exist; pass a checkpoint directory or a repo id (org/name) in the local HF cache")
    cache = hub_cache_dir()
    repo_dir = cache / f"models--{source.replace('/', '--')}"
    if not repo_dir.is_dir():
        raise SourceNotFoundError(
            f"{source} is neither a local path nor in the Hugging Face cache at {cache}; "
            f"download it first (hf download {source}) or set HF_HUB_CACHE"
        )
    ref = revision or "main"
    ref_file = repo_dir / "refs" / ref
    commit = ref_file.read_text().strip() if ref_file.is_file() else ref
    snapshot = repo_dir / "snapshots" / commit
    if not snapshot.is_dir():
        snaps = sorted(p.name for p in (repo_dir / "snapshots").glob("*")) if (repo_dir / "snapshots").is_dir() else []
        if revision is None and len(snaps) == 1:
            snapshot = repo_dir / "snapshots" / snaps[0]
        else:
            raise SourceNotFoundError(
                f"revision {ref!r} of {source} is not in the cache ({repo_dir}); cached snapshots: {', '.join(snaps) or 'none'}"
            )
    if not (snapshot / "config.json").is_file():
        raise SourceNotFoundError(f"cached snapshot {snapshot} has no config.json; re-download {source}")
    return snapshot
