"""One writer per directory: an exclusive lock that dies with the process holding it.

A :class:`DirectoryLock` is ``fcntl.flock`` on a small file, ``DIR/.moelens.lock``
(:data:`LOCK_NAME`) unless told otherwise, into which the holder writes its pid so that a
process that is refused can say who holds the directory. The kernel drops a flock when the
holder's file is closed, and so whenever the process ends, however it ends (SIGKILL included):
a lock is never left held by a dead process. A lock file left behind by a killed holder is
simply locked again by the next process.

The lock file is bookkeeping, not content: code that asks whether a directory is empty (to
refuse to write into someone's files) ignores an entry named :data:`LOCK_NAME`.

>>> with DirectoryLock("runs/mixtral-gate"):          # raises RunDirectoryError if held
...     ...                                           # write into the directory
>>> with DirectoryLock(cache_dir, blocking=True):     # waits for the holder instead
...     ...

Locks are advisory (only processes that take them are kept out) and need a local or
otherwise flock-capable file system. POSIX only.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path
from types import TracebackType
from typing import Optional

from moelens.errors import RunDirectoryError

LOCK_NAME = ".moelens.lock"


def pid_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` exists on this machine.

    For cleaning up after dead processes: a leftover named after a pid that is not alive can be
    removed. A pid is reused once its process is gone, so True may mean an unrelated process;
    treat True as "keep". A zombie (ended, not yet reaped by its parent) still counts as alive."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: existence and permission check only, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OverflowError:  # not a pid this system can have
        return False
    return True


class DirectoryLock:
    """Exclusive lock on the directory ``path`` (a context manager).

    ``blocking=False`` (the default) fails at once when another process holds the directory,
    with a :class:`~moelens.errors.RunDirectoryError` naming it and the holder's pid;
    ``blocking=True`` waits, with no timeout, until the holder is done. The wait can be
    interrupted (Ctrl-C raises ``KeyboardInterrupt`` as usual).

    The lock lives in ``path / LOCK_NAME``; ``path`` is created if missing. ``lock_file``
    puts it elsewhere: a directory that is replaced as a whole by a rename (a cache entry
    finished in a temporary sibling) keeps its lock beside it, since a lock inside would be
    renamed away with the old directory. The lock file is removed on release.

    The lock belongs to this object, not to the process: a second ``DirectoryLock`` on the same
    directory in the same process is refused like any other holder."""

    def __init__(self, path: str | os.PathLike[str], blocking: bool = False, *, lock_file: str | os.PathLike[str] | None = None):
        self.path = Path(path)
        self.blocking = blocking
        self.lock_file = Path(lock_file) if lock_file is not None else self.path / LOCK_NAME
        self._fd: Optional[int] = None

    def __repr__(self) -> str:
        return f"DirectoryLock({str(self.path)!r}, blocking={self.blocking}, held={self.held})"

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> "DirectoryLock":
        """Take the lock (waiting if ``blocking``); return ``self``."""
        if self._fd is not None:
            raise RuntimeError(f"{self!r} is already held; a DirectoryLock is not re-entrant")
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = _open_lock_file(self.lock_file)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.blocking else fcntl.LOCK_NB))
                except BlockingIOError:
                    holder = _read_pid(fd)
                    raise RunDirectoryError(
                        f"{self.path} is in use by another moelens process (pid {holder}); "
                        "wait for it to finish, or choose another directory"
                    ) from None
                # A holder removes the file on release, and a directory may be renamed away,
                # while this process waits on the old file: the lock is only ours if the file we
                # locked is still the one at lock_file. Otherwise take the one now in place.
                if _is_current(fd, self.lock_file):
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                    self._fd = fd
                    return self
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def release(self) -> None:
        """Give the lock up (nothing happens if it is not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Removed while still held, so that a waiter who then gets the old file sees that it
            # is no longer current and retries (see acquire) instead of sharing the directory.
            if _is_current(fd, self.lock_file):
                self.lock_file.unlink(missing_ok=True)
        finally:
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.release()


def _open_lock_file(path: Path) -> int:
    """Open (creating) the lock file, never through a link: a ``.moelens.lock`` that is a symbolic
    link would otherwise get the file it points at truncated to a pid. Such a link (or anything
    that is not a regular file) is refused with one line."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        if path.is_symlink():
            raise RunDirectoryError(
                f"{path} is a symbolic link; moelens never writes through a link: remove it and run again"
            ) from None
        raise RunDirectoryError(f"cannot open the lock file {path} ({exc.strerror}); remove it and run again") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunDirectoryError(f"{path} is not a regular file; moelens keeps its lock there: remove it and run again")
    return fd


def _is_current(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is the file at ``path`` now (a link there is not)."""
    try:
        here = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (here.st_dev, here.st_ino)


def _read_pid(fd: int) -> str:
    """The pid a holder wrote into its lock file, or "unknown" (it may not have written it yet)."""
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"
