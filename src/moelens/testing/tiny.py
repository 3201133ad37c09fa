"""Tiny random checkpoints of every registered family, written by transformers itself.

Each family adapter provides ``tiny_config()`` (a transformers config of a small model) and
``tiny_layouts``. ``build_tiny_checkpoint`` instantiates the model with a fixed seed, optionally
casts it, and writes it with ``save_pretrained``: ``layout="per_expert"`` uses the published Hub
layout (``save_original_format=True``), ``layout="fused"`` the transformers v5 in-memory layout.
Families that are fused on disk whatever the option (GPT-OSS, Llama4, Granite, JetMoE, DBRX)
declare only ``"fused"``. A family may also override ``tiny_write(model, out, layout)`` for a
layout that transformers cannot write (FP8 or MXFP4 quantised files).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from moelens.safe_files import check_empty_output

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class TinySpec:
    """One tiny checkpoint to build: family, on-disk layout, dtype and whether to shard."""

    family: str
    layout: str = "per_expert"
    dtype: str = "float32"
    sharded: bool = False

    @property
    def id(self) -> str:
        return f"{self.family}-{self.layout}-{self.dtype}{'-sharded' if self.sharded else ''}"


def tiny_specs(families: Optional[list[str]] = None, dtypes: tuple[str, ...] = DTYPES, sharded: tuple[bool, ...] = (False, True)) -> Iterator[TinySpec]:
    """Every (family, layout, dtype, sharded) combination the families declare."""
    from moelens.checkpoint.registry import families as all_families

    for name, cls in all_families().items():
        if families is not None and name not in families:
            continue
        for layout in cls.tiny_layouts:
            for dtype in dtypes:
                for sh in sharded:
                    yield TinySpec(name, layout, dtype, sh)


def build_tiny_model(family: str, seed: int = 0) -> Any:
    """The transformers model (random init, fixed seed) of a family's tiny config; ``family`` may
    also name a forward-only causal LM (gpt2, gptj, gpt_neox, phi, gemma, falcon, opt)."""
    import torch
    from transformers import AutoModelForCausalLM

    from moelens.checkpoint.families.causal_lm import TINY_CAUSAL_LMS, tiny_causal_lm_config
    from moelens.checkpoint.registry import families

    if family in TINY_CAUSAL_LMS:  # forward-only families (GPT-2, OPT, ...): not registered
        cls, config = None, tiny_causal_lm_config(family)
    else:
        cls = families()[family]
        config = cls.tiny_config()
    torch.manual_seed(seed)
    model_cls = getattr(cls, "tiny_model_class", None)
    if model_cls is not None:
        model = model_cls()(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    # Random init leaves some tensors (norms, biases) at constants; perturb every parameter so a
    # reader that swaps or misorients two tensors cannot pass by accident.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def build_tiny_checkpoint(spec: TinySpec, out: Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint of ``spec`` into ``out`` (created if missing) and return ``out``.

    Raises :class:`~moelens.errors.OutputExistsError`, before anything is written, if ``out``
    exists and is not an empty directory."""
    out = Path(out)
    check_empty_output(out)

    import torch
    from transformers.utils import logging as hf_logging

    from moelens.checkpoint.registry import families

    hf_logging.disable_progress_bar()  # a tiny write needs no "Writing model shards" bar
    out.mkdir(parents=True, exist_ok=True)
    cls = families().get(spec.family)
    model = build_tiny_model(spec.family, seed)
    if spec.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    writer = getattr(cls, "tiny_write", None)
    if writer is not None and spec.layout in getattr(cls, "tiny_custom_layouts", ()):
        writer(model, out, spec)
        return out
    kwargs: dict[str, Any] = {"save_original_format": spec.layout != "fused"}
    if spec.sharded:
        kwargs["max_shard_size"] = "20KB"
    model.save_pretrained(out, **kwargs)
    (out / "moelens_tiny.json").write_text(json.dumps({"family": spec.family, "layout": spec.layout, "dtype": spec.dtype, "sharded": spec.sharded, "seed": seed}))
    return out
