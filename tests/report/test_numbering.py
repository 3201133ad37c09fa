"""Section numbers from one source: TOC entries numbered 1, 1.1, …; headings given the same."""

from __future__ import annotations

import pytest

from moelens.report.numbering import number_headings, numbered, numbers_of


def test_entries_and_children_are_numbered_and_headings_take_the_numbers():
    toc = numbered([("a", "Alpha", [("a1", "One"), ("a2", "Two")]), ("b", "Beta", [])])
    assert numbers_of(toc) == {"a": "1", "a1": "1.1", "a2": "1.2", "b": "2"}
    html = ('<section id="a"><h1>Alpha</h1><section id="a1">\n<h2>7. One</h2></section>'
            '<section id="a2"><h2>Two</h2></section></section><section id="b" class="x"><h2>3.4 Beta</h2></section>')
    out = number_headings(html, numbers_of(toc))
    assert "<h1>1. Alpha</h1>" in out and "<h2>1.1. One</h2>" in out and "<h2>1.2. Two</h2>" in out and "<h2>2. Beta</h2>" in out


def test_an_anchor_without_a_heading_is_an_error():
    with pytest.raises(ValueError, match="#c"):
        number_headings('<div id="c"><p>x</p></div>', {"c": "1"})
