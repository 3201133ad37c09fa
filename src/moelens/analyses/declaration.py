"""What an analysis declares once, and every outer layer reads: :class:`Declaration`.

An analysis's declaration names its config (whose fields carry default, help, flag and whether
they change the numbers: :func:`moelens.analyses.fields.option`), the Python function's name and
argument order, the models it reads, its tables, its report section, its figures, its command and
what the atlas runs. The API functions (:mod:`moelens.analyses.api`), the command line's commands
(:mod:`moelens.cli.analyses`), the manifest's options (:mod:`moelens.analyses.runner`), the atlas's
runs and their reproduce commands (:mod:`moelens.atlas`), the figure catalog
(:mod:`moelens.figures.catalog`) and the report's sections (:mod:`moelens.report.sections`) are
derived from the declarations by loops over :func:`moelens.analyses.registry.declarations`.

Code, the config class included, is named lazily, as ``"module:attribute"`` strings (:func:`load`),
so that reading the declarations (``moelens --help`` lists every analysis's command) costs no
more than importing each analysis's ``__init__``, where its declaration lives. A leaf module: the
standard library only.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Mapping


def load(target: str) -> Any:
    """The object a ``"package.module:attribute"`` string names, imported now."""
    module, _, attribute = target.partition(":")
    if not attribute:
        raise ValueError(f"{target!r} is not 'module:attribute'")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class ModelInput:
    """A model an analysis reads: a parameter of the Python function (``name``), an input of the
    runner (``role``: ``"a"``, ``"b"``, ``"base"``) and an argument of the command line
    (``cli_name``, shown as ``metavar``; an option ``flag`` such as ``--base`` instead of a
    positional argument when given). Optional models default to None everywhere."""

    name: str = "model"
    role: str = "a"
    required: bool = True
    cli_name: str = "source"
    metavar: str = "MODEL"
    help: str = "Checkpoint directory, or a repo id in the local Hugging Face cache."
    flag: str | None = None


@dataclass(frozen=True)
class FigureSpec:
    """A figure of the analysis's runs: ``target`` its function (``"module:function"``), ``title``
    the heading of its explanation in the report, whether it draws ``one_run`` or many, and the
    ``options`` it takes (``k``, ``metric``, ...)."""

    target: str
    title: str
    one_run: bool = False
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class CommandFlag:
    """An option of the command that is not a config field (how the summary is printed, say):
    ``--<name>`` with ``-`` for ``_``, a bool flag when ``default`` is a bool."""

    name: str
    default: Any
    help: str


@dataclass(frozen=True)
class Command:
    """The command line's command: its ``name`` and one-paragraph ``help``; ``show`` prints a
    finished run's summary (``"module:function"``, called with the run and the parsed values);
    ``flags`` are the command's own options beside the config's."""

    name: str
    help: str
    show: str
    flags: tuple[CommandFlag, ...] = ()


@dataclass(frozen=True)
class Declaration:
    """Everything the outer layers know of one analysis.

    ``name``: registry key, the manifest's ``analysis`` and the report section's id; ``title``
    its human name; ``config`` the frozen config class (``"module:Class"``, a torch-free module;
    :attr:`config_type` imports it); ``analysis`` the :class:`Analysis`
    subclass (``"module:Class"``); ``function`` the name of the Python function (``ml.<function>``);
    ``signature`` the config fields in the order that function takes them, ``"*"`` before the
    keyword-only ones (every field appears once; ``out``, ``progress``, ``config`` and ``executor``
    follow as keywords); ``inputs`` the models it reads, first in the
    signature; ``run`` (``"module:function"``, ``run(models, config, out=, progress=, executor=)``)
    runs a checked config on opened models, its docstring the Python function's; ``tables`` the
    tables of its runs; ``section`` its report section's builder (``(runs, fmt) -> Section``);
    ``figures`` its figures by name; ``command`` its command; ``atlas``
    (``"module:function"``, ``(AtlasInputs) -> [Call]``) what the atlas runs of it, if anything;
    ``unit_noun`` what one of its units is, for progress bars ("layers", "prompt groups");
    ``reads_whole_model`` whether it runs the model through transformers (which reads every
    weight file whole, outside the tensor store: its manifests then record whole-file hashes).
    Every analysis takes ``executor=`` (and its command ``--executor``): its units run anywhere."""

    name: str
    title: str
    config: str
    analysis: str
    function: str
    signature: tuple[str, ...]
    run: str
    tables: tuple[str, ...]
    section: str
    command: Command
    inputs: tuple[ModelInput, ...] = (ModelInput(),)
    figures: Mapping[str, FigureSpec] = field(default_factory=dict)
    atlas: str | None = None
    unit_noun: str = "layers"
    reads_whole_model: bool = False

    @property
    def config_type(self) -> type:
        """The config class, imported now."""
        return load(self.config)

    def positional(self) -> list[str]:
        """The config fields the Python function takes positionally (after the models)."""
        return list(self.signature[: self.signature.index("*")]) if "*" in self.signature else list(self.signature)

    def keyword_only(self) -> list[str]:
        return list(self.signature[self.signature.index("*") + 1:]) if "*" in self.signature else []

    def exports(self, *, config: tuple[str, ...] = (), analysis: tuple[str, ...] = ()) -> dict[str, str]:
        """The public names of the analysis's package by the module that defines each, for
        :func:`moelens.lazy.lazy_package`: the config class and the names ``config`` of its module,
        the analysis class and the names ``analysis`` of its module, and the Python function
        (:mod:`moelens.analyses.api`)."""
        config_module, _, config_class = self.config.partition(":")
        analysis_module, _, analysis_class = self.analysis.partition(":")
        return {
            **dict.fromkeys((config_class, *config), config_module),
            **dict.fromkeys((analysis_class, *analysis), analysis_module),
            self.function: "moelens.analyses.api",
        }


__all__ = ["Command", "CommandFlag", "Declaration", "FigureSpec", "ModelInput", "load"]
