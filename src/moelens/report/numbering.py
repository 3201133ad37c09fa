"""Section numbers, from one source: the table of contents gives each entry its number, and the
heading of the element the entry links to gets the very same number.

``numbered([("a", "Alpha", [("a1", "One")])])`` → ``[("a", "1", "Alpha", [("a1", "1.1", "One")])]``;
:func:`number_headings` then writes ``1.`` and ``1.1`` before the first heading inside ``id="a"``
and ``id="a1"``, replacing any number the heading had.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

#: A TOC entry with its number: anchor, number ("2" or "2.3"), text, sub-entries.
NumberedEntry = tuple[str, str, str, list[tuple[str, str, str, list]]]


def numbered(entries: Sequence[tuple[str, str, Sequence[tuple[str, str]]]]) -> list[NumberedEntry]:
    """Number ``(anchor, text, [(anchor, text), …])`` entries 1, 2, … and their children 1.1, 1.2, …"""
    out: list[NumberedEntry] = []
    for i, (anchor, text, children) in enumerate(entries, start=1):
        subs = [(a, f"{i}.{j}", t, []) for j, (a, t) in enumerate(children, start=1)]
        out.append((anchor, str(i), text, subs))
    return out


def numbers_of(entries: Sequence[NumberedEntry]) -> dict[str, str]:
    """Anchor → number, for every entry and sub-entry."""
    found: dict[str, str] = {}
    for anchor, number, _text, subs in entries:
        found[anchor] = number
        found.update(numbers_of(subs))
    return found


_NUMBER = r"(?:\d+(?:\.\d+)*\.?\s+)?"


def number_headings(html: str, numbers: dict[str, str]) -> str:
    """Write each anchor's number before the first heading inside the element with that id."""
    for anchor, number in numbers.items():
        pattern = re.compile(r'(id="' + re.escape(anchor) + r'"[^>]*>\s*<h[1-6][^>]*>)' + _NUMBER)
        html, n = pattern.subn(lambda m, number=number: f"{m.group(1)}{number}. ", html, count=1)
        if n == 0:
            raise ValueError(f"the table of contents links to #{anchor}, which starts with no heading")
    return html
