"""The zoo's training data (mixtures, rows, answer weights, curriculum), schedule and optimizer."""

from __future__ import annotations

import collections
import itertools
import random

import pytest
import torch

from moelens.zoo.train import Curriculum, Group, RowSampler, Schedule, Sentence, make_optimizer, mixture_stream, train

BOS, EOS, PAD = 1, 2, 0


def _facts(n_subjects: int, per_subject: int = 2, length: int = 5) -> tuple[Sentence, ...]:
    """Fact sentences whose ids encode (subject, copy, position); the answer is the last token."""
    return tuple(
        Sentence(tuple(1000 * (s + 1) + 10 * c + k for k in range(length)), subject=f"s{s}", answer=length - 1)
        for s in range(n_subjects) for c in range(per_subject)
    )


def _filler(n: int, length: int = 4) -> tuple[Sentence, ...]:
    return tuple(Sentence(tuple(100_000 + 10 * i + k for k in range(length))) for i in range(n))


def test_an_epoch_of_the_mixture_holds_each_groups_share():
    facts, filler = _facts(10), _filler(30)
    stream = mixture_stream([Group(facts, 1.0), Group(filler, 0.1)], random.Random(0))
    epoch = list(itertools.islice(stream, 23))
    assert sum(s.subject is not None for s in epoch) == 20
    assert len(set(epoch)) == 23  # each fact once, 3 distinct fillers
    # a share below one still shows every filler sentence in turn
    seen = {s for s in itertools.islice(stream, 23 * 9) if s.subject is None}
    assert seen | {s for s in epoch if s.subject is None} == set(filler)


def test_an_empty_mixture_is_refused():
    with pytest.raises(ValueError, match="empty"):
        next(mixture_stream([Group(_filler(3), 0.1)], random.Random(0)))


def test_rows_hold_whole_sentences_and_weigh_the_answers():
    facts = _facts(6, length=7)
    sampler = RowSampler([Group(facts, 1.0), Group(_filler(12), 0.5)], BOS, EOS, PAD, random.Random(1), row_tokens=20, answer_weight=16.0)
    batch = sampler.batch(12)
    ids, mask, labels, weights = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["weights"]
    by_first = {s.ids[0]: s for s in facts + _filler(12)}
    for r in range(ids.shape[0]):
        row = ids[r, : int(mask[r].sum())].tolist()
        assert row[0] == BOS and row[-1] == EOS and len(row) <= 20
        assert (labels[r, len(row):] == -100).all() and (weights[r, len(row):] == 0).all()
        k, answers = 1, []
        while k < len(row) - 1:  # walk the row sentence by sentence: none is cut in two
            s = by_first[row[k]]
            assert tuple(row[k:k + len(s.ids)]) == s.ids
            if s.answer is not None:
                answers.append(k + s.answer)
            k += len(s.ids)
        assert k == len(row) - 1
        expected = torch.ones(len(row))
        expected[answers] = 16.0
        assert torch.equal(weights[r, :len(row)], expected)


def test_a_sentence_longer_than_a_row_gets_a_row_of_its_own():
    long = Sentence(tuple(range(10, 40)))
    sampler = RowSampler([Group((long,), 1.0)], BOS, EOS, PAD, random.Random(0), row_tokens=8)
    ids, answers = sampler.row()
    assert ids == [BOS, *long.ids, EOS] and answers == []


