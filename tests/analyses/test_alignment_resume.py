"""A run directory written layer by layer: a killed run resumes to exactly the uninterrupted result."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import moelens as ml
from moelens.errors import RunDirectoryError

from .synthetic import random_layers, write_from_tensors


class Killed(Exception):
    """Stands for the process dying at a chosen moment."""


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory):
    routers, experts = random_layers(3, 5, 16, 24, seed=5)
    return write_from_tensors(tmp_path_factory.mktemp("ckpt") / "three", "mixtral", routers, experts)


def _kill_when(task: str, done: int, message_has: str = ""):
    def callback(event):
        if event.task == task and event.done == done and message_has in event.message:
            raise Killed(f"{task} {done}")
    return callback


def _assert_same_tables(a: ml.Run, b: ml.Run) -> None:
    assert set(a.tables) == set(b.tables) == {"alignment", "alignment_layers", "alignment_pairs", "spectra"}
    for name in a.tables:
        pd.testing.assert_frame_equal(a[name], b[name])


@pytest.mark.parametrize("null", ["derangement", "shuffle-sampled"])
def test_killed_after_layer_1_resumes_to_the_uninterrupted_tables(three_layers, tmp_path, null):
    opts = {"matrix": "all", "null": null, "shuffles": 20, "cache": False}
    full = ml.router_alignment(three_layers, out=tmp_path / "full", **opts)
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        ml.router_alignment(three_layers, out=out, progress=_kill_when("layers", 2), **opts)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running"
    assert manifest["completed_units"] == ["L00000", "L00001"]
    assert not list(out.glob("*.parquet"))  # final tables only once every layer is done
    resumed = ml.router_alignment(three_layers, out=out, **opts)
    _assert_same_tables(full, resumed)
    keys = ["layer", "matrix", "expert", "k"]
    assert not resumed["alignment"].duplicated(keys).any()
    assert not resumed["alignment_pairs"].duplicated(["layer", "matrix", "router", "expert", "k"]).any()
    assert resumed.manifest["status"] == "complete"
    assert resumed.manifest["completed_units"] == ["L00000", "L00001", "L00002"]
    assert set(resumed.manifest["timings"]["per_unit_s"]) == {"L00000", "L00001", "L00002"}
    assert resumed.manifest["created"] == manifest["created"]
    assert not (out / "parts").exists()


def test_killed_inside_a_layer_and_stale_parts_are_recomputed(three_layers, tmp_path):
    full = ml.router_alignment(three_layers, cache=False)
    out = tmp_path / "mid"
    with pytest.raises(Killed):
        ml.router_alignment(three_layers, out=out, cache=False, progress=_kill_when("experts", 3, "layer 2"))
    # a part written for layer 2 but never recorded in the manifest (killed between the two)
    stale = out / "parts" / "L00002"
    stale.mkdir(parents=True)
    full["alignment"].head(3).to_parquet(stale / "alignment.parquet")
    resumed = ml.router_alignment(three_layers, out=out, cache=False)
    _assert_same_tables(full, resumed)


def test_resuming_a_complete_run_does_no_work(three_layers, tmp_path):
    out = tmp_path / "done"
    first = ml.router_alignment(three_layers, layers=[0, 2], k=[1, 4], out=out, cache=False)
    again = ml.router_alignment(three_layers, layers=[0, 2], k=[1, 4], out=out, cache=False, progress=_kill_when("experts", 1))
    _assert_same_tables(first, again)
    assert again.manifest["timings"] == first.manifest["timings"]


def test_other_options_or_other_weights_are_refused(three_layers, tmp_path):
    out = tmp_path / "run"
    ml.router_alignment(three_layers, layers=[0], k=[1, 4], out=out, cache=False)
    with pytest.raises(RunDirectoryError, match=r"k=\[1, 4\].*k=\[1, 8\]"):
        ml.router_alignment(three_layers, layers=[0], k=[1, 8], out=out, cache=False)
    with pytest.raises(RunDirectoryError, match="null"):
        ml.router_alignment(three_layers, layers=[0], k=[1, 4], null="shuffle", out=out, cache=False)
    routers, experts = random_layers(3, 5, 16, 24, seed=6)
    other = write_from_tensors(tmp_path / "other", "mixtral", routers, experts)
    with pytest.raises(RunDirectoryError, match="other weight files"):
        ml.router_alignment(other, layers=[0], k=[1, 4], out=out, cache=False)


def test_a_directory_that_is_not_a_run_is_refused(three_layers, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirectoryError, match="not a moelens run directory"):
        ml.router_alignment(three_layers, out=tmp_path / "busy", cache=False)
