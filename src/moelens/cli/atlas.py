"""``atlas``: every analysis of a model (and its fine-tune) and one report."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from moelens.choices import DEFAULT_DEVICE, DEVICE_HELP
from moelens.cli.app import app, check_sources, command_help, console, progress_bar
from moelens.cli.options import command_from_parameters, executor_from_cli, executor_parameters


def _atlas(values: dict) -> None:
    limit = values.get("trace_limit")
    if limit is not None and limit < 1:
        from moelens.errors import ConfigError

        raise ConfigError(f"--trace-limit {limit}: give a whole number ≥ 1")
    check_sources(values, "source", "tuned", "base")
    from moelens.atlas import RESTORE_PROMPTS, atlas, shell_quote

    executor = executor_from_cli(values)
    restore = values.get("restore_limit")
    restore = RESTORE_PROMPTS if restore is None else restore
    command = "moelens " + " ".join(shell_quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["atlas"] else None
    with progress_bar() as callback:
        result = atlas(values["source"], values["out"], tuned=values.get("tuned"), base=values.get("base"),
                       prompts=values.get("prompts"), calibration=values.get("calibration"), executor=executor,
                       device=values["device"], trace_limit=limit, restore_limit=restore, title=values.get("title"), progress=callback, command=command,
                       jobs=values.get("jobs"))
    for name in result.runs:
        console.print(f"  {'reused' if name in result.reused else 'wrote '} runs/{escape(name)}", highlight=False)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    console.print(f"{len(result.figures)} figure files in [bold]{escape(str(result.out / 'figures'))}[/]", highlight=False)
    console.print(f"report: [bold]{escape(str(result.report.resolve()))}[/]", highlight=False)


def _register_atlas() -> None:
    P = inspect.Parameter

    def opt(name: str, annotation: object, default: object, *decls: str, help: str, metavar: Optional[str] = None) -> inspect.Parameter:
        return P(name, P.KEYWORD_ONLY, annotation=annotation, default=typer.Option(default, *decls, help=help, metavar=metavar, show_default=default is not None))

    params = [
        P("source", P.POSITIONAL_OR_KEYWORD, annotation=str,
          default=typer.Argument(..., metavar="MODEL", help="The model: checkpoint directory or cached repo id (MoE or dense).")),
        opt("out", Path, ..., "--out", help="Directory of the atlas: runs/, figures/ and report.html (finished runs are reused).", metavar="DIR"),
        opt("tuned", Optional[str], None, "--tuned", help="Its fine-tune: MODEL is the base.", metavar="B"),
        opt("base", Optional[str], None, "--base", help="Its base: MODEL is the fine-tune.", metavar="A"),
        opt("prompts", Optional[Path], None, "--prompts", help="Facts for interventions (JSONL: prompt, subject, target); a zoo model brings its own.", metavar="FACTS.jsonl"),
        opt("calibration", Optional[Path], None, "--calibration", help="Text for clustering and merge costs, one sequence per line; a zoo model brings its own.", metavar="TEXT"),
        opt("trace_limit", Optional[int], None, "--trace-limit", help="Interventions on the first N prompts only (default: all).", metavar="N"),
        opt("restore_limit", Optional[int], None, "--restore-limit", metavar="N",
            help="Causal tracing (restore) of the first model on its first N prompts (default 12, at most --trace-limit; 0: none); "
                 "attention knockout, the seed-003 figure, blocks round(9/48 × layers) layers around each layer."),
        opt("device", str, DEFAULT_DEVICE, "--device", help=f"{DEVICE_HELP}, for every analysis."),
        opt("title", Optional[str], None, "--title", help="Title of the report."),
        opt("jobs", Optional[int], None, "--jobs", metavar="N",
            help="Analyses run at once, each in its own process (default: one per CPU core on the CPU with the local executor, as memory allows; 1: one at a time, in this process); the report's sections are drawn on as many processes (default: one per core)."),
        *executor_parameters(),
    ]
    app.command("atlas")(command_from_parameters(params, _atlas, command_help("atlas"), "atlas"))


_register_atlas()
