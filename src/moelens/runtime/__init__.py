"""Forward passes: load a model and its tokenizer, run batches of prompts, read next-token
predictions."""

from moelens.runtime.load import load_causal_lm, load_tokenizer, resolve_dtype
from moelens.runtime.recall import NextTokenResult, fact_recall, next_token_predictions

__all__ = ["NextTokenResult", "fact_recall", "load_causal_lm", "load_tokenizer", "next_token_predictions", "resolve_dtype"]
