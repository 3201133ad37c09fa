"""Session-wide fixtures: tiny checkpoints of every family, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
# One thread per test process: the suite runs as two processes on two cores (pytest-xdist), and
# the tiny models and matrices of the tests are dominated by thread synchronisation otherwise.
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_checkpoint(family, layout="per_expert", dtype="float32", sharded=False) -> Path``.

    Builds (once per session) a tiny random checkpoint with transformers' ``save_pretrained``."""
    from moelens.testing.tiny import TinySpec, build_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    built: dict[TinySpec, Path] = {}

    def make(family: str, layout: str = "per_expert", dtype: str = "float32", sharded: bool = False) -> Path:
        spec = TinySpec(family, layout, dtype, sharded)
        if spec not in built:
            built[spec] = build_tiny_checkpoint(spec, root / spec.id)
        return built[spec]

    return make


@pytest.fixture(scope="session")
def small_zoo(tmp_path_factory: pytest.TempPathFactory):
    """The small zoo (``moelens zoo build --small``, seed 0): a trained 2-layer Mixtral-layout
    base model, its tuned counterpart, ``facts.jsonl`` and ``calibration.txt``. Built once per
    test session (about 20 s on two cores) into a temporary directory, never the user's cache.

    Returns a :class:`moelens.zoo.Zoo` (``.base``, ``.tuned``, ``.facts``, ``.calibration``,
    ``.info``, ``.fact_records()``)."""
    from moelens import zoo

    return zoo.build(out=tmp_path_factory.mktemp("zoo") / "mixtral-0-small", seed=0, small=True)
