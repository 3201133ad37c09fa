"""A report's sections drawn on worker processes at once, with the very bytes a serial build gives.

Drawing and encoding figures is nearly all of a report's time (the atlas of the default zoo: 62
figures, each saved as SVG for the report and as PNG for ``figures/``), and the sections are
independent: each is a function of its own runs (:func:`moelens.report.sections.section_builder`).
:func:`build_sections` hands each section to a worker process (``spawn``: a fresh interpreter,
nothing inherited from a parent that may run threads), which loads the section's runs from their
directories and builds it while keeping its figure files, costliest section first. The parent
then takes the sections in report order.

The one thing a section shares with the others is the figure files' names: a name already taken
by an earlier section gets ``-2`` (:func:`moelens.report.embed.embed`), and a worker cannot know
the earlier sections' names. So a section whose names clash with an earlier one's is built again
in the parent, after the earlier sections' files, exactly as a serial build would; otherwise the
worker's section and files are the serial ones (same function, same runs, same bytes).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from moelens.results import Run

#: Seconds of drawing per run of each analysis on the default zoo (a 12-layer report, measured
#: on one core): the order in which sections are handed out, costliest first.
SECTION_COST = {
    "router_alignment": 20.0, "module_metrics": 35.0, "expert_distance": 2.0, "interventions": 2.5,
    "clustering": 3.5, "calibration": 1.0, "router_edits": 2.0, "merge_cost": 0.5,
}


def _build_in_worker(name: str, paths: Sequence[str], fmt: str, collect: bool) -> tuple[Any, list[Any]]:
    """(section, figure files) of analysis ``name`` over the runs in ``paths``."""
    from moelens.report.embed import collecting_files
    from moelens.report.sections import section_builder
    from moelens.results import load_run

    runs = [load_run(p) for p in paths]
    if not collect:
        return section_builder(name)(runs, fmt), []
    with collecting_files() as files:
        section = section_builder(name)(runs, fmt)
    return section, list(files)


def _worker_init() -> None:
    # one thread per worker: the workers already fill the cores, and the figures' arrays are small
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import matplotlib

    matplotlib.use("Agg")


def build_sections(groups: dict[str, list[Run]], fmt: str, workers: int = 1) -> list[Any]:
    """The report's sections of ``groups`` (analysis → runs, in report order), built on up to
    ``workers`` processes; serially when ``workers`` is 1, when there is one section, or when a
    run has no directory a worker could load it from."""
    from moelens.report.embed import add_collected, collected_stems, collecting_active
    from moelens.report.sections import section_builder

    names = list(groups)
    workers = min(workers, len(names))
    if workers <= 1 or any(run.path is None for runs in groups.values() for run in runs):
        return [section_builder(name)(runs, fmt) for name, runs in groups.items()]
    collect = collecting_active()
    order = sorted(names, key=lambda n: -SECTION_COST.get(n, 1.0) * len(groups[n]))
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init) as pool:
        futures = {n: pool.submit(_build_in_worker, n, [str(r.path) for r in groups[n]], fmt, collect) for n in order}
        sections = []
        for name in names:
            section, files = futures[name].result()
            if collect and {f.stem for f in files} & collected_stems():
                section = section_builder(name)(groups[name], fmt)  # numbered after the earlier sections' names
            else:
                add_collected(files)
            sections.append(section)
    return sections


__all__ = ["SECTION_COST", "build_sections"]
