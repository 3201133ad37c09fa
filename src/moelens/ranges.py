"""Index lists written as ranges: ``"0,5,10-13"`` <-> ``[0, 5, 10, 11, 12, 13]``. A leaf module."""

from __future__ import annotations

from typing import Iterable

from moelens.errors import ConfigError


def compact_ranges(values: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    vals = sorted(set(int(v) for v in values))
    parts: list[str] = []
    i = 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        parts.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return ",".join(parts)


def parse_ranges(text: str) -> list[int]:
    """'0,5,10-13' -> [0, 5, 10, 11, 12, 13] (order kept, duplicates dropped)."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ConfigError(f"cannot read {part!r} as an index or range; write e.g. 0,5,10-13") from None
    seen: set[int] = set()
    return [v for v in out if not (v in seen or seen.add(v))]
