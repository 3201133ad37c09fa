"""The layered-circuit measurement: its criteria, its curves on the small zoo, and (slow) the
criteria on default zoos of several seeds."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moelens.zoo.circuits import Circuits, Tolerances, layered_failures, measure_circuits, thirds

# The seeds whose default zoos must show the layered signature.
SEEDS = (0, 1, 2)


def _signature(n: int = 12) -> Circuits:
    """Curves of the shape a layered recall circuit gives (ROME's and Geva et al.'s)."""
    x = np.arange(n) / (n - 1)
    return Circuits(
        layers=n, prompts=10, recall=0.95,
        restore_subject=tuple(np.clip(1.0 - 1.6 * x, 0, 1)),  # high early, gone by the last third
        restore_last=tuple(np.clip(2.0 * x - 0.8, 0, 1)),  # nothing early, all of it late
        block_subj=tuple(0.4 * np.exp(-((x - 0.35) / 0.2) ** 2)),  # several middle layers
        block_nonsubj=tuple(np.full(n, 0.02)), block_last=tuple(np.full(n, 0.005)),
        corruption_effect=0.8, block_window=1,
    )


def test_thirds_cover_every_layer_once():
    for n in (3, 4, 12, 16, 48):
        first, middle, last = thirds(n)
        assert list(first) + list(middle) + list(last) == list(range(n))
        assert len(first) == len(last) >= len(middle) - 1


def test_the_signature_passes_and_each_departure_is_named():
    good = _signature()
    assert layered_failures(good) == []
    flat_last = replace(good, restore_last=tuple(np.full(12, 0.9)))  # the last token knows from the start
    assert any("first third" in f for f in layered_failures(flat_last))
    late_subject = replace(good, restore_subject=tuple(np.full(12, 0.9)))
    assert any("last subject token still recovers" in f for f in layered_failures(late_subject))
    one_layer = replace(good, block_subj=(0.9,) + (0.0,) * 11)  # read in layer 0 only
    assert any("in 1 layer" in f for f in layered_failures(one_layer))
    assert any("recall" in f for f in layered_failures(replace(good, recall=0.5)))
    assert layered_failures(replace(good, layers=2)) != []


def test_curves_on_the_small_zoo(small_zoo):
    c = measure_circuits(small_zoo.base, small_zoo.facts, limit=8, noise_samples=2)
    n = small_zoo.info["sizes"]["layers"]
    assert c.layers == n and c.prompts == 8
    for curve in (c.restore_subject, c.restore_last, c.block_subj, c.block_nonsubj, c.block_last):
        assert len(curve) == n and np.all(np.isfinite(curve))
    assert c.recall == pytest.approx(small_zoo.info["base"]["recall"], abs=1e-3)
    assert c.corruption_effect > 0.1  # noise on the subject must cost the answer
    # restoring the last layer's output at the last token restores the clean prediction itself
    assert c.restore_last[-1] == pytest.approx(1.0, abs=1e-4)
    assert all(0 <= v <= 1 + 1e-6 for v in c.block_subj + c.block_last)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_default_zoo_circuits_are_layered(seed):
    """Builds the default zoo of ``seed`` (minutes) into ``$MOELENS_CIRCUITS_ZOOS`` once, where
    later runs find it; without that variable the test is skipped."""
    root = os.environ.get("MOELENS_CIRCUITS_ZOOS")
    if not root:
        pytest.skip("set MOELENS_CIRCUITS_ZOOS to a directory for the default zoos (built there once, minutes each)")
    from moelens import zoo

    z = zoo.build(out=Path(root) / f"mixtral-{seed}", seed=seed)
    c = measure_circuits(z.base, z.facts, limit=48)
    assert layered_failures(c, Tolerances()) == [], c.table()


def test_the_measured_facts_take_turns_over_the_relations():
    from moelens.zoo.circuits import spread_over_relations

    records = [{"relation": rel, "i": str(i)} for rel, n in (("capital", 5), ("language", 1), ("job", 3)) for i in range(n)]
    picked = spread_over_relations(records, 6)
    assert [(r["relation"], r["i"]) for r in picked] == [
        ("capital", "0"), ("language", "0"), ("job", "0"), ("capital", "1"), ("job", "1"), ("capital", "2")]
    assert spread_over_relations(records, None) == records and spread_over_relations(records, 50) == records
