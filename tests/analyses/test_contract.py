"""The contract every registered analysis keeps (like scikit-learn's ``parametrize_with_checks``):
determinism under a seed, declared schemas, save/load, resume after a kill, one writer per run
directory, nothing printed, progress events, unit seeds that depend on the unit's key only; and
its surface, derived from its declaration: the Python function's signature and defaults are the
config's, the command's options are the config's fields, the manifest records the config, the
report section, figures and atlas runs resolve, and each reproduce command parses back to the
config of the real call.

A contract case makes (models, config) from the tiny checkpoints: :data:`CASES` holds the first
analyses'; a later analysis brings its own as ``contract_case`` in ``tests/analyses/test_<name>.py``."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import shlex
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

import moelens as ml
from moelens.analyses import ANALYSES, get_analysis, run_analysis
from moelens.analyses.base import config_seed, recorded_options
from moelens.analyses.declaration import load
from moelens.analyses.fields import cli_fields, config_fields, flag_name, recorded_fields
from moelens.analyses.registry import declarations
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


def _contract_case(name: str):
    """The contract case of analysis ``name``: in :data:`CASES`, or its own test module's ``contract_case``."""
    if name in CASES:
        return CASES[name]
    module = importlib.import_module(f"tests.analyses.test_{name}")
    return module.contract_case


DECLARED = declarations()


def test_every_registered_analysis_has_a_contract_case():
    assert set(DECLARED) == set(ANALYSES)
    for name in DECLARED:
        assert callable(_contract_case(name)), name


@pytest.fixture(params=sorted(DECLARED))
def case(request, tiny_checkpoint):
    analysis = get_analysis(request.param)
    models, config = _contract_case(request.param)(tiny_checkpoint)
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


def test_the_manifest_records_the_config(case):
    """Every recorded field of the config is in the manifest's options (as the config holds it,
    or as the plan resolved it), and resuming compares every field that changes the numbers."""
    analysis, models, config = case
    run = run_analysis(analysis, models, config)
    options = run.manifest["options"]
    assert set(recorded_fields(type(config))) <= set(options)
    given = recorded_options(config)
    for name in ("seed", "limit", "mode", "method", "null", "matrix", "gamma", "pool", "tol", "export", "samples"):
        if name in given and isinstance(given[name], (int, float, str)):
            assert options[name] == given[name], name  # a value the plan does not resolve is the config's


# ----------------------------------------------------------------------------------------------
# The surface, derived from each declaration
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(DECLARED))
def test_the_python_function_takes_the_config_with_its_defaults(name):
    d = DECLARED[name]
    function = getattr(ml, d.function)
    assert function is getattr(importlib.import_module("moelens.analyses"), d.function) and d.function in ml.__all__
    assert getattr(ml, d.config_type.__name__) is d.config_type
    fields = {f.name: f for f in config_fields(d.config_type)}
    order = [n for n in d.signature if n != "*"]
    assert sorted(order) == sorted(fields) and len(order) == len(set(order)), "every config field once in the signature"
    params = inspect.signature(function).parameters
    extras = ["out", "progress", "config", "executor"]
    assert list(params) == [i.name for i in d.inputs] + order + extras
    keyword_only = set(d.keyword_only()) | set(extras)
    for p in params.values():
        assert (p.kind is p.KEYWORD_ONLY) == (p.name in keyword_only), p.name
        if p.name in fields:
            required = fields[p.name].metadata.get("required")
            assert p.default == (p.empty if required else fields[p.name].default), f"{p.name}: API default ≠ config default"
    assert (function.__doc__ or "").strip(), "the run function's docstring is the function's"


