"""A word-level tokenizer for the zoo's world, loadable offline with ``AutoTokenizer``.

One token per word, so a fact's target is exactly one token and "the next token after the prompt"
is a clean definition of recall. Text is lower-cased and split on whitespace and punctuation;
``<bos>`` is prepended to every encoded text, as the training rows begin with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from moelens.zoo.corpus import QA_ANSWER, QA_QUESTION

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)

# The tuned model's chat format: a user turn is a question, an assistant turn an answer; the
# generation prompt ends where the tuned model was taught to answer (a fact's ``qa_prompt``).
QA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + QA_QUESTION + " {{ message['content'] }} "
    "{% elif message['role'] == 'assistant' %}" + QA_ANSWER + " {{ message['content'] }} . "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + QA_ANSWER + "{% endif %}"
)


def build_tokenizer(words: Iterable[str], max_length: int = 128):
    """A ``transformers`` fast tokenizer whose vocabulary is the special tokens, then ``words``
    in the order given (ids are stable for a stable word order); ``max_length`` is the model's
    context length."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        padding_side="right", model_max_length=max_length,
    )


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
