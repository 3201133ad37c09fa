"""Loading checkpoints for forward passes."""

from __future__ import annotations

import pytest
import torch

from moelens.errors import ConfigError, SourceNotFoundError
from moelens.runtime import load_causal_lm, load_tokenizer, resolve_dtype
from moelens.runtime.load import auto_dtype


def test_load_causal_lm_in_eval_mode_and_requested_dtype(small_zoo):
    model = load_causal_lm(small_zoo.base)
    assert not model.training
    assert model.dtype == torch.float32
    assert load_causal_lm(small_zoo.base, dtype="bf16").dtype == torch.bfloat16


def test_resolve_dtype():
    assert resolve_dtype(None) is None
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ConfigError, match="unknown dtype"):
        resolve_dtype("float8")


def test_auto_dtype_is_float32_on_the_cpu_and_the_checkpoints_own_elsewhere():
    assert auto_dtype("auto", torch.device("cpu")) == "float32"
    assert auto_dtype("auto", torch.device("meta")) is None
    assert auto_dtype("bfloat16", torch.device("cpu")) == "bfloat16"


def test_missing_checkpoint_and_missing_tokenizer_are_one_line_errors(tmp_path, tiny_checkpoint):
    with pytest.raises(SourceNotFoundError):
        load_causal_lm(tmp_path / "nowhere")
    with pytest.raises(SourceNotFoundError, match="no tokenizer files"):
        load_tokenizer(tiny_checkpoint("mixtral"))
