"""Checks the layer-streaming tests share: which weight groups a streamed runtime reads, and a
command refused with ``--stream off`` on a model too large that ``--stream auto`` then runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moelens.runtime import forward as fw_module
from tests.cli.helpers import run_moelens


def count_reads(streamed: Any, monkeypatch: Any) -> list[str]:
    """The names of the weight groups ``streamed`` reads from now on, in order (``"layer 0"``)."""
    reads: list[str] = []
    original = streamed.groups_of.read
    monkeypatch.setattr(streamed.groups_of, "read", lambda group: (reads.append(group.name), original(group))[1])
    return reads


def assert_refused_off_then_streamed(command: str, args: list[str], out: Path, monkeypatch: Any) -> None:
    """With almost no memory available, ``moelens COMMAND ARGS --stream off`` is one line, exit
    status 2, naming the in-memory need and ``--stream on``, and writes nothing at ``out``; the
    same command with ``--stream auto`` (the default) streams and succeeds."""
    monkeypatch.setattr(fw_module, "available_memory", lambda device: 1000)
    r = run_moelens(command, *args, "--stream", "off")
    output = " ".join((r.stdout + r.stderr).split())
    assert r.code == 2, output
    assert "to run in memory" in output and "--stream on" in output
    assert not out.exists()
    r = run_moelens(command, *args)  # auto streams the same model
    assert r.code == 0, r.stdout + r.stderr
