"""``open_model``: from a path or repo id to an :class:`~moelens.checkpoint.model.MoEModel`."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Optional

from moelens.checkpoint.registry import family_for_config
from moelens.checkpoint.source import resolve_source
from moelens.errors import CheckpointFormatError

if TYPE_CHECKING:
    from moelens.checkpoint.model import MoEModel


def read_config(path) -> dict:
    cfg_path = path / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except UnicodeDecodeError:
        raise CheckpointFormatError(f"{cfg_path} is not text (not UTF-8); it is damaged, re-download it") from None
    except json.JSONDecodeError as exc:
        raise CheckpointFormatError(f"{cfg_path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(config, dict):
        raise CheckpointFormatError(f"{cfg_path} is not a JSON object")
    # Multimodal wrappers (Llama4) keep the language model's settings under text_config; the
    # family adapter reads them from there, so the config is returned whole.
    return config


def _check_config(adapter, cfg_path) -> None:
    """Fail at open, naming the key, when config.json lacks what the family reads to know the
    model's shape; otherwise a KeyError would surface later, as a traceback."""
    try:
        adapter.n_layers()
        adapter.hidden_size()
        adapter.moe_layer_indices()
    except KeyError as exc:
        raise CheckpointFormatError(
            f"{cfg_path} has no {exc.args[0]!r}, which a {adapter.name} config needs; the file is damaged or not this family's"
        ) from None
    except (TypeError, ValueError) as exc:
        raise CheckpointFormatError(f"{cfg_path} holds a value a {adapter.name} config cannot use ({exc}); the file is damaged") from None


def open_model(source: str | os.PathLike[str], revision: Optional[str] = None) -> MoEModel:
    """Open a checkpoint for lazy reading.

    ``source`` is a local directory holding ``config.json`` and safetensors files, or a repo id
    (``"mistralai/Mixtral-8x7B-v0.1"``) already in the local Hugging Face cache; nothing is
    downloaded. Reads ``config.json``, the safetensors index and file headers, nothing else.

    >>> model = open_model("path/to/checkpoint")
    >>> model.family, model.n_experts, model.layer(0).router().weight.shape
    """
    path = resolve_source(source, revision)
    # torch only once the path is known to exist: a mistyped path is reported at once
    from moelens.checkpoint.model import MoEModel
    from moelens.checkpoint.store import TensorStore

    config = read_config(path)
    family_cls = family_for_config(config)
    store = TensorStore(path)
    adapter = family_cls(config, store)
    _check_config(adapter, path / "config.json")
    return MoEModel(path=path, source=str(source), config=config, store=store, family_adapter=adapter, revision=revision)
