"""The small zoo: files, recall, base-to-tuned relation, readers, cache, atomicity."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch

from moelens import open_model, zoo
from moelens.errors import ConfigError, SourceNotFoundError
from moelens.zoo.corpus import build_world
from moelens.zoo.recipe import SMALL_WORLD

# Measured on the small zoo (seed 0): base 1.00, tuned 1.00 on questions, 1.00 on plain prompts.
# The margins leave room for another machine's float rounding, not for a broken recipe.
MIN_BASE_RECALL = 0.9
MIN_TUNED_RECALL = 0.9
MIN_TUNED_PLAIN_RECALL = 0.8


def test_files_and_manifest(small_zoo):
    for path in small_zoo.paths().values():
        assert path.exists(), path
    info = small_zoo.info
    assert info["recipe_hash"] == zoo.recipe_for(small=True).hash(0)
    assert info["family"] == "mixtral" and info["seed"] == 0 and info["recipe"]["small"] is True
    assert info["base"]["steps"] == info["recipe"]["base"]["steps"]
    assert info["tuned"]["steps"] == info["recipe"]["tuned"]["steps"]
    for phase in ("base", "tuned"):
        assert 0 < info[phase]["loss"] < 2.0
        assert info[phase]["seconds"] > 0
    assert info["seconds"] > 0
    records = small_zoo.fact_records()
    assert records == [f.as_record() for f in build_world(0, SMALL_WORLD).facts]
    assert len(small_zoo.calibration.read_text().splitlines()) == info["recipe"]["calibration_lines"]


def test_recall_of_the_saved_models_matches_the_manifest(small_zoo):
    from moelens.runtime import fact_recall, load_causal_lm, load_tokenizer

    facts = small_zoo.fact_records()
    base = load_causal_lm(small_zoo.base, dtype="float32")
    tuned = load_causal_lm(small_zoo.tuned, dtype="float32")
    tok = load_tokenizer(small_zoo.base)
    base_recall = fact_recall(base, tok, facts).recall
    tuned_qa = fact_recall(tuned, tok, facts, prompt_key="qa_prompt").recall
    tuned_plain = fact_recall(tuned, tok, facts).recall
    assert base_recall >= MIN_BASE_RECALL
    assert tuned_qa >= MIN_TUNED_RECALL
    assert tuned_plain >= MIN_TUNED_PLAIN_RECALL
    assert base_recall == pytest.approx(small_zoo.info["base"]["recall"], abs=1e-4)
    assert tuned_qa == pytest.approx(small_zoo.info["tuned"]["recall"], abs=1e-4)
    assert tuned_plain == pytest.approx(small_zoo.info["tuned"]["recall_plain"], abs=1e-4)
    # the base model was never taught questions: recall there is what the tuning added
    assert fact_recall(base, tok, facts, prompt_key="qa_prompt").recall < tuned_qa


def _expert_vector(expert) -> torch.Tensor:
    return torch.cat([expert.gate.flatten(), expert.up.flatten(), expert.down.flatten()]).double()


def test_tuned_experts_start_from_the_base_experts(small_zoo):
    base, tuned = open_model(small_zoo.base), open_model(small_zoo.tuned)
    assert base.n_experts == tuned.n_experts == 8
    for L in range(base.summary()["n_layers"]):
        b = [_expert_vector(base.layer(L).expert(e)) for e in range(base.n_experts)]
        t = [_expert_vector(tuned.layer(L).expert(e)) for e in range(base.n_experts)]
        for e in range(base.n_experts):
            rel = float((t[e] - b[e]).norm() / b[e].norm())
            # moved by tuning, yet far closer to its own base expert than unrelated experts
            # are to each other (relative L2 of unrelated weights is about sqrt(2))
            assert 0.0 < rel < 0.8, (L, e, rel)
            others = min(float((t[e] - b[j]).norm() / b[j].norm()) for j in range(base.n_experts) if j != e)
            assert rel < others, (L, e, rel, others)


def test_models_open_with_moelens_and_transformers(small_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for path in (small_zoo.base, small_zoo.tuned):
        model = open_model(path)
        info = model.summary()
        assert info["family"] == "mixtral"
        assert info["expert_layout"] == "per_expert"
        assert (info["n_experts"], info["top_k"], info["n_layers"]) == (8, 2, 2)
        hf = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        assert hf.config.output_router_logits is True
        assert hf.config.router_aux_loss_coef > 0
    fact = small_zoo.fact_records()[0]
    ids = tok.apply_chat_template([{"role": "user", "content": fact["qa_prompt"].split(" : ", 1)[1].rsplit(" answer", 1)[0]}],
                                  add_generation_prompt=True, tokenize=False)
    assert ids == "<bos>" + fact["qa_prompt"]  # the tuned model's chat format is its question format
    out = hf.generate(**tok(fact["qa_prompt"], return_tensors="pt"), max_new_tokens=1, do_sample=False)
    assert tok.decode(out[0, -1:]).strip() == fact["target"]


def test_second_build_returns_the_cached_zoo(small_zoo):
    stamp = small_zoo.zoo_json.stat().st_mtime_ns
    again = zoo.build(out=small_zoo.root, seed=0, small=True)
    assert again.cached is True
    assert again.info == small_zoo.info
    assert small_zoo.zoo_json.stat().st_mtime_ns == stamp
    assert zoo.load_zoo(small_zoo.root).info == small_zoo.info


def test_a_zoo_with_a_missing_file_is_not_complete(small_zoo, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(small_zoo.root, copy)
    assert zoo.load_zoo(copy).info == small_zoo.info
    (copy / "tuned" / "model.safetensors").unlink()
    with pytest.raises(SourceNotFoundError, match="not a finished zoo"):
        zoo.load_zoo(copy)


def test_refuses_to_overwrite_a_directory_that_is_not_a_zoo(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a zoo"):
        zoo.build(out=tmp_path, small=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_unknown_family_and_dtype_are_refused():
    with pytest.raises(ConfigError, match="no family"):
        zoo.recipe_for("gpt2")
    with pytest.raises(ConfigError, match="dtype"):
        zoo.recipe_for(dtype="int8")


class Interrupted(Exception):
    pass


def test_an_interrupted_build_leaves_nothing_that_looks_complete(tmp_path):
    recipe = zoo.recipe_for(small=True)
    out = tmp_path / "zoo"

    def stop_in_tuning(event):
        if event.task == "tuned model":
            raise Interrupted

    quick = replace(recipe, base=replace(recipe.base, steps=4), tuned=replace(recipe.tuned, steps=4))
    with pytest.raises(Interrupted):
        zoo.build(out=out, recipe=quick, progress=stop_in_tuning)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no hidden partial build left behind


def test_default_directory_honours_moelens_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MOELENS_CACHE", str(tmp_path))
    assert zoo.default_zoo_dir("qwen3_moe", 7, small=True) == tmp_path / "zoo" / "qwen3_moe-7-small"
    assert zoo.default_zoo_dir() == tmp_path / "zoo" / "mixtral-0"


def test_a_recipe_that_hides_the_subject_everywhere_is_refused():
    from moelens.errors import ConfigError
    from moelens.zoo.train import SubjectReading

    with pytest.raises(ConfigError, match="no layer would be left"):
        replace(zoo.recipe_for(), subject_reading=SubjectReading(hidden_layers=12))
    with pytest.raises(ValueError, match="share"):
        SubjectReading(hidden_layers=2, last_token_share=1.5)


def test_recipe_hash_changes_with_every_field():
    from moelens.zoo.train import SubjectReading

    r = zoo.recipe_for(small=True)
    hashes = {
        r.hash(0), r.hash(1), replace(r, threads=2).hash(0), replace(r, dtype="bfloat16").hash(0),
        replace(r, base=replace(r.base, steps=301)).hash(0), replace(r, shape=replace(r.shape, top_k=1)).hash(0),
        zoo.recipe_for(small=False).hash(0), zoo.recipe_for("olmoe", small=True).hash(0),
        replace(r, subject_reading=SubjectReading(hidden_layers=1, last_token_share=0.5)).hash(0),
    }
    assert len(hashes) == 9
