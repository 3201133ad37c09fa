"""Damaged inputs of the forward-pass analyses, end to end through the command line: NaN weights,
a tokenizer larger than the embedding, prompts longer than the positions, targets outside the
vocabulary, logits that overflow at run time. Each gives exit status 2 and one stderr line naming
the tensor, the layer or the line, with no traceback, no third-party warning and no run directory
left behind."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelens.cli import main
from tests.analyses import interventions_fixtures as fx

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("forward-inputs")
    tok = fx.tokenizer()
    model = fx.save_model(fx.mixtral_config(tok), tok, root / "moe")
    text = root / "calibration.txt"
    text.write_text("".join(f"{r['prompt']} {r.get('target', '')}\n" for r in fx.PROMPTS * 5))
    return {"model": model, "prompts": fx.write_prompts(root / "prompts.jsonl"), "text": text}


@pytest.fixture
def model(pristine, tmp_path) -> Path:
    """A private copy of the tiny MoE checkpoint, free to damage."""
    return Path(shutil.copytree(pristine["model"], tmp_path / "moe"))


def damage(model: Path, pattern: str, change, every: bool = False) -> str:
    """Apply ``change`` to the first tensor whose name contains ``pattern`` (to each, with
    ``every``); return the first one's name."""
    path = model / "model.safetensors"
    tensors = load_file(path)
    names = [n for n in sorted(tensors) if pattern in n]
    for name in names if every else names[:1]:
        tensors[name] = change(tensors[name].clone())
    save_file(tensors, path, metadata={"format": "pt"})
    return names[0]


def poison(t: torch.Tensor) -> torch.Tensor:
    t.view(-1)[3] = float("nan")
    return t


