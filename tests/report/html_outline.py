"""A small reader of report HTML for tests: sections by id, headings, figures, tables, links."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser


@dataclass
class Section:
    id: str
    headings: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)  # data-figure names
    tables: list[list[list[str]]] = field(default_factory=list)  # rows of cell texts (header row first)
    details: int = 0


class Outline(HTMLParser):
    """Sections (every element with an id that is a <section>), nested: a figure or table counts
    for each section that encloses it."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: dict[str, Section] = {}
        self.stack: list[str] = []  # open sections
        self.open_tags: list[str] = []
        self.heading: list[str] | None = None
        self.table: list[list[str]] | None = None
        self.cell: list[str] | None = None
        self.srcs: list[str] = []
        self.hrefs: list[str] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            section_id = attrs.get("id", "")
            self.sections[section_id] = Section(section_id)
            self.stack.append(section_id)
        self.open_tags.append(tag)
        if tag in ("h1", "h2", "h3", "h4"):
            self.heading = []
        elif tag == "figure" and "data-figure" in attrs:
            for s in self.stack:
                self.sections[s].figures.append(attrs["data-figure"])
        elif tag == "details":
            for s in self.stack:
                self.sections[s].details += 1
        elif tag == "table":
            self.table = []
        elif tag == "tr" and self.table is not None:
            self.table.append([])
        elif tag in ("td", "th") and self.table is not None:
            self.cell = []
        elif tag == "title":
            self._in_title = True
        if "src" in attrs:
            self.srcs.append(attrs["src"] or "")
        if "href" in attrs:
            self.hrefs.append(attrs["href"] or "")

    def handle_endtag(self, tag):
        if self.open_tags and self.open_tags[-1] == tag:
            self.open_tags.pop()
        if tag == "section" and self.stack:
            self.stack.pop()
        elif tag in ("h1", "h2", "h3", "h4") and self.heading is not None:
            text = " ".join("".join(self.heading).split())
            for s in self.stack:
                self.sections[s].headings.append(text)
            self.heading = None
        elif tag in ("td", "th") and self.cell is not None and self.table is not None:
            self.table[-1].append("".join(self.cell).strip())
            self.cell = None
        elif tag == "table" and self.table is not None:
            for s in self.stack:
                self.sections[s].tables.append(self.table)
            self.table = None
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self.heading is not None:
            self.heading.append(data)
        if self.cell is not None:
            self.cell.append(data)
        if self._in_title:
            self.title += data


def outline(html: str) -> Outline:
    parser = Outline()
    parser.feed(html)
    parser.close()
    return parser
