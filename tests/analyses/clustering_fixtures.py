"""A tiny MoE language model with a tokenizer, calibration text and facts, for the calibration,
clustering and merge tests.

The model is the zoo's Mixtral config at a tiny shape (hidden 32, 2 layers, 8 experts, top-2,
F = 24) with random weights and the zoo's word-level tokenizer (one token per word, ``<bos>``
prepended), so text goes through the same path as a real checkpoint's in a fraction of a second.
The calibration text has 20 non-empty lines (the last 2 held out) and blank lines between some.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WORDS = ("the", "river", "city", "dog", "market", "crossed", "watched", "found", "quiet", "cold", "small", "happy", "at",
         "night", "before", "winter", "paris", "rome", "berlin", "capital", "of", "is", "france", "italy", "germany", "a")
HIDDEN, LAYERS, HEADS, KV_HEADS, EXPERTS, TOP_K, FFN, POSITIONS = 32, 2, 4, 2, 8, 2, 24, 16
FACTS = [
    {"prompt": "the capital of france is", "target": "paris"},
    {"prompt": "the capital of italy is", "target": "rome"},
    {"prompt": "the capital of germany is", "target": "berlin"},
    {"prompt": "a small dog crossed the", "target": "river"},
]


def text_lines() -> list[str]:
    """Twenty lines of the vocabulary's words, of 3 to 13 words (one longer than the positions)."""
    import numpy as np

    rng = np.random.default_rng(0)
    lines = []
    for i in range(20):
        n = 3 + (i * 5) % 11
        lines.append(" ".join(rng.choice(WORDS, size=n)))
    lines[3] = " ".join(["the"] * (POSITIONS + 5))  # cut at the model's positions
    return lines


def write_text(path: Path, lines: list[str] | None = None) -> Path:
    """The calibration text: the lines with a blank line after every fifth."""
    lines = text_lines() if lines is None else lines
    out = []
    for i, line in enumerate(lines):
        out.append(line)
        if i % 5 == 4:
            out.append("   ")
    path.write_text("\n".join(out) + "\n")
    return path


def write_facts(path: Path) -> Path:
    path.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    return path


def tokenizer() -> Any:
    from moelens.zoo.tokenizer import build_tokenizer

    return build_tokenizer(WORDS, max_length=POSITIONS)


def config(tok: Any, family: str = "mixtral") -> Any:
    from moelens.zoo.models import ModelShape, make_config

    shape = ModelShape(hidden_size=HIDDEN, expert_ffn=FFN, layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS, experts=EXPERTS,
                       top_k=TOP_K, max_positions=POSITIONS)
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    c = make_config(family, shape, len(tok), special)
    c.initializer_range = 0.2
    return c


def save_model(out: Path, seed: int = 0, family: str = "mixtral") -> Path:
    """A random-init tiny model with the tokenizer, written into ``out`` (float32)."""
    from transformers.utils import logging as hf_logging

    from .interventions_fixtures import save_model as save_random_model

    hf_logging.disable_progress_bar()
    tok = tokenizer()
    return save_random_model(config(tok, family), tok, out, seed=seed)
