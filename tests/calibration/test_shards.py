"""Token shards: consecutive whole sequences, at most ``shard_tokens`` tokens each, from the tokens alone."""

from __future__ import annotations

from moelens.calibration.layer import token_shards


def test_shards_cover_every_sequence_once_in_order():
    sequences = [(1,) * n for n in (3, 4, 2, 9, 1, 1)]
    assert token_shards(sequences, None) == [(0, 6)]
    assert token_shards(sequences, 7) == [(0, 2), (2, 3), (3, 4), (4, 6)]  # 3+4 | 2 | 9 (longer: alone) | 1+1
    assert token_shards(sequences, 100) == [(0, 6)]
    assert token_shards(sequences, 1) == [(i, i + 1) for i in range(6)]
    assert token_shards([], 5) == [(0, 0)]
