"""Where an analysis's units run: the executor protocol, one unit's computation, the local executor.

The runner (:mod:`moelens.analyses.runner`) owns the run: it plans, writes each finished unit,
resumes, assembles the tables. An executor only decides WHERE the units of a plan are computed
and hands their results back in the order they finish:

- :class:`LocalExecutor` (the default): in this process, one unit after another;
- :class:`~moelens.analyses.executors.ray_executor.RayExecutor`: as Ray tasks on a local or an
  existing cluster, each worker reading its own slices of the checkpoint.

A unit's numbers never depend on the executor: every random draw of a unit comes from its own
seed (drawn in the plan from the config's seed and the unit's key), and a unit is pure work on
the files it names. So a run begun on one executor may be resumed on another, and the executor
is recorded in the manifest (``"executor"``) as information, not as an option to match.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd

from moelens.analyses.base import Analysis, Plan, Unit, UnitContext
from moelens.errors import MoelensError
from moelens.progress import ProgressCallback

EXECUTORS = ("local", "ray")


class ExecutorError(MoelensError):
    """A unit that could not be computed where the executor sent it (its worker kept dying, or
    the cluster went away): the units already finished are kept, and the same command resumes."""


@dataclass
class UnitResult:
    """One finished unit, as an executor hands it back: its tables, the seconds its computation
    took, its warnings and counters, and where it ran (``worker`` = ``host:pid``, the compute
    ``device``, the worker process's peak resident memory so far). ``reads`` holds the digests
    of the tensors this process read for the first time while planning and computing it, per
    checkpoint directory (read key -> digest; see :mod:`moelens.checkpoint.store`)."""

    key: str
    tables: dict[str, pd.DataFrame]
    seconds: float
    warnings: list[str] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)
    device: str | None = None
    worker: str = ""
    peak_rss_mib: float = 0.0
    reads: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class Job:
    """What an executor is asked to run: the analysis, its opened input models, the user's
    config, the driver's plan and where progress goes."""

    analysis: Analysis
    models: Mapping[str, Any]
    config: Any
    plan: Plan
    progress: ProgressCallback | None = None


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compute_unit(analysis: Analysis, plan: Plan, unit: Unit, progress: ProgressCallback | None = None) -> UnitResult:
    """One unit's pure work in this process: ``analysis.compute`` and what it said while working."""
    from moelens.checkpoint.store import take_read_digests

    context = UnitContext(progress)
    t0 = time.perf_counter()
    tables = analysis.compute(plan, unit, context)
    seconds = time.perf_counter() - t0
    device = plan.options.get("device") if isinstance(plan.options, Mapping) else None
    return UnitResult(
        key=unit.key, tables=dict(tables), seconds=seconds, warnings=list(context.warnings),
        counters=dict(context.counters), device=None if device is None else str(device),
        worker=f"{socket.gethostname()}:{os.getpid()}", peak_rss_mib=peak_rss_mib(), reads=take_read_digests(),
    )


class Session:
    """An executor at work on one job: :meth:`run` yields the results of ``units`` as they
    finish; :meth:`info` is what the manifest records (updated as results arrive)."""

    def info(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, units: list[Unit]) -> Iterator[UnitResult]:  # pragma: no cover - abstract
        raise NotImplementedError


class Executor:
    """Base class: :meth:`plan` plans the job on the driver, :meth:`session` opens what runs it."""

    name: ClassVar[str]

    def plan(self, analysis: Analysis, models: Mapping[str, Any], config: Any) -> Plan:
        """The driver's plan: every check of the user's input happens here, before anything is
        started or written."""
        return analysis.plan(models, config)

    @contextmanager
    def session(self, job: Job) -> Iterator[Session]:  # pragma: no cover - abstract
        raise NotImplementedError
        yield


class LocalSession(Session):
    def __init__(self, job: Job):
        self.job = job
        self.devices: set[str] = set()

    def info(self) -> dict[str, Any]:
        import torch

        return {"name": "local", "threads": torch.get_num_threads(), "devices": sorted(self.devices)}

    def run(self, units: list[Unit]) -> Iterator[UnitResult]:
        for unit in units:
            result = compute_unit(self.job.analysis, self.job.plan, unit, self.job.progress)
            if result.device:
                self.devices.add(result.device)
            yield result


class LocalExecutor(Executor):
    """Every unit in this process, in plan order, with progress inside each unit."""

    name = "local"

    def __repr__(self) -> str:
        return "LocalExecutor()"

    @contextmanager
    def session(self, job: Job) -> Iterator[Session]:
        yield LocalSession(job)


__all__ = [
    "EXECUTORS", "Executor", "ExecutorError", "Job", "LocalExecutor", "LocalSession", "Session", "UnitResult",
    "compute_unit", "peak_rss_mib",
]
