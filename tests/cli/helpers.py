"""``moelens ARGS`` in the test's own process, through the entry point a user's shell runs
(:func:`moelens.cli.main`), with the exit status and the stdout and stderr a fresh process would
have given.

A process of its own pays about 5 s of imports (torch, transformers) on a loaded core; a test
whose subject is the command's output, not process start-up, runs it here instead. What a fresh
process would add to stderr is kept: warnings under Python's default filters (formatted as the
interpreter prints them), log records of libraries that log to stderr (transformers), and the
traceback of an exception that escapes ``main`` (with exit status 1). The commands run as
``python -m moelens`` in a subprocess elsewhere (tests/checkpoint/test_errors.py and one case per
command-line module), which covers start-up itself.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass
class CliResult:
    """What ``moelens`` returned: ``code`` (exit status), ``stdout`` and ``stderr``."""

    code: int
    stdout: str
    stderr: str


def _stream_handlers() -> list[logging.StreamHandler]:
    """The handlers that print to a console stream (not files), of every logger there is."""
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    return [h for lg in loggers for h in lg.handlers if type(h) is logging.StreamHandler]


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_moelens(*args: str | Path, columns: int = 120) -> CliResult:
    """Run ``moelens *args`` and return its exit status, stdout and stderr."""
    from moelens.cli import main

    out, err = io.StringIO(), io.StringIO()
    handlers = _stream_handlers()
    streams = [h.stream for h in handlers]
    for h in handlers:
        h.setStream(out if h.stream in (sys.stdout, sys.__stdout__) else err)
    argv = sys.argv
    sys.argv = ["moelens", *map(str, args)]
    try:
        with _environment({"COLUMNS": str(columns), "NO_COLOR": "1"}), warnings.catch_warnings(record=True) as caught, \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            # Python's own default filters, as a fresh interpreter has them (pytest's are stricter)
            warnings.resetwarnings()
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            try:
                main()
                code = 0
            except SystemExit as exc:
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:  # sys.exit("message"): printed on stderr, status 1
                    print(exc.code, file=sys.stderr)
                    code = 1
            except Exception:  # what escapes main: the interpreter prints the traceback, status 1
                traceback.print_exc()
                code = 1
            for w in caught:
                err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
    finally:
        sys.argv = argv
        for h, stream in zip(handlers, streams):
            h.setStream(stream)
    return CliResult(code, out.getvalue(), err.getvalue())


def run_fresh(*args: str | Path, columns: int = 120, timeout: float = 300) -> CliResult:
    """``python -m moelens *args`` in a process of its own (one thread, offline), as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": str(columns), "NO_COLOR": "1"}
    done = subprocess.run([sys.executable, "-m", "moelens", *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)
    return CliResult(done.returncode, done.stdout, done.stderr)


def run_cases(command: str, cases: dict[str, str], paths: dict[str, Path], runs: Path, *, fresh: str,
              empty: str | None = None) -> dict[str, dict]:
    """``moelens command ARGS --out runs/NAME`` of each case (``NAME -> ARGS``, a format string
    whose ``{X}`` stand for ``paths["X"]``): the case ``fresh`` in a process of its own (start-up
    and the command together, as a user runs it), the others in this process; the case ``empty``
    finds its ``--out`` as an empty directory. ``NAME -> {"rc", "stdout", "stderr", "out", "argv"}``."""
    done: dict[str, dict] = {}
    for name, template in cases.items():
        out = runs / name
        if name == empty:
            out.mkdir(parents=True)
        args = [command, *template.format(**{k: str(v) for k, v in paths.items()}).split(), "--out", str(out)]
        result = (run_fresh if name == fresh else run_moelens)(*args)
        done[name] = {"rc": result.code, "stdout": result.stdout, "stderr": result.stderr, "out": out, "argv": " ".join(args)}
    return done
