"""The atlas's runs on several worker processes at once, each run written by one of them.

The atlas's runs are independent but for what clustering feeds (the distances within clusters
and merge costs read the ``cluster-*`` runs), and on the zoo's tiny matrices one thread per run
is what pays: two cores finish two runs in the time of one. :func:`run_steps` starts ``workers``
processes (``spawn``: a fresh interpreter each, nothing inherited from a parent that may already
run threads), each of which plans the atlas again without re-reading the inputs its parent checked
(:func:`moelens.atlas.plan_atlas` with ``checks=False``) and then runs the steps it is handed by
name. A step is handed out once the runs it ``needs`` are finished, the longest path to the end
first (critical-path order, by each step's ``cost``), so the long causal-tracing run does not start
last. Each run directory has one writer (the worker running it, holding the run's lock), so an
interrupted atlas resumes exactly as a serial one does; the parent only reads the finished runs.

Worker progress reaches the parent's callback with the task named after the worker
(``[1] cells``) and the run in the message.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from moelens.progress import ProgressCallback, ProgressEvent, report

#: A worker's share of memory: the atlas runs one model per worker (a trace loads it whole), so
#: workers × the largest model's bytes stay under this share of the available memory.
MEMORY_SHARE = 0.5

_steps: dict[str, Any] = {}
_events: Any = None
_slot = 0


def choose_workers(requested: int | None, pending: int, parallel_ok: bool, model_bytes: int = 0,
                   cpus: int | None = None, available_memory: int | None = None) -> int:
    """How many worker processes run the atlas's ``pending`` runs: ``requested`` (at most one per
    run), else one per core this process may use when runs may share the machine (``parallel_ok``:
    the local executor on the CPU), as many as memory holds one model each, at least 1."""
    from moelens.threads import available_cpus

    if requested is not None:
        return max(1, min(requested, pending))
    if not parallel_ok or pending < 2:
        return 1
    n = min(cpus if cpus is not None else available_cpus(), pending)
    memory = available_memory if available_memory is not None else _available_memory()
    if model_bytes > 0 and memory is not None:
        n = min(n, max(1, int(memory * MEMORY_SHARE // model_bytes)))
    return max(1, n)


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def critical_order(steps: Sequence[Any]) -> list[Any]:
    """``steps`` by the cost of the longest chain of runs each one starts (its own cost plus the
    most costly chain among the runs that need it), longest first; ties keep the plan's order."""
    names = {s.name for s in steps}
    users: dict[str, list[Any]] = {s.name: [] for s in steps}
    for s in steps:
        for n in s.needs:
            if n in names:
                users[n].append(s)
    memo: dict[str, float] = {}

    def chain(s: Any) -> float:
        if s.name not in memo:
            memo[s.name] = s.cost + max((chain(u) for u in users[s.name]), default=0.0)
        return memo[s.name]

    order = {s.name: i for i, s in enumerate(steps)}
    return sorted(steps, key=lambda s: (-chain(s), order[s.name]))


def _init_worker(planner: Callable[..., Any], plan: dict[str, Any], threads: int | None, events: Any, counter: Any) -> None:
    """A worker's start: its thread count, its slot number, and the plan's steps by name
    (``planner(**plan, checks=False)``: the atlas's own planner, handed down rather than imported,
    so that this module stays below the atlas)."""
    global _events, _slot
    if threads is not None:
        from moelens.threads import set_threads

        set_threads(threads)
    import torch

    torch.set_num_threads(threads or torch.get_num_threads())
    with counter.get_lock():
        counter.value += 1
        _slot = counter.value
    _events = events
    steps, _ = planner(**plan, checks=False)
    _steps.update({s.name: s for s in steps})


def _run_step(name: str, directory: str) -> str:
    """Run the step ``name`` into ``directory`` (in a worker), its progress sent to the parent."""
    def forward(event: ProgressEvent) -> None:
        message = f"{name}  {event.message}" if event.message else name
        _events.put(ProgressEvent(f"[{_slot}] {event.task}", event.done, event.total, message, event.step))

    _steps[name].run(Path(directory), forward if _events is not None else None)
    return name


def run_steps(steps: Sequence[Any], out: Path, planner: Callable[..., Any], plan: dict[str, Any], workers: int, total: int,
              load: Callable[[Path], Any], progress: ProgressCallback | None = None, done_before: int = 0) -> dict[str, Any]:
    """Run ``steps`` (none finished yet) on ``workers`` processes; return their runs by name.

    ``planner`` is :func:`moelens.atlas.plan_atlas` and ``plan`` its arguments (the workers plan
    again from them); ``load`` reads a finished run directory. The first error stops every worker (a run
    left unfinished resumes on the next call) and is raised here."""
    from moelens.threads import available_cpus, requested_threads

    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    counter = ctx.Value("i", 0)
    threads = requested_threads()
    if threads is None and not os.environ.get("OMP_NUM_THREADS", "").strip():
        threads = max(1, math.floor(available_cpus() / workers))  # the cores shared out, never more threads than cores
    pending = critical_order(steps)
    names = {s.name for s in steps}
    finished: set[str] = set()
    runs: dict[str, Any] = {}
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            try:
                event = events.get(timeout=0.2)
            except queue.Empty:
                continue
            except (EOFError, OSError):
                return
            if progress is not None:
                progress(event)

    relay = threading.Thread(target=drain, daemon=True)
    relay.start()
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(planner, plan, threads, events, counter))
    running: dict[Future[str], str] = {}
    clean = False
    try:
        while pending or running:
            ready = [s for s in pending if all(n in finished or n not in names for n in s.needs)]
            for s in ready[:max(0, workers - len(running))]:
                pending.remove(s)
                report(progress, "atlas", done_before + len(finished), total, f"{s.name} ({s.analysis})", step=True)
                running[pool.submit(_run_step, s.name, str(out / "runs" / s.name))] = s.name
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                name = running.pop(future)
                future.result()  # a worker's error (or its death: BrokenProcessPool) is raised here
                finished.add(name)
                runs[name] = load(out / "runs" / name)
        clean = True
    finally:
        if not clean:  # stop the other runs now: each resumes on the next call
            _stop_workers(pool)
        pool.shutdown(wait=True, cancel_futures=True)
        stop.set()
        relay.join()
        _flush(events, progress)
        events.close()
    return runs


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """End the pool's worker processes (Python 3.14 has ``terminate_workers``; before it, the
    processes the pool keeps)."""
    terminate = getattr(pool, "terminate_workers", None)
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        if process.is_alive():
            process.terminate()


def _flush(events: Any, progress: ProgressCallback | None) -> None:
    """Events the workers sent after the relay stopped looking (the last ones of a run)."""
    while True:
        try:
            event = events.get_nowait()
        except (queue.Empty, EOFError, OSError, ValueError):
            return
        if progress is not None:
            progress(event)


__all__ = ["choose_workers", "critical_order", "run_steps"]
