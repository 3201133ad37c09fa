"""Jinja2 rendering of the report templates (in ``report/templates/``), autoescaped."""

from __future__ import annotations

from functools import lru_cache

from jinja2 import Environment, PackageLoader, StrictUndefined

from moelens.figures.catalog import FIGURES


def explanation_title(figure: str) -> str:
    """The heading of a figure's explanation (its title in the catalog): captions link to it."""
    return FIGURES[figure].title


@lru_cache(maxsize=1)
def environment() -> Environment:
    """Every value is HTML-escaped (labels and titles are user text); a missing variable is an error."""
    env = Environment(
        loader=PackageLoader("moelens.report", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["explain_title"] = explanation_title
    return env


def render(template: str, **context: object) -> str:
    return environment().get_template(template).render(**context)
