"""``moelens modules`` as a user types it, through the command line's entry point.

A user's mistake exits with status 2 and exactly one non-empty line on stderr (no traceback),
and leaves no run directory behind; a good command writes the run the API computes and prints
the mean over layers of each module. One fixture runs every command of this module, then each
test reads its result: the default command as ``python -m moelens modules ...`` in a process of
its own, the others in the test process (a process each would pay the import of torch every time).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from safetensors import safe_open
from safetensors.torch import save_file

import moelens as ml
from tests.analyses.synthetic import write_shape_variants
from tests.cli.helpers import run_cases

pytestmark = pytest.mark.slow  # one process of its own: about 5 s of imports

KNOWN_PAIR = "corr, cos, rel_l2, cka, changed_frac"
KNOWN_SINGLE = "fro_norm, spectral_norm, stable_rank, effective_rank, alpha"


def _narrow_dense_mlp(src: Path, dst: Path, width: int) -> Path:
    """A copy of a dense Llama checkpoint whose MLP is ``width`` wide (config.json says so too)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
            continue
        with safe_open(str(f), "pt") as h:
            metadata, tensors = h.metadata(), {k: h.get_tensor(k) for k in h.keys()}
        for k, t in tensors.items():
            if "mlp.gate_proj" in k or "mlp.up_proj" in k:
                tensors[k] = t[:width].contiguous()
            elif "mlp.down_proj" in k:
                tensors[k] = t[:, :width].contiguous()
        save_file(tensors, str(dst / f.name), metadata=metadata)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["intermediate_size"] = width
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# case -> (arguments after "modules", with {A} {B} {C} {Q} {L} {L40} {S} {S5} {F40} standing for
# the checkpoints of the fixture, and what the one stderr line must say)
ERRORS = {
    "families": ("{A} {Q}", "differ in family (mixtral vs qwen3_moe)"),
    "base_family": ("{A} --base {Q}", "the base"),
    "expert_count": ("{S} {S5}", "differ in experts (4 vs 5)"),
    "expert_shape": ("{S} {F40}", "differ in expert FFN (48 vs 40)"),
    "dense_shape": ("{L} {L40}", "differ in intermediate_size (48 vs 40)"),
    "metric": ("{A} {B} --metrics corr,foo", f"unknown pair metric 'foo'; expected some of {KNOWN_PAIR}"),
    "single": ("{A} --single fro_norm,bar", f"unknown single metric 'bar'; expected some of {KNOWN_SINGLE}"),
    "single_as_pair": ("{A} {B} --metrics alpha", "'alpha' is a single metric"),
    "pair_one_model": ("{A} --metrics corr", "pair metrics compare two models"),
    "layers": ("{A} --layers 0,7", "layer 7 is out of range"),
    "layers_syntax": ("{A} --layers 0-x", "0-x"),
    "tol0": ("{A} {B} --tol 0", "tol=0"),
    "tol_inf": ("{A} {B} --tol inf", "tol"),
    "device": ("{A} --device tpu", "unknown device 'tpu'"),
}
# the refusal comes from compute, after the run directory and the progress bar were started
GOOD = {
    "defaults": "{A} {B} --base {C}",
    "options": "{A} {B} --layers 1 --metrics cka,corr --single stable_rank,fro_norm --tol 0.01 --device cpu",
    "single_dense": "{L} --layers 0-1 --single alpha,effective_rank",
}


