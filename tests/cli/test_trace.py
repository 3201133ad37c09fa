"""`moelens trace` and `moelens.trace`: bad input is one line and exit status 2 with nothing
written; a dense model gets its sites; the table's rows are what was asked for."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import moelens as ml
from moelens.cli import main
from moelens.errors import UnsupportedArchitectureError
from tests.analyses import interventions_fixtures as fx
from tests.cli.helpers import run_moelens

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trace-cli")
    tok = fx.tokenizer()
    return {
        "moe": fx.save_model(fx.mixtral_config(tok), tok, root / "moe"),
        "dense": fx.save_model(fx.llama_config(tok), tok, root / "dense"),
        "gpt2": fx.save_model(fx.causal_lm_config(tok, "gpt2"), tok, root / "gpt2"),
        "prompts": fx.write_prompts(root / "prompts.jsonl"),
    }


@dataclass
class Result:
    exit_code: int
    output: str


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run ``moelens trace ARGS`` in-process through the real entry point (errors → exit 2)."""
    def run(*args: str) -> Result:
        r = run_moelens("trace", *args)
        return Result(r.code, " ".join((r.stdout + r.stderr).split()))

    return run


@pytest.mark.parametrize("extra, message", [
    ([], "no prompts"),
    (["--prompts", "/nonexistent/facts.jsonl"], "does not exist"),
    (["--prompts", "{prompts}", "--sites", "router"], "dense model and has no router"),
    (["--prompts", "{prompts}", "--sites", "moe,subj", "--layers", "7"], "layer 7 is out of range"),
    (["--prompts", "{prompts}", "--mode", "restore", "--sites", "subj"], "not a restore site"),
    (["--prompts", "{prompts}", "--mode", "sideways"], "choose one of knockout, restore, block"),
    (["--prompts", "{prompts}", "--ablation", "half"], "choose mean or zero"),
    (["--prompts", "{prompts}", "--window", "0"], "window=0"),
    (["--prompts", "{prompts}", "--batch-size", "-3"], "batch_size=-3"),
    (["--prompts", "{prompts}", "--seed", "-1"], "seed=-1"),
    (["--prompts", "{prompts}", "--mode", "restore", "--noise-scale", "loud"], "noise_scale 'loud': give embedding, subject or a positive number"),
    (["--prompts", "{prompts}", "--mode", "restore", "--noise-scale", "-0.5"], "positive number"),
    (["--prompts", "{prompts}", "--mode", "restore", "--noise-draw", "each"], "noise_draw 'each': choose per-prompt or shared"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(cli, models, tmp_path, extra, message):
    out = tmp_path / "run"
    args = [a.replace("{prompts}", str(models["prompts"])) for a in extra]
    result = cli(str(models["dense"]), "--out", str(out), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_a_model_without_a_tokenizer_is_named(cli, models, tiny_checkpoint, tmp_path):
    result = cli(str(tiny_checkpoint("mixtral")), "--prompts", str(models["prompts"]), "--out", str(tmp_path / "r"))
    assert result.exit_code == 2 and "no tokenizer" in result.output
    assert not (tmp_path / "r").exists()


def test_a_dense_model_gets_subj_attn_last_and_the_table_has_one_row_per_prompt_and_cell(cli, models, tmp_path):
    out = tmp_path / "dense"
    result = cli(str(models["dense"]), "--prompts", str(models["prompts"]), "--out", str(out), "--device", "cpu")
    assert result.exit_code == 0, result.output
    run = ml.load_run(out)
    table = run["interventions"]
    assert len(table) == len(fx.PROMPTS) * fx.LAYERS * 3
    assert set(table["site"]) == {"subj", "attn", "last"} and set(table["mode"]) == {"knockout"}
    assert table["jsd"].between(0, 1).all()
    # knocking out the last token's final hidden state changes the prediction; the subject's cannot
    final = table[table["layer"] == fx.LAYERS - 1]
    assert (final[final["site"] == "last"]["jsd"] > 1e-3).all()
    assert (final[final["site"] == "subj"]["jsd"] < 1e-7).all()
    summary = run["interventions_summary"]
    jsd = summary[(summary["measure"] == "jsd") & (summary["site"] == "last")].sort_values("layer")
    expect = table[table["site"] == "last"].groupby("layer")["jsd"].mean().to_numpy()
    assert jsd["mean"].to_numpy() == pytest.approx(expect, abs=1e-12)
    assert run.manifest["options"]["n_prompts"] == len(fx.PROMPTS) and run.manifest["options"]["prompts_sha256"]


def test_trace_runs_end_to_end_on_a_gpt2_checkpoint_with_romes_noise_rules(cli, models, tmp_path):
    """Any causal LM: GPT-2 opens for forward passes; knockout, and restore with ROME's rules."""
    out = tmp_path / "gpt2"
    result = cli(str(models["gpt2"]), "--prompts", str(models["prompts"]), "--out", str(out), "--device", "cpu")
    assert result.exit_code == 0, result.output
    run = ml.load_run(out)
    assert len(run["interventions"]) == len(fx.PROMPTS) * fx.LAYERS * 3
    assert run.manifest["architecture"] == "gpt2" and run["interventions"]["jsd"].max() > 1e-2
    out = tmp_path / "gpt2-restore"
    result = cli(str(models["gpt2"]), "--prompts", str(models["prompts"]), "--out", str(out), "--device", "cpu", "--mode", "restore",
                 "--layers", "1", "--sites", "restore_mlp", "--noise-scale", "subject", "--noise-draw", "shared", "--correct-only")
    assert result.exit_code == 0, result.output
    run = ml.load_run(out)
    options = run.manifest["options"]
    assert (options["noise_scale"], options["noise_draw"], options["correct_only"]) == ("subject", "shared", True)
    skipped = run.manifest["prompts_skipped_incorrect"]
    assert len(set(run["interventions"]["prompt_id"])) == len(fx.PROMPTS) - skipped
    assert any("skipped (correct only)" in n for n in run.manifest["notes"])


def test_weight_readings_of_a_forward_only_model_are_one_line(models, monkeypatch, capsys, tmp_path):
    model = ml.open_model(models["gpt2"])
    assert model.family == "gpt2" and not model.is_moe and model.n_layers == fx.LAYERS and model.hidden_size == fx.HIDDEN
    with pytest.raises(UnsupportedArchitectureError, match="forward-pass analyses only"):
        model.attention(0)
    monkeypatch.setattr(sys, "argv", ["moelens", "modules", str(models["gpt2"]), "--out", str(tmp_path / "m")])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "forward-pass analyses only (moelens trace)" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m").exists()
