"""File operations that write and delete only moelens' own files, never through a link.

Every output directory (``--out``) belongs to the user: moelens writes what it creates there,
removes only what it created, and never follows a symbolic link found inside it (a link named
``parts`` or ``.moelens.lock`` pointing elsewhere must not get the files it points at truncated
or deleted). The rules, in one place:

- a file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (never opened through a link), then
  renamed over its final name: a rename replaces a link itself, not the file it points at;
- a folder moelens writes into (``parts/L00003``) must be a real directory, every component
  from the output directory down (:func:`check_no_links`); a link is refused with one line;
- a tree is removed with :func:`remove_tree`, which removes a link as a link and never
  descends through one;
- scratch files live under ``--out/.moelens-tmp/<pid>-*`` (:func:`scratch_dir`) and temporary
  files are named ``.<name>.*.tmp``: the next process holding the directory's lock removes
  those of dead processes (:func:`remove_temporaries`, :func:`remove_dead_scratch`), and
  nothing else.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import BinaryIO, Callable

from moelens.errors import RunDirectoryError

#: Scratch space of a command inside its output directory.
SCRATCH = ".moelens-tmp"


class LinkRefusedError(RunDirectoryError):
    """A symbolic link where moelens would write or delete its own files."""


def link_refused(path: Path) -> LinkRefusedError:
    return LinkRefusedError(
        f"{path} is a symbolic link; moelens writes and deletes only its own files under an output directory "
        "and never through a link: remove the link, or choose another --out directory"
    )


def check_no_links(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Raise :class:`LinkRefusedError` if ``path`` or any folder between ``root`` (itself not
    checked: the user named it) and ``path`` is a symbolic link. ``path`` outside ``root`` is
    refused as well, so nothing is written beside the output directory by mistake."""
    root, path = Path(root), Path(path)
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise RunDirectoryError(f"{path} is outside the output directory {root}; moelens writes only under --out") from None
    if ".." in rel.parts:
        raise RunDirectoryError(f"{path} leaves the output directory {root}; moelens writes only under --out")
    current = root
    for part in rel.parts:
        current = current / part
        if current.is_symlink():
            raise link_refused(current)


def find_links(root: str | os.PathLike[str]) -> list[Path]:
    """Every symbolic link inside ``root`` (the walk never enters one)."""
    found = []
    for here, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            p = Path(here) / name
            if p.is_symlink():
                found.append(p)
    return found


def refuse_links_inside(root: str | os.PathLike[str]) -> None:
    """Raise :class:`LinkRefusedError` (naming the first) if ``root`` holds a symbolic link:
    a directory moelens manages holds only real files it wrote."""
    links = find_links(root)
    if links:
        raise link_refused(sorted(links)[0])


def temporary_name(path: Path) -> Path:
    """``.<name>.<pid>-<random>.tmp`` beside ``path``: the pattern :func:`remove_temporaries` knows."""
    return path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _new_file(path: Path) -> int:
    """Create ``path`` exclusively, refusing to follow a link (mode as a plain open would give)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None], root: str | os.PathLike[str] | None = None) -> Path:
    """Write ``path`` in one step: ``write(fh)`` fills a new temporary file beside it, which is
    then renamed over ``path`` (a link at ``path`` is replaced, its target untouched). With
    ``root``, every folder from ``root`` down must be a real directory (:func:`check_no_links`)."""
    path = Path(path)
    if root is not None:
        check_no_links(root, path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    if root is not None:
        check_no_links(root, path.parent)  # a link may have been in place of a folder mkdir accepted
    tmp = temporary_name(path)
    try:
        fd = _new_file(tmp)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, root: str | os.PathLike[str] | None = None) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda fh: fh.write(data), root)


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Remove ``path``: a link is removed as a link (its target untouched), a folder with all it
    holds (links inside removed as links, never followed), a file unlinked; missing is fine."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)  # rmtree unlinks links it meets, never descends into them


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one of moelens' temporary files (``.<name>.<anything>.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp") and name.count(".") >= 3


def remove_temporaries(root: str | os.PathLike[str]) -> list[Path]:
    """Remove every moelens temporary file (``.<name>.*.tmp``) under ``root``, links never
    followed; call it holding the directory's lock (no writer alive). Returns what was removed."""
    removed = []
    if not Path(root).is_dir() or Path(root).is_symlink():
        return removed
    for here, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            if is_temporary(name):
                p = Path(here) / name
                try:
                    p.unlink()
                    removed.append(p)
                except OSError:
                    pass
    return removed


def scratch_dir(out: str | os.PathLike[str]) -> Path:
    """A new private folder ``out/.moelens-tmp/<pid>-<random>`` for scratch files; the caller
    removes it with :func:`remove_tree` (a killed process leaves it to :func:`remove_dead_scratch`)."""
    out = Path(out)
    base = out / SCRATCH
    check_no_links(out, base)
    base.mkdir(parents=True, exist_ok=True)
    check_no_links(out, base)
    path = base / f"{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    return path


def remove_dead_scratch(out: str | os.PathLike[str]) -> list[Path]:
    """Remove the scratch folders under ``out/.moelens-tmp`` of processes that are gone (and the
    folder itself once empty). Only names this module writes (``<pid>-<hex>``) are touched."""
    from moelens.locks import pid_alive

    base = Path(out) / SCRATCH
    removed: list[Path] = []
    if base.is_symlink():
        base.unlink()
        return [base]
    if not base.is_dir():
        return removed
    for entry in base.iterdir():
        pid, _, rest = entry.name.partition("-")
        if not (pid.isdigit() and rest):
            continue
        if not pid_alive(int(pid)):
            remove_tree(entry)
            removed.append(entry)
    try:
        base.rmdir()
    except OSError:
        pass  # not empty: a live process's scratch
    return removed


def check_empty_output(out: str | os.PathLike[str], kept: tuple[str, ...] = ()) -> None:
    """``out`` must be missing or a directory that holds nothing (its lock file and the names in
    ``kept`` aside): a checkpoint written there is never mixed with, nor written over, files that
    are already there."""
    from moelens.errors import OutputExistsError
    from moelens.locks import LOCK_NAME

    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise OutputExistsError(f"{out} is a broken symbolic link; choose an empty or new --out directory")
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory; choose an empty or new --out directory")
    if any(entry.name not in (LOCK_NAME, *kept) for entry in out.iterdir()):
        raise OutputExistsError(f"{out} exists and is not empty; choose an empty or new --out directory")


__all__ = [
    "SCRATCH", "LinkRefusedError", "atomic_write", "atomic_write_bytes", "check_empty_output", "check_no_links", "find_links", "is_temporary",
    "refuse_links_inside", "remove_dead_scratch", "remove_tree", "remove_temporaries", "scratch_dir", "temporary_name",
]
