"""Units as Ray tasks: on a local cluster started for the run, or on an existing one.

A task receives paths and names, never tensors: a :class:`RemoteJob` (the analysis, the config,
each input model as a :class:`ModelRef` = source, revision and file fingerprints, the thread
count) and a :class:`~moelens.analyses.base.Unit`. The worker opens the checkpoints itself (from
shared storage or its own Hugging Face cache), checks that its files are the driver's (same
fingerprints), plans the job again (headers only, once per worker process and run), reads its
layer's slices, computes, and returns the unit's tables: a few thousand rows, small beside the
weights it read. The driver writes them into the run directory as the local executor does (one
writer, atomic parts), so resume, the manifest and the assembled tables are the same.

The driver keeps at most ``workers`` tasks in flight. A unit that fails (its worker process died,
or it raised an error other than a user's mistake) is submitted again, at most ``max_retries``
times; a unit's numbers do not depend on the attempt (its seed is the plan's). Every task runs
with ``threads`` threads, set explicitly in torch and in the BLAS pools (SciPy's LAPACK, used for
the CPU decompositions, has its own), so a Ray run and a local run with the same thread count do
the same arithmetic.

GPUs: with ``gpus_per_worker`` > 0 each task asks Ray for that share of a GPU, and Ray makes just
that device visible to it; ``device="auto"`` (or ``cuda``) then runs the unit there. Ray hides
every GPU from a task that asks for none.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import threading
import uuid
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moelens.analyses.base import Analysis, Plan, Unit
from moelens.analyses.executors.base import Executor, ExecutorError, Job, Session, UnitResult, compute_unit
from moelens.errors import (
    ConfigError,
    IndexOutOfRangeError,
    MoelensError,
    NotMoEError,
    RunDirectoryError,
    SourceNotFoundError,
    UnsupportedArchitectureError,
)

DEFAULT_MAX_RETRIES = 3
#: Seconds to wait for an existing cluster to answer (Ray itself would retry for minutes);
#: ``MOELENS_RAY_CONNECT_TIMEOUT`` sets another default.
CONNECT_TIMEOUT_S = 30.0
INSTALL_HINT = "pip install 'moelens[ray]' (or pip install 'ray>=2.9'; make install does it)"
#: Errors of the user's input or files: the same on every attempt, so never retried.
NOT_RETRIED = (ConfigError, SourceNotFoundError, NotMoEError, IndexOutOfRangeError, UnsupportedArchitectureError, RunDirectoryError)


def import_ray() -> Any:
    """The ``ray`` module, or a :class:`ConfigError` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--executor ray needs the ray package, which is not installed here: {INSTALL_HINT}") from None
    return ray


# ----------------------------------------------------------------------------------------------
# What a task receives, and what a worker does with it
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRef:
    """An input model as a task receives it: where to open it and what its files must be.

    ``source`` is the absolute directory for a local checkpoint (workers see the same path on
    shared storage) or the repo id for one in the Hugging Face cache (each worker resolves it in
    its own cache); ``files`` are the driver's fingerprints of config and weight files."""

    source: str
    revision: str | None
    files: Mapping[str, str]
    name: str

    @classmethod
    def of(cls, model: Any) -> "ModelRef":
        local = Path(model.source).expanduser().exists()
        source = str(Path(model.path).resolve()) if local else str(model.source)
        return cls(source, model.revision, dict(model.file_hashes()), model.name)

    def open(self) -> Any:
        from moelens.checkpoint import open_model

        model = open_model(self.source, self.revision)
        files = model.file_hashes()
        if dict(files) != dict(self.files):
            differ = sorted(k for k in set(files) | set(self.files) if files.get(k) != self.files.get(k))
            raise ConfigError(
                f"the worker on {socket.gethostname()} reads other files for {self.name} than the driver "
                f"({', '.join(differ[:3])}{' …' if len(differ) > 3 else ''} differ at {model.path}); give every node the same "
                "checkpoint (shared storage, or the same snapshot in each node's Hugging Face cache)"
            )
        return model


