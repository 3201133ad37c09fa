"""The options of layer-wise interventions (docs/methods.md §4): a frozen config, checked when made.

Torch-free (the standard library and moelens' leaf modules only), so that the command line shows
and checks these options without importing the analysis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moelens.analyses import fields
from moelens.choices import (
    ABLATIONS,
    DEFAULT_DEVICE,
    DEFAULT_SITES,
    DEFAULT_WINDOW,
    DEVICE_HELP,
    MODES,
    NOISE_DRAWS,
    NOISE_SAMPLES,
    NOISE_SCALES,
    SITES,
)
from moelens.errors import ConfigError
from moelens.ranges import parse_ranges


@dataclass(frozen=True)
class InterventionsConfig:
    """Options of :func:`trace` (each field's help says what it does)."""

    prompts: Any = fields.option(None, "JSONL file, one object per line with prompt, subject and optionally target.", kind=str, metavar="FACTS.jsonl", required=True)
    limit: int | None = fields.option(None, "Use only the first N prompts of the file.", kind=int, metavar="N")
    mode: str = fields.option("knockout", f"{' | '.join(MODES)}: knock a site out, restore it into a corrupted run (causal tracing), or block attention to it.")
    sites: tuple[str, ...] | None = fields.option(None, "Sites, comma-separated: knockout subj,attn,last,router,moe; restore restore_hidden,restore_mlp,restore_attn; block block_subj,block_nonsubj,block_last (default: subj,attn,last or all three of the mode).", parse=fields.comma_names, metavar="LIST")
    ablation: str = fields.option("mean", "knockout: replace a site by zero or by its mean over the prompt set (mean|zero).")
    layers: tuple[int, ...] | None = fields.option(None, "Layers, e.g. 0,5,10-13 (default: every layer).", parse=parse_ranges, metavar="LIST")
    window: int | None = fields.option(None, "restore/block: layers restored or blocked around each layer (default 10 for restore, 9 for block).", kind=int)
    noise_samples: int = fields.option(NOISE_SAMPLES, "restore: noise samples per prompt.")
    seed: int = fields.option(0, "restore: the noise of prompt i is drawn with seed + i (with --noise-draw shared: with seed).")
    noise_scale: Any = fields.option("embedding", "restore: the noise std: embedding = 3 × std of all embedding entries (default); subject = 3 × std of the subject tokens' embeddings over the prompts (ROME); or a number, the std itself.", kind=str, metavar="embedding|subject|STD")
    noise_draw: str = fields.option("per-prompt", "restore: per-prompt = each prompt draws its own noise (default); shared = one draw from the seed for every prompt of the same subject length (ROME).", metavar="per-prompt|shared")
    correct_only: bool = fields.option(False, "Skip prompts whose clean top-1 token is not the target's first token (ROME); the count goes to the manifest and the report.")
    batch_size: int | None = fields.option(None, "Rows per forward pass (default: as many as a memory bound allows).", kind=int, changes_numbers=False, recorded=False)
    device: str = fields.option(DEFAULT_DEVICE, f"{DEVICE_HELP}.", changes_numbers=False)
    dtype: str = fields.option("auto", "auto (float32 on CPU, the checkpoint's dtype on CUDA), float32, bfloat16 or float16.")
    stream: str = fields.stream_option()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.ablation not in ABLATIONS:
            raise ConfigError(f"ablation {self.ablation!r}: choose mean or zero")
        object.__setattr__(self, "sites", fields.name_tuple(self.sites, SITES[self.mode], "site", f" is not a {self.mode} site;"))
        object.__setattr__(self, "layers", fields.as_index_tuple(self.layers, "layer"))
        object.__setattr__(self, "window", fields.positive_int(self.window, "window", allow_none=True))
        object.__setattr__(self, "limit", fields.positive_int(self.limit, "limit", allow_none=True))
        object.__setattr__(self, "noise_samples", fields.positive_int(self.noise_samples, "noise_samples"))
        object.__setattr__(self, "batch_size", fields.positive_int(self.batch_size, "batch_size", allow_none=True))
        object.__setattr__(self, "seed", fields.check_seed(self.seed))
        object.__setattr__(self, "stream", fields.check_stream(self.stream))
        object.__setattr__(self, "noise_scale", _noise_scale(self.noise_scale))
        if self.noise_draw not in NOISE_DRAWS:
            raise ConfigError(f"noise_draw {self.noise_draw!r}: choose {' or '.join(NOISE_DRAWS)}")
        if not fields.is_bool(self.correct_only):
            raise ConfigError(f"correct_only={self.correct_only!r}: give True or False")
        object.__setattr__(self, "correct_only", bool(self.correct_only))
        fields.check_forward_dtype(self.dtype)
        object.__setattr__(self, "prompts", fields.prompts_value(
            self.prompts, "no prompts: give a JSONL file (--prompts FACTS.jsonl) with prompt and subject on every line",
            lambda p: dict(p) if isinstance(p, Mapping) else p))

    @property
    def chosen_sites(self) -> tuple[str, ...]:
        return self.sites if self.sites is not None else DEFAULT_SITES[self.mode]

    @property
    def chosen_window(self) -> int:
        return self.window if self.window is not None else DEFAULT_WINDOW[self.mode]


def _noise_scale(value: Any) -> str | float:
    """``"embedding"``, ``"subject"`` or a finite std > 0 (a number, or its text from the CLI)."""
    if isinstance(value, str) and value in NOISE_SCALES:
        return value
    number = None
    if not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
    if number is None or not math.isfinite(number) or number <= 0:
        raise ConfigError(f"noise_scale {value!r}: give {', '.join(NOISE_SCALES)} or a positive number (the noise std itself)")
    return number



__all__ = ["InterventionsConfig"]
