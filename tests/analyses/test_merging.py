"""Merged checkpoints from clustering runs, what merging costs (fact recall and held-out
perplexity against one-prompt-at-a-time references), and the commands calibrate, cluster,
distance --clusters, merge and merge-cost as a user types them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import moelens as ml
from moelens.analyses.clustering import cluster, merge_clusters, merge_cost
from moelens.errors import ConfigError, OutputExistsError
from tests.cli.helpers import run_moelens

from . import clustering_fixtures as fx


@pytest.fixture(scope="module")
def m_run(lm_dir, lm_files, tmp_path_factory):
    return cluster(lm_dir, lm_files["text"], method="m-smoe", groups=3, out=tmp_path_factory.mktemp("runs") / "m")


def _tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ----------------------------------------------------------------------------------------------
# One-at-a-time references
# ----------------------------------------------------------------------------------------------
def reference_recall(path) -> float:
    from moelens.runtime import load_causal_lm, load_tokenizer

    lm, tok = load_causal_lm(path, dtype="float32"), load_tokenizer(path)
    hits = 0
    with torch.no_grad():
        for fact in fx.FACTS:
            ids = tok(fact["prompt"])["input_ids"]
            predicted = int(lm(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            hits += predicted == tok(" " + fact["target"], add_special_tokens=False)["input_ids"][0]
    return hits / len(fx.FACTS)


def reference_perplexity(path, text) -> float:
    from moelens.runtime import load_causal_lm, load_tokenizer

    lm, tok = load_causal_lm(path, dtype="float32"), load_tokenizer(path)
    lines = [line for line in text.read_text().splitlines() if line.strip()]
    nll, count = 0.0, 0
    with torch.no_grad():
        for line in lines[len(lines) - len(lines) // 10:]:  # the held-out last tenth
            ids = tok(line)["input_ids"][: fx.POSITIONS]
            logp = torch.log_softmax(lm(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            for i in range(len(ids) - 1):
                nll -= float(logp[i, ids[i + 1]])
                count += 1
    return math.exp(nll / count)


# ----------------------------------------------------------------------------------------------
# merge
# ----------------------------------------------------------------------------------------------
def test_merge_writes_the_merged_checkpoint_of_the_clusters_and_refuses_other_models(lm_dir, m_run, tmp_path):
    from moelens.merge import export_merged

    out = merge_clusters(lm_dir, m_run.path, tmp_path / "merged", export="compact")
    direct = export_merged(lm_dir, m_run["clusters"], tmp_path / "direct", export="compact")
    a, b = _tensors(out), _tensors(direct)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ml.open_model(out).n_experts == 3
    other = fx.save_model(tmp_path / "other", seed=3)
    with pytest.raises(ConfigError, match="was made from"):
        merge_clusters(other, m_run.path, tmp_path / "never")
    with pytest.raises(OutputExistsError, match="not empty"):
        merge_clusters(lm_dir, m_run.path, out)
    with pytest.raises(ConfigError, match="is a calibration run|give the --out directory of moelens cluster"):
        merge_clusters(lm_dir, ml.calibrate(lm_dir, [[2, 5, 6]], out=tmp_path / "cal").path, tmp_path / "never")
    assert not (tmp_path / "never").exists()


# ----------------------------------------------------------------------------------------------
# merge cost
# ----------------------------------------------------------------------------------------------
def test_merge_cost_equals_one_prompt_at_a_time_references(lm_dir, m_run, lm_files, tmp_path):
    from moelens.merge import export_merged

    run = merge_cost(lm_dir, [m_run.path], facts=lm_files["facts"], texts=lm_files["text"], export="shared")
    cost = run["merge_cost"].set_index("variant")
    assert list(cost.index) == ["original", "00-m-smoe", "00-m-smoe-permuted"]
    references = {"original": lm_dir}
    for permute in (False, True):
        key = "00-m-smoe-permuted" if permute else "00-m-smoe"
        references[key] = export_merged(lm_dir, m_run["clusters"], tmp_path / key, export="shared", permute=permute)
    for key, path in references.items():
        assert cost.loc[key, "recall"] == pytest.approx(reference_recall(path), abs=1e-12), key
        assert cost.loc[key, "perplexity"] == pytest.approx(reference_perplexity(path, lm_files["text"]), rel=1e-5), key
    assert cost.loc["00-m-smoe", "groups_min"] == 3 and cost.loc["original", "groups_max"] == fx.EXPERTS
    summary = run["merge_cost_summary"].set_index("variant")
    np.testing.assert_allclose(summary["recall_delta"], cost["recall"] - cost.loc["original", "recall"], atol=1e-15)
    np.testing.assert_allclose(summary["perplexity_ratio"], cost["perplexity"] / cost.loc["original", "perplexity"], rtol=1e-12)
    assert cost.loc["original", "perplexity"] != cost.loc["00-m-smoe", "perplexity"]  # merging changed the model
    # the clustering's own calibration text is the default, and perplexity alone is enough
    default = merge_cost(lm_dir, [m_run.path], permute="off")
    assert default["merge_cost"]["perplexity"].tolist() == pytest.approx(run["merge_cost"]["perplexity"].iloc[:2].tolist(), rel=1e-12)
    assert np.isnan(default["merge_cost"]["recall"]).all()


def test_merge_cost_scratch_lives_under_out_and_is_gone_when_the_run_finishes(lm_dir, m_run, tmp_path, monkeypatch):
    import tempfile
    from pathlib import Path

    import moelens.merge
    from moelens.safe_files import SCRATCH

    out = tmp_path / "cost"
    written: list[Path] = []
    real = moelens.merge.export_merged

    def recording(model, clusters, out_dir, **kwargs):
        written.append(Path(out_dir))
        return real(model, clusters, out_dir, **kwargs)

    def no_system_temp(*args, **kwargs):
        raise AssertionError("merge cost wrote scratch outside its --out")

    monkeypatch.setattr(moelens.merge, "export_merged", recording)
    monkeypatch.setattr(tempfile, "mkdtemp", no_system_temp)
    merge_cost(lm_dir, [m_run.path], permute="off", out=out)
    assert written and all(p.parent.parent == out / SCRATCH for p in written)
    assert not (out / SCRATCH).exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_merge_cost_refuses_what_it_cannot_measure(lm_dir, m_run, lm_files, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("the river\nthe city\n")
    python_clusters = cluster(lm_dir, ["the river crossed the city"] * 3, method="m-smoe", groups=3, out=tmp_path / "py")
    other = fx.save_model(tmp_path / "other", seed=4)
    global_run = cluster(lm_dir, m_run.path, method="m-smoe", groups=3, budget="global", out=tmp_path / "global")
    cases = [
        ({"clusters": [m_run.path], "texts": short}, "held-out last 10 % is empty"),
        ({"clusters": [python_clusters.path]}, "nothing to measure"),
        ({"clusters": []}, "no clustering run given"),
        ({"clusters": [m_run.path], "export": "zip"}, "unknown export"),
        ({"clusters": [global_run.path], "export": "compact", "facts": lm_files["facts"]}, "same number of groups in every layer"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            merge_cost(lm_dir, out=tmp_path / "never", **kwargs)
    with pytest.raises(ConfigError, match="was made from"):
        merge_cost(other, [m_run.path], facts=lm_files["facts"], out=tmp_path / "never")
    assert not (tmp_path / "never").exists()


# ----------------------------------------------------------------------------------------------
# The commands
# ----------------------------------------------------------------------------------------------
def test_the_commands_write_what_the_api_computes(lm_dir, m_run, lm_files, tmp_path):
    from moelens.cli.app import app

    runner = CliRunner()
    calibration = tmp_path / "cal"
    steps = [
        ["calibrate", str(lm_dir), "--texts", str(lm_files["text"]), "--out", str(calibration), "--max-tokens", "60"],
        ["cluster", str(lm_dir), "--calibration", str(calibration), "--method", "hc-smoe", "--ratio", "0.5", "--out", str(tmp_path / "hc")],
        ["distance", str(lm_dir), "--clusters", str(tmp_path / "hc"), "--permute", "--out", str(tmp_path / "d")],
        ["merge", str(lm_dir), "--clusters", str(tmp_path / "hc"), "--out", str(tmp_path / "merged"), "--no-permute", "--export", "shared"],
        ["merge-cost", str(lm_dir), "--clusters", str(tmp_path / "hc"), "--facts", str(lm_files["facts"]), "--permute", "on", "--out", str(tmp_path / "cost")],
    ]
    for args in steps:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args[0], result.output, result.exception)
        assert "wrote" in result.output, args[0]
    assert len(ml.load_run(calibration)["calibration_tokens"]) == 60
    hc = ml.load_run(tmp_path / "hc")
    assert (hc["cluster_layers"]["groups"] == 4).all() and hc.manifest["options"]["calibration_run"] == str(calibration.resolve())
    assert set(ml.load_run(tmp_path / "d")["expert_distance"]["pairing"]) == {"hc-smoe-permuted"}
    assert ml.open_model(tmp_path / "merged").n_experts == fx.EXPERTS  # shared keeps E experts
    assert ml.load_run(tmp_path / "cost")["merge_cost"]["variant"].tolist() == ["original", "00-hc-smoe-permuted"]
    mistakes = [
        (["cluster", str(lm_dir), "--calibration", str(calibration), "--groups", "0", "--out", str(tmp_path / "x")], "--groups 0 is outside"),
        (["merge", str(lm_dir), "--clusters", str(calibration), "--out", str(tmp_path / "x")], "give the --out directory of moelens cluster"),
        (["merge", str(lm_dir), "--clusters", str(tmp_path / "hc"), "--out", str(tmp_path / "x"), "--export", "zip"], "unknown export"),
    ]
    for args, message in mistakes:
        result = runner.invoke(app, args)
        # moelens.cli.main prints a MoelensError on one line with status 2; in process it is the exception
        assert isinstance(result.exception, ConfigError) and message in str(result.exception), args
    assert not (tmp_path / "x").exists()


def test_a_mistake_is_one_line_and_status_2(lm_dir, lm_files, tmp_path):
    done = run_moelens("cluster", lm_dir, "--calibration", lm_files["text"], "--groups", str(fx.EXPERTS), "--out", tmp_path / "run")
    assert done.code == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and f"--groups {fx.EXPERTS} is outside 1..{fx.EXPERTS - 1}" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()
