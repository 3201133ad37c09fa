"""Where an analysis's units run: in this process (``local``, the default) or as Ray tasks (``ray``).

>>> import moelens as ml
>>> from moelens.analyses.executors import RayExecutor
>>> run = ml.expert_distance("base", "tuned", executor="ray")                       # a local Ray cluster
>>> run = ml.router_alignment("mixtral", executor=RayExecutor(address="auto", workers=8))

The executor decides only where units run; the runner plans, writes, resumes and assembles the
tables the same way for both (:mod:`moelens.analyses.runner`).
"""

from moelens.analyses.executors.base import (
    EXECUTORS,
    Executor,
    ExecutorError,
    Job,
    LocalExecutor,
    Session,
    UnitResult,
    compute_unit,
)
from moelens.analyses.executors.choice import executor_from_options, resolve_executor


def __getattr__(name: str):
    # RayExecutor without importing Ray (or its module) until it is asked for
    if name in ("RayExecutor", "ModelRef", "RemoteJob"):
        from moelens.analyses.executors import ray_executor

        return getattr(ray_executor, name)
    raise AttributeError(f"module 'moelens.analyses.executors' has no attribute {name!r}")


__all__ = [
    "EXECUTORS", "Executor", "ExecutorError", "Job", "LocalExecutor", "ModelRef", "RayExecutor", "RemoteJob", "Session",
    "UnitResult", "compute_unit", "executor_from_options", "resolve_executor",
]
