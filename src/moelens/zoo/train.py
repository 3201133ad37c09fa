"""A small, deterministic training loop for the zoo's models.

Rows are built from pre-tokenised sentences: ``<bos>``, whole sentences drawn from a stream of
shuffled epochs (every sentence is seen once per epoch) while they fit, ``<eos>``, then right
padding that the loss ignores. A fixed number of steps, AdamW with a linear warm-up and a cosine
decay, gradient clipping. All randomness (initialisation aside, which the caller seeds) comes from one
``random.Random`` seeded here, so the same seed gives the same weights on the same machine.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moelens.progress import ProgressCallback, report


@dataclass(frozen=True)
class Schedule:
    """How long and how hard to train."""

    steps: int
    batch_rows: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.0
    clip_norm: float = 1.0

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        t = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass
class TrainLog:
    """Losses per step and time: ``loss`` is what was minimised, ``lm_loss`` (next-token
    cross-entropy) + ``router_aux_loss_coef`` × ``aux_loss`` (load balancing; top_k when
    perfectly balanced)."""

    loss: list[float] = field(default_factory=list)
    lm_loss: list[float] = field(default_factory=list)
    aux_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def final(self, window: int = 20) -> dict[str, float]:
        """Mean of the last ``window`` steps (one step's loss depends on its batch)."""
        def mean(values: list[float]) -> float:
            tail = values[-window:]
            return sum(tail) / len(tail) if tail else float("nan")

        return {
            "loss": mean(self.loss),
            "lm_loss": mean(self.lm_loss),
            "aux_loss": mean(self.aux_loss),
            "steps": len(self.loss),
            "seconds": round(self.seconds, 2),
        }


def sentence_stream(n: int, rng: random.Random) -> Iterator[int]:
    """Indices 0..n-1 in a fresh shuffled order each epoch, forever."""
    order = list(range(n))
    while True:
        rng.shuffle(order)
        yield from order


@dataclass
class RowSampler:
    """Batches of training rows from token-id sentences (``sentences[i]`` without specials).

    A row is ``<bos>``, then whole sentences from the stream while they fit in ``row_tokens``
    (at least one), then ``<eos>``: rows are nearly full, so little compute goes to padding, and
    a fact sentence is never cut in two."""

    sentences: Sequence[Sequence[int]]
    bos_id: int
    eos_id: int
    pad_id: int
    rng: random.Random
    row_tokens: int = 40

    def __post_init__(self) -> None:
        self._stream = sentence_stream(len(self.sentences), self.rng)
        self._pending: int | None = None

    def _next_sentence(self) -> int:
        if self._pending is not None:
            i, self._pending = self._pending, None
            return i
        return next(self._stream)

    def row(self) -> list[int]:
        ids = [self.bos_id]
        while True:
            i = self._next_sentence()
            if len(ids) > 1 and len(ids) + len(self.sentences[i]) + 1 > self.row_tokens:
                self._pending = i
                break
            ids.extend(self.sentences[i])
        ids.append(self.eos_id)
        return ids

    def batch(self, rows: int) -> dict[str, torch.Tensor]:
        seqs = [self.row() for _ in range(rows)]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        for r, s in enumerate(seqs):
            input_ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def train(
    model: Any, sampler: RowSampler, schedule: Schedule, progress: ProgressCallback | None = None,
    task: str = "training",
) -> TrainLog:
    """Train ``model`` in place for ``schedule.steps`` steps; report progress every few steps."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": schedule.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=schedule.lr, betas=(0.9, 0.98), eps=1e-8,
    )
    log = TrainLog()
    aux_coef = float(getattr(model.config, "router_aux_loss_coef", 0.0)) if getattr(model.config, "output_router_logits", False) else 0.0
    model.train()
    start = time.perf_counter()
    every = max(1, schedule.steps // 100)
    for step in range(schedule.steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step)
        out = model(**sampler.batch(schedule.batch_rows))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.clip_norm)
        optimizer.step()
        loss = float(out.loss.detach())
        aux = getattr(out, "aux_loss", None)
        aux = float(aux.detach()) if aux is not None else 0.0
        log.loss.append(loss)
        log.aux_loss.append(aux)
        log.lm_loss.append(loss - aux_coef * aux)
        if (step + 1) % every == 0 or step + 1 == schedule.steps:
            recent = log.loss[-every:]
            report(progress, task, step + 1, schedule.steps, f"loss {sum(recent) / len(recent):.3f}")
    log.seconds = time.perf_counter() - start
    model.eval()
    return log
