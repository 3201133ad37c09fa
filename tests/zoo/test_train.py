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
