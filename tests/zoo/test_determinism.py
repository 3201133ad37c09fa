"""Same seed, same recipe, same machine: the same weights, bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from moelens import zoo


@pytest.mark.slow
def test_same_seed_gives_bit_identical_weights(small_zoo, tmp_path):
    # a separate directory, so the cache cannot answer for the second build
    again = zoo.build(out=tmp_path / "again", seed=0, small=True)
    assert again.cached is False
    for name in ("base", "tuned"):
        a = load_file(str(small_zoo.root / name / "model.safetensors"))
        b = load_file(str(again.root / name / "model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
            # compare raw bytes: torch.equal would call -0.0 and 0.0 equal
            assert a[key].contiguous().view(torch.uint8).equal(b[key].contiguous().view(torch.uint8)), key
        assert (small_zoo.root / name / "tokenizer.json").read_bytes() == (again.root / name / "tokenizer.json").read_bytes()
    for name in ("facts.jsonl", "calibration.txt"):
        assert (small_zoo.root / name).read_bytes() == (again.root / name).read_bytes()
    for phase in ("base", "tuned"):
        assert again.info[phase]["loss"] == small_zoo.info[phase]["loss"]
        assert again.info[phase]["recall"] == small_zoo.info[phase]["recall"]
