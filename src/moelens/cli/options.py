"""Command-line options derived from an analysis's config dataclass, so that a field declared once
(its default, help text and parser; see :func:`moelens.analyses.fields.option`) is the API's keyword,
the manifest's option and the CLI's option alike."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import typer


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def config_parameters(config_type: type, exclude: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One keyword-only parameter (a ``typer.Option``) per CLI field of ``config_type``."""
    params = []
    for f in dataclasses.fields(config_type):
        meta = f.metadata
        if not meta.get("cli", True) or f.name in exclude:
            continue
        kind = str if meta.get("parse") else (meta.get("kind") or str)
        annotation = Optional[kind] if f.default is None else kind
        name = option_name(f.name)
        decls = (f"{name}/--no-{name[2:]}",) if kind is bool else (name,)
        default = f.default
        if meta.get("parse") and isinstance(default, (tuple, list)):
            default = ",".join(str(v) for v in default)  # the text the parser turns back into the value
        metavar = meta.get("metavar")
        if metavar == "LIST":  # a comma-separated list: name what it lists (--layers LAYERS)
            metavar = f.name.upper()
        opt = typer.Option(default, *decls, help=meta.get("help", ""), metavar=metavar, show_default=f.default is not None)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=annotation))
    return params


def config_from_cli(config_type: type, values: Mapping[str, Any]) -> Any:
    """The config of the CLI's parsed ``values`` (fields it lacks keep their defaults)."""
    from moelens.analyses.fields import make_config

    kwargs = {}
    for f in dataclasses.fields(config_type):
        if f.name not in values:
            continue
        value = values[f.name]
        parse = f.metadata.get("parse")
        if parse is not None and value is not None:
            value = parse(value)
        if isinstance(value, Path):
            value = str(value)
        kwargs[f.name] = value
    return make_config(config_type, kwargs)


def executor_parameters() -> list[inspect.Parameter]:
    """The options that say where units run (``--executor`` and Ray's own), one set for every
    analysis's command (every analysis is split into units that can run anywhere)."""

    def opt(name: str, annotation: Any, default: Any, flag: str, help: str, metavar: str | None = None) -> inspect.Parameter:
        option = typer.Option(default, flag, help=help, metavar=metavar, show_default=default is not None)
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)

    return [
        opt("executor", str, "local", "--executor", "Where the units run (layers, token shards, prompt groups, merged variants): local (this process) or ray (Ray tasks: a local cluster, or the one at --ray-address)."),
        opt("ray_address", Optional[str], None, "--ray-address", "Join the Ray cluster at auto or HOST:PORT (its head node) instead of starting a local one.", "ADDR"),
        opt("workers", Optional[int], None, "--workers", "Ray tasks at once (default: the cluster's CPUs, or its GPUs ÷ --gpus-per-worker).", "N"),
        opt("gpus_per_worker", Optional[float], None, "--gpus-per-worker", "GPUs each Ray task asks for (e.g. 1, or 0.5 to share one); with --device auto or cuda.", "X"),
        opt("max_retries", Optional[int], None, "--max-retries", "Times a Ray task that failed (its worker died) is run again (default 3).", "N"),
        threads_parameter(),
    ]


def threads_parameter() -> inspect.Parameter:
    """``--threads N``: CPU threads of the computation (default: chosen from the work)."""
    option = typer.Option(
        None, "--threads", metavar="N", show_default=False,
        help="CPU threads to compute with (default: 1 for small matrices, every core this process may use for large ones; "
             "OMP_NUM_THREADS also sets it). With --executor ray: threads of each task.",
    )
    return inspect.Parameter("threads", inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[int])


def threads_from_cli(values: Mapping[str, Any]) -> int | None:
    """Record the CLI's ``--threads`` for every computation of this process (checked ≥ 1)."""
    from moelens.threads import set_threads

    set_threads(values.get("threads"))
    return values.get("threads")


def executor_from_cli(values: Mapping[str, Any]) -> Any:
    """The executor of the CLI's parsed ``values`` (checked: Ray importable, options that fit)."""
    from moelens.analyses.executors import executor_from_options

    threads = threads_from_cli(values)
    return executor_from_options(
        values.get("executor"), address=values.get("ray_address"), workers=values.get("workers"),
        gpus_per_worker=values.get("gpus_per_worker"), max_retries=values.get("max_retries"), threads=threads,
    )


def command_from_parameters(
    params: list[inspect.Parameter], body: Callable[[dict[str, Any]], None], doc: str, name: str
) -> Callable[..., None]:
    """A function Typer can register whose signature is ``params`` and which calls ``body(kwargs)``."""

    def command(**kwargs: Any) -> None:
        body(kwargs)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    command.__name__ = name.replace("-", "_")
    return command
