"""Jinja2 rendering of the report templates (in ``report/templates/``), autoescaped."""

from __future__ import annotations

from functools import lru_cache

from jinja2 import Environment, PackageLoader, StrictUndefined


def _explanation_titles() -> dict[str, str]:
    from moelens.analyses.registry import declarations

    return {name: spec.title for d in declarations().values() for name, spec in d.figures.items()}


#: Figure function → heading of its explanation (figure captions point back to it), from the
#: analyses' declarations.
EXPLANATION_TITLES = _explanation_titles()


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
    env.globals["explain_title"] = EXPLANATION_TITLES.__getitem__
    return env


def render(template: str, **context: object) -> str:
    return environment().get_template(template).render(**context)
