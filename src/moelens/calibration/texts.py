"""Calibration text: lines read, split into calibration and held-out parts, tokenised, cut.

docs/methods.md §7: each non-empty line of the text file is one sequence, tokenised as ``tokenizer(line)``
with the tokenizer's default special tokens and cut at the model's maximum positions. The last
10 % of the non-empty lines (⌊n/10⌋ of n) are held out for perplexity and never calibrate;
calibration takes the sequences of the other lines in order until ``max_tokens`` tokens are
reached, the last one cut so that the total is exactly ``min(max_tokens, available)``.

A line is empty when it holds only white space; line numbers are 1-based lines of the file (blank
lines count), so a token points back to the line it came from. In Python, ``texts`` may also be a
list of strings (line i = item i) or of token-id lists (already tokenised, for models without a
tokenizer).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moelens.choices import DEFAULT_MAX_TOKENS
from moelens.errors import ConfigError
from moelens.textfiles import read_lines as read_text_lines

#: Share of the non-empty lines held out for perplexity (the last ⌊n/10⌋).
HOLDOUT_DIVISOR = 10


@dataclass(frozen=True)
class CalibrationLines:
    """The non-empty lines of a calibration text, before tokenisation.

    ``items`` are strings, or tuples of token ids when the caller tokenised them; ``line_numbers``
    the 1-based line of each; ``source`` the resolved path or ``"<N texts given in Python>"``."""

    source: str
    path: str | None
    items: tuple[Any, ...]
    line_numbers: tuple[int, ...]

    @property
    def n_heldout(self) -> int:
        return len(self.items) // HOLDOUT_DIVISOR

    @property
    def n_calibration(self) -> int:
        return len(self.items) - self.n_heldout

    @property
    def pretokenised(self) -> bool:
        return bool(self.items) and not isinstance(self.items[0], str)

    def digest(self) -> str:
        """SHA-256 of the lines (what a resumed run compares)."""
        blob = json.dumps([list(i) if not isinstance(i, str) else i for i in self.items], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class CalibrationTokens:
    """The calibration sequences as one stream of N tokens.

    ``sequences`` token ids per sequence (after the cut); ``lines`` the 1-based file line of each
    sequence; per token, ``sequence`` [N] and ``position`` [N] say where it sits."""

    sequences: tuple[tuple[int, ...], ...]
    lines: tuple[int, ...]

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    def token_table(self) -> dict[str, np.ndarray]:
        """Columns ``token, sequence, line, position, token_id`` (one row per token, in order)."""
        lengths = np.array([len(s) for s in self.sequences], dtype=np.int64)
        sequence = np.repeat(np.arange(len(self.sequences), dtype=np.int64), lengths)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        n = int(lengths.sum())
        return {
            "token": np.arange(n, dtype=np.int64),
            "sequence": sequence,
            "line": np.asarray(self.lines, dtype=np.int64)[sequence] if n else np.zeros(0, np.int64),
            "position": np.arange(n, dtype=np.int64) - starts,
            "token_id": np.fromiter((t for s in self.sequences for t in s), dtype=np.int64, count=n),
        }


def read_lines(texts: Any) -> CalibrationLines:
    """The non-empty lines of a text file (a path), or of a list of strings or token-id lists."""
    if isinstance(texts, (str, os.PathLike)):
        p = Path(texts)
        kept = read_text_lines(p, "calibration file")
        if not kept:
            raise ConfigError(f"calibration file {p} is empty (no line holds text); give one text sequence per line")
        resolved = str(p.resolve())
        return CalibrationLines(resolved, resolved, tuple(t for _, t in kept), tuple(n for n, _ in kept))
    if isinstance(texts, Sequence) and not isinstance(texts, (bytes, bytearray)):
        items = list(texts)
        if not items:
            raise ConfigError("the calibration texts are empty; give at least one text (or token-id list)")
        if all(isinstance(t, str) for t in items):
            kept = [(i + 1, t) for i, t in enumerate(items) if t.strip()]
            if not kept:
                raise ConfigError("every calibration text is blank; give at least one with text")
            return CalibrationLines(f"<{len(items)} texts given in Python>", None, tuple(t for _, t in kept), tuple(n for n, _ in kept))
        seqs = []
        for i, t in enumerate(items):
            if isinstance(t, str) or not isinstance(t, Sequence) or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in t):
                raise ConfigError(f"calibration text {i} is neither a string nor a list of token ids; give all strings or all token-id lists")
            if len(t):
                seqs.append((i + 1, tuple(int(v) for v in t)))
        if not seqs:
            raise ConfigError("every calibration token-id list is empty; give at least one token")
        return CalibrationLines(f"<{len(items)} token-id lists given in Python>", None, tuple(s for _, s in seqs), tuple(n for n, _ in seqs))
    raise ConfigError(f"calibration texts must be a text file or a list of strings, got {type(texts).__name__}")


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []))
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None:
        ids.add(int(unk))
    return ids


def tokenise(lines: CalibrationLines, tokenizer: Any | None, max_positions: int | None, vocab_size: int | None,
             max_tokens: int = DEFAULT_MAX_TOKENS, part: str = "calibration") -> CalibrationTokens:
    """The ``part`` (``calibration`` or ``heldout``) of ``lines`` as token sequences, each cut at
    ``max_positions``; calibration stops at ``max_tokens`` tokens (the last sequence cut).

    Refuses text none of whose tokens the tokenizer knows (every token special or unknown), and
    token ids outside the vocabulary."""
    if part not in ("calibration", "heldout"):
        raise ValueError(part)
    chosen = range(lines.n_calibration) if part == "calibration" else range(lines.n_calibration, len(lines.items))
    items = [lines.items[i] for i in chosen]
    numbers = [lines.line_numbers[i] for i in chosen]
    if lines.pretokenised:
        encoded = [list(t) for t in items]
    else:
        if tokenizer is None:
            raise ConfigError(f"{lines.source}: text needs the model's tokenizer, and the model has none; give token ids instead")
        # verbose=False: a line longer than the positions is cut below, not worth a warning
        encoded = [list(ids) for ids in tokenizer(items, verbose=False)["input_ids"]] if items else []
    if vocab_size is not None:
        for ids, line in zip(encoded, numbers):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ConfigError(f"{lines.source} line {line}: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    sequences: list[tuple[int, ...]] = []
    kept_lines: list[int] = []
    budget = max_tokens if part == "calibration" else None
    total = 0
    for ids, line in zip(encoded, numbers):
        if max_positions is not None:
            ids = ids[:max_positions]
        if budget is not None:
            ids = ids[: budget - total]
        if not ids:
            if budget is not None and total >= budget:
                break
            continue
        sequences.append(tuple(int(t) for t in ids))
        kept_lines.append(line)
        total += len(ids)
    out = CalibrationTokens(tuple(sequences), tuple(kept_lines))
    if part == "calibration":
        if not out.n_tokens:
            raise ConfigError(f"{lines.source} encodes to no token; give text in the model's language")
        if tokenizer is not None and not lines.pretokenised:
            special = _special_ids(tokenizer)
            if all(t in special for s in out.sequences for t in s):
                raise ConfigError(f"{lines.source}: none of its {out.n_tokens} tokens is known to the model's tokenizer "
                                  "(all are special or unknown tokens); give text in the model's language")
    return out


__all__ = ["DEFAULT_MAX_TOKENS", "HOLDOUT_DIVISOR", "CalibrationLines", "CalibrationTokens", "read_lines", "tokenise"]
