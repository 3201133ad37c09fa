"""Every zoo family and dtype writes a checkpoint that moelens and transformers both read.

A few training steps suffice here: the point is the files, not what the weights learned."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moelens import open_model, zoo


def _quick(family: str, dtype: str = "float32") -> zoo.Recipe:
    r = zoo.recipe_for(family, small=True, dtype=dtype)
    return replace(r, base=replace(r.base, steps=3, warmup_steps=1), tuned=replace(r.tuned, steps=3, warmup_steps=1), calibration_lines=5)


@pytest.mark.parametrize("family,dtype", [("qwen3_moe", "float32"), ("olmoe", "float32"), ("mixtral", "bfloat16")])
def test_family_and_dtype_round_trip(family, dtype, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    built = zoo.build(out=tmp_path / family, recipe=_quick(family, dtype), seed=1)
    assert built.info["family"] == family and built.info["dtype"] == dtype
    for path in (built.base, built.tuned):
        model = open_model(path)
        info = model.summary()
        assert info["family"] == family
        assert info["expert_layout"] == "per_expert"
        assert (info["n_experts"], info["top_k"]) == (8, 2)
        assert model.layer(0).expert(3).gate.dtype == getattr(torch, dtype)
        hf = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
        assert hf.dtype == getattr(torch, dtype)
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        logits = hf(**tok(built.fact_records()[0]["prompt"], return_tensors="pt")).logits
        assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()
