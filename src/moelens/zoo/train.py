"""A small, deterministic training loop for the zoo's models.

Training text is :class:`Sentence` s (token ids without specials, the subject a fact sentence
is about, the index of its answer token) in :class:`Group` s, each with a share: an epoch holds
``round(share × len(group))`` sentences of every group, drawn from that group's own stream of
shuffled passes (so a share below one still shows every sentence in turn, and a share of two
shows each twice), then shuffled together. A row is ``<bos>``, whole sentences while they fit,
``<eos>``, then right padding that the loss ignores.

The objective is next-token cross-entropy in which a fact's answer token (the target word of
a plain sentence, the answer of a question) weighs ``answer_weight`` times as much as any other
token, plus ``router_aux_loss_coef`` × the router's load-balancing loss. The answer is the one
token of a fact sentence that only memorisation can predict; the rest are the template, which is
learnt in a few steps, and the subject, whose choice is noise. Up-weighting the answer puts most
of the gradient on what the zoo is for and cuts the steps to memorise the facts about threefold.

A :class:`Schedule` may start with a curriculum: stages that train on the facts of a growing
share of the subjects (shuffled once per phase) before all of them. Facts about many subjects
are learnt only after a plateau during which the model learns to route a subject's identity to
the answer position; on a few subjects that circuit forms in tens of steps, and it then carries
over to the rest. Without it the default zoo needs three times the steps for the same recall.

A :class:`SubjectReading` decides which of a subject's tokens the tokens after it may attend to
while training: none of them in the first ``hidden_layers`` layers, and in the layers after, in
``last_token_share`` of the rows, only the subject's last token (in the other rows all of them).
A model trained so must gather what it knows about a subject at the subject's last token before
any later token can read it, and the answer's position reads it in the upper layers: the
layered recall of a large language model (Meng et al. 2022; Geva et al. 2023), put where the
recipe says, so that the interventions that look for it have a known answer. Only training is
masked: the saved model is a plain model of its family, run without any mask; the share below
one teaches it that seeing the subject's other tokens in the upper layers changes nothing.

AdamW with a linear warm-up, then either a cosine decay or (``decay_steps``) a constant rate and
a linear decay over the last steps; gradient clipping. All randomness (initialisation aside,
which the caller seeds) comes from the ``random.Random`` given, so the same seed gives the same
weights on the same machine.
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
    """How long and how hard to train.

    The learning rate rises linearly over ``warmup_steps``; then, with ``decay_steps == 0``, it
    follows a cosine from ``lr`` to ``min_lr_ratio × lr`` at the last step, else it stays at
    ``lr`` and falls linearly to ``min_lr_ratio × lr`` over the last ``decay_steps`` steps.
    ``curriculum`` is a tuple of ``(subject_share, steps)`` stages trained before the whole
    corpus (their steps count in ``steps``)."""

    steps: int
    batch_rows: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    decay_steps: int = 0
    beta2: float = 0.98
    curriculum: tuple[tuple[float, int], ...] = ()

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.decay_steps:
            left = self.steps - step  # decay_steps .. 1 over the decay
            if left > self.decay_steps:
                return self.lr
            return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * left / self.decay_steps)
        t = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass(frozen=True)
class SubjectReading:
    """Which of a subject's tokens later tokens may attend to in training (see the module's
    docstring): none in layers ``[0, hidden_layers)``; in the layers after, in
    ``last_token_share`` of the rows, only the last. The default changes nothing."""

    hidden_layers: int = 0
    last_token_share: float = 0.0

    def __post_init__(self) -> None:
        if self.hidden_layers < 0 or not 0.0 <= self.last_token_share <= 1.0:
            raise ValueError(f"subject reading needs hidden_layers ≥ 0 and a share in [0, 1], got {self}")

    @property
    def masks(self) -> bool:
        return self.hidden_layers > 0 or self.last_token_share > 0


@dataclass
class TrainLog:
    """Losses per step and time: ``loss`` is what was minimised (answer-weighted cross-entropy
    + ``router_aux_loss_coef`` × ``aux_loss``), ``lm_loss`` the plain next-token cross-entropy
    (every token alike), ``aux_loss`` the load-balancing loss (top_k when perfectly balanced)."""

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


@dataclass(frozen=True)
class Sentence:
    """One training sentence: token ids without specials; for a fact, its ``subject`` and the
    index in ``ids`` of its ``answer`` token (None for filler); ``subject_span`` the positions
    ``[start, end)`` in ``ids`` of the tokens of the entity it is about (None: none)."""

    ids: tuple[int, ...]
    subject: str | None = None
    answer: int | None = None
    subject_span: tuple[int, int] | None = None


@dataclass(frozen=True)
class Group:
    """Sentences that an epoch draws ``round(share × len(sentences))`` of."""

    sentences: tuple[Sentence, ...]
    share: float = 1.0


def sentence_stream(n: int, rng: random.Random) -> Iterator[int]:
    """Indices 0..n-1 in a fresh shuffled order each pass, forever."""
    order = list(range(n))
    while True:
        rng.shuffle(order)
        yield from order


def mixture_stream(groups: Sequence[Group], rng: random.Random) -> Iterator[Sentence]:
    """Sentences epoch after epoch: each epoch takes ``round(share × len)`` sentences from every
    group's own stream of shuffled passes and shuffles them together."""
    streams = [sentence_stream(len(g.sentences), rng) for g in groups]
    counts = [round(g.share * len(g.sentences)) for g in groups]
    if sum(counts) == 0:
        raise ValueError("the training mixture is empty")
    while True:
        epoch = [g.sentences[next(s)] for g, s, c in zip(groups, streams, counts) for _ in range(c)]
        rng.shuffle(epoch)
        yield from epoch


