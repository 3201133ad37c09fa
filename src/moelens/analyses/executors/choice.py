"""Which executor runs the units, from the command line's spelling (``local`` or ``ray`` and its
options). Apart from :mod:`moelens.analyses.executors.base`, which the Ray executor builds on, so
that the base never imports the executor built on it."""

from __future__ import annotations

from moelens.analyses.executors.base import EXECUTORS, Executor, LocalExecutor
from moelens.errors import ConfigError


def executor_from_options(
    executor: str | Executor | None = "local",
    *,
    address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    max_retries: int | None = None,
    threads: int | None = None,
) -> Executor:
    """An executor from the command line's spelling: ``local`` (the default) or ``ray`` with its
    options. Ray's options with ``local`` are a mistake, named rather than ignored. ``threads``
    is each Ray task's thread count (a local run takes it from :func:`moelens.threads.set_threads`)."""
    if isinstance(executor, Executor):
        return executor
    name = "local" if executor is None else str(executor).strip().lower()
    ray_options = {"--ray-address": address, "--workers": workers, "--gpus-per-worker": gpus_per_worker, "--max-retries": max_retries}
    if name == "local":
        given = [flag for flag, value in ray_options.items() if value is not None]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise ConfigError(f"{', '.join(given)} {verb} to --executor ray; add --executor ray, or leave {' and '.join(given)} out for a local run")
        return LocalExecutor()
    if name == "ray":
        from moelens.analyses.executors.ray_executor import DEFAULT_MAX_RETRIES, RayExecutor

        return RayExecutor(
            address=address, workers=workers, gpus_per_worker=0.0 if gpus_per_worker is None else gpus_per_worker,
            max_retries=DEFAULT_MAX_RETRIES if max_retries is None else max_retries, threads_per_worker=threads,
        )
    raise ConfigError(f"unknown executor {executor!r}; expected one of {', '.join(EXECUTORS)}")


def resolve_executor(executor: str | Executor | None) -> Executor:
    """``None`` or ``"local"`` -> :class:`LocalExecutor`; ``"ray"`` -> a default
    :class:`~moelens.analyses.executors.ray_executor.RayExecutor`; an executor as given."""
    return executor_from_options(executor)


__all__ = ["executor_from_options", "resolve_executor"]
