"""Merge cost with the model layer-streamed: each merged layer is merged as it is read (once per
variant: recall and perplexity share a pass), and the tables equal those of the exported and
loaded variants (bit for bit on the tiny model, a bfloat16 checkpoint measured in float32
included); a model too large with ``--stream off`` is refused before anything is written."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from moelens import load_run
from moelens.analyses.clustering import cluster, merge_cost
from tests.runtime.stream_checks import assert_refused_off_then_streamed

pytestmark = pytest.mark.usefixtures("one_torch_thread")
COLUMNS = ["variant", "recall", "perplexity", "n_tokens", "n_facts", "groups_min", "groups_max"]


@pytest.fixture(scope="module")
def m_run(lm_dir, lm_files, tmp_path_factory):
    return cluster(lm_dir, lm_files["text"], method="m-smoe", groups=3, out=tmp_path_factory.mktemp("stream-runs") / "m")


def _equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a[COLUMNS].reset_index(drop=True), b[COLUMNS].reset_index(drop=True), check_exact=True)


@pytest.mark.parametrize("export", ["shared", "compact"])
def test_streamed_merge_cost_equals_the_exported_variants(lm_dir, lm_files, m_run, export, monkeypatch):
    kw = dict(facts=lm_files["facts"], texts=lm_files["text"], export=export, device="cpu", dtype="float32")
    memory = merge_cost(lm_dir, [m_run.path], stream="off", **kw)
    import moelens.merge.export as export_module

    def no_export(*args, **kwargs):
        raise AssertionError("a streamed merge cost writes no merged checkpoint")

    monkeypatch.setattr(export_module, "_export", no_export)
    from moelens.runtime.weights import WeightGroups

    reads: list[str] = []
    read = WeightGroups.read
    monkeypatch.setattr(WeightGroups, "read", lambda self, group: (reads.append(group.name), read(self, group))[1])
    streamed = merge_cost(lm_dir, [m_run.path], stream="on", **kw)
    # recall and perplexity of a variant share one pass: each layer read once per variant
    assert reads.count("layer 0") == reads.count("layer 1") == reads.count("head") == 3
    assert list(memory["merge_cost"]["variant"]) == ["original", "00-m-smoe", "00-m-smoe-permuted"]
    _equal(memory["merge_cost"], streamed["merge_cost"])
    cost = streamed["merge_cost"].set_index("variant")
    assert cost.loc["original", "perplexity"] != cost.loc["00-m-smoe", "perplexity"]  # the merge is applied
    assert cost.loc["00-m-smoe", "perplexity"] != cost.loc["00-m-smoe-permuted", "perplexity"]
    assert streamed.manifest["options"]["stream"] == "on"


def test_a_bfloat16_checkpoint_is_merged_in_its_own_dtype_when_streamed(lm_dir, lm_files, tmp_path):
    # the export merges in the stored dtype, rounds to it and is loaded in float32: merging the
    # float32 weights instead would round once less
    from moelens.runtime import load_causal_lm

    path = tmp_path / "bf16"
    load_causal_lm(lm_dir, dtype="bfloat16").save_pretrained(path)
    for f in lm_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, path / f.name)
    run = cluster(path, lm_files["text"], method="m-smoe", groups=3, out=tmp_path / "m")
    kw = dict(texts=lm_files["text"], export="shared", permute="off", device="cpu", dtype="float32")
    memory = merge_cost(path, [run.path], stream="off", **kw)
    streamed = merge_cost(path, [run.path], stream="on", **kw)
    _equal(memory["merge_cost"], streamed["merge_cost"])
    assert np.isfinite(streamed["merge_cost"]["perplexity"]).all()


def test_a_model_too_large_with_stream_off_is_refused_before_anything_is_written(lm_dir, lm_files, m_run, tmp_path, monkeypatch):
    out = tmp_path / "cost"
    args = [str(lm_dir), "--clusters", str(m_run.path), "--texts", str(lm_files["text"]), "--permute", "off", "--device", "cpu",
            "--out", str(out)]
    assert_refused_off_then_streamed("merge-cost", args, out, monkeypatch)
    run = load_run(out)
    assert run.manifest["options"]["stream"] == "auto"
    monkeypatch.undo()
    memory = merge_cost(lm_dir, [m_run.path], texts=lm_files["text"], permute="off", device="cpu", stream="off")
    _equal(memory["merge_cost"], run["merge_cost"])
