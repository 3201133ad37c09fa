"""Checks of what a forward pass reads, made before anything is written, and of what it computes.

A NaN or inf in one weight turns every logit downstream into NaN: a table of NaN (or of whatever
argmax makes of them) would look like a result. So the forward-pass analyses refuse such a
checkpoint up front, naming the tensor (:func:`check_checkpoint_finite` reads the safetensors
files one tensor at a time; :func:`check_parameters_finite` checks a loaded model's parameters),
and name the first decoder layer whose output is not finite when the logits of a batch are not
(:func:`check_logits`; with finite weights that is an overflow, typically of float16).

A tokenizer whose ids reach past the embedding's rows would make the embedding lookup fail with an
IndexError deep inside torch: :func:`check_vocabulary` compares the two when both are opened.
A prompt longer than the model's positions is refused with its line (:func:`max_positions`,
:data:`MAX_TOKENS` where the config names no bound), so no forward pass runs for minutes on one
giant input and Ctrl-C is always seconds away.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from moelens.errors import CheckpointFormatError, ConfigError

#: The longest input accepted from a model whose config names no number of positions.
MAX_TOKENS = 32768

#: Bytes read through a checkpoint's memory maps before they are closed (bounds resident memory).
RELEASE_BYTES = 256 << 20

_CORRUPT = "the checkpoint is corrupt or was saved mid-divergence; use an intact copy"


def _count_bad(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum()) if t.is_floating_point() and not bool(torch.isfinite(t).all()) else 0


def check_checkpoint_finite(model: Any) -> None:
    """Raise :class:`CheckpointFormatError` naming the first tensor of ``model`` (an opened
    :class:`~moelens.checkpoint.MoEModel`) that holds NaN or inf. Reads one tensor at a time from
    the memory-mapped files, so the cost is one pass over the weights and the memory one tensor."""
    store = model.store
    read = 0
    try:
        for name in sorted(store.infos):
            bad = _count_bad(store.read(name))
            if bad:
                raise CheckpointFormatError(f"tensor {name!r} of {model.path} holds {bad} NaN/inf values; {_CORRUPT}")
            read += store.infos[name].nbytes
            if read > RELEASE_BYTES:  # pages read through the memory maps would otherwise stay resident
                store.release()
                read = 0
    finally:
        store.release()


def check_parameters_finite(lm: Any, source: Any) -> None:
    """Raise :class:`CheckpointFormatError` naming the first parameter of a loaded model (its
    ``named_parameters`` name, the checkpoint tensor's name in transformers' layout) that holds
    NaN or inf."""
    with torch.no_grad():
        for name, p in lm.named_parameters():
            bad = _count_bad(p)
            if bad:
                raise CheckpointFormatError(f"weight {name!r} (as transformers names it) of {source} holds {bad} NaN/inf values; {_CORRUPT}")


def text_config(config: Any) -> Mapping[str, Any]:
    """The language-model part of a config (a dict or a transformers config)."""
    if not isinstance(config, Mapping):
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        config = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    nested = config.get("text_config")
    return nested if isinstance(nested, Mapping) else config


def max_positions(config: Any) -> int:
    """The longest input, in tokens, a model takes: its ``max_position_embeddings`` (or
    ``n_positions``), else :data:`MAX_TOKENS`."""
    cfg = text_config(config)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return MAX_TOKENS


def embedding_rows(config: Any) -> int | None:
    """Rows of the input embedding, as the config states them (``vocab_size``)."""
    value = text_config(config).get("vocab_size")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_vocabulary(tokenizer: Any, rows: int | None, model_name: Any) -> None:
    """Every id ``tokenizer`` can produce (``len(tokenizer)``, added tokens included) must index a
    row of the model's embedding."""
    if rows is None or tokenizer is None:
        return
    size = len(tokenizer)
    if size > rows:
        raise ConfigError(
            f"the tokenizer of {model_name} has {size} tokens but the model's embedding only {rows} rows: "
            "token ids from the tokenizer would index past it; use the tokenizer saved with these weights"
        )


def check_length(n_tokens: int, limit: int, where: str) -> None:
    """One input of ``n_tokens`` tokens fits a model of ``limit`` positions."""
    if n_tokens > limit:
        raise ConfigError(f"{where}: the prompt has {n_tokens} tokens, more than the model's {limit} positions; shorten it")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' log messages and warnings while moelens tokenises or loads: what they
    would say (a sequence longer than the model's maximum, ...) moelens checks and reports itself,
    on one line. Only transformers' own logger is lowered, and only for the duration."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"transformers(\.|$)")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _decoder_layers(lm: Any) -> list[torch.nn.Module]:
    """The decoder layers of a loaded causal LM: its longest ``ModuleList``."""
    best: list[torch.nn.Module] = []
    for module in lm.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(best):
            best = list(module)
    return best


def first_nonfinite_layer(lm: Any, **inputs: Any) -> int | None:
    """Index of the first decoder layer whose output holds NaN or inf for ``inputs`` (one forward
    pass with a hook on every layer); -1 for the embedding; None when every layer's output is finite."""
    found: list[int] = []

    def watch(index: int):
        def hook(module: Any, args: Any, output: Any) -> None:
            t = output[0] if isinstance(output, (tuple, list)) else output
            if not found and isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                found.append(index)
        return hook

    handles = []
    embed = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    if embed is not None:
        handles.append(embed.register_forward_hook(watch(-1)))
    handles += [layer.register_forward_hook(watch(i)) for i, layer in enumerate(_decoder_layers(lm))]
    try:
        with torch.no_grad():
            lm(**inputs)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def check_logits(logits: torch.Tensor, lm: Any, what: str, **inputs: Any) -> None:
    """Raise :class:`ConfigError` when ``logits`` hold NaN or inf, naming the first layer whose
    output is not finite (found by re-running ``inputs`` with hooks). The weights were checked
    finite when loaded, so this is an overflow of the forward dtype. ``lm=None`` (a layer-streamed
    model, whose layers are not all there to re-run) names no layer."""
    if bool(torch.isfinite(logits).all()):
        return
    if lm is None:
        raise ConfigError(f"{what}: the logits hold NaN/inf (the weights are finite, so the forward dtype overflowed); "
                          "run with --dtype float32")
    layer = first_nonfinite_layer(lm, **inputs)
    dtype = str(next(lm.parameters()).dtype).replace("torch.", "")
    where = ("the embedding output" if layer == -1 else f"the output of decoder layer {layer}") if layer is not None else "the final norm or LM head"
    fix = ("its weights are too large for float32 arithmetic: the checkpoint is likely damaged" if dtype == "float32"
           else "run with --dtype float32")
    raise ConfigError(f"{what}: the logits hold NaN/inf; {where} is the first that is not finite (the weights are finite, "
                      f"so {dtype} overflowed); {fix}")


__all__ = [
    "MAX_TOKENS", "check_checkpoint_finite", "check_length", "check_logits", "check_parameters_finite", "check_vocabulary",
    "embedding_rows", "first_nonfinite_layer", "max_positions", "quiet_transformers", "text_config",
]
