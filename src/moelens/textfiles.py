"""The one reader of a user's text files: UTF-8 text, JSON and JSON Lines.

Every text input (prompts, facts, calibration text, a ``zoo.json``, a run's manifest) is read here,
so that a damaged file always gives one line that names the file and the line: a non-UTF-8 byte,
a line that is not JSON, a file that is a folder or cannot be read. This module imports nothing of
moelens but its errors, so every layer may use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from moelens.errors import ConfigError, MoelensError


def _line_of(data: bytes, offset: int) -> int:
    """1-based line number of byte ``offset``."""
    return data.count(b"\n", 0, offset) + 1


def read_text(path: str | os.PathLike[str], what: str, error: type[MoelensError] = ConfigError) -> str:
    """The whole of a UTF-8 text file; ``what`` names it in errors ("prompts file", "manifest").

    A BOM is dropped. A byte sequence that is not UTF-8 is reported with its line and byte offset.
    """
    p = Path(path)
    if not p.exists():
        raise error(f"{what} {p} does not exist")
    if not p.is_file():
        raise error(f"{what} {p} is not a file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {p} line {_line_of(data, exc.start)}: not UTF-8 text "
                    f"(byte 0x{data[exc.start]:02x} at offset {exc.start}); save it as UTF-8") from None


def read_json(path: str | os.PathLike[str], what: str, error: type[MoelensError] = ConfigError) -> Any:
    """A JSON document from a UTF-8 file, with the line of the first syntax error in the message."""
    text = read_text(path, what, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what} {path} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise error(f"{what} {path}: JSON nested too deeply") from None


def read_jsonl(path: str | os.PathLike[str], what: str, error: type[MoelensError] = ConfigError) -> Iterator[tuple[int, Any]]:
    """``(line_number, value)`` for every non-blank line of a JSON Lines file (1-based numbers)."""
    text = read_text(path, what, error)
    for i, raw in enumerate(text.splitlines()):
        if not raw.strip():
            continue
        try:
            yield i + 1, json.loads(raw)
        except json.JSONDecodeError as exc:
            raise error(f"{what} {path} line {i + 1}: not JSON ({exc.msg}); a {what} is JSONL, one object per line") from None
        except RecursionError:
            raise error(f"{what} {path} line {i + 1}: JSON nested too deeply") from None


def read_lines(path: str | os.PathLike[str], what: str, error: type[MoelensError] = ConfigError) -> list[tuple[int, str]]:
    """``(line_number, line)`` for every line of a text file that holds more than white space."""
    return [(i + 1, line) for i, line in enumerate(read_text(path, what, error).splitlines()) if line.strip()]