@pytest.mark.parametrize("name", list(DECLARED))
def test_the_command_offers_the_config_fields(name):
    import typer

    import moelens.cli.analyses  # noqa: F401  (registers every analysis's command)
    from moelens.cli.app import app
    from moelens.cli.commands import LAZY_COMMANDS, listed_commands

    d = DECLARED[name]
    assert d.command.name in listed_commands() and LAZY_COMMANDS[d.command.name][1] == d.command.help
    info = next(c for c in app.registered_commands if c.name == d.command.name)
    command = typer.main.get_command_from_info(info, pretty_exceptions_short=True, rich_markup_mode="rich")
    params = {p.name: p for p in command.params}
    for f in cli_fields(d.config_type):
        assert f.name in params, f"--{f.name} missing from {d.command.name}"
        assert flag_name(f.name) in params[f.name].opts and params[f.name].help == f.metadata["help"]
    own = {i.cli_name for i in d.inputs} | {f.name for f in d.command.flags} | {"out", "revision", "threads"}
    own |= {"executor", "ray_address", "workers", "gpus_per_worker", "max_retries"}
    assert set(params) == own | {f.name for f in cli_fields(d.config_type)}
    assert callable(load(d.command.show))


@pytest.mark.parametrize("name", list(DECLARED))
def test_tables_section_and_figures_resolve(name):
    import moelens.figures as figures
    from moelens.figures.catalog import FIGURES
    from moelens.report.sections import SECTION_BUILDERS

    d = DECLARED[name]
    cls = ANALYSES[name]
    assert set(d.tables) == set(cls.schemas())
    assert cls.config_type is d.config_type and cls.title == d.title
    assert {i.role for i in d.inputs} == set(cls.inputs) and [i.role for i in d.inputs if i.required] == [cls.inputs[0]]
    assert callable(load(d.section)) and name in SECTION_BUILDERS
    for figure, spec in d.figures.items():
        function = load(spec.target)
        assert getattr(figures, figure) is function and FIGURES[figure].analysis == name
        assert FIGURES[figure].title == spec.title and spec.title
        accepted = inspect.signature(function).parameters
        assert all(option in accepted for option in spec.options), figure
    if d.atlas:
        assert callable(load(d.atlas))


def _fake_model(path: Path):
    return SimpleNamespace(path=path, name=path.name, n_layers=12, n_experts=8, family_adapter=SimpleNamespace())


def test_every_reproduce_command_parses_to_the_config_of_its_call(tmp_path):
    """The atlas's commands are derived from the same calls as its runs: each one, parsed by its
    command, gives the config the Python call gives."""
    import typer

    import moelens.cli.analyses  # noqa: F401
    from moelens.analyses.fields import make_config
    from moelens.atlas import AtlasInputs, RunRef, reproduce_command
    from moelens.cli.app import app
    from moelens.cli.options import config_from_cli

    base, tuned = _fake_model(tmp_path / "base model"), _fake_model(tmp_path / "tuned")
    (tmp_path / "facts.jsonl").write_text('{"prompt": "a", "subject": "a", "target": "b"}\n')
    (tmp_path / "text.txt").write_text("a b c\n")
    given = AtlasInputs({"base": base, "tuned": tuned}, base, base, tuned, True, tmp_path / "facts.jsonl", tmp_path / "text.txt", 5, 3, tmp_path)
    calls = [call for d in DECLARED.values() if d.atlas for call in load(d.atlas)(given)]
    assert {c.analysis for c in calls} == {name for name, d in DECLARED.items() if d.atlas}
    for call in calls:
        d = DECLARED[call.analysis]
        words = shlex.split(reproduce_command(call, "ray", "cpu"))
        assert words[:2] == ["moelens", d.command.name]
        info = next(c for c in app.registered_commands if c.name == d.command.name)
        command = typer.main.get_command_from_info(info, pretty_exceptions_short=True, rich_markup_mode="rich")
        values = command.make_context(d.command.name, words[2:]).params
        has_device = "device" in {f.name for f in config_fields(d.config_type)}
        assert values["out"] == Path("runs") / call.name and values.get("device", "cpu") == "cpu"
        assert values.get("executor", "ray") == "ray"
        for i in d.inputs:
            model = call.models.get(i.name)
            assert values[i.cli_name] == (None if model is None else str(model.path))
        options = {k: [str(Path("runs") / r.name) for r in v] if isinstance(v, list) else (str(Path("runs") / v.name) if isinstance(v, RunRef) else v)
                   for k, v in call.options.items()}
        from_cli = config_from_cli(d.config_type, values)
        from_call = make_config(d.config_type, {**options, **({"device": "cpu"} if has_device else {})})
        assert dataclasses.asdict(from_cli) == dataclasses.asdict(from_call), call.name
