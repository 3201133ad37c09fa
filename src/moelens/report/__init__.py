"""Reports: one self-contained HTML file from one or many runs.

>>> import moelens as ml
>>> ml.report(["runs/base", "runs/tuned"], "report.html", title="Base vs tuned")

The file carries its figures (as ``data:`` URIs) and its styles inline and names no external
resource, so it opens offline and can be sent as it is. Heavy imports (matplotlib, Jinja2)
wait until a report is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Union

from moelens.results import Run

RunLike = Union[Run, str, "os.PathLike[str]"]
FIGURE_FORMATS = ("svg", "png")


def _as_runs(runs: Union[RunLike, Iterable[RunLike]]) -> list[Run]:
    from moelens.errors import ConfigError
    from moelens.results import load_run

    items = [runs] if isinstance(runs, (Run, str, os.PathLike)) else list(runs)
    if not items:
        raise ConfigError("a report needs at least one run; pass run directories or Run objects")
    return [item if isinstance(item, Run) else load_run(item) for item in items]


def _group_by_analysis(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by analysis, in the order each analysis first appears."""
    from moelens.errors import ConfigError
    from moelens.report.sections import SECTION_BUILDERS

    groups: dict[str, list[Run]] = {}
    for run in runs:
        name = str(run.manifest.get("analysis", ""))
        if name not in SECTION_BUILDERS:
            where = f" ({run.path})" if run.path else ""
            raise ConfigError(f"the report has no section for a {name!r} run{where}; it reports {', '.join(SECTION_BUILDERS)}")
        groups.setdefault(name, []).append(run)
    return groups


def build_report(runs: Union[RunLike, Iterable[RunLike]], title: Optional[str] = None, figure_format: str = "svg",
                 extra: Optional[dict] = None, jobs: int = 1) -> str:
    """The HTML text of the report of ``runs`` (Run objects or run directories of any analysis).

    One section per analysis (in the order each first appears), with one table of contents.
    ``figure_format``: ``"svg"`` (sharp at any zoom, the default) or ``"png"``. ``extra`` (the
    atlas's): ``notes`` (lines on what was skipped) and ``reproduce`` (``atlas``: the command,
    ``commands``: one per run, ``versions``), shown on the first screen.
    ``jobs``: sections drawn at once on worker processes (:mod:`moelens.report.parallel`; the
    same report as one after another).
    """
    from datetime import datetime, timezone

    from moelens.errors import ConfigError
    from moelens.report.numbering import number_headings, numbered, numbers_of
    from moelens.report.parallel import build_sections
    from moelens.report.render import render
    from moelens.version import package_version

    if figure_format not in FIGURE_FORMATS:
        raise ConfigError(f"report figures are {' or '.join(FIGURE_FORMATS)}, not {figure_format!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs {jobs!r}: give a whole number ≥ 1")
    groups = _group_by_analysis(_as_runs(runs))
    sections = build_sections(groups, figure_format, jobs)
    context = {
        "title": title or ("moelens report: " + ", ".join(s.title.lower() for s in sections)),
        "sections": sections,
        "n_runs": sum(len(g) for g in groups.values()),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "version": package_version(),
        "notes": [],
        "reproduce": None,
        **(extra or {}),
    }
    toc = numbered([(s.id, s.title, s.toc) for s in sections])
    return number_headings(render("report.html", **context, toc=toc), numbers_of(toc))


def write_report(html: str, out: Union[str, "os.PathLike[str]"]) -> Path:
    """Write ``html`` to ``out`` (parent folders created; replaced in one step, never half-written)."""
    from moelens.safe_files import atomic_write_bytes

    out = check_report_file(out)

    return atomic_write_bytes(out, html.encode("utf-8"))  # a new file renamed into place: never through a link


def check_report_file(out: Union[str, "os.PathLike[str]"]) -> Path:
    """``out`` as a Path if a report may be written there: an HTML file name, not a directory,
    missing or a report moelens wrote (:func:`check_replaceable`)."""
    from moelens.errors import ConfigError

    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"{out} is a directory; give the report a file name, e.g. --out {out / 'report.html'}")
    if out.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"{out}: a report is an HTML file; give a name ending in .html")
    check_replaceable(out)
    return out


#: What every report moelens writes carries near its top (templates/base.html).
_GENERATOR = b'<meta name="generator" content="moelens'


def check_replaceable(out: Path) -> None:
    """A report is written over ``out`` only if ``out`` is missing or a report moelens wrote
    (known by its generator tag): somebody's own HTML file, or a link, is never replaced."""
    from moelens.errors import OutputExistsError

    if out.is_symlink():
        raise OutputExistsError(f"{out} is a symbolic link; moelens never writes through a link: give the report another name")
    if not out.exists():
        return
    try:
        with open(out, "rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        raise OutputExistsError(f"cannot read {out} ({exc.strerror}); give the report another name") from None
    if _GENERATOR not in head:
        raise OutputExistsError(f"{out} exists and is not a report moelens wrote; give the report another name, or delete the file")


def report(runs: Union[RunLike, Iterable[RunLike]], out: Union[str, "os.PathLike[str]"], title: Optional[str] = None,
           figure_format: str = "svg") -> Path:
    """Build the report of ``runs`` and write it to ``out``; returns the path. ``out`` is checked
    before any work: a directory or a name not ending in .html is refused."""
    check_report_file(out)
    return write_report(build_report(runs, title, figure_format), out)


__all__ = ["build_report", "write_report", "report"]

