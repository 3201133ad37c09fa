"""Load a checkpoint for forward passes with transformers, offline.

The same path or repo id that :func:`moelens.open_model` reads lazily is resolved here (local
directory or local Hugging Face cache; nothing is downloaded) and handed to
``AutoModelForCausalLM``. The model is returned in eval mode on the requested device.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from moelens.checkpoint.source import resolve_source
from moelens.errors import ConfigError, SourceNotFoundError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"``/``"bf16"``/``torch.bfloat16`` -> ``torch.bfloat16``; ``None`` stays ``None``
    (the checkpoint's own dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of {', '.join(sorted(DTYPES))}") from None


def auto_dtype(choice: str, device: torch.device) -> str | None:
    """The dtype to load a model in for an analysis's ``dtype`` option: ``auto`` is float32 on the
    CPU (exact comparisons, no slow half-precision kernels) and the checkpoint's own (None)
    elsewhere; any other choice as given."""
    if choice == "auto":
        return "float32" if device.type == "cpu" else None
    return choice


def load_causal_lm(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
    revision: str | None = None,
) -> Any:
    """A ``transformers`` causal LM in eval mode on ``device``.

    ``dtype=None`` keeps the dtype stored in the checkpoint; ``"float32"`` is the safe choice for
    exact comparisons on CPU. A parameter holding NaN or inf is refused by name
    (:class:`~moelens.errors.CheckpointFormatError`)."""
    from transformers import AutoModelForCausalLM

    directory = resolve_source(path, revision)
    torch_dtype = resolve_dtype(dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype if torch_dtype is not None else "auto"}
    from transformers.utils import logging as hf_logging

    # Loading is quiet: moelens reports its own progress, and an analysis never prints.
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, **kwargs)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    from moelens.runtime.checks import check_parameters_finite

    check_parameters_finite(model, directory)  # NaN weights: the tensor named now, not NaN tables later
    return model.to(device).eval()


def load_tokenizer(path: str | os.PathLike[str], revision: str | None = None) -> Any:
    """The checkpoint's tokenizer via ``AutoTokenizer``, offline."""
    from transformers import AutoTokenizer

    directory = resolve_source(path, revision)
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise SourceNotFoundError(f"{directory} has no tokenizer files (tokenizer.json or tokenizer.model); copy the tokenizer beside the weights")
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
