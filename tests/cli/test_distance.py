"""``moelens distance`` as a user types it, through the command line's entry point.

A user's mistake exits with status 2 and exactly one non-empty line on stderr (no traceback),
and leaves no run directory behind; a good command writes the run the API computes. One fixture
runs every command of this module, then each test reads its result: the default command as
``python -m moelens distance ...`` in a process of its own, the others in the test process (a
process each would pay the import of torch every time).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import moelens as ml
from tests.analyses.synthetic import write_shape_variants
from tests.cli.helpers import run_cases

pytestmark = pytest.mark.slow  # one process of its own: about 5 s of imports


# case -> (arguments after "distance", {A} {B} {Q} {L} {S} {S5} {F40} standing for the checkpoints
# of the fixture, and what the one stderr line must say)
ERRORS = {
    "families": ("{A} {Q}", "is a mixtral model and"),
    "expert_count": ("{S} {S5}", "n_experts = 4 and"),
    "expert_shape": ("{S} {F40}", "expert_ffn = 48 and"),
    "dense": ("{L}", "dense llama model"),
    "gamma0": ("{A} --gamma 0", "gamma must lie in (0, 1]"),
    "gamma1.5": ("{A} --gamma 1.5", "gamma must lie in (0, 1]"),
    "top_sv": ("{A} --top-sv 33", "top_sv = 33 exceeds min(rows, cols) = 32"),
    "within_two": ("{A} {B} --pairing within", "run each model alone"),
    "base_tuned_one": ("{A} --pairing base-tuned", "needs two models"),
    "matrices": ("{A} --matrices gate,foo", "unknown matrix 'foo'"),
    "pool": ("{A} --pool max", "unknown pool 'max'"),
    "layers": ("{A} --layers 0,7", "layer 7 is out of range"),
}
GOOD = {
    "defaults": "{A}",
    "options": "{A} {B} --layers 1 --matrices gate,down --pool ito --gamma 0.25 --device cpu --dtype float64",
}


@pytest.fixture(scope="module")
def results(tiny_checkpoint, tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("distance-cli")
    from moelens.testing.tiny import TinySpec, build_tiny_checkpoint

    shapes = write_shape_variants(root / "shapes")
    paths = {
        "A": tiny_checkpoint("mixtral"), "Q": tiny_checkpoint("qwen3_moe"), "L": tiny_checkpoint("llama"),
        "B": build_tiny_checkpoint(TinySpec("mixtral"), root / "mixtral-seed1", seed=1),
        "S": shapes["base"], "S5": shapes["experts5"], "F40": shapes["ffn40"],
    }
    cases = {f"error-{k}": v[0] for k, v in ERRORS.items()} | {f"good-{k}": v for k, v in GOOD.items()}
    # an empty directory that exists already stays empty
    done = run_cases("distance", cases, paths, root / "runs", fresh="good-defaults", empty="error-gamma0")
    done["_paths"] = paths  # type: ignore[assignment]
    return done


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_exit_2_with_one_line_and_no_run_directory(results, case):
    r = results[f"error-{case}"]
    where = f"moelens {r['argv']}\nstdout:\n{r['stdout']}\nstderr:\n{r['stderr']}"
    assert r["rc"] == 2, where
    lines = [line for line in r["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1, where
    assert "Traceback" not in r["stderr"] and "Traceback" not in r["stdout"], where
    assert lines[0].startswith("error:"), where
    assert ERRORS[case][1] in lines[0], where
    out: Path = r["out"]
    assert not out.exists() or not any(out.iterdir()), f"{where}\nleft: {sorted(p.name for p in out.iterdir())}"


def test_defaults_compare_the_experts_within_each_layer(results):
    r = results["good-defaults"]
    assert r["rc"] == 0, r["stderr"]
    run = ml.load_run(r["out"])
    assert run.manifest["status"] == "complete"
    opts = run.manifest["options"]
    assert opts["pairing"] == "within" and opts["matrices"] == ["gate", "up", "down"] and opts["gamma"] == 0.3
    assert opts["pool"] == "mean" and opts["top_sv"] is None and opts["layers"] == [0, 1]
    api = ml.expert_distance(results["_paths"]["A"], device="cpu")
    for name in ("expert_distance", "expert_distance_layers"):
        pd.testing.assert_frame_equal(run[name], api[name])
    # the printed table: one row per layer with the expert rows' means
    layers = api["expert_distance_layers"].query("matrix == 'expert'").set_index(["layer", "measure"])
    for L in (0, 1):
        line = next(x for x in r["stdout"].splitlines() if x.strip().strip("│┃ ").startswith(f"{L} "))
        assert f"{layers.loc[(L, 'rel_l2'), 'mean']:.4f}" in line and f"{layers.loc[(L, 'sv_align'), 'mean']:.4f}" in line, r["stdout"]


def test_every_option_reaches_the_analysis(results):
    r = results["good-options"]
    assert r["rc"] == 0, r["stderr"]
    run = ml.load_run(r["out"])
    opts = run.manifest["options"]
    assert opts["pairing"] == "base-tuned" and opts["layers"] == [1] and opts["matrices"] == ["gate", "down"]
    assert opts["pool"] == "ito" and opts["gamma"] == 0.25 and opts["dtype"] == "float64" and opts["device"] == "cpu"
    p = results["_paths"]
    api = ml.expert_distance(p["A"], p["B"], layers=[1], matrices=("gate", "down"), pool="ito", gamma=0.25, device="cpu", dtype="float64")
    for name in ("expert_distance", "expert_distance_layers"):
        pd.testing.assert_frame_equal(run[name], api[name])
    assert set(run["expert_distance"].matrix) == {"gate", "down", "expert"}
