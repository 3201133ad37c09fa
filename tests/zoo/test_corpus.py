"""The world, its texts and its tokenizer are pure functions of the seed."""

from __future__ import annotations

from moelens.zoo.corpus import RELATIONS, WorldSize, build_world, calibration_text
from moelens.zoo.recipe import SMALL_WORLD
from moelens.zoo.tokenizer import build_tokenizer, save_tokenizer


def test_same_seed_same_world_and_texts():
    a, b = build_world(3, SMALL_WORLD), build_world(3, SMALL_WORLD)
    assert a == b
    assert list(calibration_text(a, 3, n_lines=20)) == list(calibration_text(b, 3, n_lines=20))
    assert build_world(4, SMALL_WORLD).facts != a.facts


def test_world_has_the_requested_entities_and_every_relation():
    size = WorldSize()
    world = build_world(0, size)
    assert len(world.entities["person"]) == size.people
    assert len(set(world.entities["person"])) == size.people
    subjects = {f.subject for f in world.facts}
    assert len(subjects) == size.countries + size.people + size.companies
    assert len(subjects) >= 300  # several hundred subjects
    assert {f.relation for f in world.facts} == {r.name for r in RELATIONS}
    capitals = [f.target for f in world.facts if f.relation == "capital"]
    assert len(set(capitals)) == len(capitals), "two countries share a capital"


def test_every_fact_prompt_ends_right_before_a_one_word_target():
    world = build_world(0, SMALL_WORLD)
    for f in world.facts:
        assert f.sentence == f"{f.prompt} {f.target} ."
        assert f.subject in f.prompt and f.subject in f.qa_prompt
        assert len(f.target.split()) == 1
        assert f.qa_prompt.endswith("answer :")
    # people have two-word names: subjects that span several tokens
    assert all(len(f.subject.split()) == 2 for f in world.facts if f.relation == "birthplace")


def test_filler_mentions_no_entity():
    world = build_world(0, SMALL_WORLD)
    names = {w for kind in ("country", "city", "person", "company", "language", "currency") for e in world.entities[kind] for w in e.split()}
    assert world.filler
    assert not any(set(s.split()) & names for s in world.filler)


def test_tokenizer_one_token_per_word_and_loads_with_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    world = build_world(0, SMALL_WORLD)
    tok = build_tokenizer(world.words())
    save_tokenizer(tok, tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    for f in world.facts[::7]:
        ids = loaded(f.sentence)["input_ids"]
        assert ids == tok(f.sentence)["input_ids"]
        assert ids[0] == loaded.bos_token_id
        assert len(ids) == 1 + len(f.sentence.split())
        assert loaded.unk_token_id not in ids
    assert loaded.pad_token_id == 0
    assert loaded.decode(loaded("The capital.")["input_ids"], skip_special_tokens=True) == "the capital ."
