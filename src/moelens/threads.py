"""How many CPU threads an analysis computes with.

torch's default is one thread per core the machine has. On the zoo's tiny matrices
(d = 64) the threads spend their time waiting for each other, and on a machine busy with other
work each of them also waits for a core: a run of ``distance`` was four times slower with the
default than with one thread. So the count follows the work:

- an explicit request wins: :func:`set_threads` (the CLI's ``--threads N``), then the
  ``OMP_NUM_THREADS`` environment variable;
- otherwise matrices smaller than :data:`SMALL_MATRIX` elements get one thread, larger ones every
  core this process may use (:func:`available_cpus`: its CPU affinity, capped by the cgroup's CPU
  quota, never ``os.cpu_count()``, which counts the machine's cores, not this container's).

This module imports nothing heavy: the CLI reads it before it knows whether torch is needed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from moelens.errors import ConfigError

#: Below this many elements in the largest matrix, threads cost more than they save: one thread.
#: (A 1024 × 1024 matrix; the zoo's largest is 64 × 256, a Mixtral expert's 4096 × 14336.)
SMALL_MATRIX = 1 << 20

#: Where cgroup v2 (``cpu.max``) and v1 (``cpu/cpu.cfs_quota_us``) mount their files.
CGROUP_ROOT = Path("/sys/fs/cgroup")

_requested: int | None = None


def set_threads(threads: int | None) -> None:
    """Compute with ``threads`` CPU threads from now on in this process (``None``: choose from
    the work again). The Python API's one switch; the CLI's ``--threads N`` calls it."""
    global _requested
    _requested = None if threads is None else check_threads(threads, "threads")


def requested_threads() -> int | None:
    """The count :func:`set_threads` asked for, or None."""
    return _requested


def check_threads(value: Any, name: str) -> int:
    """``value`` as a whole number ≥ 1, else one line naming ``name``."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{name}={value!r}: give a whole number of threads ≥ 1")
    return int(text)


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPUs the cgroup's quota allows (quota ÷ period), or None when there is no quota.

    cgroup v2: ``cpu.max`` holds ``"<quota> <period>"`` or ``"max <period>"``; v1:
    ``cpu.cfs_quota_us`` (−1 = none) and ``cpu.cfs_period_us`` under ``cpu/`` or ``cpu,cpuacct/``."""
    v2 = root / "cpu.max"
    try:
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in ("cpu", "cpu,cpuacct", "."):
        try:
            quota_us = int((root / folder / "cpu.cfs_quota_us").read_text().strip())
            period_us = int((root / folder / "cpu.cfs_period_us").read_text().strip())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def available_cpus(affinity: Iterable[int] | None = None, root: Path = CGROUP_ROOT) -> int:
    """The cores this process may use: its affinity set, capped by the cgroup quota (rounded up:
    a quota of 1.5 CPUs keeps two threads busy part of the time), at least 1."""
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except (AttributeError, OSError):  # not Linux
            affinity = range(os.cpu_count() or 1)
    cpus = max(1, len(set(affinity)))
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit - 1e-9)))
    return cpus


def choose_threads(
    largest_matrix: int,
    requested: int | None = None,
    environ: Mapping[str, str] | None = None,
    cpus: int | None = None,
) -> int:
    """The thread count for work whose largest matrix has ``largest_matrix`` elements:
    ``requested`` (else :func:`set_threads`'s), else ``OMP_NUM_THREADS``, else one thread below
    :data:`SMALL_MATRIX` elements and :func:`available_cpus` from there on."""
    if requested is None:
        requested = _requested
    if requested is not None:
        return check_threads(requested, "threads")
    env = os.environ if environ is None else environ
    if env.get("OMP_NUM_THREADS", "").strip():
        return check_threads(env["OMP_NUM_THREADS"], "OMP_NUM_THREADS")
    if largest_matrix < SMALL_MATRIX:
        return 1
    return available_cpus() if cpus is None else max(1, int(cpus))


def largest_matrix(models: Mapping[str, Any] | Iterable[Any]) -> int:
    """Elements of the largest weight matrix of the opened ``models`` (hidden size × expert or
    dense FFN width), read from their configs without loading a tensor; 0 when none says."""
    values = models.values() if isinstance(models, Mapping) else models
    largest = 0
    for model in values:
        if model is None:
            continue
        try:
            d = int(model.hidden_size)
        except Exception:  # not a checkpoint (a run directory, a text): no matrix of its own
            continue
        widths = [d]
        for attr in ("expert_ffn", "intermediate_size"):
            try:
                widths.append(int(getattr(model, attr)))
            except Exception:
                pass
        largest = max(largest, d * max(widths))
    return largest


def apply_threads(threads: int) -> int:
    """Set torch's intra-op threads to ``threads`` (and its inter-op pool, which can only be set
    before the first parallel work; later it is left as it is). Returns ``threads``."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already started: torch refuses a second setting
        pass
    return threads


def use_threads_for(models: Mapping[str, Any] | Iterable[Any], requested: int | None = None) -> int:
    """Choose the count for ``models`` (:func:`choose_threads`), apply it, and return it."""
    return apply_threads(choose_threads(largest_matrix(models), requested))


__all__ = [
    "CGROUP_ROOT", "SMALL_MATRIX", "apply_threads", "available_cpus", "cgroup_cpu_limit", "check_threads",
    "choose_threads", "largest_matrix", "requested_threads", "set_threads", "use_threads_for",
]
