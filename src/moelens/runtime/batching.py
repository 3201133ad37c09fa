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
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    mask = torch.arange(width)[None, :] < lengths[:, None]  # [R, width]
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    # one tensor of every token, laid into the mask's True entries in row-major order (a loop of
    # small copies per row costs more than the forward pass for thousands of short rows)
    ids[mask] = torch.tensor([int(t) for r in rows for t in r], dtype=torch.long)
    return ids.to(device), mask.long().to(device)


__all__ = ["batches", "right_padded"]
