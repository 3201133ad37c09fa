"""The options of the calibration pass (docs/methods.md §3): a frozen config, checked when made.

Torch-free (the standard library and moelens' leaf modules only), so that the command line shows
and checks these options without importing the analysis.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from moelens.analyses import fields
from moelens.choices import DEFAULT_DEVICE, DEFAULT_MAX_TOKENS, DEVICE_HELP
from moelens.errors import ConfigError
from moelens.ranges import parse_ranges


def check_texts(texts: Any) -> Any:
    """A path as a string, a list of texts as a tuple; nothing is read yet."""
    if texts is None:
        raise ConfigError("no calibration text: give a text file (--texts FILE) with one sequence per line")
    if isinstance(texts, os.PathLike):
        return os.fspath(texts)
    if isinstance(texts, str):
        return texts
    try:
        return tuple(t if isinstance(t, str) else tuple(t) for t in texts)
    except TypeError:
        raise ConfigError(f"calibration texts must be a text file or a list of strings, got {type(texts).__name__}") from None


@dataclass(frozen=True)
class CalibrationConfig:
    """Options of :func:`calibrate` (each field's help says what it does)."""

    texts: Any = fields.option(None, "Calibration text: one sequence per non-empty line; the last 10 % of the lines are held out (perplexity) and not used.", kind=str, metavar="TEXT_FILE", required=True)
    max_tokens: int = fields.option(DEFAULT_MAX_TOKENS, "Calibration tokens at most (lines in file order, the last sequence cut).")
    layers: tuple[int, ...] | None = fields.option(None, "MoE layers, e.g. 0,5,10-13 (default: every MoE layer).", parse=parse_ranges, metavar="LIST")
    batch_tokens: int = fields.option(4096, "Padded tokens per forward pass.", changes_numbers=False)
    shard_tokens: int | None = fields.option(None, "Calibration tokens per unit: each layer's tokens are split into shards of whole sequences with at most this many tokens, computed apart (e.g. on several Ray workers, --executor ray) and added up; the statistics equal one shard's within float32 summation order (default: one unit per layer).", kind=int, metavar="N")
    device: str = fields.option(DEFAULT_DEVICE, f"{DEVICE_HELP}.", changes_numbers=False)
    dtype: str = fields.option("auto", "Forward pass in auto (float32 on CPU, the checkpoint's dtype on CUDA), float32, bfloat16 or float16.")
    stream: str = fields.stream_option()

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", check_texts(self.texts))
        object.__setattr__(self, "max_tokens", fields.positive_int(self.max_tokens, "max_tokens"))
        object.__setattr__(self, "batch_tokens", fields.positive_int(self.batch_tokens, "batch_tokens"))
        if self.shard_tokens is not None:
            object.__setattr__(self, "shard_tokens", fields.positive_int(self.shard_tokens, "shard_tokens"))
        object.__setattr__(self, "layers", fields.as_index_tuple(self.layers, "layer"))
        object.__setattr__(self, "stream", fields.check_stream(self.stream))
        fields.check_forward_dtype(self.dtype)



__all__ = ["CalibrationConfig", "check_texts"]
