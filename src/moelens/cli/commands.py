"""Every command's name, order and one-paragraph help, and the root's own help: what ``moelens
--help`` lists, kept free of typer and of any analysis so that it can be printed without them
(:mod:`moelens.cli.quick`). The commands take their help text from here."""

from __future__ import annotations

#: The root's help (first screen of ``moelens --help``).
ROOT_HELP = "Look inside Mixture-of-Experts language models."
VERSION_HELP = "Print the version of moelens and exit."
#: Click's text for every command's ``--help``.
HELP_HELP = "Show this message and exit."

#: Commands whose module is imported only when the command runs (or shows its own help): their
#: options derive from analysis configs, whose modules import torch, pandas or matplotlib. Every
#: registered analysis's command (name and help from its declaration) comes first, then these.
OTHER_LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "atlas": ("moelens.cli.atlas", "Every analysis that applies to a model (and its fine-tune): router alignment, expert distance, module metrics, "
              "interventions, clustering and merge costs, each as a run under DIR/runs, then one report DIR/report.html "
              "and every figure under DIR/figures."),
    "merge": ("moelens.cli.clustering", "Merge each cluster's experts (usage-weighted average, after permutation alignment) into a checkpoint transformers loads."),
    "report": ("moelens.cli.reports", "Write one self-contained HTML report of runs of any analysis (one section each; figures and styles inline)."),
    "figure": ("moelens.cli.reports", "Draw one figure of one or more runs and save it as PNG, SVG or PDF."),
}


def _lazy_commands() -> dict[str, tuple[str, str]]:
    from moelens.analyses.registry import declarations  # configs only: no torch, pandas or typer

    analyses = {d.command.name: ("moelens.cli.analyses", d.command.help) for d in declarations().values()}
    return {**analyses, **OTHER_LAZY_COMMANDS}


LAZY_COMMANDS: dict[str, tuple[str, str]] = _lazy_commands()

#: The help of the commands registered when the command line starts (moelens.cli.checkpoint, .zoo).
EAGER_COMMANDS: dict[str, str] = {
    "inspect": "Summarise a checkpoint: family, layers, experts, top-k, sizes.",
    "tiny": "Write a tiny random checkpoint of a family (for trying moelens without downloads).",
    "families": "List the model families and architectures moelens reads.",
    "zoo": "Tiny MoE language models trained here on invented facts (base and tuned).",
}

#: The order of ``moelens --help`` (a command missing here is listed after these).
COMMAND_ORDER = ("align", "distance", "modules", "trace", "route", "atlas", "inspect", "tiny", "families", "calibrate", "cluster",
                 "merge", "merge-cost", "report", "figure", "zoo")


def command_help(name: str) -> str:
    """The one-paragraph help of command ``name``."""
    return LAZY_COMMANDS[name][1] if name in LAZY_COMMANDS else EAGER_COMMANDS[name]


def listed_commands() -> list[str]:
    """Every command, in the order ``moelens --help`` lists them."""
    names = dict.fromkeys([*COMMAND_ORDER, *LAZY_COMMANDS, *EAGER_COMMANDS])
    return sorted(names, key=lambda n: COMMAND_ORDER.index(n) if n in COMMAND_ORDER else len(COMMAND_ORDER))
