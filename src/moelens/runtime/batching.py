"""Batches of token-id sequences for forward passes: grouped under a token budget, right-padded.

A batch of R sequences right-padded to the longest, T, costs R·T tokens of compute;
:func:`batches` groups consecutive sequences while that product stays within the budget.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def batches(sequences: Sequence[Sequence[int]], batch_tokens: int) -> Iterator[list[int]]:
    """Indices of consecutive sequences whose right-padded batch has ≤ ``batch_tokens`` tokens
    (a longer sequence still gets a batch of its own)."""
    rows: list[int] = []
    width = 0
    for i, s in enumerate(sequences):
        w = max(width, len(s))
        if rows and w * (len(rows) + 1) > batch_tokens:
            yield rows
            rows, w = [], len(s)
        rows.append(i)
        width = w
    if rows:
        yield rows


def right_padded(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device, width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` [R, width] of ``rows`` right-padded with ``pad_id`` to
    ``width`` (default: the longest row), on ``device``."""
    width = max(len(r) for r in rows) if width is None else width
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


__all__ = ["batches", "right_padded"]