def test_curriculum_stages_train_on_a_growing_set_of_subjects():
    facts, filler = _facts(20), _filler(40)
    data = Curriculum([Group(facts, 1.0), Group(filler, 0.5)], [(0.1, 3), (0.5, 2)], BOS, EOS, PAD, random.Random(2), row_tokens=40)

    def subjects_at(step: int) -> set[int]:
        ids = data.batch(step, 16)["input_ids"]
        return {int(t) // 1000 - 1 for t in ids.flatten().tolist() if 1000 <= t < 100_000}

    first = set().union(*(subjects_at(s) for s in range(3)))
    second = set().union(*(subjects_at(s) for s in range(3, 5)))
    last = set().union(*(subjects_at(5) for _ in range(4)))
    assert len(first) == 2 and len(second) == 10 and len(last) == 20
    assert first < second  # the subjects of a stage are kept in the next


@pytest.mark.parametrize("stage", [(0.0, 5), (1.5, 5), (0.5, 0)])
def test_a_bad_curriculum_stage_is_refused(stage):
    with pytest.raises(ValueError, match="curriculum stage"):
        Curriculum([Group(_facts(4), 1.0)], [stage], BOS, EOS, PAD, random.Random(0))


def test_learning_rate_schedules():
    cosine = Schedule(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert cosine.lr_at(0) == pytest.approx(0.1) and cosine.lr_at(9) == pytest.approx(1.0)
    assert cosine.lr_at(10) == pytest.approx(1.0)
    assert cosine.lr_at(55) == pytest.approx(0.55)  # half way down the cosine: (1 + 0.1) / 2
    assert cosine.lr_at(99) > 0.1 and cosine.lr_at(100) == pytest.approx(0.1)
    plateau = Schedule(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1, decay_steps=20)
    assert all(plateau.lr_at(s) == 1.0 for s in range(10, 81))
    assert plateau.lr_at(90) == pytest.approx(0.1 + 0.9 * 10 / 20)
    assert plateau.lr_at(99) == pytest.approx(0.1 + 0.9 / 20)
    rates = [plateau.lr_at(s) for s in range(80, 100)]
    assert rates == sorted(rates, reverse=True)


class _TinyLM(torch.nn.Module):
    """Embedding + linear head: enough to train and to check the optimizer's state."""

    def __init__(self, vocab: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, vocab)
        self.config = type("Config", (), {})()

    def forward(self, input_ids, attention_mask):
        return collections.namedtuple("Out", "logits")(self.head(self.norm(self.embed(input_ids))))


def _sentences() -> tuple[Sentence, ...]:
    return tuple(Sentence((10 + i, 20 + i, 30 + i), subject=f"s{i}", answer=2) for i in range(8))


def test_training_lowers_the_loss_and_continues_the_optimizer():
    model = _TinyLM()
    data = Curriculum([Group(_sentences(), 1.0)], [], BOS, EOS, PAD, random.Random(0), row_tokens=12, answer_weight=4.0)
    log, optimizer = train(model, data, Schedule(steps=60, batch_rows=8, lr=3e-2, warmup_steps=5, beta2=0.95))
    assert len(log.loss) == len(log.lm_loss) == 60
    assert sum(log.loss[-5:]) < 0.5 * sum(log.loss[:5])
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    # norms and biases are never decayed
    assert all(p.ndim < 2 for p in optimizer.param_groups[1]["params"])
    steps_before = optimizer.state[model.head.weight]["step"].item()
    _, again = train(model, data, Schedule(steps=3, batch_rows=8, lr=1e-3, beta2=0.99, weight_decay=0.1), optimizer=optimizer)
    assert again is optimizer and optimizer.state[model.head.weight]["step"].item() == steps_before + 3
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    assert optimizer.param_groups[0]["weight_decay"] == 0.1 and optimizer.param_groups[1]["weight_decay"] == 0.0


def test_the_answer_weight_moves_the_loss_towards_the_answers():
    """With the answers weighed heavily the loss is (nearly) their cross-entropy alone."""
    model = _TinyLM()
    batch = RowSampler([Group(_sentences(), 1.0)], BOS, EOS, PAD, random.Random(0), row_tokens=12, answer_weight=1e6).batch(4)
    from moelens.zoo.train import _objective

    with torch.no_grad():
        loss, lm, _ = _objective(model, batch, 0.0)
        logits = model(batch["input_ids"], batch["attention_mask"]).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], reduction="none", ignore_index=-100)
    answer = batch["weights"][:, 1:] > 1
    assert float(loss) == pytest.approx(float(ce[answer].mean()), rel=1e-4)
    assert lm == pytest.approx(float(ce[batch["labels"][:, 1:] != -100].mean()), rel=1e-5)
    assert make_optimizer(model, Schedule(steps=1)).defaults["fused"] is True
    assert make_optimizer(model, Schedule(steps=1), fused=False).defaults["foreach"] is True


def test_subject_bars_hide_a_subject_from_the_tokens_after_it():
    """Known by construction: a subject at positions 1, 2, 3 of a row of 7, and one at 5 in the
    second row (one token: its last is all of it)."""
    from moelens.zoo.train import subject_bars

    hidden, late = subject_bars([[(1, 4)], [(5, 6)]], [True, True], 7)
    want = torch.zeros(2, 7, 7, dtype=torch.bool)
    want[0, 4:, 1:4] = True
    want[1, 6:, 5:6] = True
    assert torch.equal(hidden, want)
    want_late = torch.zeros(2, 7, 7, dtype=torch.bool)
    want_late[0, 4:, 1:3] = True  # the last subject token (3) stays visible
    assert torch.equal(late, want_late)
    _, none = subject_bars([[(1, 4)]], [False], 7)
    assert not none.any()


