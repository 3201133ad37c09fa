"""Tiny checkpoints and a prompt set for the interventions tests.

Two models with random weights share the zoo's word-level tokenizer (one token per word, ``<bos>``
prepended): a Mixtral-layout MoE model (the zoo's own config builder, hidden 32, 3 layers,
4 experts, top-2) and a dense Llama model of the same size. Weights are drawn with a large
``initializer_range`` so that next-token distributions are peaked and interventions move them by
tenths of a bit, not by 1e-4 (a 1e-5 tolerance would otherwise compare noise).

The prompts have subjects of one and two tokens, a subject at the start of the prompt and one in
the middle, and one prompt without a target (the clean top-1 token stands in for it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PROMPTS: list[dict[str, str]] = [
    {"prompt": "The capital city of France is", "subject": "France", "target": "Paris"},
    {"prompt": "Miles Davis plays the", "subject": "Miles Davis", "target": "trumpet"},
    {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux", "target": "French"},
    {"prompt": "Rome is the capital of", "subject": "Rome"},
]

EXTRA_WORDS = ("paris", "trumpet", "french", "italy", "piano", "london", "english", "city", "a", "of")
HIDDEN, LAYERS, HEADS, KV_HEADS, EXPERTS, TOP_K, FFN = 32, 3, 4, 2, 4, 2, 48
INIT_RANGE = 0.25


def vocabulary() -> list[str]:
    """Every word of the prompts and targets (lower-cased, in first-seen order), then a few more."""
    words: list[str] = []
    for record in PROMPTS:
        for text in (record["prompt"], record.get("target", "")):
            for w in text.lower().split():
                if w not in words:
                    words.append(w)
    words.extend(w for w in EXTRA_WORDS if w not in words)
    return words


def tokenizer() -> Any:
    from moelens.zoo.tokenizer import build_tokenizer

    return build_tokenizer(vocabulary(), max_length=64)


def _special(tok: Any) -> dict[str, int]:
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def mixtral_config(tok: Any, family: str = "mixtral") -> Any:
    """The zoo's config of ``family`` (mixtral, qwen3_moe or olmoe) at the tests' tiny shape."""
    from moelens.zoo.models import ModelShape, make_config

    shape = ModelShape(hidden_size=HIDDEN, expert_ffn=FFN, layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS,
                       experts=EXPERTS, top_k=TOP_K, max_positions=64)
    config = make_config(family, shape, len(tok), _special(tok))
    config.initializer_range = INIT_RANGE
    return config


def llama_config(tok: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HIDDEN // HEADS,
        max_position_embeddings=64, tie_word_embeddings=False, initializer_range=INIT_RANGE,
        **_special(tok),
    )


#: Causal LMs that moelens opens for forward passes only (GPT-2, GPT-J, GPT-NeoX, Phi, Gemma, Falcon, OPT).
CAUSAL_LMS = ("gpt2", "gptj", "gpt_neox", "phi", "gemma", "falcon", "opt")


def causal_lm_config(tok: Any, model_type: str) -> Any:
    """A tiny config of one of ``CAUSAL_LMS`` at the tests' shape (hidden 32, 3 layers, 4 heads)."""
    from moelens.checkpoint.families.causal_lm import tiny_causal_lm_config

    config = tiny_causal_lm_config(model_type, vocab_size=len(tok), layers=LAYERS, special=_special(tok))
    config.initializer_range = INIT_RANGE
    if hasattr(config, "init_std"):  # OPT's name for it
        config.init_std = INIT_RANGE
    config.tie_word_embeddings = False
    return config


def save_model(config: Any, tok: Any, out: Path, seed: int = 0) -> Path:
    """Random-init model of ``config`` (float32, fixed seed) with ``tok`` saved into ``out``.

    Norm weights are moved off their constant init so that a reference that skipped a norm
    could not pass by accident."""
    import torch
    from transformers import AutoModelForCausalLM

    from moelens.zoo.tokenizer import save_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_tokenizer(tok, out)
    return out


def write_prompts(path: Path, records: list[dict[str, str]] = PROMPTS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
