"""The Python functions of the analyses (``ml.router_alignment``, ``ml.trace``, ...), derived from
their declarations (:mod:`moelens.analyses.declaration`): one loop, no function written per
analysis.

A function takes the analysis's models (opened :class:`~moelens.checkpoint.MoEModel` s or
checkpoint paths), then its config's fields in the declared order with the config's defaults
(``"*"`` in the declaration starts the keyword-only ones), then ``out``, ``progress``, ``config``
(a config object that replaces the keyword options) and ``executor`` (every analysis runs on
every executor). Every option is checked (the config is made) before a model is opened or anything
is written; the declaration's ``run`` does the rest, and its docstring is the function's.

>>> import moelens as ml
>>> run = ml.router_alignment("zoo/base", layers=[0, 1], matrix="gate")
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any, Callable

from moelens.analyses.declaration import Declaration, load
from moelens.analyses.fields import config_fields, make_config

_P = inspect.Parameter
#: The keywords every analysis function ends with, after its config's fields.
RUN_KEYWORDS = ("out", "progress", "config")
_MODEL = "MoEModel | str | os.PathLike[str]"


def api_parameters(declaration: Declaration) -> list[inspect.Parameter]:
    """The parameters of the Python function of ``declaration``, in order."""
    fields = {f.name: f for f in config_fields(declaration.config_type)}
    params = [_P(i.name, _P.POSITIONAL_OR_KEYWORD, default=_P.empty if i.required else None,
                 annotation=_MODEL if i.required else f"{_MODEL} | None") for i in declaration.inputs]
    for kind, names in ((_P.POSITIONAL_OR_KEYWORD, declaration.positional()), (_P.KEYWORD_ONLY, declaration.keyword_only())):
        for name in names:
            f = fields[name]
            default = _P.empty if f.metadata.get("required") else f.default
            params.append(_P(name, kind, default=default, annotation=f.type))
    params += [
        _P("out", _P.KEYWORD_ONLY, default=None, annotation="str | os.PathLike[str] | None"),
        _P("progress", _P.KEYWORD_ONLY, default=None, annotation="ProgressCallback | None"),
        _P("config", _P.KEYWORD_ONLY, default=None, annotation=f"{declaration.config_type.__name__} | None"),
    ]
    params.append(_P("executor", _P.KEYWORD_ONLY, default=None, annotation="str | Executor | None"))
    return params


def opened(model: Any) -> Any:
    """An opened model (None stays None; a path is opened)."""
    from moelens.checkpoint import MoEModel, open_model

    return model if model is None or isinstance(model, MoEModel) else open_model(model)


def make_api_function(declaration: Declaration) -> Callable[..., Any]:
    """The Python function of ``declaration`` (see the module's docstring)."""
    run = load(declaration.run)
    signature = inspect.Signature(api_parameters(declaration))
    names = [f.name for f in config_fields(declaration.config_type)]

    def function(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = bound.arguments
        config = values["config"]
        if config is None:  # every option is checked before a model is opened or anything written
            config = make_config(declaration.config_type, {name: values[name] for name in names})
        models = {i.role: opened(values[i.name]) for i in declaration.inputs}
        return run(models, config, out=values["out"], progress=values["progress"], executor=values.get("executor"))

    function.__signature__ = signature  # type: ignore[attr-defined]
    function.__name__ = function.__qualname__ = declaration.function
    function.__module__ = run.__module__
    function.__doc__ = run.__doc__
    return function


@lru_cache(maxsize=None)
def api_function(name: str) -> Callable[..., Any]:
    """The Python function called ``name`` (``"router_alignment"``, ``"trace"``), made once."""
    from moelens.analyses.registry import declarations

    for declaration in declarations().values():
        if declaration.function == name:
            return make_api_function(declaration)
    raise AttributeError(f"no analysis function named {name!r}")


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    return api_function(name)


__all__ = ["RUN_KEYWORDS", "api_function", "api_parameters", "make_api_function", "opened"]