class RowSampler:
    """Batches of training rows from a mixture of sentence groups.

    A row is ``<bos>``, whole sentences, ``<eos>``, at most ``row_tokens`` long (a sentence
    that alone is longer gets a row of its own): a fact sentence is never cut in two. The row
    takes the oldest of the next ``lookahead`` sentences of the stream first, then any of them
    that still fits, oldest first, so rows come out nearly full (padding is compute spent on
    nothing) while every sentence waits at most a row or two. ``batch`` also returns each
    label's loss ``weights``: ``answer_weight`` on answer tokens, 1 on other tokens, 0 on
    padding; and, when ``reading`` masks, the (query, key) pairs its attention bars
    (:func:`subject_bars`)."""

    def __init__(
        self, groups: Sequence[Group], bos_id: int, eos_id: int, pad_id: int, rng: random.Random,
        row_tokens: int = 40, answer_weight: float = 1.0, lookahead: int = 8,
        reading: SubjectReading = SubjectReading(),
    ) -> None:
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.row_tokens = row_tokens
        self.answer_weight = answer_weight
        self.lookahead = lookahead
        self.reading = reading
        self._rng = rng
        self._stream = mixture_stream(groups, rng)
        self._waiting: list[Sentence] = []

    def row(self) -> tuple[list[int], list[int]]:
        """Token ids of one row and the positions of its answer tokens."""
        ids, answers, _ = self._row()
        return ids, answers

    def _row(self) -> tuple[list[int], list[int], list[tuple[int, int]]]:
        """Token ids of one row, the positions of its answer tokens and its subjects' spans."""
        ids, answers, spans = [self.bos_id], [], []
        while True:
            while len(self._waiting) < self.lookahead:
                self._waiting.append(next(self._stream))
            room = self.row_tokens - len(ids) - 1  # keep a place for <eos>
            pick = next((i for i, s in enumerate(self._waiting) if len(s.ids) <= room), None)
            if pick is None:
                if len(ids) > 1:
                    break
                pick = 0
            s = self._waiting.pop(pick)
            if s.answer is not None:
                answers.append(len(ids) + s.answer)
            if s.subject_span is not None:
                spans.append((len(ids) + s.subject_span[0], len(ids) + s.subject_span[1]))
            ids.extend(s.ids)
        ids.append(self.eos_id)
        return ids, answers, spans

    def batch(self, rows: int) -> dict[str, torch.Tensor]:
        built = [self._row() for _ in range(rows)]
        width = max(len(ids) for ids, _, _ in built)
        # padded Python lists, then one tensor each (a tensor per row costs more than the row)
        ids_rows, mask_rows, weight_rows = [], [], []
        for ids, answers, _ in built:
            pad = width - len(ids)
            ids_rows.append(ids + [self.pad_id] * pad)
            mask_rows.append([1] * len(ids) + [0] * pad)
            w = [1.0] * len(ids) + [0.0] * pad
            for a in answers:
                w[a] = self.answer_weight
            weight_rows.append(w)
        input_ids = torch.tensor(ids_rows, dtype=torch.long)
        mask = torch.tensor(mask_rows, dtype=torch.long)
        weights = torch.tensor(weight_rows, dtype=torch.float32)
        labels = input_ids.masked_fill(mask == 0, -100)
        out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "weights": weights}
        if self.reading.masks:
            last_only = [self._rng.random() < self.reading.last_token_share for _ in built]
            out["subject_hidden"], out["subject_last_only"] = subject_bars([spans for _, _, spans in built], last_only, width)
        return out