def run_cli(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    """Exit status and stderr (stdout may carry progress lines) of ``moelens *args``."""
    monkeypatch.setattr(sys, "argv", ["moelens", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main()
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out
    return int(info.value.code or 0), captured.err


def assert_one_line(code: int, output: str, *phrases: str, after_progress: bool = False) -> str:
    """Exit 2 and one error line (after the progress lines of units begun, where ``after_progress``)."""
    assert code == 2, output
    assert "Traceback" not in output and "Token indices" not in output, output
    lines = output.strip().splitlines()[-1:] if after_progress else output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


# -- NaN weights -------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["embed_tokens", "self_attn.k_proj", "experts"])
def test_trace_names_a_nan_tensor_and_writes_nothing(pattern, model, pristine, tmp_path, capsys, monkeypatch):
    name = damage(model, pattern, poison)
    out = tmp_path / "run"
    code, output = run_cli(capsys, monkeypatch, "trace", str(model), "--prompts", str(pristine["prompts"]), "--out", str(out))
    assert_one_line(code, output, name, "NaN/inf")
    assert not out.exists()


def test_calibrate_names_a_nan_expert_before_any_write(model, pristine, tmp_path, capsys, monkeypatch):
    name = damage(model, "experts", poison)
    out = tmp_path / "run"
    code, output = run_cli(capsys, monkeypatch, "calibrate", str(model), "--texts", str(pristine["text"]), "--out", str(out))
    assert_one_line(code, output, name, "NaN/inf")
    assert not out.exists()


def test_modules_names_a_nan_attention_matrix(model, tmp_path, capsys, monkeypatch):
    name = damage(model, "self_attn.q_proj", poison)
    out = tmp_path / "run"
    code, output = run_cli(capsys, monkeypatch, "modules", str(model), "--out", str(out))
    assert_one_line(code, output, name, "NaN/inf", after_progress=True)
    assert not out.exists()  # found in the first layer: no unit finished, nothing is left


def test_modules_refuses_an_attention_matrix_of_the_wrong_shape(model, tmp_path, capsys, monkeypatch):
    name = damage(model, "layers.1.self_attn.v_proj", lambda t: t[:-1].contiguous())  # [KV·hd, d] = [16, 32] -> [15, 32]
    out = tmp_path / "run"
    code, output = run_cli(capsys, monkeypatch, "modules", str(model), "--out", str(out))
    assert_one_line(code, output, name, "[15, 32]", "[16, 32]")
    assert not out.exists()


# -- logits that overflow with finite weights ----------------------------------------------------------
def test_overflowing_logits_name_the_first_layer_and_leave_no_run(model, pristine, tmp_path, capsys, monkeypatch):
    # finite weights whose products overflow float32 in the experts of the last layer (2)
    damage(model, "layers.2.block_sparse_moe.experts", lambda t: t * 3e38 / t.abs().max(), every=True)
    out = tmp_path / "run"
    code, output = run_cli(capsys, monkeypatch, "trace", str(model), "--prompts", str(pristine["prompts"]), "--out", str(out),
                           "--ablation", "zero")
    assert_one_line(code, output, "decoder layer 2", "NaN/inf", "float32 overflowed", after_progress=True)
    assert not out.exists()
    # the corrected checkpoint runs into the same directory
    shutil.copy(pristine["model"] / "model.safetensors", model / "model.safetensors")
    code, output = run_cli(capsys, monkeypatch, "trace", str(model), "--prompts", str(pristine["prompts"]), "--out", str(out),
                           "--ablation", "zero", "--layers", "0")
    assert code == 0, output
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_first_nonfinite_layer_by_construction(pristine):
    from moelens.runtime import load_causal_lm
    from moelens.runtime.checks import first_nonfinite_layer

    lm = load_causal_lm(pristine["model"], dtype="float32")
    ids = torch.tensor([[1, 5, 6, 7]])
    assert first_nonfinite_layer(lm, input_ids=ids) is None
    with torch.no_grad():
        lm.model.layers[2].self_attn.o_proj.weight.fill_(3e38)
    assert first_nonfinite_layer(lm, input_ids=ids) == 2


# -- tokenizer, lengths, targets -----------------------------------------------------------------------
def test_a_tokenizer_larger_than_the_embedding_is_refused(model, pristine, tmp_path, capsys, monkeypatch):
    from moelens.zoo.tokenizer import build_tokenizer, save_tokenizer

    words = fx.vocabulary() + [f"extra{i}" for i in range(40)]
    save_tokenizer(build_tokenizer(words, max_length=64), model)
    code, output = run_cli(capsys, monkeypatch, "trace", str(model), "--prompts", str(pristine["prompts"]), "--out", str(tmp_path / "run"))
    rows = json.loads((model / "config.json").read_text())["vocab_size"]
    assert_one_line(code, output, f"embedding only {rows} rows")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("record, phrases", [
    ({"prompt": "The capital city of France is " + "a " * 80, "subject": "France", "target": "Paris"}, ["line 2", "more than the model's 64 positions"]),
    ({"prompt": "The capital city of France is", "subject": "France", "target": "Zanzibar"}, ["line 2", "'Zanzibar'", "not in the tokenizer's vocabulary"]),
])
def test_long_prompts_and_unknown_targets_are_named_by_line(record, phrases, pristine, tmp_path, capsys, monkeypatch):
    prompts = fx.write_prompts(tmp_path / "prompts.jsonl", [fx.PROMPTS[1], record])
    out = tmp_path / "run"
    code, output = run_cli(capsys, monkeypatch, "trace", str(pristine["model"]), "--prompts", str(prompts), "--out", str(out))
    assert_one_line(code, output, str(prompts), *phrases)
    assert not out.exists()


def test_merge_cost_facts_are_bounded_and_checked_up_front(pristine, tmp_path):
    from moelens.analyses.clustering.merge_cost import check_facts, read_fact_lines
    from moelens.errors import ConfigError
    from moelens.runtime import load_tokenizer

    tokenizer = load_tokenizer(pristine["model"])
    facts = tmp_path / "facts.jsonl"
    good = {"prompt": "Miles Davis plays the", "target": "trumpet"}
    facts.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "a " * 200_000, "target": "paris"}) + "\n")
    with pytest.raises(ConfigError, match=r"line 2: the prompt has 200001 tokens, more than the model's 64 positions"):
        check_facts(str(facts), read_fact_lines(str(facts)), tokenizer, 64)
    facts.write_text(json.dumps(good) + "\n\n" + json.dumps({"prompt": "Rome is the capital of", "target": "Atlantis"}) + "\n")
    with pytest.raises(ConfigError, match=r"line 3: the target 'Atlantis' is not in the tokenizer's vocabulary"):
        check_facts(str(facts), read_fact_lines(str(facts)), tokenizer, 64)


# -- the atlas checks before it makes anything -------------------------------------------------------------
@pytest.mark.parametrize("extra, phrase", [
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--prompts", "{long}"], "more than the model's 64 positions"),
])
def test_atlas_refuses_before_making_its_directory(extra, phrase, pristine, tmp_path, capsys, monkeypatch):
    long = fx.write_prompts(tmp_path / "long.jsonl", [fx.PROMPTS[0], {"prompt": "a " * 100 + "France", "subject": "France"}])
    out = tmp_path / "atlas"
    args = [a.replace("{long}", str(long)) for a in extra]
    code, output = run_cli(capsys, monkeypatch, "atlas", str(pristine["model"]), "--out", str(out), *args)
    assert_one_line(code, output, phrase)
    assert not out.exists()
