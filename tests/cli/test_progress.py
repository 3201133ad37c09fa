"""Progress when stderr is not a terminal (a log file, CI): one plain line per finished step,
never cut; and a command that fails after its progress began leaves one error line only."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

from rich.console import Console

import moelens
from moelens.cli.app import PlainProgress, clock
from moelens.progress import ProgressEvent


def _lines(events: list[ProgressEvent]) -> list[str]:
    buffer = io.StringIO()
    plain = PlainProgress(Console(file=buffer, width=40, force_terminal=False))
    for event in events:
        plain(event)
    return buffer.getvalue().splitlines()


def test_clock():
    assert clock(5.9) == "0:00:05"
    assert clock(3725) == "1:02:05"


def test_one_line_per_finished_unit():
    lines = _lines([ProgressEvent("layers", 0, 3, step=True), ProgressEvent("layers", 1, 3, "layer 0", True),
                    ProgressEvent("layers", 1, 3, "layer 0", True), ProgressEvent("experts", 1, 64, "layer 1 gate"),
                    ProgressEvent("experts", 2, 64, "layer 1 gate"), ProgressEvent("layers", 2, 3, "layer 1", True),
                    ProgressEvent("layers", 3, 3, "layer 2", True)])
    assert [re.sub(r"\s+\d+:\d\d:\d\d$", "", line) for line in lines] == ["layers 1/3  layer 0", "layers 2/3  layer 1", "layers 3/3  layer 2"]
    assert all(re.search(r"  \d+:\d\d:\d\d$", line) for line in lines)


def test_atlas_steps_and_a_second_loop_of_the_same_name():
    message = "distance-base-tuned (expert_distance) with a long name that a narrow console would cut"
    lines = _lines([ProgressEvent("atlas", 0, 2, "align-base (router_alignment)", True), ProgressEvent("layers", 0, 2, step=True),
                    ProgressEvent("layers", 2, 2, "layer 1", True), ProgressEvent("atlas", 1, 2, message, True),
                    ProgressEvent("layers", 0, 2, step=True), ProgressEvent("layers", 1, 2, "layer 0", True)])
    assert [line.rsplit("  ", 1)[0] for line in lines] == [
        "atlas 0/2  align-base (router_alignment)", "layers 2/2  layer 1", f"atlas 1/2  {message}", "layers 1/2  layer 0",
    ]  # whole lines on a 40-column console


def test_resumed_loop_shows_where_it_starts():
    assert [line.rsplit("  ", 1)[0] for line in _lines([ProgressEvent("layers", 2, 4, step=True)])] == ["layers 2/4"]


def test_inner_loops_are_throttled():
    buffer = io.StringIO()
    plain = PlainProgress(Console(file=buffer, width=80, force_terminal=False), interval=10.0)
    for i in range(1, 200):
        plain(ProgressEvent("training", i, 1000, "loss 1.0"))
    assert buffer.getvalue() == ""  # none within the first interval
    plain.started -= 11  # as if 11 s had passed
    plain(ProgressEvent("training", 200, 1000, "loss 0.9"))
    plain(ProgressEvent("training", 201, 1000, "loss 0.9"))
    assert [line.rsplit("  ", 1)[0] for line in buffer.getvalue().splitlines()] == ["training 200/1000  loss 0.9"]


FAILING = """
import sys
from moelens.cli.app import app, progress_bar
from moelens.errors import ConfigError
from moelens.progress import ProgressEvent

@app.command("fails-late")
def fails_late() -> None:
    with progress_bar() as callback:
        callback(ProgressEvent("layers", 0, 4))
        raise ConfigError("layer 3 is damaged; re-download it")

from moelens.cli import main
sys.argv = ["moelens", "fails-late"]
main()
"""


def test_error_after_progress_is_one_line():
    env = {**os.environ, "PYTHONPATH": str(Path(moelens.__file__).parents[1]), "COLUMNS": "60"}
    done = subprocess.run([sys.executable, "-c", FAILING], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["error: layer 3 is damaged; re-download it"]
    assert done.stdout == ""
