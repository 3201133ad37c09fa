"""What every benchmark shares: one measurement per child process, so that its peak RSS is its
own and its thread count is set before any library reads it.

A benchmark script calls itself with ``--measure NAME … --json-out FILE``; the child does the
work, adds its peak RSS and writes one JSON object, which :func:`run_measurement` returns with
the load average before and after.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_measurement(script: str, measure: str, work: Path, threads: int, *args: str) -> dict[str, Any]:
    """Run ``script --measure MEASURE ARGS…`` in a child process and return what it measured."""
    json_out = work / f"{measure}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, script, "--measure", measure, *args, "--json-out", str(json_out)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    if threads:
        # numpy's and SciPy's BLAS/LAPACK (CPU Grams, tridiagonalisations, the references' SVDs)
        # have their own thread pools, which torch.set_num_threads does not bound; read at load time.
        env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    load = os.getloadavg()[0]
    subprocess.run(cmd, check=True, env=env)
    result = json.loads(json_out.read_text())
    result["load_before"] = load
    result["load_after"] = os.getloadavg()[0]
    return result


def finish_measurement(result: dict[str, Any], json_out: str) -> None:
    """In the child: add the peak RSS and write the result for the parent."""
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(json_out).write_text(json.dumps(result))


def line(label: str, r: dict[str, Any], note: str = "", width: int = 40) -> str:
    """One printed row of a measurement."""
    return (f"  {label:<{width}} {r['wall_s']:9.2f} s   peak RSS {r['peak_rss_mib']:8.0f} MiB"
            f"   load {r['load_before']:.1f}->{r['load_after']:.1f}{'   ' + note if note else ''}")
