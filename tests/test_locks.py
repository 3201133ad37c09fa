"""``moelens.locks``: one holder per directory across processes, released however the holder
ends, and a blocking wait that Ctrl-C interrupts.

Other processes are forked (they start at once, with moelens already imported) and talk to
the test through a pipe. No lock is held by the test process when it forks, so a child never
inherits one."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from moelens.errors import RunDirectoryError
from moelens.locks import LOCK_NAME, DirectoryLock, pid_alive

if not hasattr(os, "fork"):
    pytest.skip("the other processes are forked", allow_module_level=True)
fork = multiprocessing.get_context("fork")
TIMEOUT = 30


def _hold(directory: str, conn, blocking: bool = False) -> None:
    """Child: take the lock, report, hold it until told to go (or killed)."""
    try:
        conn.send(("waiting", os.getpid()))
        with DirectoryLock(directory, blocking=blocking):
            conn.send(("locked", os.getpid()))
            conn.recv()  # anything: release and exit
    except KeyboardInterrupt:
        conn.send(("interrupted", os.getpid()))
        os._exit(42)


def start_holder(directory: Path, blocking: bool = False) -> tuple[multiprocessing.Process, object]:
    parent, child = fork.Pipe()
    proc = fork.Process(target=_hold, args=(str(directory), child, blocking), daemon=True)
    proc.start()
    assert parent.poll(TIMEOUT) and parent.recv()[0] == "waiting"
    return proc, parent


def expect(conn, what: str) -> int:
    assert conn.poll(TIMEOUT), f"no {what!r} from the child"
    message, pid = conn.recv()
    assert message == what
    return pid


def test_a_second_process_is_refused_until_the_holder_is_killed(tmp_path):
    proc, conn = start_holder(tmp_path)
    pid = expect(conn, "locked")
    assert pid == proc.pid != os.getpid()
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(pid)
    with pytest.raises(RunDirectoryError) as info:
        DirectoryLock(tmp_path).acquire()
    assert str(info.value).startswith(f"{tmp_path} is in use by another moelens process (pid {pid})")

    os.kill(pid, signal.SIGKILL)  # no cleanup runs: the kernel drops the flock
    proc.join(TIMEOUT)
    assert proc.exitcode == -signal.SIGKILL
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(pid)  # left behind, and harmless
    with DirectoryLock(tmp_path) as lock:
        assert lock.held
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_blocking_acquire_waits_for_the_holder(tmp_path):
    proc, conn = start_holder(tmp_path)
    expect(conn, "locked")
    got = threading.Event()

    def wait_for_it():
        with DirectoryLock(tmp_path, blocking=True):
            got.set()

    waiter = threading.Thread(target=wait_for_it, daemon=True)
    waiter.start()
    assert not got.wait(1.0), "acquired while another process held the lock"
    conn.send("go")
    proc.join(TIMEOUT)
    assert proc.exitcode == 0
    assert got.wait(TIMEOUT)
    waiter.join(TIMEOUT)


def test_ctrl_c_interrupts_a_blocking_wait(tmp_path):
    holder, holder_conn = start_holder(tmp_path)
    expect(holder_conn, "locked")
    waiter, conn = start_holder(tmp_path, blocking=True)
    time.sleep(0.5)  # let the waiter reach flock
    assert not conn.poll(0), "the waiter took a held lock"
    os.kill(waiter.pid, signal.SIGINT)
    expect(conn, "interrupted")
    waiter.join(TIMEOUT)
    assert waiter.exitcode == 42
    holder_conn.send("go")
    holder.join(TIMEOUT)
    assert holder.exitcode == 0


def test_exclusive_after_a_release_that_removes_the_lock_file(tmp_path):
    """A waiter that wakes on the removed lock file must lock the current one, or a newcomer
    creating a fresh file would hold the directory at the same time."""
    first = DirectoryLock(tmp_path).acquire()
    second = DirectoryLock(tmp_path, blocking=True)
    waiter = threading.Thread(target=second.acquire, daemon=True)
    waiter.start()
    time.sleep(0.3)
    first.release()
    waiter.join(TIMEOUT)
    assert second.held
    with pytest.raises(RunDirectoryError, match=f"pid {os.getpid()}"):
        DirectoryLock(tmp_path).acquire()
    second.release()


def test_the_lock_file_can_live_beside_the_directory(tmp_path):
    target = tmp_path / "cache-entry"
    lock = DirectoryLock(target, lock_file=tmp_path / ".cache-entry.lock").acquire()
    with pytest.raises(RunDirectoryError, match=f"{target} is in use"):
        DirectoryLock(target, lock_file=tmp_path / ".cache-entry.lock").acquire()
    lock.release()
    assert list(tmp_path.iterdir()) == []


def test_pid_alive(tmp_path):
    assert pid_alive(os.getpid())
    proc = fork.Process(target=os._exit, args=(0,))
    proc.start()
    proc.join(TIMEOUT)  # reaped: the pid is free
    assert not pid_alive(proc.pid)
    assert not pid_alive(0) and not pid_alive(-1) and not pid_alive(2**40)


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("someone's notes\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).symlink_to(target)
    with pytest.raises(RunDirectoryError, match="is a symbolic link"):
        DirectoryLock(run).acquire()
    assert target.read_text() == "someone's notes\n"
    (run / LOCK_NAME).unlink()
    (run / LOCK_NAME).symlink_to(tmp_path / "missing")  # a dangling link is not created through either
    with pytest.raises(RunDirectoryError, match="is a symbolic link"):
        DirectoryLock(run).acquire()
    assert not (tmp_path / "missing").exists()


def test_a_lock_file_that_is_a_folder_is_refused_with_one_line(tmp_path):
    (tmp_path / "run" / LOCK_NAME).mkdir(parents=True)
    with pytest.raises(RunDirectoryError, match="remove it and run again"):
        DirectoryLock(tmp_path / "run").acquire()
