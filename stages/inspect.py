"""`replaykd views`: a PNG grid of replayed views across epochs, to check a recipe by eye."""
from __future__ import annotations

from pathlib import Path

import typer

from pipeline.errors import ReplayKDError
from pipeline.grid import view_grid
from pipeline.io import atomic_path
from pipeline.loader import ReplayViews
from pipeline.manifest import Manifest
from pipeline.recipe import Recipe


def parse_epochs(spec: str) -> list[int]:
    """'0-3' -> [0, 1, 2, 3]; '0,2,5' -> [0, 2, 5]; '4' -> [4]."""
    try:
        out: list[int] = []
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ReplayKDError(f"cannot read epochs {spec!r}: use e.g. '0-3' or '0,2,5'") from None
    if not out or min(out) < 0:
        raise ReplayKDError(f"epochs {spec!r} must name at least one epoch, none negative")
    return out


def views(
    data: Path = typer.Argument(..., help="Dataset folder holding manifest.json (as written by 'replaykd shards')."),
    recipe: str = typer.Option("deit", help="Recipe name under manifests/recipes/ or a YAML file."),
    epochs: str = typer.Option("0-3", help="Epochs to show, one column each: '0-3' or '0,2,5'."),
    samples: int = typer.Option(8, min=1, help="Samples to show, one row each (from the first shard)."),
    seed: int = typer.Option(0, min=0, help="Run seed of the views."),
    split: str = typer.Option("train", help="Split to take samples from."),
    out: Path = typer.Option(Path("views.png"), help="PNG file to write."),
    cell: int = typer.Option(96, min=8, help="Side of each cell in pixels."),
) -> None:
    """Write a PNG grid of replayed (mixed) views of a few samples across epochs."""
    manifest, rec = Manifest.load(data), Recipe.load(recipe)
    epoch_list = parse_epochs(epochs)
    ds = ReplayViews(manifest, rec, seed, epoch_list, split=split, rank=0, world_size=1)
    ds.units = ds.units[:1]
    by_key: dict[str, dict[int, object]] = {}
    for item in ds:
        by_key.setdefault(item["key"], {})[item["epoch"]] = item["image"]
    keys = manifest.shard_rows(split, ds.units[0].shard).column("key").to_pylist()[:samples]
    grid = view_grid([[by_key[k][e] for e in epoch_list] for k in keys], rec.mean, rec.std, cell)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        grid.save(tmp, format="PNG")
    typer.echo(f"wrote {out}: {len(keys)} samples x epochs {epoch_list} (recipe {rec.name}, seed {seed})")
