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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch's own thread pool at one thread for a module (``pytestmark =
    pytest.mark.usefixtures("one_torch_thread")``), restored after it. The tiny models and
    decompositions of the tests spend more time in thread synchronisation than in arithmetic on a
    shared two-core machine (a forward pass goes from ~15 ms to ~300 ms)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    Under pytest-xdist the directory is shared by the session's workers: the first builds it
    (holding the zoo's lock), the others wait for it and read the finished zoo.

    Returns a :class:`moelens.zoo.Zoo` (``.base``, ``.tuned``, ``.facts``, ``.calibration``,
    ``.info``, ``.fact_records()``)."""
    from moelens import zoo

    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent  # the session's folder, above each worker's own
    else:
        root = tmp_path_factory.mktemp("zoo")
    return zoo.build(out=root / "mixtral-0-small", seed=0, small=True)
