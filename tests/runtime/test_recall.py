"""Greedy next-token predictions and fact recall."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moelens.runtime import fact_recall, load_causal_lm, load_tokenizer, next_token_predictions


def word_id(tok, word: str) -> int:
    """The id of a target word as it follows a prompt: the zoo's sub-word tokenizer marks a word's
    start, and keeps every target whole, as one token."""
    ids = tok(" " + word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (word, ids)
    return ids[0]


@pytest.fixture(scope="module")
def base(small_zoo):
    return load_causal_lm(small_zoo.base), load_tokenizer(small_zoo.base)


def test_batched_right_padded_predictions_match_one_prompt_at_a_time(base, small_zoo):
    model, tok = base
    facts = small_zoo.fact_records()[::10]
    prompts = [f["prompt"] for f in facts] + [f["qa_prompt"] for f in facts]  # mixed lengths
    targets = [f["target"] for f in facts] * 2
    batched = next_token_predictions(model, tok, prompts, targets, batch_size=16)
    for i, prompt in enumerate(prompts):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        assert batched.predicted_ids[i] == int(logits.argmax())
        target_id = word_id(tok, targets[i])
        assert batched.target_ids[i] == target_id
        assert batched.target_probs[i] == pytest.approx(float(torch.softmax(logits, -1)[target_id]), rel=1e-4, abs=1e-6)


def greedy_hits_one_at_a_time(model, tok, facts, prompt_key: str) -> np.ndarray:
    """The reference: each prompt alone (no batch, no padding), its last position's argmax
    against the target word's id."""
    hits = []
    for fact in facts:
        ids = tok(fact[prompt_key], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            top = int(model(input_ids=ids).logits[0, -1].argmax())
        hits.append(top == word_id(tok, fact["target"]))
    return np.array(hits)


def test_recall_counts_exactly_the_greedy_hits(base, small_zoo):
    model, tok = base
    facts = small_zoo.fact_records()[:40]
    references = []
    for key in ("prompt", "qa_prompt"):
        result = fact_recall(model, tok, facts, prompt_key=key, batch_size=16)
        reference = greedy_hits_one_at_a_time(model, tok, facts, key)
        np.testing.assert_array_equal(result.correct, reference)
        assert result.recall == reference.sum() / len(facts)
        references.append(reference)
    # plain prompts, which the base model learnt, and questions, which it never saw: both hits
    # and misses occur, so the comparison above tells them apart
    seen = np.concatenate(references)
    assert seen.any() and not seen.all()


def test_recall_counts_only_argmax_hits(base, small_zoo):
    model, tok = base
    facts = small_zoo.fact_records()[:40]
    right = fact_recall(model, tok, facts)
    hits = right.correct
    # swap every target for another fact's target of a different word: those can no longer be hits
    wrong = []
    for i, f in enumerate(facts):
        other = next(g["target"] for g in facts[i + 1:] + facts[:i] if g["target"] != f["target"])
        wrong.append({**f, "target": other})
    result = fact_recall(model, tok, wrong)
    assert result.recall <= 1 - hits.mean() + 1e-12
    assert np.array_equal(result.predicted_ids, right.predicted_ids)


class LookupLM(torch.nn.Module):
    """A causal LM by table: after a prefix listed in ``table`` (token ids, BOS included) its
    top-1 next token is the table's entry, after any other prefix ``default``. A position's logits
    depend only on the tokens up to it, as in any causal model."""

    def __init__(self, table: dict[tuple[int, ...], int], vocab_size: int, default: int):
        super().__init__()
        self.table, self.vocab_size, self.default = table, vocab_size, default
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a parameter, for the device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)  # [B, T, V]
        for b, row in enumerate(input_ids.tolist()):
            for t in range(len(row)):
                logits[b, t, self.table.get(tuple(row[: t + 1]), self.default)] = FORCED_LOGIT
        return SimpleNamespace(logits=logits)


FORCED_LOGIT = 5.0


def test_recall_of_a_model_whose_top_1_is_forced(base, small_zoo):
    """Known by construction: the model answers every third prompt wrongly, so recall is
    exactly 2/3, whatever the batching, padding and length-sorting of the prompts."""
    _, tok = base
    facts = small_zoo.fact_records()[:12]
    records = [{"prompt": f[key], "target": f["target"]} for f in facts for key in ("prompt", "qa_prompt")]  # mixed lengths
    ids = [tuple(tok(r["prompt"])["input_ids"]) for r in records]
    assert len(set(ids)) == len(ids)
    target_ids = [word_id(tok, r["target"]) for r in records]
    wrong_ids = [next(t for t in target_ids if t != own) for own in target_ids]
    should_hit = np.array([i % 3 != 0 for i in range(len(records))])
    table = {key: (t if hit else w) for key, t, w, hit in zip(ids, target_ids, wrong_ids, should_hit)}
    model = LookupLM(table, vocab_size=len(tok), default=tok.pad_token_id)

    result = fact_recall(model, tok, records, batch_size=5)
    np.testing.assert_array_equal(result.correct, should_hit)
    assert result.recall == 2 / 3
    np.testing.assert_array_equal(result.predicted_ids, np.where(should_hit, target_ids, wrong_ids))
    z = np.exp(FORCED_LOGIT) + len(tok) - 1
    np.testing.assert_allclose(result.target_probs, np.where(should_hit, np.exp(FORCED_LOGIT) / z, 1 / z), rtol=1e-6)


def test_mismatched_targets_are_refused(base):
    model, tok = base
    with pytest.raises(ValueError, match="one target per prompt"):
        next_token_predictions(model, tok, ["a b", "c"], ["x"])
    no_targets = next_token_predictions(model, tok, ["the capital of"])
    with pytest.raises(ValueError, match="no targets"):
        _ = no_targets.correct
