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


def test_word_level_tokenizer_one_token_per_word_and_loads_with_auto_tokenizer(tmp_path):
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


def _zoo_tokenizer(world, vocab_size):
    from moelens.zoo.tokenizer import train_tokenizer

    return train_tokenizer(world.base_sentences() + world.qa_sentences(), world.whole_words(), vocab_size)


def test_subword_tokenizer_is_deterministic_and_keeps_targets_whole(tmp_path):
    from transformers import AutoTokenizer

    from moelens.zoo.recipe import recipe_for

    world = build_world(0, SMALL_WORLD)
    vocab = recipe_for(small=True).vocab_size
    tok = _zoo_tokenizer(world, vocab)
    assert tok.backend_tokenizer.to_str() == _zoo_tokenizer(world, vocab).backend_tokenizer.to_str()
    save_tokenizer(tok, tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    for f in world.facts:
        target = loaded(" " + f.target, add_special_tokens=False)["input_ids"]
        assert len(target) == 1 and target[0] != loaded.unk_token_id
        prompt = loaded(f.prompt)["input_ids"]
        full = loaded(f.sentence)["input_ids"]
        assert prompt[0] == loaded.bos_token_id
        assert full[:len(prompt)] == prompt and full[len(prompt)] == target[0]  # recall's next token
        assert loaded.unk_token_id not in full
    assert loaded.decode(loaded(world.facts[0].sentence)["input_ids"], skip_special_tokens=True) == world.facts[0].sentence


def test_default_world_subjects_span_two_to_four_tokens():
    from moelens.zoo.recipe import recipe_for

    recipe = recipe_for()
    for seed in (0, 1, 2):
        world = build_world(seed, recipe.world)
        tok = _zoo_tokenizer(world, recipe.vocab_size)
        lengths = [len(ids) for ids in tok([" " + s for s in world.subjects()], add_special_tokens=False)["input_ids"]]
        inside = sum(2 <= n <= 4 for n in lengths) / len(lengths)
        assert inside >= 0.97, (seed, sorted(lengths))
        for kind in ("country", "company"):  # places and companies too, not only two-word people
            names = world.entities[kind]
            assert sum(len(tok(" " + s, add_special_tokens=False)["input_ids"]) >= 2 for s in names) >= 0.95 * len(names)


def test_biographies_words_reach_the_tokenizer_whole_only_when_asked():
    from moelens.zoo.corpus import build_world

    world = build_world(0)
    assert "," not in world.whole_words() and "," in world.whole_words(biographies=True)
    assert world.texts() == world.base_sentences() + world.qa_sentences()


def test_fact_sentences_know_where_their_subject_stands():
    """Every plain sentence, question and biography marks its subject's tokens: decoded, the
    span is the subject, as the first tokens of a plain sentence and inside a question."""
    from moelens.zoo.build import _fact_sentences, _word_index, subject_spans

    world = build_world(0, SMALL_WORLD)
    tok = _zoo_tokenizer(world, 110)
    for qa in (False, True):
        for fact, s in zip(world.facts, _fact_sentences(tok, world.facts, qa)):
            start, end = s.subject_span
            assert tok.decode(list(s.ids[start:end])).strip() == fact.subject
            assert (start == 0) != qa
    bios = world.biographies()
    bio_ids = tok(bios, add_special_tokens=False)["input_ids"]
    for ids, subject, (start, end) in zip(bio_ids, world.subjects(), subject_spans(tok, bios, bio_ids, world.subjects())):
        assert start == 0 and tok.decode(ids[start:end]).strip() == subject
    # a name inside a longer word is not the subject's place
    assert _word_index("velor veloria has velo", "velo") == 18
    assert _word_index("velo has velo", "velo") == 0
