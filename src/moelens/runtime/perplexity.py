"""Perplexity of a causal LM on token sequences.

    PPL = exp( Σ_s Σ_{i=1}^{n_s−1} −log p(t_{s,i} | t_{s,<i}) / Σ_s (n_s − 1) )

over every sequence s of n_s tokens (the first token of a sequence is context, never predicted):
a token-weighted mean, so a long line counts for its tokens. Sequences are batched by a budget of
padded tokens, right-padded (padding never reaches the real tokens of a causal model and is left
out of the sums), and the sums run in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moelens.progress import ProgressCallback, report
from moelens.runtime.batching import batches, right_padded
from moelens.runtime.checks import check_logits


@dataclass(frozen=True)
class Perplexity:
    """``nll`` Σ −log p (nats) over ``n_predicted`` tokens; ``value`` = exp(nll / n_predicted)."""

    nll: float
    n_predicted: int

    @property
    def value(self) -> float:
        return math.exp(self.nll / self.n_predicted) if self.n_predicted else float("nan")


@torch.no_grad()
def perplexity(model: Any, sequences: Sequence[Sequence[int]], pad_id: int = 0, batch_tokens: int = 4096,
               progress: ProgressCallback | None = None) -> Perplexity:
    """Perplexity of ``model`` on ``sequences`` (token ids, each at most the model's positions).

    ``model``: a loaded causal LM or a forward runtime (:func:`moelens.runtime.forward.open_forward`);
    a layer-streamed one runs every batch in one pass, each layer read once. The sums are the same
    either way: each batch's is formed in float64 as its logits come, and added in batch order."""
    from moelens.runtime.forward import run_calls, whole_module

    calls, result = perplexity_calls(model, sequences, pad_id, batch_tokens, progress)
    run_calls(model, calls, progress if whole_module(model) is None else None)
    return result()


def perplexity_calls(model: Any, sequences: Sequence[Sequence[int]], pad_id: int = 0, batch_tokens: int = 4096,
                     progress: ProgressCallback | None = None) -> tuple[list[Any], Callable[[], Perplexity]]:
    """:func:`perplexity` as the batches' calls for ``model`` (a runtime or a loaded module) and
    what gives the result once they have run: so one streamed pass can run them beside other calls."""
    from moelens.runtime.forward import runtime_device, whole_module
    from moelens.runtime.stream import Call

    device = runtime_device(model)
    lm = whole_module(model)
    streamed = lm is None
    seqs = [list(s) for s in sequences if len(s) >= 2]  # a one-token sequence predicts nothing
    plan = list(batches(seqs, batch_tokens))
    sums: list[tuple[float, int] | None] = [None] * len(plan)
    calls = []
    for b, rows in enumerate(plan):
        ids, mask = right_padded([seqs[i] for i in rows], pad_id, device)
        kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}

        def keep(output: Any, b: int = b, ids: torch.Tensor = ids, mask: torch.Tensor = mask) -> None:
            logits = output.logits[:, :-1].float()                                               # [R, T−1, V]
            check_logits(logits[mask[:, 1:].bool()], lm, "perplexity", input_ids=ids, attention_mask=mask, use_cache=False)
            logp = torch.log_softmax(logits, dim=-1)
            real = mask[:, 1:].bool()
            picked = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)                        # [R, T−1]
            sums[b] = (float(picked[real].double().sum()), int(real.sum()))
            if not streamed:
                report(progress, "perplexity", b + 1, len(plan))

        calls.append(Call(kwargs, keep=keep))

    def result() -> Perplexity:
        nll = 0.0
        count = 0
        for summed, n in sums:  # type: ignore[misc]  # every batch has run
            nll -= summed
            count += n
        return Perplexity(nll, count)

    return calls, result


__all__ = ["Perplexity", "perplexity", "perplexity_calls"]
