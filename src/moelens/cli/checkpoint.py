"""Commands about checkpoints: ``inspect``, ``tiny``, ``families``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from moelens.cli.app import app, command_help, console, fail, human_bytes, human_count


@app.command(help=command_help("inspect"))
def inspect(
    source: str = typer.Argument(..., metavar="MODEL", help="Checkpoint directory, or a repo id in the local Hugging Face cache."),
    revision: Optional[str] = typer.Option(None, help="Revision (branch, tag or commit) of a cached repo."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """``moelens inspect`` (its help: moelens.cli.commands)."""
    from rich.table import Table

    from moelens.checkpoint import open_model
    from moelens.ranges import compact_ranges

    model = open_model(source, revision)
    info = model.summary()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    table = Table(title=f"{model.name}", show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column()
    rows = [
        ("family", f"{info['family']} ({info['architecture']})"),
        ("layers", str(info["n_layers"])),
        ("MoE layers", compact_ranges(info["moe_layers"]) or "none (dense model)"),
        ("dense layers", compact_ranges(info["dense_layers"]) or "none"),
        ("experts E", str(info["n_experts"])),
        ("top-k", str(info["top_k"])),
        ("hidden size d", str(info["hidden_size"])),
        ("expert FFN F", str(info["expert_ffn"])),
        ("shared experts", str(info["shared_experts"])),
        ("expert layout", str(info["expert_layout"])),
        ("expert dtype", str(info["dtype"])),
        ("tensor dtypes", ", ".join(f"{k}×{v}" for k, v in sorted(info["dtypes"].items()))),
        ("parameters", f"{human_count(info['parameters_total'])} total, {human_count(info['parameters_experts'])} in routed experts"),
        ("size on disk", human_bytes(info["size_on_disk_bytes"])),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


@app.command(help=command_help("tiny"))
def tiny(
    family: str = typer.Argument(..., metavar="FAMILY", help="Family name, e.g. mixtral, qwen3_moe, gpt_oss (see `moelens families`)."),
    out: Path = typer.Option(..., "--out", help="Directory to write the checkpoint into."),
    layout: Optional[str] = typer.Option(None, help="On-disk layout (default: the family's first): per_expert or hub (published), fused (transformers v5), fp8, mxfp4, multimodal — see `moelens families`."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16."),
    sharded: bool = typer.Option(False, help="Split into several safetensors shards."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
) -> None:
    """``moelens tiny`` (its help: moelens.cli.commands)."""
    from moelens.checkpoint.registry import families
    from moelens.testing.tiny import DTYPES, TinySpec, build_tiny_checkpoint

    fams = families()
    if family not in fams:
        fail(f"unknown family {family!r}; known: {', '.join(fams)}")
    layouts = tuple(fams[family].tiny_layouts) + tuple(getattr(fams[family], "tiny_custom_layouts", ()))
    layout = layout or layouts[0]
    if dtype not in DTYPES:
        fail(f"unknown dtype {dtype!r}; tiny checkpoints are written in {' or '.join(DTYPES)}")
    if layout not in layouts:
        fail(f"{family} has no tiny {layout!r} layout; it has {', '.join(dict.fromkeys(layouts))}")
    path = build_tiny_checkpoint(TinySpec(family, layout, dtype, sharded), out, seed=seed)
    console.print(f"wrote tiny {family} ({layout}, {dtype}) to [bold]{path}[/]")


@app.command("families", help=command_help("families"))
def list_families() -> None:
    """``moelens families`` (its help: moelens.cli.commands)."""
    from rich.table import Table

    from moelens.checkpoint.registry import families

    table = Table("family", "architectures", "tiny layouts")
    for name, cls in families().items():
        layouts = dict.fromkeys(tuple(cls.tiny_layouts) + tuple(getattr(cls, "tiny_custom_layouts", ())))
        table.add_row(name, ", ".join(cls.architectures), ", ".join(layouts))
    console.print(table)