@dataclass(frozen=True)
class RemoteJob:
    """Everything a worker needs besides the unit: small and picklable. ``token`` names the run,
    so a worker plans each run once whatever the number of its units it computes."""

    token: str
    analysis: Analysis
    config: Any
    models: Mapping[str, ModelRef | None]
    threads: int


_WORKER_PLANS: dict[str, Plan] = {}


#: Config fields that name files or run directories (texts, prompts, facts, clustering and
#: calibration runs, the spectrum cache): the only ones :func:`absolute_paths` touches, so that a
#: value like ``cpu`` stays what it is even beside a folder of that name.
PATH_FIELDS = frozenset({"texts", "calibration", "clusters", "facts", "prompts", "cache_dir"})


def absolute_paths(config: Any) -> Any:
    """``config`` with every relative path of its :data:`PATH_FIELDS` (the path of an existing
    file or directory, or a tuple of them) made absolute: a worker process need not share the
    driver's working directory. Other values are left as they are."""
    if not dataclasses.is_dataclass(config):
        return config

    def fix(value: Any) -> Any:
        if isinstance(value, str) and value and not os.path.isabs(value) and os.path.exists(value):
            return os.path.abspath(value)
        return value

    changes = {}
    for f in dataclasses.fields(config):
        if f.name not in PATH_FIELDS:
            continue
        value = getattr(config, f.name)
        if isinstance(value, str):
            new = fix(value)
        elif isinstance(value, tuple) and value and all(isinstance(v, str) for v in value):
            new = tuple(fix(v) for v in value)
        else:
            continue
        if new != value:
            changes[f.name] = new
    # object.__setattr__ on a copy: the frozen config is not checked again (its paths exist)
    if not changes:
        return config
    copy = dataclasses.replace(config)
    for name, value in changes.items():
        object.__setattr__(copy, name, value)
    return copy


def _worker_plan(job: RemoteJob) -> Plan:
    """The job's plan in this worker process, made once per run (one run's models held at a time)."""
    plan = _WORKER_PLANS.get(job.token)
    if plan is None:
        _WORKER_PLANS.clear()
        models = {name: None if ref is None else ref.open() for name, ref in job.models.items()}
        plan = job.analysis.plan(models, job.config)
        _WORKER_PLANS[job.token] = plan
    return plan


def run_remote_unit(job: RemoteJob, unit: Unit) -> UnitResult:
    """A task's body (in a Ray worker): set the thread count, plan, compute one unit."""
    import torch

    if torch.get_num_threads() != job.threads:
        torch.set_num_threads(job.threads)
    return compute_unit(job.analysis, _worker_plan(job), unit)


_REMOTE: Any = None


def _remote_function(ray: Any) -> Any:
    global _REMOTE
    if _REMOTE is None:
        _REMOTE = ray.remote(run_remote_unit)
    return _REMOTE


