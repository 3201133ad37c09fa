"""What a zoo build is made of: world size, model shape, training schedules, dtype, threads.

A recipe plus a seed determines the zoo. Its hash (over every field and ``RECIPE_VERSION``) is
stored in ``zoo.json``; a later build with the same hash finds the zoo complete and returns it.
Bump ``RECIPE_VERSION`` whenever the code changes what a recipe produces.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from moelens.errors import ConfigError
from moelens.zoo.corpus import WorldSize
from moelens.zoo.experts import EXPERTS_IMPLEMENTATIONS, SORTED
from moelens.zoo.models import FAMILIES, ModelShape
from moelens.zoo.train import Schedule, SubjectReading

RECIPE_VERSION = 6
#: Decoder layers of the default zoo: enough that reading a subject, moving it to the last token
#: and forming the answer can happen in different layers, as in the models the seed figures show.
DEFAULT_LAYERS = 12
ZOO_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Recipe:
    """Everything but the seed that decides a zoo's files.

    The base model trains on every plain fact sentence once per epoch and ``filler_share`` of
    the filler sentences; the tuned model on ``qa_repeats`` copies of every question/answer
    sentence, ``tuned_plain_share`` of the plain fact sentences (so it keeps the plain format)
    and the same share of filler. A fact's answer token weighs ``answer_weight`` in the loss
    (see :mod:`moelens.zoo.train`). ``vocab_size`` bounds the tokens the sub-word tokenizer learns
    from the names (:func:`~moelens.zoo.tokenizer.train_tokenizer`; the whole words come on top):
    small enough that a name is cut into its syllables and ending. ``threads`` is fixed because
    the result of a float reduction depends on how it is split across threads: same recipe, same threads, same
    weights. ``experts`` is how the experts are computed in training (see
    :mod:`moelens.zoo.experts`): every implementation computes the same function, but their
    float sums differ in rounding, so it is part of the recipe too. ``subject_reading`` is what
    the tokens after a subject may see of it in training (:class:`~moelens.zoo.train.SubjectReading`):
    in the default zoo none of it in the first 5 of the 12 layers, and in 0.4 of the rows only
    its last token in the layers after, so that its recall is layered where the recipe says."""

    family: str = "mixtral"
    world: WorldSize = field(default_factory=WorldSize)
    shape: ModelShape = field(default_factory=lambda: ModelShape(layers=DEFAULT_LAYERS))
    base: Schedule = field(default_factory=lambda: Schedule(
        steps=600, batch_rows=32, lr=5e-3, warmup_steps=42, decay_steps=120, beta2=0.95,
        curriculum=((0.05, 60), (0.1, 60), (0.3, 60), (0.6, 60)),
    ))
    tuned: Schedule = field(default_factory=lambda: Schedule(
        steps=150, batch_rows=32, lr=5e-3, warmup_steps=15, beta2=0.95, curriculum=((0.1, 15), (0.3, 20)),
    ))
    qa_repeats: int = 1
    tuned_plain_share: float = 0.25
    filler_share: float = 0.1
    answer_weight: float = 16.0
    biography_share: float = 0.0
    vocab_size: int = 200
    row_tokens: int = 40
    calibration_lines: int = 200
    dtype: str = "float32"
    threads: int = 1
    small: bool = False
    experts: str = SORTED
    subject_reading: SubjectReading = field(default_factory=lambda: SubjectReading(hidden_layers=5, last_token_share=0.4))

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"the zoo has no family {self.family!r}; choose one of {', '.join(FAMILIES)}")
        if self.dtype not in ZOO_DTYPES:
            raise ConfigError(f"zoo dtype {self.dtype!r} is not supported; choose one of {', '.join(ZOO_DTYPES)}")
        if self.experts not in EXPERTS_IMPLEMENTATIONS:
            raise ConfigError(f"unknown experts implementation {self.experts!r}; choose one of {', '.join(EXPERTS_IMPLEMENTATIONS)}")
        if self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")
        if self.subject_reading.hidden_layers >= self.shape.layers:
            raise ConfigError(f"subject_reading hides the subject in {self.subject_reading.hidden_layers} layers of "
                              f"{self.shape.layers}: no layer would be left to read it")

    def as_dict(self) -> dict[str, Any]:
        """The recipe as plain JSON values (lists, not tuples), as ``zoo.json`` holds it."""
        return json.loads(json.dumps({"version": RECIPE_VERSION, **asdict(self)}))

    def hash(self, seed: int) -> str:
        """Content hash of the recipe and seed (what the cache compares)."""
        blob = json.dumps({"recipe": self.as_dict(), "seed": seed}, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


SMALL_WORLD = WorldSize(countries=10, cities=20, people=40, companies=16, languages=6, currencies=6, filler_sentences=40)
SMALL_SHAPE = ModelShape(hidden_size=64, expert_ffn=96, layers=2, heads=4, kv_heads=2, experts=8, top_k=2)


def recipe_for(family: str = "mixtral", small: bool = False, dtype: str = "float32", threads: int = 1) -> Recipe:
    """The standard recipe: the default zoo (about 1,400 facts, 12 layers), or ``small``
    (about 250 facts, 2 layers) for tests."""
    recipe = Recipe(family=family, dtype=dtype, threads=threads)
    if small:
        recipe = replace(
            recipe, small=True, world=SMALL_WORLD, shape=SMALL_SHAPE, calibration_lines=60, vocab_size=110, subject_reading=SubjectReading(),
            base=Schedule(steps=150, batch_rows=32, lr=5e-3, warmup_steps=15),
            tuned=Schedule(steps=60, batch_rows=32, lr=2e-3, warmup_steps=6),
        )
    return recipe