@pytest.fixture(scope="module")
def results(tiny_checkpoint, tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("modules-cli")
    from moelens.testing.tiny import TinySpec, build_tiny_checkpoint

    shapes = write_shape_variants(root / "shapes")
    paths = {
        "A": tiny_checkpoint("mixtral"), "Q": tiny_checkpoint("qwen3_moe"), "L": tiny_checkpoint("llama"),
        "B": build_tiny_checkpoint(TinySpec("mixtral"), root / "mixtral-seed1", seed=1),
        "C": build_tiny_checkpoint(TinySpec("mixtral"), root / "mixtral-seed2", seed=2),
        "L40": _narrow_dense_mlp(tiny_checkpoint("llama"), root / "llama-ffn40", 40),
        "S": shapes["base"], "S5": shapes["experts5"], "F40": shapes["ffn40"],
    }
    cases = {f"error-{k}": v[0] for k, v in ERRORS.items()} | {f"good-{k}": v for k, v in GOOD.items()}
    # an empty directory that exists already stays empty
    done = run_cases("modules", cases, paths, root / "runs", fresh="good-defaults", empty="error-tol0")
    done["_paths"] = paths  # type: ignore[assignment]
    return done


def _where(r: dict) -> str:
    return f"moelens {r['argv']}\nstdout:\n{r['stdout']}\nstderr:\n{r['stderr']}"


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_exit_2_with_one_error_line(results, case):
    r = results[f"error-{case}"]
    where = _where(r)
    assert r["rc"] == 2, where
    assert "Traceback" not in r["stderr"] and "Traceback" not in r["stdout"], where
    errors = [line for line in r["stderr"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and ERRORS[case][1] in errors[0], where


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_print_nothing_else_and_leave_no_run_directory(results, case):
    r = results[f"error-{case}"]
    where = _where(r)
    lines = [line for line in r["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1, where
    out: Path = r["out"]
    assert not out.exists() or not any(out.iterdir()), f"{where}\nleft: {sorted(p.name for p in out.iterdir())}"


def _printed_means(stdout: str, metrics: list[str]) -> dict[str, list[str]]:
    """{module: [cells]} of the printed table (box-drawing rows)."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("│┃").split("│")]
        if len(cells) == 1 + len(metrics) and (cells[0].startswith(("attn.", "mlp.", "shared")) or cells[0] == "router"):
            rows[cells[0]] = cells[1:]
    return rows


def test_defaults_with_b_and_base(results):
    r = results["good-defaults"]
    assert r["rc"] == 0, _where(r)
    run = ml.load_run(r["out"])
    assert run.manifest["status"] == "complete"
    opts = run.manifest["options"]
    assert opts["layers"] == [0, 1] and opts["tol"] == 1e-3 and opts["models"] == ["a", "b", "base"]
    assert opts["metrics"] == ["corr", "cos", "rel_l2", "cka", "changed_frac"]
    assert opts["single"] == ["fro_norm", "spectral_norm", "stable_rank", "effective_rank", "alpha"]
    p = results["_paths"]
    api = ml.module_metrics(p["A"], p["B"], p["C"], device="cpu")
    for name in ("module_metrics", "module_metrics_experts"):
        pd.testing.assert_frame_equal(run[name], api[name])
    assert set(run["module_metrics"].model) == {"a", "b", "pair", "pair_delta"}
    # the printed table: each module's pair metrics, mean over layers
    metrics = opts["metrics"]
    printed = _printed_means(r["stdout"], metrics)
    pair = api["module_metrics"].query("model == 'pair'")
    means = pair.groupby(["module", "metric"]).value.mean()
    assert set(printed) == set(pair.module), r["stdout"]
    for module, cells in printed.items():
        for metric, cell in zip(metrics, cells):
            want = f"{means.loc[(module, metric)]:.4f}"
            assert cell == want or (cell == want.lstrip("-") and float(want) == 0), (module, metric, cell, want)
    assert "wrote" in r["stdout"]


def test_every_option_reaches_the_analysis(results):
    r = results["good-options"]
    assert r["rc"] == 0, _where(r)
    run = ml.load_run(r["out"])
    opts = run.manifest["options"]
    assert opts["layers"] == [1] and opts["metrics"] == ["corr", "cka"] and opts["single"] == ["fro_norm", "stable_rank"]
    assert opts["tol"] == 0.01 and opts["device"] == "cpu" and opts["models"] == ["a", "b"]
    p = results["_paths"]
    api = ml.module_metrics(p["A"], p["B"], layers=[1], metrics=("cka", "corr"), single=("stable_rank", "fro_norm"), tol=0.01, device="cpu")
    for name in ("module_metrics", "module_metrics_experts"):
        pd.testing.assert_frame_equal(run[name], api[name])
    t = run["module_metrics"]
    assert set(t.metric) == {"corr", "cka", "fro_norm", "stable_rank"} and set(t.layer) == {1}


def test_one_dense_model_single_metrics(results):
    r = results["good-single_dense"]
    assert r["rc"] == 0, _where(r)
    run = ml.load_run(r["out"])
    t, te = run["module_metrics"], run["module_metrics_experts"]
    assert set(t.model) == {"a"} and set(t.metric) == {"alpha", "effective_rank"}
    assert te.empty
    assert set(t.module) == {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"}
    api = ml.module_metrics(results["_paths"]["L"], single=("alpha", "effective_rank"), device="cpu")
    pd.testing.assert_frame_equal(t, api["module_metrics"])
    printed = _printed_means(r["stdout"], ["effective_rank", "alpha"])
    assert set(printed) == set(t.module), r["stdout"]
