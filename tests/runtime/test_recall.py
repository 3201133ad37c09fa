"""Greedy next-token predictions and fact recall."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelens.runtime import fact_recall, load_causal_lm, load_tokenizer, next_token_predictions


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
        target_id = tok.convert_tokens_to_ids(targets[i])
        assert batched.target_ids[i] == target_id
        assert batched.target_probs[i] == pytest.approx(float(torch.softmax(logits, -1)[target_id]), rel=1e-4, abs=1e-6)


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
    assert right.recall == hits.mean()


def test_mismatched_targets_are_refused(base):
    model, tok = base
    with pytest.raises(ValueError, match="one target per prompt"):
        next_token_predictions(model, tok, ["a b", "c"], ["x"])
    no_targets = next_token_predictions(model, tok, ["the capital of"])
    with pytest.raises(ValueError, match="no targets"):
        _ = no_targets.correct
