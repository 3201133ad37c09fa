"""One seed per unit (docs/methods.md §6): every unit carries its run's seed, and every random draw
of a unit's computation comes from that seed, never from the config read again or the unit's
key. The proof: a unit of the plan made with seed A, handed seed B, computes exactly what the
same unit of the plan made with seed B computes, and something else than with seed A.
"""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

import moelens as ml
from moelens.analyses import RouterAlignment
from moelens.analyses.base import UnitContext, config_seed, stream_seed
from moelens.analyses.interventions.analysis import Interventions
from moelens.analyses.router_edits.analysis import RouterEdits

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [
    {"prompt": "the capital of france is", "subject": "france", "target": "paris"},
    {"prompt": "a small dog crossed the", "subject": "small dog", "target": "river"},
]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("seeds") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return str(path)


def _configs(lm_dir, prompts):
    """(analysis, config of seed 1, config of seed 2, the table that carries the draws)."""
    return {
        "router_alignment (GaleMoE's shuffle-sampled)": (
            RouterAlignment(), ml.RouterAlignmentConfig(null="shuffle-sampled", shuffles=12, matrix="gate", cache=False, seed=1), "alignment"),
        "interventions (restore noise)": (
            Interventions(), ml.InterventionsConfig(prompts=prompts, mode="restore", noise_samples=2, layers=(1,), seed=1), "interventions"),
        "router_edits (random subspaces)": (
            RouterEdits(), ml.RouterEditsConfig(prompts=prompts, edits=("random",), k=(2,), layers=(0,), experts=(0, 1), samples=2, seed=1),
            "router_edits"),
    }


@pytest.mark.parametrize("which", ["router_alignment (GaleMoE's shuffle-sampled)", "interventions (restore noise)",
                                   "router_edits (random subspaces)"])
def test_a_units_draws_come_from_its_own_seed(lm_dir, prompts, which):
    analysis, config, table = _configs(lm_dir, prompts)[which]
    model = ml.open_model(lm_dir)
    plan_1 = analysis.plan({"a": model}, config)
    plan_2 = analysis.plan({"a": model}, dataclasses.replace(config, seed=2))
    assert {u.seed for u in plan_1.units} == {config_seed(config)} == {1}
    unit_1, unit_2 = plan_1.units[0], plan_2.units[0]
    handed_2 = analysis.compute(plan_1, dataclasses.replace(unit_1, seed=2), UnitContext())[table]
    own_2 = analysis.compute(plan_2, unit_2, UnitContext())[table]
    own_1 = analysis.compute(plan_1, unit_1, UnitContext())[table]
    pd.testing.assert_frame_equal(handed_2, own_2)  # the unit's seed decides, not the plan's config
    assert not handed_2.equals(own_1)


def test_stream_seeds_are_keyed_by_what_is_drawn():
    # router edits' random subspace of (layer 3, expert 5, k 8, sample 0) under unit seed 0: the
    # value earlier versions drew it from (SeedSequence([0, crc32(key)]), first 63 bits), so
    # published tables stay reproducible
    assert stream_seed(0, "L3E5k8s0") == 4963108936493307680
    assert stream_seed(1, "L3E5k8s0") != stream_seed(0, "L3E5k8s0") != stream_seed(0, "L3E5k8s1")
