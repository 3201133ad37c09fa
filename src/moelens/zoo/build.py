"""Build (or find in the cache) a zoo: a base MoE model, its tuned counterpart, their facts.

Layout of a zoo directory::

    base/              model + tokenizer, trained on the plain sentences
    tuned/             base trained further on the question/answer rendering
    facts.jsonl        one fact a line: relation, subject, target, prompt, qa_prompt
    calibration.txt    lines of text for calibration passes
    zoo.json           recipe and its hash, seed, losses, recall, timings, sizes (written last)

A build writes into a hidden sibling directory and renames it into place at the end, so an
interrupted build never looks complete; ``zoo.json`` with the recipe's hash and every listed
file present is what makes a directory a finished zoo that the next build returns at once.

One process builds a given zoo directory at a time: a build holds an exclusive lock (a
:class:`~moelens.locks.DirectoryLock` on ``.<name>.lock`` beside the directory, since the
directory itself is replaced by a rename), and a second build of the same directory waits for
the first and then finds its zoo. Hidden ``.<name>.partial-PID`` and ``.<name>.old-PID``
directories left by a build that was killed (SIGKILL, power loss) are removed by the next build
once their process is gone.

Fact recall (the share of facts whose target is the greedy next token, see
:mod:`moelens.runtime.recall`) is measured on the models as saved (after any dtype cast):
``zoo.json["base"]["recall"]`` on the plain ``prompt``; ``zoo.json["tuned"]["recall"]`` on the
question ``qa_prompt``, the format it was tuned for, and ``["tuned"]["recall_plain"]`` on the
plain ``prompt`` (what it kept of the base's format).
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moelens.errors import ConfigError, OutputExistsError, SourceNotFoundError
from moelens.locks import LOCK_NAME, DirectoryLock, pid_alive
from moelens.progress import ProgressCallback, report
from moelens.safe_files import remove_tree
from moelens.zoo.corpus import World, build_world, calibration_text
from moelens.zoo.recipe import Recipe, recipe_for

ZOO_JSON = "zoo.json"
FACTS = "facts.jsonl"
CALIBRATION = "calibration.txt"
BASE, TUNED = "base", "tuned"


def _in_root(name: str) -> property:
    """A file or folder of the zoo, ``root / name``, as a read-only attribute."""

    def path(self: Zoo) -> Path:
        return self.root / name

    return property(path, doc=f"``root / {name!r}``")


@dataclass(frozen=True)
class Zoo:
    """A finished zoo on disk. ``info`` is the content of ``zoo.json``; ``cached`` says whether
    this call found it already built."""

    root: Path
    info: dict[str, Any] = field(repr=False)
    cached: bool = False

    base = _in_root(BASE)
    tuned = _in_root(TUNED)
    facts = _in_root(FACTS)
    calibration = _in_root(CALIBRATION)
    zoo_json = _in_root(ZOO_JSON)

    def paths(self) -> dict[str, Path]:
        return {"base": self.base, "tuned": self.tuned, "facts": self.facts, "calibration": self.calibration, "zoo.json": self.zoo_json}

    def fact_records(self) -> list[dict[str, str]]:
        """The facts as dicts (``prompt``, ``subject``, ``target``, ``relation``, ``qa_prompt``)."""
        return [json.loads(line) for line in self.facts.read_text().splitlines() if line.strip()]


def cache_root() -> Path:
    """``$MOELENS_CACHE``, else ``$XDG_CACHE_HOME/moelens``, else ``~/.cache/moelens``."""
    if os.environ.get("MOELENS_CACHE"):
        return Path(os.environ["MOELENS_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "moelens"
    return Path.home() / ".cache" / "moelens"


DEFAULT_DTYPE = "float32"


def default_zoo_dir(family: str = "mixtral", seed: int = 0, small: bool = False, dtype: str = DEFAULT_DTYPE) -> Path:
    """``<cache>/zoo/<family>-<seed>[-small][-<dtype>]``: the dtype is named unless it is the
    default float32, so that a bfloat16 build never replaces (or is mistaken for) the float32
    zoo of the same family and seed."""
    suffix = ("-small" if small else "") + ("" if dtype == DEFAULT_DTYPE else f"-{dtype}")
    return cache_root() / "zoo" / f"{family}-{seed}{suffix}"


def zoo_lock(out: Path, blocking: bool = True) -> DirectoryLock:
    """The lock a build of the zoo directory ``out`` holds: ``.<name>.lock`` beside ``out``
    (inside, it would be renamed away with the directory it guards)."""
    out = Path(out)
    return DirectoryLock(out, blocking=blocking, lock_file=out.parent / f".{out.name}.lock")


def _listed_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != ZOO_JSON)


def load_zoo(path: str | os.PathLike[str]) -> Zoo:
    """Open a finished zoo directory; raise if it is missing or incomplete."""
    root = Path(path).expanduser()
    info = _complete_info(root)
    if info is None:
        raise SourceNotFoundError(f"{root} is not a finished zoo (no valid {ZOO_JSON} or files missing); build it with `moelens zoo build --out {root}`")
    return Zoo(root=root, info=info, cached=True)


def _read_info(root: Path) -> dict[str, Any]:
    """``zoo.json`` of ``root`` as a zoo record (an object with the recipe's hash and the files it
    lists); raises :class:`~moelens.errors.OutputExistsError` naming the file otherwise."""
    from moelens.textfiles import read_json

    path = root / ZOO_JSON
    info = read_json(path, "zoo record", error=OutputExistsError)
    if not isinstance(info, dict) or not isinstance(info.get("recipe_hash"), str) or not isinstance(info.get("files"), dict):
        raise OutputExistsError(f"zoo record {path} is not a moelens zoo record (an object with recipe_hash and files)")
    return info


def _complete_info(root: Path) -> dict[str, Any] | None:
    """``zoo.json`` of ``root`` if it is a zoo record and every file it lists exists with its size."""
    try:
        info = _read_info(root)
    except OutputExistsError:
        return None
    files = info["files"]
    if not files:
        return None
    for rel, size in files.items():
        p = root / str(rel)
        if not p.is_file() or p.stat().st_size != size:
            return None
    return info


def _own_entries(info: dict[str, Any]) -> set[str]:
    """The top-level names a zoo with record ``info`` is made of."""
    return {ZOO_JSON, LOCK_NAME} | {Path(str(rel)).parts[0] for rel in info.get("files") or {} if Path(str(rel)).parts}


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers draws its own progress bars when saving; library code must not print."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _save_model(model: Any, tokenizer: Any, out: Path, chat_template: str | None = None) -> None:
    from moelens.zoo.tokenizer import save_tokenizer

    # The published per-expert layout, so readers meet the same tensor names as on the Hub.
    model.save_pretrained(str(out), save_original_format=True)
    save_tokenizer(tokenizer, out, chat_template)


def _recall(model: Any, tokenizer: Any, facts: list[dict[str, str]], prompt_key: str) -> tuple[float, dict[str, float]]:
    """Fact recall over all facts and per relation."""
    from moelens.runtime.recall import fact_recall

    correct = fact_recall(model, tokenizer, facts, prompt_key=prompt_key).correct
    by_relation: dict[str, list[bool]] = {}
    for fact, hit in zip(facts, correct):
        by_relation.setdefault(fact["relation"], []).append(bool(hit))
    per = {rel: round(sum(h) / len(h), 4) for rel, h in by_relation.items()}
    return round(float(correct.mean()), 4), per


def subject_token_counts(tokenizer: Any, subjects: list[str]) -> dict[str, int]:
    """How many subjects span how many tokens (as they follow a space inside a prompt), keyed
    by the token count as text, in ascending order."""
    counts: dict[int, int] = {}
    for ids in tokenizer([" " + s for s in subjects], add_special_tokens=False)["input_ids"]:
        counts[len(ids)] = counts.get(len(ids), 0) + 1
    return {str(k): counts[k] for k in sorted(counts)}


def _as_saved(model: Any, dtype: str) -> Any:
    """The model in the dtype it is saved in (a copy when casting, so training stays in fp32)."""
    import torch

    if dtype == "float32":
        return model
    return copy.deepcopy(model).to(getattr(torch, dtype))


def _fact_sentences(tokenizer: Any, facts: Any, qa: bool) -> tuple[Any, ...]:
    """Training sentences of ``facts``, plain or as questions, with their subject, the span of
    its tokens and the index of their answer token (the word right after the prompt)."""
    from moelens.zoo.train import Sentence

    texts = [f.qa_sentence if qa else f.sentence for f in facts]
    prompts = [f.qa_prompt if qa else f.prompt for f in facts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer([" " + f.target for f in facts], add_special_tokens=False)["input_ids"]
    spans = subject_spans(tokenizer, texts, ids, [f.subject for f in facts])
    out = []
    for fact, s, p, t, span in zip(facts, ids, prompt_ids, target_ids, spans):
        # a target is one token (the tokenizer keeps it whole): the answer is the token right
        # after the prompt's, and the same token that recall reads
        if list(s[:len(p)]) != list(p) or len(t) != 1 or s[len(p)] != t[0]:
            raise RuntimeError(f"the answer of {fact.sentence!r} is not the token after its prompt")
        out.append(Sentence(tuple(s), subject=fact.subject, answer=len(p), subject_span=span))
    return tuple(out)


def _word_index(text: str, words: str) -> int:
    """Where ``words`` first stands in ``text`` as whole words (not inside a longer word)."""
    padded = f" {text} "
    i = padded.find(f" {words} ")
    if i < 0:
        raise RuntimeError(f"{words!r} is not in {text!r}")
    return i


def subject_spans(tokenizer: Any, texts: list[str], ids: list[list[int]], subjects: list[str]) -> list[tuple[int, int]]:
    """Token positions ``[start, end)`` of each subject's first mention in its text (``ids``: the
    text's tokens): the tokens of the text up to the subject's end, less those of the text before
    it (the zoo's tokenizer splits at spaces first, so the two are prefixes of ``ids``; checked)."""
    starts = [_word_index(t, s) for t, s in zip(texts, subjects)]
    before = [t[:i].rstrip() for t, i in zip(texts, starts)]
    through = [t[:i + len(s)] for t, s, i in zip(texts, subjects, starts)]
    head = tokenizer(before, add_special_tokens=False)["input_ids"]
    upto = tokenizer(through, add_special_tokens=False)["input_ids"]
    out = []
    for text, f, h, u in zip(texts, ids, head, upto):
        if list(f[:len(u)]) != list(u) or list(u[:len(h)]) != list(h) or len(u) <= len(h):
            raise RuntimeError(f"the subject of {text!r} is not a run of its tokens")
        out.append((len(h), len(u)))
    return out


def _training_groups(world: World, tokenizer: Any, recipe: Recipe) -> tuple[list[Any], list[Any]]:
    """The base phase's mixture (plain facts, some filler) and the tuned phase's (questions,
    some plain facts so the plain format is kept, some filler)."""
    from moelens.zoo.train import Group, Sentence

    plain = _fact_sentences(tokenizer, world.facts, qa=False)
    questions = _fact_sentences(tokenizer, world.facts, qa=True)
    filler = tuple(Sentence(tuple(ids)) for ids in tokenizer(list(world.filler), add_special_tokens=False)["input_ids"])
    base = [Group(plain, 1.0), Group(filler, recipe.filler_share)]
    if recipe.biography_share:
        texts = world.biographies()
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        bios = tuple(Sentence(tuple(i), subject_span=span) for i, span in zip(ids, subject_spans(tokenizer, texts, ids, world.subjects())))
        base.append(Group(bios, recipe.biography_share))
    tuned = [Group(questions, float(recipe.qa_repeats)), Group(plain, recipe.tuned_plain_share), Group(filler, recipe.filler_share)]
    return base, tuned


def _train_phase(
    model: Any, tokenizer: Any, groups: list[Any], schedule: Any, recipe: Recipe, rng_name: str,
    progress: ProgressCallback | None, task: str, optimizer: Any = None,
) -> tuple[Any, Any]:
    """(training log, optimizer) of one phase; ``optimizer`` continues the previous phase's."""
    from moelens.zoo.train import Curriculum, train

    data = Curriculum(
        groups, schedule.curriculum, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
        random.Random(rng_name), row_tokens=recipe.row_tokens, answer_weight=recipe.answer_weight,
        reading=recipe.subject_reading,
    )
    return train(model, data, schedule, progress=progress, task=task, optimizer=optimizer, experts=recipe.experts)


def _write_texts(world: World, recipe: Recipe, seed: int, out: Path) -> None:
    with open(out / FACTS, "w") as fh:
        fh.writelines(json.dumps(fact.as_record()) + "\n" for fact in world.facts)
    with open(out / CALIBRATION, "w") as fh:
        fh.writelines(line + "\n" for line in calibration_text(world, seed, n_lines=recipe.calibration_lines))


def _build_into(tmp: Path, recipe: Recipe, seed: int, progress: ProgressCallback | None) -> dict[str, Any]:
    """Build every file of the zoo into ``tmp``; return the content of ``zoo.json``."""
    from moelens.results.run import package_versions
    from moelens.zoo.models import make_model
    from moelens.zoo.tokenizer import QA_CHAT_TEMPLATE, train_tokenizer

    start = time.perf_counter()
    world = build_world(seed, recipe.world)
    facts = [f.as_record() for f in world.facts]
    tokenizer = train_tokenizer(
        world.texts(recipe.biography_share > 0), world.whole_words(recipe.biography_share > 0), recipe.vocab_size,
        max_length=recipe.shape.max_positions,
    )
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    model = make_model(recipe.family, recipe.shape, len(tokenizer), special, seed)
    n_params = sum(p.numel() for p in model.parameters())
    n_expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)

    base_groups, tuned_groups = _training_groups(world, tokenizer, recipe)
    base_log, optimizer = _train_phase(model, tokenizer, base_groups, recipe.base, recipe, f"moelens-zoo-base-{seed}", progress, "base model")
    saved = _as_saved(model, recipe.dtype)
    base_recall, base_by_relation = _recall(saved, tokenizer, facts, "prompt")
    report(progress, "base model", recipe.base.steps, recipe.base.steps, f"loss {base_log.final()['loss']:.3f}, recall {base_recall:.3f}")
    _save_model(saved, tokenizer, tmp / BASE)
    del saved

    # The tuned phase continues the base phase's AdamW: a fresh one would move every weight by
    # about the full learning rate in its first steps (Adam's first updates are the gradient's
    # sign), wiping out a third of the plain recall before the questions are learnt.
    tuned_log, _ = _train_phase(
        model, tokenizer, tuned_groups, recipe.tuned, recipe, f"moelens-zoo-tuned-{seed}", progress, "tuned model", optimizer=optimizer,
    )
    saved = _as_saved(model, recipe.dtype)
    tuned_recall_qa, tuned_by_relation = _recall(saved, tokenizer, facts, "qa_prompt")
    tuned_recall_plain, _ = _recall(saved, tokenizer, facts, "prompt")
    report(progress, "tuned model", recipe.tuned.steps, recipe.tuned.steps, f"loss {tuned_log.final()['loss']:.3f}, recall {tuned_recall_qa:.3f}")
    _save_model(saved, tokenizer, tmp / TUNED, chat_template=QA_CHAT_TEMPLATE)

    _write_texts(world, recipe, seed, tmp)
    return {
        "recipe_version": recipe.as_dict()["version"],
        "recipe_hash": recipe.hash(seed),
        "recipe": recipe.as_dict(),
        "seed": seed,
        "family": recipe.family,
        "dtype": recipe.dtype,
        "threads": recipe.threads,
        "sizes": {
            "facts": len(facts), "subjects": len({f["subject"] for f in facts}), "relations": len({f["relation"] for f in facts}),
            "vocab": len(tokenizer), "subject_tokens": subject_token_counts(tokenizer, world.subjects()), "parameters": n_params, "expert_parameters": n_expert_params,
            "layers": recipe.shape.layers, "hidden_size": recipe.shape.hidden_size, "expert_ffn": recipe.shape.expert_ffn,
            "experts": recipe.shape.experts, "top_k": recipe.shape.top_k,
        },
        "base": {**base_log.final(), "recall": base_recall, "recall_prompt": "prompt", "recall_by_relation": base_by_relation},
        "tuned": {
            **tuned_log.final(), "recall": tuned_recall_qa, "recall_prompt": "qa_prompt", "recall_by_relation": tuned_by_relation,
            "recall_plain": tuned_recall_plain,
        },
        "seconds": round(time.perf_counter() - start, 2),
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def remove_leftovers(out: Path) -> list[Path]:
    """Remove the hidden ``.<name>.partial-PID`` (a build in progress) and ``.<name>.old-PID``
    (a zoo being replaced) directories of ``out`` whose process is gone: what a killed build
    leaves behind. Call it holding :func:`zoo_lock`; this process's own pid counts as gone, since
    it has no build in progress yet. Returns what was removed."""
    removed = []
    for kind in ("partial", "old"):
        for p in sorted(out.parent.glob(f".{out.name}.{kind}-*")):
            suffix = p.name.rsplit("-", 1)[1]
            if not suffix.isdigit():
                continue  # not a name a build writes: leave it alone
            pid = int(suffix)
            if pid == os.getpid() or not pid_alive(pid):
                remove_tree(p)  # a link of that name is removed as a link, never followed
                removed.append(p)
    return removed


def _recipe_difference(info: dict[str, Any], recipe: Recipe, seed: int) -> tuple[str, str]:
    """What the zoo in ``info`` was built with and what this build asks for, naming only the
    settings that differ (``dtype 'bfloat16'`` / ``dtype 'float32'``)."""
    old = {**(info.get("recipe") or {}), "seed": info.get("seed")}
    new = {**recipe.as_dict(), "seed": seed}
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if not keys:
        return "another recipe", "this one"

    def describe(values: dict[str, Any]) -> str:
        return ", ".join(f"{k} {values.get(k)!r}" if not isinstance(values.get(k), dict) else f"its own {k} settings" for k in keys)

    return describe(old), describe(new)


def _existing(out: Path, recipe: Recipe, seed: int, force: bool, explicit: bool) -> Zoo | None:
    """The finished zoo of this recipe at ``out`` (None when it must be built), or an error if
    ``out`` holds something a build must not replace."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ConfigError(f"{out} is a file; pass a directory for the zoo")
    info = _complete_info(out)
    if info is None:
        # an unfinished or damaged zoo is rebuilt; anything else is somebody's files
        if not (out / ZOO_JSON).exists() and not (out / ZOO_JSON).is_symlink():
            if any(p.name != LOCK_NAME for p in out.iterdir()):
                raise OutputExistsError(f"{out} is a non-empty directory that is not a zoo; pass an empty or new directory to --out")
            return None
        if explicit and not force:
            _check_damaged_zoo(out)
        return None
    if info.get("recipe_hash") == recipe.hash(seed):
        return None if force else Zoo(root=out, info=info, cached=True)
    if explicit and not force:
        # the default cache entry is moelens' own and is simply rebuilt; a directory the caller
        # named holds a zoo someone may still want
        was, wanted = _recipe_difference(info, recipe, seed)
        raise OutputExistsError(
            f"{out} holds a zoo built with {was}, but this build asks for {wanted}; "
            "pass --force to replace it, or choose another --out directory"
        )
    return None


def _check_damaged_zoo(out: Path) -> None:
    """A named ``out`` whose ``zoo.json`` is unreadable, or lists files that are missing, is
    rebuilt only if all it holds is a zoo's own files: the rebuild replaces the directory, and a
    ``zoo.json`` that cannot be read does not show that the rest is moelens' to delete."""
    if (out / ZOO_JSON).is_symlink():
        raise OutputExistsError(f"{out / ZOO_JSON} is a symbolic link, not a zoo record; pass --force to replace {out}, "
                                "or choose another --out directory")
    try:
        info = _read_info(out)
    except OutputExistsError as exc:
        raise OutputExistsError(f"{exc}; {out} may hold files that are not a zoo's: pass --force to replace it, "
                                "or choose another --out directory") from None
    others = sorted(p.name for p in out.iterdir() if p.name not in _own_entries(info))
    if others:
        raise OutputExistsError(f"{out} holds an unfinished zoo and files that are not a zoo's ({', '.join(others[:3])}); "
                                "pass --force to replace it, or choose another --out directory")


def build(
    out: str | os.PathLike[str] | None = None, seed: int = 0, family: str = "mixtral", small: bool = False,
    dtype: str = "float32", threads: int = 1, force: bool = False, recipe: Recipe | None = None,
    progress: ProgressCallback | None = None,
) -> Zoo:
    """Build the zoo of ``(recipe, seed)`` into ``out`` (default: :func:`default_zoo_dir`), or
    return it at once if ``out`` already holds it (``force=True`` rebuilds).

    ``recipe`` overrides the standard one made from ``family``, ``small``, ``dtype`` and
    ``threads``. ``out`` may be missing, empty, or an unfinished zoo (which is replaced). A
    finished zoo of another recipe or seed is replaced in the default cache directory, but
    refused in an ``out`` the caller named unless ``force=True``
    (:class:`~moelens.errors.OutputExistsError`, as is any other non-empty directory).

    While another process builds the same directory, this call waits for it (Ctrl-C
    interrupts the wait) and then returns the zoo it built.

    >>> zoo = build(small=True)
    >>> zoo.base, zoo.tuned, zoo.info["base"]["recall"]
    """
    recipe = recipe or recipe_for(family, small, dtype, threads)
    explicit = out is not None
    out = Path(out).expanduser() if out is not None else default_zoo_dir(recipe.family, seed, recipe.small, recipe.dtype)
    # A finished zoo is returned without taking the lock, so that a read-only cache serves.
    found = _existing(out, recipe, seed, force, explicit)
    if found is not None:
        return found
    out.parent.mkdir(parents=True, exist_ok=True)
    with zoo_lock(out, blocking=True):
        # another process may have built this zoo (or put something else there) while this one
        # waited for the lock
        found = _existing(out, recipe, seed, force, explicit)
        if found is not None:
            return found
        remove_leftovers(out)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        tmp.mkdir()
        try:
            with _torch_threads(recipe.threads), _quiet_transformers():
                info = _build_into(tmp, recipe, seed, progress)
            info["files"] = {rel: (tmp / rel).stat().st_size for rel in _listed_files(tmp)}
            from moelens.results.run import write_json

            write_json(tmp / ZOO_JSON, info)
            _move_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return Zoo(root=out, info=info, cached=False)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Swap the finished build in for whatever ``out`` held (an older or partial zoo)."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