def subject_bars(spans: Sequence[Sequence[tuple[int, int]]], last_only: Sequence[bool], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two [R, T, T] boolean (query, key) masks of what later tokens may not see of a subject
    whose tokens are ``[start, end)`` in row r: ``hidden`` bars every query q ≥ end from keys
    start … end − 1; ``last_only`` bars them from keys start … end − 2 (all but the last), in the
    rows where ``last_only[r]``, and nothing elsewhere."""
    hidden = torch.zeros(len(spans), width, width, dtype=torch.bool)
    late = torch.zeros_like(hidden)
    for r, (row_spans, only) in enumerate(zip(spans, last_only)):
        for start, end in row_spans:
            hidden[r, end:, start:end] = True
            if only:
                late[r, end:, start:end - 1] = True
    return hidden, late


class SubjectMasks:
    """Attention pre-hooks that bar what :class:`SubjectReading` hides, in every decoder layer
    of ``model`` while installed (``with SubjectMasks(model, reading) as masks``): the current
    batch's ``subject_hidden`` in the first ``hidden_layers`` layers, ``subject_last_only`` in the
    others. ``use(batch)`` points them at a batch before its forward pass."""

    def __init__(self, model: Any, reading: SubjectReading) -> None:
        from moelens.runtime.architecture import describe

        self.reading = reading
        self.attention = [p.attention for p in describe(model).layers] if reading.masks else []
        if any(a is None for a in self.attention):
            raise ValueError("subject reading needs self-attention in every decoder layer")
        self._batch: dict[str, torch.Tensor] | None = None
        self._handles: list[Any] = []

    def use(self, batch: dict[str, torch.Tensor]) -> None:
        self._batch = batch

    def _hook(self, layer: int) -> Any:
        from moelens.runtime.interventions import barred_mask

        key = "subject_hidden" if layer < self.reading.hidden_layers else "subject_last_only"

        def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> Any:
            batch = self._batch
            if batch is None or key not in batch:
                return None
            kwargs["attention_mask"] = barred_mask(kwargs.get("attention_mask"), batch["attention_mask"], batch[key])
            return args, kwargs

        return hook

    def __enter__(self) -> SubjectMasks:
        if self.reading.masks:
            self._handles = [a.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, a in enumerate(self.attention)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._batch = [], None


class Curriculum:
    """The row samplers of a training phase: one per curriculum stage, then the whole mixture.

    Stage ``(share, steps)`` keeps the fact sentences of the first ``share`` of the subjects (in
    an order shuffled by ``rng``) and ``share`` of each group's sentences without a subject, so
    facts and filler keep their proportions."""

    def __init__(
        self, groups: Sequence[Group], stages: Sequence[tuple[float, int]], bos_id: int, eos_id: int,
        pad_id: int, rng: random.Random, row_tokens: int = 40, answer_weight: float = 1.0,
        reading: SubjectReading = SubjectReading(),
    ) -> None:
        self.reading = reading

        def sampler(part: Sequence[Group]) -> RowSampler:
            return RowSampler(part, bos_id, eos_id, pad_id, rng, row_tokens=row_tokens, answer_weight=answer_weight, reading=reading)

        subjects = sorted({s.subject for g in groups for s in g.sentences if s.subject is not None})
        rng.shuffle(subjects)
        self.stages: list[tuple[int, RowSampler]] = []
        end = 0
        for share, steps in stages:
            if not 0 < share <= 1 or steps < 1:
                raise ValueError(f"a curriculum stage needs a subject share in (0, 1] and at least one step, got ({share}, {steps})")
            keep = set(subjects[:max(1, round(share * len(subjects)))])
            part = []
            for g in groups:
                facts = tuple(s for s in g.sentences if s.subject in keep)
                other = tuple(s for s in g.sentences if s.subject is None)
                part += [Group(facts, g.share), Group(other, g.share * share)]
            end += steps
            self.stages.append((end, sampler(part)))
        self.full = sampler(groups)

    def batch(self, step: int, rows: int) -> dict[str, torch.Tensor]:
        for end, stage in self.stages:
            if step < end:
                return stage.batch(rows)
        return self.full.batch(rows)


def _objective(model: Any, batch: dict[str, torch.Tensor], aux_coef: float) -> tuple[torch.Tensor, float, float]:
    """(answer-weighted cross-entropy + ``aux_coef`` × aux loss, plain cross-entropy, aux loss)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1].float()
    labels, weights = batch["labels"][:, 1:], batch["weights"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none", ignore_index=-100)
    weights = weights.reshape(-1)
    loss = (ce * weights).sum() / weights.sum()
    aux = getattr(out, "aux_loss", None)
    if aux is not None and aux_coef:
        loss = loss + aux_coef * aux
    lm = float(ce.detach().sum()) / int((labels != -100).sum())
    return loss, lm, float(aux.detach()) if aux is not None else 0.0


def make_optimizer(model: Any, schedule: Schedule, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameters: group 0 the matrices, with weight decay; group 1 the
    norms and biases, without. ``fused``: one kernel per parameter doing the whole update
    (moments, bias correction, step) in one pass over memory; else ``foreach``, a few
    multi-tensor kernels per step (the same update up to rounding)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": schedule.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=schedule.lr, betas=(0.9, schedule.beta2), eps=1e-8, **({"fused": True} if fused else {"foreach": True}),
    )


def train(
    model: Any, data: Curriculum, schedule: Schedule, progress: ProgressCallback | None = None,
    task: str = "training", optimizer: torch.optim.AdamW | None = None, experts: str | None = None,
) -> tuple[TrainLog, torch.optim.AdamW]:
    """Train ``model`` in place for ``schedule.steps`` steps; report progress every few steps.

    ``optimizer`` continues an earlier phase's AdamW (its moment estimates) under this
    schedule's learning rates, betas and weight decay; without it a fresh one starts.
    ``experts`` names the experts implementation to train with (see
    :mod:`moelens.zoo.experts`; the model's own is restored afterwards), None keeps the
    model's. Returns the log and the optimizer."""
    if experts is None:
        return _train(model, data, schedule, progress, task, optimizer)
    from moelens.zoo.experts import training_experts

    with training_experts(model, experts):
        return _train(model, data, schedule, progress, task, optimizer)


def _train(
    model: Any, data: Curriculum, schedule: Schedule, progress: ProgressCallback | None, task: str,
    optimizer: torch.optim.AdamW | None,
) -> tuple[TrainLog, torch.optim.AdamW]:
    if optimizer is None:
        optimizer = make_optimizer(model, schedule)
    else:
        for group in optimizer.param_groups:
            group["betas"] = (0.9, schedule.beta2)
        optimizer.param_groups[0]["weight_decay"] = schedule.weight_decay  # the matrices (make_optimizer)
    log = TrainLog()
    aux_coef = float(getattr(model.config, "router_aux_loss_coef", 0.0)) if getattr(model.config, "output_router_logits", False) else 0.0
    model.train()
    start = time.perf_counter()
    every = max(1, schedule.steps // 100)
    with SubjectMasks(model, getattr(data, "reading", SubjectReading())) as masks:
        for step in range(schedule.steps):
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr_at(step)
            batch = data.batch(step, schedule.batch_rows)
            masks.use(batch)
            loss, lm, aux = _objective(model, batch, aux_coef)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.clip_norm, foreach=True)
            optimizer.step()
            log.loss.append(float(loss.detach()))
            log.lm_loss.append(lm)
            log.aux_loss.append(aux)
            if (step + 1) % every == 0 or step + 1 == schedule.steps:
                recent = log.loss[-every:]
                report(progress, task, step + 1, schedule.steps, f"loss {sum(recent) / len(recent):.3f}")
    log.seconds = time.perf_counter() - start
    model.eval()
    return log, optimizer
