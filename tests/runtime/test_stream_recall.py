"""Fact recall and perplexity from a layer-streamed model equal the in-memory ones (bit for bit
on the tiny checkpoints), each layer read once for every batch, and a loaded module still works."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelens.runtime import fact_recall, load_causal_lm
from moelens.runtime.forward import open_forward
from moelens.runtime.perplexity import perplexity
from tests.analyses import clustering_fixtures as fx
from tests.runtime.stream_checks import count_reads

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")
FAMILIES = [("mixtral", "per_expert"), ("qwen3_moe", "per_expert"), ("deepseek_v3", "per_expert"), ("gpt_oss", "mxfp4"),
            ("olmoe", "per_expert"), ("llama", "per_expert")]


def _sequences(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (9, 5, 12, 7, 1, 11, 8, 6, 10, 4)]


def _facts() -> list[dict[str, str]]:
    # the word-level tokenizer's words; the random models get some right and some wrong
    words = fx.WORDS
    return [{"prompt": " ".join(words[(i * 7 + j) % len(words)] for j in range(2 + i % 4)), "target": words[(i * 5) % len(words)]}
            for i in range(12)]


@pytest.mark.parametrize("family, layout", FAMILIES)
def test_streamed_recall_and_perplexity_equal_in_memory(tiny_checkpoint, family, layout):
    path = tiny_checkpoint(family, layout)
    memory = open_forward(path, CPU, "float32", stream="off")
    streamed = open_forward(path, CPU, "float32", stream="on")
    vocab = memory.model.get_input_embeddings().weight.shape[0]
    seqs = _sequences(vocab)
    a = perplexity(memory, seqs, pad_id=0, batch_tokens=24)
    b = perplexity(streamed, seqs, pad_id=0, batch_tokens=24)
    assert a.n_predicted == b.n_predicted == sum(len(s) - 1 for s in seqs if len(s) > 1)
    assert a.nll == b.nll and np.isfinite(a.value)
    # the module itself (as the zoo passes it) gives the same sums
    assert perplexity(memory.model, seqs, pad_id=0, batch_tokens=24).nll == a.nll
    tok = fx.tokenizer()
    facts = _facts()
    r_m = fact_recall(memory, tok, facts, batch_size=5)
    r_s = fact_recall(streamed, tok, facts, batch_size=5)
    np.testing.assert_array_equal(r_m.predicted_ids, r_s.predicted_ids)
    np.testing.assert_array_equal(r_m.target_probs, r_s.target_probs)
    assert r_m.target_probs.min() > 0
    np.testing.assert_array_equal(fact_recall(memory.model, tok, facts, batch_size=5).target_probs, r_m.target_probs)
    assert all(p.device.type == "meta" for p in streamed.model.parameters())


def test_a_streamed_recall_reads_each_layer_once_for_all_batches(tiny_checkpoint, monkeypatch):
    path = tiny_checkpoint("mixtral", "per_expert")
    streamed = open_forward(path, CPU, "float32", stream="on")
    reads = count_reads(streamed, monkeypatch)
    steps: list[tuple[str, int, int]] = []
    result = fact_recall(streamed, fx.tokenizer(), _facts(), batch_size=2, progress=lambda e: steps.append((e.task, e.done, e.total)))
    assert len(result.predicted_ids) == 12  # six batches
    assert reads == ["embedding", *(f"layer {i}" for i in range(len(streamed.layers))), "head"]
    assert steps and steps[-1][0] == "streamed layers"
    # a one-prompt-at-a-time reference: the padding of a batch changes nothing
    lm = load_causal_lm(path, dtype="float32")
    tok = fx.tokenizer()
    with torch.no_grad():
        for fact, predicted in zip(_facts(), result.predicted_ids):
            ids = tok(fact["prompt"])["input_ids"]
            assert predicted == int(lm(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
