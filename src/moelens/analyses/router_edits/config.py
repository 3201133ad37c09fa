"""The options of router edits (docs/methods.md §8): a frozen config, checked when made.

Torch-free (the standard library and moelens' leaf modules only), so that the command line shows
and checks these options without importing the analysis.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moelens.analyses import fields
from moelens.choices import DEFAULT_DEVICE, DEVICE_HELP
from moelens.errors import ConfigError
from moelens.module_names import ROLES
from moelens.ranges import parse_ranges

#: The edits of one router row r_e (docs/methods.md §8).
EDITS = ("project_out", "keep_aligned", "random", "zero", "transplant")
#: Edits that take a subspace size k; the others are recorded with k = 0.
EDITS_WITH_K = ("project_out", "keep_aligned", "random")
DEFAULT_K = (1, 8, 64)


def parse_pairs(text: Any) -> tuple[tuple[int, int], ...] | None:
    """``"0:1,3:2"`` -> ((0, 1), (3, 2)); a tuple of pairs is checked and kept."""
    if text is None:
        return None
    items = fields.comma_names(text) if isinstance(text, str) else tuple(text)
    pairs = []
    for item in items:
        if isinstance(item, str):
            parts = item.split(":")
            if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                raise ConfigError(f"pair {item!r}: write each pair as E:E2, two expert indices, e.g. 0:1")
            a, b = int(parts[0]), int(parts[1])
        else:
            try:
                a, b = (int(v) for v in item)
            except (TypeError, ValueError):
                raise ConfigError(f"pair {item!r}: give two expert indices") from None
        if a == b:
            raise ConfigError(f"pair {a}:{b} names the same expert twice; a transplant needs two different experts")
        if a < 0 or b < 0:
            raise ConfigError(f"pair {a}:{b}: expert indices are ≥ 0")
        pairs.append((a, b))
    if not pairs:
        raise ConfigError("the pair list is empty; give at least one pair, e.g. 0:1")
    return tuple(pairs)


@dataclass(frozen=True)
class RouterEditsConfig:
    """Options of :func:`router_edits` (each field's help says what it does)."""

    prompts: Any = fields.option(None, "JSONL file with a \"prompt\" on every line (as trace), or a text file, one text per line.", kind=str, metavar="PROMPTS", required=True)
    limit: int | None = fields.option(None, "Use only the first N prompts.", kind=int, metavar="N")
    edits: tuple[str, ...] | None = fields.option(None, f"Edits, comma-separated: {','.join(EDITS)} (default: all).", parse=fields.comma_names, metavar="LIST")
    k: tuple[int, ...] | None = fields.option(None, "Subspace sizes k of project_out, keep_aligned and random, e.g. 1,8,64 (default: those ≤ d).", parse=parse_ranges, metavar="LIST")
    matrix: str = fields.option("gate", "Expert matrix whose top-k input singular vectors define the aligned part: gate, up or down.")
    layers: tuple[int, ...] | None = fields.option(None, "MoE layers, e.g. 0,5,10-13 (default: every MoE layer).", parse=parse_ranges, metavar="LIST")
    experts: tuple[int, ...] | None = fields.option(None, "Experts whose router rows are edited, e.g. 0-3 (default: all).", parse=parse_ranges, metavar="LIST")
    pairs: tuple[tuple[int, int], ...] | None = fields.option(None, "transplant: pairs E:E2 (row E replaced by row E2), e.g. 0:1,1:0 (default: each expert with the next).", parse=parse_pairs, metavar="LIST")
    samples: int = fields.option(5, "random: subspaces drawn per (layer, expert, k).")
    seed: int = fields.option(0, "Seed of the random subspaces (each drawn from seed, layer, expert, k and sample).")
    batch_size: int | None = fields.option(None, "Rows per forward pass (default: as many as a memory bound allows).", kind=int, changes_numbers=False, recorded=False)
    device: str = fields.option(DEFAULT_DEVICE, f"{DEVICE_HELP}.", changes_numbers=False)
    dtype: str = fields.option("auto", "auto (float32 on CPU, the checkpoint's dtype on CUDA), float32, bfloat16 or float16.")
    stream: str = fields.stream_option()

    def __post_init__(self) -> None:
        object.__setattr__(self, "edits", fields.name_tuple(self.edits, EDITS, "edit"))
        if self.matrix not in ROLES:
            raise ConfigError(f"unknown matrix {self.matrix!r}; expected one of {', '.join(ROLES)}")
        k = fields.as_index_tuple(self.k, "k")
        if k is not None:
            if not k:
                raise ConfigError("the k list is empty; give at least one k, e.g. 1,8,64")
            if min(k) < 1:
                raise ConfigError(f"k={min(k)}: every k must be at least 1")
            k = tuple(sorted(set(k)))
        object.__setattr__(self, "k", k)
        object.__setattr__(self, "layers", fields.as_index_tuple(self.layers, "layer"))
        object.__setattr__(self, "experts", fields.as_index_tuple(self.experts, "expert"))
        if self.experts is not None and not self.experts:
            raise ConfigError("the expert list is empty; give at least one expert, e.g. --experts 0")
        object.__setattr__(self, "pairs", parse_pairs(self.pairs))
        object.__setattr__(self, "limit", fields.positive_int(self.limit, "limit", allow_none=True))
        object.__setattr__(self, "samples", fields.positive_int(self.samples, "samples"))
        object.__setattr__(self, "batch_size", fields.positive_int(self.batch_size, "batch_size", allow_none=True))
        object.__setattr__(self, "seed", fields.check_seed(self.seed))
        object.__setattr__(self, "stream", fields.check_stream(self.stream))
        fields.check_forward_dtype(self.dtype)
        object.__setattr__(self, "prompts", fields.prompts_value(
            self.prompts, "no prompts: give a JSONL file (--prompts PROMPTS.jsonl) with a prompt on every line, or a text file",
            lambda p: p["prompt"] if isinstance(p, Mapping) and "prompt" in p else p))

    @property
    def chosen_edits(self) -> tuple[str, ...]:
        return self.edits if self.edits is not None else EDITS



__all__ = ["DEFAULT_K", "EDITS", "EDITS_WITH_K", "RouterEditsConfig", "parse_pairs"]
