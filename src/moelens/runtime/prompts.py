"""Prompts with a subject span (and optionally a target), read from JSONL and tokenised.

docs/methods.md §4: a prompt is tokenised as ``tokenizer(prompt)`` with the tokenizer's default special
tokens; the subject tokens are those whose character span overlaps the first occurrence of
``subject`` in ``prompt``; the last token is the prompt's last. The target token (§7) is the first
token of ``target`` as it follows the prompt: ``prompt + " " + target`` is tokenised and the first
token that ends after the prompt's last character is taken.

``prompt_id`` is the 0-based line of the prompts file (blank lines count as lines but hold no
prompt), so a table row points back to the line it came from.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moelens.errors import ConfigError
from moelens.textfiles import read_jsonl


@dataclass(frozen=True)
class PromptRecord:
    """One line of a prompts file."""

    prompt_id: int
    prompt: str
    subject: str
    target: str | None = None


@dataclass(frozen=True)
class TokenisedPrompt:
    """A prompt's token ids, its subject positions, and its target token (None: no target)."""

    record: PromptRecord
    input_ids: tuple[int, ...]
    subject_positions: tuple[int, ...]
    target_id: int | None

    @property
    def prompt_id(self) -> int:
        return self.record.prompt_id

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def last(self) -> int:
        return len(self.input_ids) - 1

    def token_kind(self, position: int) -> str:
        """ROME's group of a token: the last token is ``last`` even when it is also the first after
        the subject; a one-token subject is ``last_subject``."""
        subj = self.subject_positions
        if position == self.last:
            return "last"
        if position < subj[0]:
            return "before_subject"
        if position == subj[-1]:
            return "last_subject"
        if position == subj[0]:
            return "first_subject"
        if position < subj[-1]:
            return "middle_subject"
        if position == subj[-1] + 1:
            return "first_after"
        return "further"


def _where(source: str, line: int) -> str:
    return f"{source} line {line + 1}"


def parse_records(rows: Iterable[tuple[int, Any]], source: str) -> list[PromptRecord]:
    """Check each (line, object) and make it a record: ``prompt`` and ``subject`` non-empty strings,
    ``subject`` inside ``prompt``, ``target`` (optional) a non-empty string."""
    records = []
    for line, obj in rows:
        where = _where(source, line)
        if not isinstance(obj, Mapping):
            raise ConfigError(f"{where}: expected a JSON object with \"prompt\" and \"subject\", got {type(obj).__name__}")
        for key in ("prompt", "subject"):
            if key not in obj:
                raise ConfigError(f"{where}: no \"{key}\"; every line needs \"prompt\" and \"subject\" (and may have \"target\")")
            if not isinstance(obj[key], str) or not obj[key].strip():
                raise ConfigError(f"{where}: \"{key}\" must be a non-empty string, got {obj[key]!r}")
        target = obj.get("target")
        if target is not None and (not isinstance(target, str) or not target.strip()):
            raise ConfigError(f"{where}: \"target\" must be a non-empty string when given, got {target!r}")
        if obj["subject"] not in obj["prompt"]:
            raise ConfigError(f"{where}: subject {obj['subject']!r} is not in the prompt {obj['prompt']!r}")
        records.append(PromptRecord(line, obj["prompt"], obj["subject"], target))
    if not records:
        raise ConfigError(f"{source} holds no prompts")
    return records


def read_prompts(path: str | os.PathLike[str]) -> list[PromptRecord]:
    """Records of a JSONL prompts file (one JSON object per line; blank lines are skipped)."""
    p = Path(path)
    # parse_records numbers lines from 0; read_jsonl from 1
    rows = [(n - 1, obj) for n, obj in read_jsonl(p, "prompts file")]
    return parse_records(rows, str(p))


def as_records(prompts: str | os.PathLike[str] | Sequence[Mapping[str, Any]]) -> tuple[list[PromptRecord], str | None]:
    """Records from a JSONL path or a list of dicts (ids = list positions); and the path, if any."""
    if isinstance(prompts, (str, os.PathLike)):
        return read_prompts(prompts), str(Path(prompts).resolve())
    if isinstance(prompts, Sequence):
        return parse_records(enumerate(prompts), "prompts"), None
    raise ConfigError(f"prompts must be a JSONL path or a list of dicts, got {type(prompts).__name__}")


def _offsets(tokenizer: Any, text: str, where: str) -> tuple[list[int], list[tuple[int, int]]]:
    try:
        # verbose=False: a prompt longer than the model's maximum is refused below, on one line
        enc = tokenizer(text, return_offsets_mapping=True, verbose=False)
    except NotImplementedError:
        raise ConfigError(
            f"{where}: the tokenizer ({type(tokenizer).__name__}) cannot map tokens to characters; "
            "interventions need a fast tokenizer (tokenizer.json)"
        ) from None
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def tokenise(tokenizer: Any, record: PromptRecord, source: str = "prompts", max_length: int | None = None) -> TokenisedPrompt:
    """Token ids, subject positions and target token of one record."""
    where = _where(source, record.prompt_id)
    ids, offsets = _offsets(tokenizer, record.prompt, where)
    if not ids:
        raise ConfigError(f"{where}: the prompt encodes to no token")
    if max_length is not None and len(ids) > max_length:
        raise ConfigError(f"{where}: the prompt has {len(ids)} tokens, more than the model's {max_length} positions")
    start = record.prompt.index(record.subject)
    end = start + len(record.subject)
    # A token [s, e) overlaps the subject [start, end) when s < end and e > start; special tokens
    # have empty spans and never overlap.
    subject = tuple(i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start)
    if not subject:
        raise ConfigError(f"{where}: no token of the prompt covers the subject {record.subject!r}; check the tokenizer")
    target_id = None
    if record.target is not None:
        full_ids, full_offsets = _offsets(tokenizer, record.prompt + " " + record.target, where)
        after = [t for t, (s, e) in zip(full_ids, full_offsets) if e > len(record.prompt) and e > s]
        if not after:
            raise ConfigError(f"{where}: the target {record.target!r} encodes to no token after the prompt")
        unk = getattr(tokenizer, "unk_token_id", None)
        if unk is not None and any(t == unk for t, (s, e) in zip(full_ids, full_offsets) if e > len(record.prompt)):
            raise ConfigError(f"{where}: the target {record.target!r} is not in the tokenizer's vocabulary (it encodes to "
                              f"the unknown token {tokenizer.unk_token!r}); use a target the model can predict")
        target_id = int(after[0])
    return TokenisedPrompt(record, tuple(int(i) for i in ids), subject, target_id)


def tokenise_all(tokenizer: Any, records: Sequence[PromptRecord], source: str = "prompts", max_length: int | None = None) -> list[TokenisedPrompt]:
    return [tokenise(tokenizer, r, source, max_length) for r in records]


__all__ = ["PromptRecord", "TokenisedPrompt", "as_records", "parse_records", "read_prompts", "tokenise", "tokenise_all"]
