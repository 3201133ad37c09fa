"""Synthetic alignment runs shared by the figure tests (built once per test session)."""

from __future__ import annotations

import pytest

from moelens.results import Run
from moelens.testing.synthetic_runs import synthetic_alignment_run


@pytest.fixture(scope="session")
def one_run() -> Run:
    """One layer of a Mixtral-sized model: E = 8, d = 4096, k = 1, 2, 4, …, 4096."""
    return synthetic_alignment_run(seed=1)


@pytest.fixture(scope="session")
def six_runs() -> list[Run]:
    """Six single-layer runs: two models × gate/up/down, derangement and shuffle nulls."""
    return [
        synthetic_alignment_run(model_name=("base", "tuned")[i % 2], matrices=(("gate", "up", "down")[i // 2],),
                                null=("derangement", "shuffle")[i % 2], strength=0.03 + 0.035 * i, seed=i)
        for i in range(6)
    ]


@pytest.fixture(scope="session")
def layered_run() -> Run:
    """A zoo-sized run: five layers, d = 64, E = 8, every k from 1 to d."""
    return synthetic_alignment_run(model_name="zoo-base", layers=range(5), hidden_size=64, ks=range(1, 65), seed=7)


@pytest.fixture(scope="session")
def d48_run() -> Run:
    """d = 48, no power of two (as d = 2880 or 5120 of real models): k = 1, 2, …, 32 and 48."""
    return synthetic_alignment_run(model_name="odd-d", hidden_size=48, n_experts=4, seed=2)