def thread_environment(threads: int) -> dict[str, str]:
    """Environment of a worker process with ``threads`` threads in every pool: torch's is set
    again in the task; the BLAS libraries read theirs when they load."""
    n = str(int(threads))
    return {"OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n}


# ----------------------------------------------------------------------------------------------
# Connecting
# ----------------------------------------------------------------------------------------------
def parse_address(address: str | None) -> tuple[str, int] | None:
    """``None`` (start a local cluster), ``"auto"`` (the cluster this machine runs) or
    ``HOST:PORT`` -> (host, port) for HOST:PORT, None otherwise; anything else is a ConfigError."""
    if address is None or address == "auto":
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--ray-address {address!r} is neither auto nor HOST:PORT (e.g. 10.0.0.1:6379, the head node's GCS port)")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float) -> None:
    """A TCP connection to the head node's port, so an unreachable address fails in seconds
    with one line instead of Ray retrying for minutes."""
    target = parse_address(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        raise ConfigError(
            f"cannot reach a Ray cluster at {address} ({why}); start one there (ray start --head --port={target[1]}) "
            "or give the head node's address, or leave --ray-address out to start a local cluster"
        ) from None


def default_connect_timeout() -> float:
    text = os.environ.get("MOELENS_RAY_CONNECT_TIMEOUT", "").strip()
    if not text:
        return CONNECT_TIMEOUT_S
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"MOELENS_RAY_CONNECT_TIMEOUT={text!r} is not a number of seconds") from None


def connect(ray: Any, address: str | None, timeout: float, num_cpus: int | None) -> bool:
    """Connect this process to Ray; True when a local cluster was started here (to shut down
    after the run). An already connected process keeps its connection."""
    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if address is None:
        ray.init(num_cpus=num_cpus, **quiet)
        return True
    check_reachable(address, min(timeout, 5.0))
    box: dict[str, BaseException | bool] = {}

    def init() -> None:
        try:
            # (ERROR: Ray warns that a thread other than the main one cannot set its SIGTERM handler)
            ray.init(address=address, **{**quiet, "logging_level": logging.ERROR})
            box["ok"] = True
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    # ray.init retries an address that answers but is no Ray head for minutes: bound it
    thread = threading.Thread(target=init, name="moelens-ray-connect", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ConfigError(f"the Ray cluster at {address} did not answer within {timeout:g} s; check that its head node runs (ray status) and that this is its GCS port")
    error = box.get("error")
    if isinstance(error, BaseException):
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"cannot join the Ray cluster at {address}: {detail}; start one (ray start --head) or leave --ray-address out") from None
    return False


def _alive_nodes(ray: Any) -> list[dict[str, float]]:
    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive", True)]


# ----------------------------------------------------------------------------------------------
# The executor
# ----------------------------------------------------------------------------------------------
class RaySession(Session):
    def __init__(self, executor: "RayExecutor", job: Job, ray: Any, owns: bool):
        self.executor = executor
        self.job = job
        self.ray = ray
        self.owns = owns
        nodes = _alive_nodes(ray)
        cpus = sum(n.get("CPU", 0.0) for n in nodes)
        gpus = sum(n.get("GPU", 0.0) for n in nodes)
        gpw = executor.gpus_per_worker
        if gpw > 0:
            if gpus <= 0:
                raise ConfigError(
                    f"--gpus-per-worker {gpw:g}: the Ray cluster has no GPUs ({cpus:g} CPUs on {len(nodes)} node(s)); "
                    "leave --gpus-per-worker out, or join a cluster whose nodes have GPUs"
                )
            most = max(n.get("GPU", 0.0) for n in nodes)
            if gpw > most:
                raise ConfigError(f"--gpus-per-worker {gpw:g}: no node of the Ray cluster has that many GPUs (at most {most:g}); ask for at most {most:g}")
        units = max(1, len(job.plan.units))
        if executor.workers is not None:
            workers = executor.workers
        elif gpw > 0:
            workers = sum(int(math.floor(n.get("GPU", 0.0) / gpw + 1e-9)) for n in nodes)
        else:
            workers = int(cpus)
        self.workers = max(1, min(int(workers), units))
        most_cpus = max([n.get("CPU", 0.0) for n in nodes] or [1.0])
        threads = executor.threads_per_worker or max(1, int(cpus // self.workers))
        # a task asking for more CPUs than any node has would wait forever
        self.threads = max(1, min(int(threads), int(most_cpus)))
        self.nodes = len(nodes)
        self.cluster = {"CPU": cpus, "GPU": gpus}
        self.retries: Counter[str] = Counter()
        self.devices: set[str] = set()
        self.hosts: set[str] = set()
        self.peak_rss: dict[str, float] = {}
        self.remote_job = RemoteJob(
            token=uuid.uuid4().hex, analysis=job.analysis.for_workers(), config=absolute_paths(job.config),
            models={name: None if m is None else ModelRef.of(m) for name, m in job.models.items()}, threads=self.threads,
        )

    def info(self) -> dict[str, Any]:
        e = self.executor
        return {
            "name": "ray", "address": e.address or "local cluster", "nodes": self.nodes, "cluster": self.cluster,
            "workers": self.workers, "threads": self.threads, "gpus_per_worker": e.gpus_per_worker,
            "max_retries": e.max_retries, "retries": dict(self.retries), "devices": sorted(self.devices),
            "hosts": sorted(self.hosts), "peak_rss_mib": {k: round(v, 1) for k, v in sorted(self.peak_rss.items())},
        }

    def _options(self) -> dict[str, Any]:
        return {
            "num_cpus": self.threads, "num_gpus": self.executor.gpus_per_worker,
            # the driver retries (it counts the attempts and tells a user's mistake from a crash)
            "max_retries": 0, "retry_exceptions": False,
            "runtime_env": {"env_vars": thread_environment(self.threads)},
        }

    def _failure(self, exc: BaseException) -> tuple[str, BaseException | None]:
        """(a one-line description, the exception to raise at once or None to retry)."""
        ray = self.ray
        if isinstance(exc, ray.exceptions.RayTaskError):
            cause = getattr(exc, "cause", None)
            if isinstance(cause, NOT_RETRIED):
                return str(cause), cause
            if cause is None:
                return str(exc).strip().splitlines()[0], None
            return f"{type(cause).__name__}: {cause}", None
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0] if text else ''}", None

    def _gave_up(self, unit: Unit, attempts: int, exc: BaseException, why: str) -> BaseException:
        """What to raise when a unit failed on every attempt: the unit's own error where it raised
        one (a moelens error as it is, one line; any other with the worker's traceback), else an
        :class:`ExecutorError` saying that its worker died."""
        cause = getattr(exc, "cause", None)
        if isinstance(exc, self.ray.exceptions.RayTaskError) and isinstance(cause, Exception):
            return cause if isinstance(cause, MoelensError) else exc.as_instanceof_cause()
        return ExecutorError(
            f"unit {unit.key} failed on all {attempts} attempts ({why}); if its worker ran out of memory, run fewer "
            "--workers per node; the finished units are kept: run the same command again to resume"
        )

    def run(self, units: list[Unit]) -> Iterator[UnitResult]:
        ray = self.ray
        remote = _remote_function(ray).options(**self._options())
        job_ref = ray.put(self.remote_job)
        queue = deque(units)
        pending: dict[Any, Unit] = {}
        attempts: Counter[str] = Counter()
        try:
            while queue or pending:
                while queue and len(pending) < self.workers:
                    unit = queue.popleft()
                    attempts[unit.key] += 1
                    pending[remote.remote(job_ref, unit)] = unit
                ready, _ = ray.wait(list(pending), num_returns=1)
                ref = ready[0]
                unit = pending.pop(ref)
                try:
                    result: UnitResult = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    why, fatal = self._failure(exc)
                    if fatal is not None:
                        raise fatal from None
                    if attempts[unit.key] > self.executor.max_retries:
                        raise self._gave_up(unit, attempts[unit.key], exc, why) from None
                    self.retries[unit.key] += 1
                    queue.appendleft(unit)
                    continue
                if result.device:
                    self.devices.add(result.device)
                if result.worker:
                    self.hosts.add(result.worker.rsplit(":", 1)[0])
                    self.peak_rss[result.worker] = max(self.peak_rss.get(result.worker, 0.0), result.peak_rss_mib)
                yield result
        finally:
            for ref in pending:
                try:
                    ray.cancel(ref)
                except Exception:  # a task that finished meanwhile, a cluster already gone
                    pass


class RayExecutor(Executor):
    """Units as Ray tasks (see the module docstring).

    ``address``: None starts a local cluster for the run (``num_cpus`` CPUs, default all) and
    stops it after; ``"auto"`` or ``"HOST:PORT"`` joins a running cluster (a process already
    connected to Ray keeps its connection). ``workers``: tasks in flight (default: the cluster's
    CPUs, or its GPUs ÷ ``gpus_per_worker``, at most the number of units). ``threads_per_worker``:
    torch/BLAS threads and CPUs of each task (default: the cluster's CPUs ÷ workers).
    ``max_retries``: times a failed unit is submitted again.

    >>> run = ml.router_alignment("mixtral", executor=RayExecutor(workers=4))
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        gpus_per_worker: float = 0.0,
        max_retries: int = DEFAULT_MAX_RETRIES,
        threads_per_worker: int | None = None,
        num_cpus: int | None = None,
        connect_timeout: float | None = None,
    ):
        self.ray = import_ray()
        if connect_timeout is None:
            connect_timeout = default_connect_timeout()
        parse_address(address)
        for what, value, low in (("--workers", workers, 1), ("threads_per_worker", threads_per_worker, 1),
                                 ("num_cpus", num_cpus, 1), ("--max-retries", max_retries, 0)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{what}={value!r}: give a whole number ≥ {low}")
        if isinstance(gpus_per_worker, bool) or not isinstance(gpus_per_worker, (int, float)) or not 0 <= float(gpus_per_worker) < math.inf:
            raise ConfigError(f"--gpus-per-worker={gpus_per_worker!r}: give a number ≥ 0 (a fraction shares a GPU between workers)")
        if isinstance(connect_timeout, bool) or not isinstance(connect_timeout, (int, float)) or not connect_timeout > 0:
            raise ConfigError(f"connect_timeout={connect_timeout!r}: give a positive number of seconds")
        self.address = address
        self.workers = workers
        self.gpus_per_worker = float(gpus_per_worker)
        self.max_retries = int(max_retries)
        self.threads_per_worker = threads_per_worker
        self.num_cpus = num_cpus
        self.connect_timeout = float(connect_timeout)

    def __repr__(self) -> str:
        return (f"RayExecutor(address={self.address!r}, workers={self.workers!r}, gpus_per_worker={self.gpus_per_worker:g}, "
                f"max_retries={self.max_retries})")

    def plan(self, analysis: Analysis, models: Mapping[str, Any], config: Any) -> Plan:
        """The driver's plan. Units run on the workers' devices, not the driver's: a config asking
        for CUDA needs GPUs per worker, and is planned on the driver (which only reads headers
        there) as if on the CPU, so a driver without a GPU can send work to workers with one."""
        device = getattr(config, "device", None)
        if not (isinstance(device, str) and device.strip().lower().startswith("cuda")):
            plan = analysis.plan(models, config)
        else:
            if self.gpus_per_worker <= 0:
                raise ConfigError(f"--device {device} with --executor ray needs --gpus-per-worker (e.g. 1): Ray hides every GPU from a task that asks for none")
            plan = analysis.plan(models, dataclasses.replace(config, device="cpu"))
        if isinstance(device, str) and "device" in plan.options:
            # the workers' device, not the driver's: without GPUs a task sees none; with them, what
            # the user asked for (the manifest's "executor" lists the devices the units used)
            plan.options["device"] = "cpu" if self.gpus_per_worker <= 0 else device.strip().lower()
        return plan

    @contextmanager
    def session(self, job: Job) -> Iterator[Session]:
        ray = self.ray
        owns = connect(ray, self.address, self.connect_timeout, self.num_cpus)
        try:
            yield RaySession(self, job, ray, owns)
        finally:
            if owns:
                ray.shutdown()


__all__ = [
    "CONNECT_TIMEOUT_S", "DEFAULT_MAX_RETRIES", "ModelRef", "RayExecutor", "RaySession", "RemoteJob", "check_reachable",
    "connect", "import_ray", "parse_address", "run_remote_unit", "thread_environment",
]