def test_rows_bar_exactly_their_subjects_tokens():
    from moelens.zoo.train import SubjectReading

    facts = tuple(Sentence((7, 8) + s.ids, subject=s.subject, answer=s.answer + 2, subject_span=(2, 4)) for s in _facts(6, length=5))
    sampler = RowSampler([Group(facts, 1.0), Group(_filler(6), 1.0)], BOS, EOS, PAD, random.Random(3), row_tokens=24,
                         reading=SubjectReading(hidden_layers=1, last_token_share=0.5))
    batch = sampler.batch(16)
    hidden, late = batch["subject_hidden"], batch["subject_last_only"]
    for r in range(hidden.shape[0]):
        ids = batch["input_ids"][r].tolist()
        keys = hidden[r].any(0).nonzero().flatten().tolist()
        # every barred key is one of a subject's two tokens (ids 1000·(s+1) + 10c + 0 and + 1)
        assert keys and all(ids[k] % 10 in (0, 1) and ids[k] >= 1000 for k in keys)
        for k in keys:
            end = k + 2 if ids[k] % 10 == 0 else k + 1
            assert hidden[r, end:, k].all() and not hidden[r, :end, k].any()
        late_keys = late[r].any(0).nonzero().flatten().tolist()
        assert late_keys == [] or late_keys == [k for k in keys if ids[k] % 10 == 0]
    assert 0 < sum(bool(late[r].any()) for r in range(late.shape[0])) < late.shape[0]


def _tiny_zoo_model(family: str):
    from moelens.zoo.models import ModelShape, make_model

    shape = ModelShape(hidden_size=32, expert_ffn=32, layers=2, heads=2, kv_heads=1, experts=4, top_k=2)
    return make_model(family, shape, 64, {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}, seed=0).eval()


@pytest.fixture(scope="module")
def tiny_mixtral():
    return _tiny_zoo_model("mixtral")


def _later_logits(model, reading, ids):
    """Logits at positions 4… of one row whose subject is at positions 1, 2, 3, under ``reading``'s masks."""
    from moelens.zoo.train import SubjectMasks, subject_bars

    batch = {"input_ids": ids[None], "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    batch["subject_hidden"], batch["subject_last_only"] = subject_bars([[(1, 4)]], [True], len(ids))
    with torch.no_grad(), SubjectMasks(model, reading) as masks:
        masks.use(batch)
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0, 4:]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_subject_masks_hide_the_subject_in_the_layers_they_name(family):
    """Known by construction, in every zoo family: with the subject hidden in every layer, what
    follows it cannot depend on its tokens; hidden in the first layer only, it does; the hooks
    leave with the block."""
    from moelens.zoo.train import SubjectReading

    model = _tiny_zoo_model(family)

    a = torch.tensor([BOS, 10, 11, 12, 20, 21, 22, 23])
    b = torch.tensor([BOS, 30, 31, 32, 20, 21, 22, 23])  # another subject, same continuation
    everywhere = SubjectReading(hidden_layers=2)
    torch.testing.assert_close(_later_logits(model, everywhere, a), _later_logits(model, everywhere, b), rtol=0, atol=1e-6)
    first_only = SubjectReading(hidden_layers=1)
    assert not torch.allclose(_later_logits(model, first_only, a), _later_logits(model, first_only, b), atol=1e-4)
    plain = SubjectReading()
    with torch.no_grad():
        unmasked = model(input_ids=a[None]).logits[0, 4:]
    torch.testing.assert_close(_later_logits(model, plain, a), unmasked, rtol=0, atol=0)
    assert not model.model.layers[0].self_attn._forward_pre_hooks


def test_each_layer_gets_its_mask(tiny_mixtral):
    """The masks the attention modules receive: the whole subject barred in the hidden layer,
    all but its last token in the one after; causal everywhere."""
    from moelens.zoo.train import SubjectMasks, SubjectReading, subject_bars

    T = 8
    batch = {"input_ids": torch.arange(10, 10 + T)[None], "attention_mask": torch.ones(1, T, dtype=torch.long)}
    batch["subject_hidden"], batch["subject_last_only"] = subject_bars([[(1, 4)]], [True], T)
    seen = {}
    with torch.no_grad(), SubjectMasks(tiny_mixtral, SubjectReading(hidden_layers=1, last_token_share=1.0)) as masks:
        # registered after the masks' hooks, so they run after them
        handles = [layer.self_attn.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: seen.__setitem__(i, kwargs["attention_mask"]), with_kwargs=True)
            for i, layer in enumerate(tiny_mixtral.model.layers)]
        masks.use(batch)
        tiny_mixtral(**{k: batch[k] for k in ("input_ids", "attention_mask")})
    for h in handles:
        h.remove()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer, keys in ((0, [1, 2, 3]), (1, [1, 2])):
        got = seen[layer]
        allowed = got[0, 0] if got.dtype == torch.bool else got[0, 0] == 0
        want = causal.clone()
        want[4:, keys] = False
        assert torch.equal(allowed, want), layer
