"""The one progress channel: analyses call it, the CLI renders it with Rich.

An analysis never prints. It receives ``progress: ProgressCallback | None`` and calls
``progress(ProgressEvent(...))``; ``None`` means silence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class ProgressEvent:
    """``task`` names the loop ("layers", "training"), ``done`` of ``total`` steps are finished;
    ``message`` is a short free text (current layer, loss). ``step`` marks the outer loops
    whose every step a log should show (the runner's units, the atlas's runs); inner loops
    (experts, batches, training steps) are shown in a log at most every few seconds."""

    task: str
    done: int
    total: int
    message: str = ""
    step: bool = False


ProgressCallback = Callable[[ProgressEvent], None]


def report(progress: Optional[ProgressCallback], task: str, done: int, total: int, message: str = "", step: bool = False) -> None:
    """Call ``progress`` if there is one."""
    if progress is not None:
        progress(ProgressEvent(task, done, total, message, step))
