"""The README and docs/ stay honest: every relative link resolves to a file and a heading that
exist, nothing points at design notes outside the repository, and the column names the methods
page defines are the columns of the tables the analyses declare (and the other way round for
the main tables)."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

from moelens.analyses import ANALYSES
from moelens.metrics.module import PAIR_METRICS, SINGLE_METRICS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
METHODS = DOCS / "methods.md"

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (letters, digits,
    ``_``, ``-`` and spaces kept), spaces turned into hyphens."""
    text = heading.strip().lower()
    kept = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a Markdown page, with GitHub's -1, -2 … for repeated headings."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return [t for t in LINK.findall(CODE_SPAN.sub("", text)) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_slug_rules_by_example():
    # checked against headings GitHub renders
    assert github_slug("1. Router–expert alignment") == "1-routerexpert-alignment"
    assert github_slug("Causal tracing (`--mode restore`)") == "causal-tracing---mode-restore"
    assert github_slug("MC-SMoE (M-SMoE)") == "mc-smoe-m-smoe"


def test_docs_pages_exist_and_the_readme_links_them():
    assert METHODS.is_file() and (DOCS / "peers.md").is_file()
    links = relative_links(ROOT / "README.md")
    assert "docs/methods.md" in links and "docs/peers.md" in links


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file})")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {file.name})")
    assert not broken, f"{page.name}: broken links: {broken}"


def _project_texts():
    yield ROOT / "README.md"
    yield from DOCS.rglob("*.md")
    for path in (ROOT / "src").rglob("*"):
        if path.is_file() and path.suffix in {".py", ".html", ".md", ".txt", ".css", ".js", ".json", ".toml"} \
                and not any(part.endswith(".egg-info") or part == "__pycache__" for part in path.parts):
            yield path


def test_nothing_points_at_design_notes_outside_the_repository():
    banned = re.compile(r"SPEC\.md|\bSPEC\b(?!_)|shared/|/work/")
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
            for p in _project_texts()
            for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if banned.search(line)]
    assert not hits, "references to files users do not have:\n" + "\n".join(hits)


def declared_columns() -> dict[str, list[str]]:
    return {name: schema.column_names for cls in ANALYSES.values() for name, schema in cls.schemas().items()}


def test_column_names_the_methods_define_exist_in_a_table():
    """A bold snake-case name in methods.md is a column (or a metric name of module_metrics)."""
    text = FENCE.sub("", METHODS.read_text(encoding="utf-8"))
    defined = set(re.findall(r"\*\*([a-z][a-z0-9_]*)\*\*", text))
    assert len(defined) >= 30  # the page defines the columns of every analysis
    known = {c for cols in declared_columns().values() for c in cols} | set(PAIR_METRICS) | set(SINGLE_METRICS)
    assert not sorted(defined - known), f"methods.md defines names no table has: {sorted(defined - known)}"


MAIN_TABLES = ("alignment", "alignment_layers", "alignment_pairs", "spectra", "expert_distance", "expert_distance_layers",
               "interventions", "interventions_summary", "module_metrics", "clusters", "cluster_layers",
               "calibration_usage", "merge_cost_summary")


def test_every_column_of_the_main_tables_is_explained():
    words = set(re.findall(r"[a-z][a-z0-9_]*", METHODS.read_text(encoding="utf-8")))
    tables = declared_columns()
    assert set(MAIN_TABLES) <= set(tables), f"tables renamed: {sorted(set(MAIN_TABLES) - set(tables))}"
    missing = {t: [c for c in tables[t] if c not in words] for t in MAIN_TABLES}
    missing = {t: cols for t, cols in missing.items() if cols}
    assert not missing, f"columns methods.md does not name: {missing}"
    assert set(PAIR_METRICS) | set(SINGLE_METRICS) <= words
