"""``zoo build``: the tiny trained models."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from moelens.cli.app import app, command_help, console, progress_bar

zoo_app = typer.Typer(help=command_help("zoo"), no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("build")
def zoo_build(
    out: Optional[Path] = typer.Option(None, "--out", help="Zoo directory (default: $MOELENS_CACHE/zoo/<family>-<seed>[-small][-bfloat16], else ~/.cache/moelens/zoo/…)."),
    seed: int = typer.Option(0, help="Seed of the world, the initialisation and the data order."),
    family: str = typer.Option("mixtral", help="Model family: mixtral, qwen3_moe or olmoe."),
    small: bool = typer.Option(False, "--small", help="The small recipe (2 layers, under 200 facts, seconds to build; for tests)."),
    dtype: str = typer.Option("float32", help="dtype of the saved weights: float32 or bfloat16."),
    threads: int = typer.Option(1, help="CPU threads for training (part of the recipe: the weights depend on it)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the directory already holds this zoo."),
) -> None:
    """Train the zoo's base and tuned models (or find them built) and print the paths written."""
    from moelens import zoo

    with progress_bar() as callback:
        built = zoo.build(out=out, seed=seed, family=family, small=small, dtype=dtype, threads=threads, force=force, progress=callback)
    info = built.info
    state = "found in cache" if built.cached else f"built in {info['seconds']:.0f} s"
    console.print(
        f"zoo {info['family']} seed {info['seed']}{' (small)' if info['recipe'].get('small') else ''}: {state}; "
        f"{info['sizes']['facts']} facts; recall base {info['base']['recall']:.3f}, tuned {info['tuned']['recall']:.3f} "
        f"(questions), {info['tuned']['recall_plain']:.3f} (plain prompts)",
        highlight=False, soft_wrap=True,
    )
    # one "name  path" line each, never wrapped, so scripts can read them
    for name, path in built.paths().items():
        console.print(f"[bold cyan]{name:<12}[/] {escape(str(path))}", highlight=False, soft_wrap=True)
