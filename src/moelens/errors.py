"""One hierarchy of errors. Every message says what was found, what was expected and what to do.

The CLI prints ``str(error)`` on one line and exits with status 2; no traceback for a user's
mistake. This module imports nothing of moelens so that every layer may raise these.
"""

from __future__ import annotations


class MoelensError(Exception):
    """Base of every error moelens raises on purpose."""


class SourceNotFoundError(MoelensError):
    """A path or repo id that leads to no checkpoint."""


class UnsupportedArchitectureError(MoelensError):
    """A config whose architecture no family adapter knows."""


class CheckpointFormatError(MoelensError):
    """A checkpoint on disk that is not what its config or index promises (missing shard,
    truncated or corrupt safetensors, missing tensor, NaN weights)."""


class NotMoEError(MoelensError):
    """MoE layers asked of a dense model, or of a dense layer."""


class IndexOutOfRangeError(MoelensError, IndexError):
    """A layer or expert index outside the model."""


class ConfigError(MoelensError, ValueError):
    """An option value that cannot be used (unknown matrix role, k larger than d, ...)."""


class RunDirectoryError(MoelensError):
    """A run directory that is missing, incomplete, or written by other options."""


class OutputExistsError(ConfigError):
    """An output directory that already holds something a command would overwrite (files of
    another kind, or a build of another recipe): choose another directory, or force where the
    command offers it."""
