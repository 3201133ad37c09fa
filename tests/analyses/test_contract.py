"""The contract every registered analysis keeps (like scikit-learn's ``parametrize_with_checks``):
determinism under a seed, declared schemas, save/load, resume after a kill, one writer per run
directory, nothing printed, progress events, unit seeds that depend on the unit's key only."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import moelens as ml
from moelens.analyses import ANALYSES, get_analysis, run_analysis
from moelens.analyses.base import config_seed
from moelens.errors import RunDirectoryError
from moelens.locks import DirectoryLock
from moelens.results.manifest import SCHEMA_VERSION, read_manifest


def _alignment(tiny):
    model = ml.open_model(tiny("mixtral"))
    return {"a": model}, ml.RouterAlignmentConfig(matrix="all", null="shuffle-sampled", shuffles=20, seed=7, cache=False)


def _distance(tiny):
    return {"a": ml.open_model(tiny("mixtral")), "b": ml.open_model(tiny("mixtral", "fused"))}, ml.ExpertDistanceConfig()


def _modules(tiny):
    a = ml.open_model(tiny("qwen2_moe"))  # dense and MoE layers, shared experts, a router
    b = ml.open_model(tiny("qwen2_moe", "fused"))
    return {"a": a, "b": b, "base": None}, ml.ModuleMetricsConfig()


_TRACE: dict[str, str] = {}


def _interventions(tiny):
    # A Mixtral-layout model with a tokenizer (the tiny checkpoints have none); 40 prompts make two
    # units, so a kill after the first leaves something to resume.
    if not _TRACE:
        import tempfile
        from pathlib import Path

        from tests.analyses import interventions_fixtures as fx

        root = Path(tempfile.mkdtemp(prefix="moelens-contract-trace-"))
        tok = fx.tokenizer()
        _TRACE["model"] = str(fx.save_model(fx.mixtral_config(tok), tok, root / "mixtral"))
        _TRACE["prompts"] = str(fx.write_prompts(root / "prompts.jsonl", fx.PROMPTS * 10))
    config = ml.InterventionsConfig(prompts=_TRACE["prompts"], sites=("subj", "last", "router"), layers=(0, 2), device="cpu")
    return {"a": ml.open_model(_TRACE["model"])}, config


def _router_edits(tiny):
    _interventions(tiny)  # the same model with a tokenizer and prompts; two layers make two units
    config = ml.RouterEditsConfig(prompts=_TRACE["prompts"], limit=8, layers=(0, 2), experts=(0, 1), k=(1, 4), samples=2, device="cpu")
    return {"a": ml.open_model(_TRACE["model"])}, config


#: Token ids of a few sequences for models without a tokenizer (the tiny checkpoints).
TOKEN_IDS = [[1, 5, 9, 13, 17, 21], [1, 7, 3], [1, 2, 4, 8, 16, 32, 64], [1, 11, 22, 33]]


def _calibration(tiny):
    return {"a": ml.open_model(tiny("mixtral"))}, ml.CalibrationConfig(texts=TOKEN_IDS, batch_tokens=12, device="cpu")


def _clustering(tiny):
    config = ml.ClusteringConfig(calibration=TOKEN_IDS, method="m-smoe", groups=2, batch_tokens=12, device="cpu")
    return {"a": ml.open_model(tiny("mixtral"))}, config


_MERGE: dict[str, str] = {}


def _merge_cost(tiny):
    # A model with a tokenizer and a clustering run of it, made once per session.
    if not _MERGE:
        import tempfile
        from pathlib import Path

        from tests.analyses import clustering_fixtures as fx

        root = Path(tempfile.mkdtemp(prefix="moelens-contract-merge-"))
        _MERGE["model"] = str(fx.save_model(root / "mixtral"))
        ml.cluster(_MERGE["model"], fx.write_text(root / "calibration.txt"), method="m-smoe", groups=4, out=root / "clusters", device="cpu")
        _MERGE["clusters"], _MERGE["facts"] = str(root / "clusters"), str(fx.write_facts(root / "facts.jsonl"))
    config = ml.MergeCostConfig(clusters=(_MERGE["clusters"],), facts=_MERGE["facts"], permute="on", device="cpu")
    return {"a": ml.open_model(_MERGE["model"])}, config


#: How to make a small example of each analysis: a new analysis is not done until it has one.
CASES = {"router_alignment": _alignment, "expert_distance": _distance, "module_metrics": _modules, "interventions": _interventions,
         "router_edits": _router_edits, "calibration": _calibration, "clustering": _clustering, "merge_cost": _merge_cost}


class Killed(Exception):
    pass


def _kill_after_first_unit(noun):
    def callback(event):
        if event.task == noun and event.done == 1:
            raise Killed

    return callback


def _assert_same(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    assert set(a) == set(b)
    for name in a:
        pd.testing.assert_frame_equal(a[name].reset_index(drop=True), b[name].reset_index(drop=True), check_exact=True, obj=name)


def test_every_registered_analysis_has_a_contract_case():
    assert set(CASES) == set(ANALYSES)


@pytest.fixture(params=sorted(CASES))
def case(request, tiny_checkpoint):
    analysis = get_analysis(request.param)
    models, config = CASES[request.param](tiny_checkpoint)
    return analysis, models, config


def test_deterministic_tables_match_the_declared_schemas(case, capfd):
    analysis, models, config = case
    first = run_analysis(analysis, models, config)
    second = run_analysis(analysis, models, config)
    assert capfd.readouterr() == ("", "")  # an analysis never prints
    _assert_same(first.tables, second.tables)
    schemas = analysis.schemas()
    assert list(first.tables) == list(schemas)
    for name, schema in schemas.items():
        assert schema.problems(first[name]) == [], name
        assert list(first[name].columns) == schema.column_names
        assert len(first[name]) > 0, name
    m = first.manifest
    assert m["analysis"] == analysis.name and m["status"] == "complete" and m["schema_version"] == SCHEMA_VERSION == 2
    assert set(m["inputs"]) == {k for k, v in models.items() if v is not None}
    assert m["completed_units"] == m["units"]


def test_save_and_load_round_trip(case, tmp_path):
    analysis, models, config = case
    run = run_analysis(analysis, models, config)
    run.save(tmp_path / "saved")
    loaded = ml.load_run(tmp_path / "saved")
    _assert_same(run.tables, loaded.tables)
    assert loaded.manifest == json.loads(json.dumps(run.manifest, default=str))


def test_streamed_run_equals_the_in_memory_run_and_resumes_after_a_kill(case, tmp_path):
    analysis, models, config = case
    whole = run_analysis(analysis, models, config)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_analysis(analysis, models, config, out=out, progress=_kill_after_first_unit(analysis.unit_noun))
    manifest = read_manifest(out / "manifest.json")  # the runner writes what the manifest schema accepts, running or complete
    assert manifest["status"] == "running" and manifest["completed_units"] == manifest["units"][:1]
    with pytest.raises(RunDirectoryError, match="unfinished"):
        ml.load_run(out)  # a half-done run is named as such, not read as if complete
    resumed = run_analysis(analysis, models, config, out=out)
    _assert_same(whole.tables, resumed.tables)
    assert resumed.manifest["status"] == "complete"
    assert read_manifest(out / "manifest.json") == resumed.manifest
    assert not (out / "parts").exists()
    again = run_analysis(analysis, models, config, out=out)  # a finished run is read back, not recomputed
    _assert_same(whole.tables, again.tables)


def test_progress_reaches_every_unit(case):
    analysis, models, config = case
    events = []
    run = run_analysis(analysis, models, config, progress=events.append)
    units = [e for e in events if e.task == analysis.unit_noun]
    assert [e.done for e in units] == list(range(len(run.manifest["units"]) + 1))
    assert all(e.total == len(run.manifest["units"]) for e in units)


def test_a_second_writer_is_refused_while_the_first_holds_the_directory(case, tmp_path):
    analysis, models, config = case
    out = tmp_path / "busy"
    with DirectoryLock(out):
        with pytest.raises(RunDirectoryError, match=r"in use by another moelens process \(pid \d+\)"):
            run_analysis(analysis, models, config, out=out)
    assert not (out / "manifest.json").exists()
    run_analysis(analysis, models, config, out=out)  # free again once the holder is gone


def test_every_unit_carries_the_seed_of_its_run(case):
    """docs/methods.md "Seeds": a unit's seed is the config's (0 without one); what a compute draws
    from it is tested per analysis in test_unit_seeds.py."""
    analysis, models, config = case
    plan = analysis.plan(models, config)
    assert plan.units and {u.seed for u in plan.units} == {config_seed(config)}
