"""Checkpoints with chosen router and expert weights, written with the real key names.

Used by the tests (planted alignment, F < d shapes) and by ``benchmarks/run.py`` (real-size
layers). Each (layer, expert) goes to its own safetensors shard, listed in
``model.safetensors.index.json`` as on the Hub, so writing holds one expert in memory at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

LAYOUTS = {
    "mixtral": {
        "architecture": "MixtralForCausalLM",
        "router": "model.layers.{L}.block_sparse_moe.gate.weight",
        "expert": "model.layers.{L}.block_sparse_moe.experts.{e}.{name}.weight",
        "names": {"gate": "w1", "up": "w3", "down": "w2"},
    },
    "qwen3_moe": {
        "architecture": "Qwen3MoeForCausalLM",
        "router": "model.layers.{L}.mlp.gate.weight",
        "expert": "model.layers.{L}.mlp.experts.{e}.{name}.weight",
        "names": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    },
}


def _config(family: str, n_layers: int, d: int, f: int, n_experts: int, top_k: int) -> dict:
    common = {
        "architectures": [LAYOUTS[family]["architecture"]], "model_type": family, "hidden_size": d,
        "num_hidden_layers": n_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 128, "num_experts_per_tok": top_k,
    }
    if family == "mixtral":
        return {**common, "intermediate_size": f, "num_local_experts": n_experts}
    return {**common, "intermediate_size": 4 * d, "moe_intermediate_size": f, "num_experts": n_experts,
            "decoder_sparse_step": 1, "mlp_only_layers": []}


def write_checkpoint(
    out: str | Path,
    family: str,
    n_layers: int,
    n_experts: int,
    d: int,
    f: int,
    router: Callable[[int], torch.Tensor],
    expert: Callable[[int, int, str], torch.Tensor],
    dtype: torch.dtype = torch.float32,
    top_k: int = 2,
) -> Path:
    """Write ``router(L)`` [E, d] and ``expert(L, e, role)`` ([F, d] for gate/up, [d, F] for
    down) for every layer and expert, cast to ``dtype``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    layout = LAYOUTS[family]
    weight_map: dict[str, str] = {}
    for L in range(n_layers):
        shard = f"layer{L:03d}-router.safetensors"
        name = layout["router"].format(L=L)
        save_file({name: router(L).to(dtype).contiguous()}, str(out / shard))
        weight_map[name] = shard
        for e in range(n_experts):
            shard = f"layer{L:03d}-expert{e:03d}.safetensors"
            tensors = {}
            for role, stored in layout["names"].items():
                t = expert(L, e, role).to(dtype).contiguous()
                want = (d, f) if role == "down" else (f, d)
                assert tuple(t.shape) == want, (role, tuple(t.shape), want)
                tensors[layout["expert"].format(L=L, e=e, name=stored)] = t
            save_file(tensors, str(out / shard))
            weight_map.update({k: shard for k in tensors})
    (out / "config.json").write_text(json.dumps(_config(family, n_layers, d, f, n_experts, top_k), indent=2))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return out


def write_from_tensors(out: str | Path, family: str, routers: list[torch.Tensor], experts: list[dict[str, torch.Tensor]], dtype: torch.dtype = torch.float32) -> Path:
    """Write layers given as tensors: ``routers[L]`` [E, d] and ``experts[L][role]`` [E, out, in]."""
    n_experts, d = routers[0].shape
    f = experts[0]["gate"].shape[1]
    return write_checkpoint(
        out, family, len(routers), int(n_experts), int(d), int(f),
        router=lambda L: routers[L], expert=lambda L, e, role: experts[L][role][e], dtype=dtype,
    )


def random_layers(n_layers: int, n_experts: int, d: int, f: int, seed: int = 0) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Gaussian routers and experts (float32), reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    routers = [torch.randn(n_experts, d, generator=g) for _ in range(n_layers)]
    experts = [
        {
            "gate": torch.randn(n_experts, f, d, generator=g),
            "up": torch.randn(n_experts, f, d, generator=g),
            "down": torch.randn(n_experts, d, f, generator=g),
        }
        for _ in range(n_layers)
    ]
    return routers, experts


def write_shape_variants(root: Path) -> dict[str, Path]:
    """Three random 2-layer Mixtral checkpoints (d = 32) that differ only in shape, for the
    commands' mismatch errors: ``base`` (4 experts, F = 48), ``experts5`` (5 experts) and
    ``ffn40`` (F = 40)."""
    g = torch.Generator().manual_seed(0)

    def write(name: str, n_experts: int = 4, f: int = 48) -> Path:
        return write_checkpoint(
            root / name, "mixtral", 2, n_experts, 32, f,
            router=lambda L: torch.randn(n_experts, 32, generator=g),
            expert=lambda L, e, role: torch.randn((32, f) if role == "down" else (f, 32), generator=g),
        )

    return {"base": write("base"), "experts5": write("experts5", n_experts=5), "ffn40": write("ffn40", f=40)}
