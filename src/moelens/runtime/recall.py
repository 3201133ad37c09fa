"""Greedy next-token predictions after a batch of prompts, and fact recall.

Fact recall is the share of facts whose target is the greedy next token (the argmax of the
logits) right after the prompt. The target's token is the first token of ``" " + target``
encoded without special tokens (for a word-level tokenizer, the word itself).

Prompts are batched with right padding: in a causal model the padding after a prompt cannot
change the logits at its last real token, which is read at index ``length - 1``. Left padding
would shift the positions of a model that derives them from the sequence index.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moelens.progress import ProgressCallback, report
from moelens.runtime.checks import check_logits


@dataclass(frozen=True)
class NextTokenResult:
    """Per prompt: the greedy next token id and, when targets were given, the target's id, its
    probability and whether it is the argmax."""

    predicted_ids: np.ndarray
    target_ids: np.ndarray | None = None
    target_probs: np.ndarray | None = None

    @property
    def correct(self) -> np.ndarray:
        if self.target_ids is None:
            raise ValueError("no targets were given, so there is nothing to be correct about")
        return self.predicted_ids == self.target_ids

    @property
    def recall(self) -> float:
        """Share of prompts whose greedy next token is the target."""
        return float(self.correct.mean()) if len(self.predicted_ids) else float("nan")


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, with the special tokens the tokenizer adds itself (BOS)."""
    # verbose=False: lengths are the caller's to check (merge cost refuses long facts by line)
    return [list(ids) for ids in tokenizer(list(prompts), add_special_tokens=True, verbose=False)["input_ids"]]


def target_token_ids(tokenizer: Any, targets: Sequence[str]) -> list[int]:
    """The id of the first token of ``" " + target`` for each target."""
    encoded = tokenizer([" " + t for t in targets], add_special_tokens=False)["input_ids"]
    out = []
    for target, ids in zip(targets, encoded):
        if not ids:
            raise ValueError(f"target {target!r} encodes to no token")
        out.append(int(ids[0]))
    return out


@torch.no_grad()
def next_token_predictions(
    model: Any, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str] | None = None,
    batch_size: int = 128, progress: ProgressCallback | None = None,
) -> NextTokenResult:
    """Greedy next token after each prompt (and the target's probability if ``targets``).

    ``model``: a loaded causal LM or a forward runtime (:func:`moelens.runtime.forward.open_forward`);
    a layer-streamed one runs every batch in one pass, each layer read once."""
    from moelens.runtime.forward import is_forward, run_calls, whole_module

    calls, result = next_token_calls(model, tokenizer, prompts, targets, batch_size, progress)
    was_training = model.training if not is_forward(model) else False
    if not is_forward(model):
        model.eval()
    try:
        run_calls(model, calls, progress if whole_module(model) is None else None)
    finally:
        if not is_forward(model):
            model.train(was_training)
    return result()


def next_token_calls(
    model: Any, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str] | None = None,
    batch_size: int = 128, progress: ProgressCallback | None = None,
) -> tuple[list[Any], Callable[[], NextTokenResult]]:
    """:func:`next_token_predictions` as the batches' calls for ``model`` (a runtime or a loaded
    module) and what gives the result once they have run: so one streamed pass can run them beside
    other calls (perplexity's), each layer read once for all."""
    from moelens.runtime.forward import is_forward, runtime_device, whole_module
    from moelens.runtime.stream import Call

    if targets is not None and len(targets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets; give one target per prompt")
    device = runtime_device(model)
    lm = whole_module(model)
    streamed = lm is None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = encode_prompts(tokenizer, prompts)
    tgt = target_token_ids(tokenizer, targets) if targets is not None else None
    # Sorting by length keeps padding small; results are put back in the caller's order.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    predicted = np.zeros(len(ids), dtype=np.int64)
    probs = np.zeros(len(ids), dtype=np.float64) if tgt is not None else None
    n_batches = (len(order) + batch_size - 1) // batch_size
    calls = []
    for b in range(n_batches):
        rows = order[b * batch_size:(b + 1) * batch_size]
        width = max(len(ids[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, :len(ids[i])] = torch.tensor(ids[i])
            mask[r, :len(ids[i])] = 1
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
        if is_forward(model):  # a runtime runs transformers' models: no key-value cache to fill
            kwargs["use_cache"] = False

        def keep(output: Any, b: int = b, rows: list[int] = rows, kwargs: dict[str, Any] = kwargs) -> None:
            # only the last real position's logits are read: a batch's [R, T, V] is freed here
            last = kwargs["attention_mask"].sum(1) - 1
            final = output.logits[torch.arange(len(rows), device=device), last].float()
            check_logits(final, lm, "next-token prediction", **kwargs)
            predicted[rows] = final.argmax(-1).cpu().numpy()
            if tgt is not None:
                p = torch.softmax(final, -1)
                t = torch.tensor([tgt[i] for i in rows], device=device)
                probs[rows] = p[torch.arange(len(rows), device=device), t].double().cpu().numpy()
            if not streamed:
                report(progress, "next token", b + 1, n_batches)

        calls.append(Call(kwargs, keep=keep))
    return calls, lambda: NextTokenResult(predicted, np.asarray(tgt, dtype=np.int64) if tgt is not None else None, probs)


def fact_recall(
    model: Any, tokenizer: Any, facts: Sequence[dict[str, str]], prompt_key: str = "prompt",
    batch_size: int = 128, progress: ProgressCallback | None = None,
) -> NextTokenResult:
    """Next-token predictions for fact records (``{"prompt": ..., "target": ...}``, as in a zoo's
    ``facts.jsonl``); ``prompt_key`` picks the rendering (``"qa_prompt"`` for questions)."""
    prompts = [f[prompt_key] for f in facts]
    targets = [f["target"] for f in facts]
    return next_token_predictions(model, tokenizer, prompts, targets, batch_size=batch_size, progress=progress)


def fact_recall_calls(
    model: Any, tokenizer: Any, facts: Sequence[dict[str, str]], prompt_key: str = "prompt",
    batch_size: int = 128, progress: ProgressCallback | None = None,
) -> tuple[list[Any], Callable[[], NextTokenResult]]:
    """:func:`fact_recall` as calls and their result (see :func:`next_token_calls`)."""
    return next_token_calls(model, tokenizer, [f[prompt_key] for f in facts], [f["target"] for f in facts], batch_size, progress)
