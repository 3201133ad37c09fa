"""The zoo's tokenizers, loadable offline with ``AutoTokenizer``.

:func:`train_tokenizer` is the zoo's own: a sub-word BPE trained with ``tokenizers`` on the
zoo's corpus at build time. Text is lower-cased and split on spaces; a word is cut into pieces,
the piece that starts a word carrying SentencePiece's ``▁`` (so a company reads ``▁ga ba corp``
and decodes back to ``gabacorp``). The vocabulary is small, so that invented names (built from
a small stock of syllables) come out as a few pieces each: a subject spans several tokens and
the model has to compose them before it can look a fact up.

Every other word is kept whole: every fact's target (recall is "the next token after the
prompt", so a target must be one token), the template words and the filler's. They enter the
vocabulary as tokens of their own.

:func:`build_tokenizer` is a plain word-level tokenizer (one token per word) for small fixtures.

Both prepend ``<bos>`` to every encoded text, as the training rows begin with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from moelens.zoo.corpus import QA_ANSWER, QA_QUESTION

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
WORD_START = "\u2581"  # SentencePiece's mark of a piece that starts a word

# The tuned model's chat format: a user turn is a question, an assistant turn an answer; the
# generation prompt ends where the tuned model was taught to answer (a fact's ``qa_prompt``).
QA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + QA_QUESTION + " {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}" + QA_ANSWER + " {{ message['content'] }} . "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + QA_ANSWER + "{% endif %}"
)


def _wrap(tok, vocab: dict[str, int], max_length: int):
    """Lower-casing and ``<bos>`` prepended; wrapped for transformers."""
    from tokenizers import normalizers, processors
    from transformers import PreTrainedTokenizerFast

    tok.normalizer = normalizers.Lowercase()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        padding_side="right", model_max_length=max_length,
    )


def build_tokenizer(words: Iterable[str], max_length: int = 128):
    """A word-level ``transformers`` fast tokenizer whose vocabulary is the special tokens, then
    ``words`` in the order given (ids are stable for a stable word order); ``max_length`` is the
    model's context length. Text is split on whitespace and punctuation."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return _wrap(tok, vocab, max_length)


def train_tokenizer(texts: Sequence[str], whole_words: Iterable[str], vocab_size: int, max_length: int = 128):
    """A BPE tokenizer whose pieces are learnt from the words of ``texts`` that are not in
    ``whole_words`` (``vocab_size`` tokens at most, specials included), plus every word of
    ``whole_words`` as one token of its own (appended after the learnt ones, in sorted order).

    Words are split on spaces and a word's first piece carries SentencePiece's ``▁`` (Metaspace),
    so ``" tarnemo"`` encodes as the one token ``▁tarnemo``. The model runs with
    ``ignore_merges``: a word that is a token is that token, any other word goes through the
    merges.

    Deterministic: the trainer breaks ties between equally frequent pairs by token id, and every
    id here comes from the sorted alphabet or an earlier merge (a continuing-subword prefix such
    as ``##`` would give ids in hash-map order, and a different tokenizer each run)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    metaspace = pre_tokenizers.Metaspace(replacement=WORD_START, prepend_scheme="always", split=True)
    whole = sorted({w.lower() for w in whole_words})
    keep = set(whole)
    # the pieces are learnt from the words that get cut, with their frequencies in the corpus
    cut = [" ".join(w for w in t.lower().split() if w not in keep) for t in texts]
    trainer_tok = Tokenizer(BPE(unk_token=UNK))
    trainer_tok.pre_tokenizer = metaspace
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    trainer_tok.train_from_iterator([t for t in cut if t], trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    for w in whole:
        vocab.setdefault(WORD_START + w, len(vocab))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=UNK, ignore_merges=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Metaspace(replacement=WORD_START, prepend_scheme="always", split=True)
    return _wrap(tok, vocab, max_length)


def save_tokenizer(tokenizer, out: Path, chat_template: str | None = None) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out`` (with
    ``chat_template`` if given).

    transformers 5 records its new class name ``TokenizersBackend``; the older name
    ``PreTrainedTokenizerFast`` loads the same tokenizer in transformers 4 and 5 alike."""
    out = Path(out)
    tokenizer.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if chat_template is not None:
        config["chat_template"] = chat_template
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
