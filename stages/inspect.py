"""`replaykd views`: a PNG grid of replayed views across epochs, to check a recipe by eye."""
from __future__ import annotations


import typer

from pipeline.errors import ReplayKDError
from pipeline.grid import view_grid
from pipeline.io import atomic_path
from pipeline.loader import ReplayViews
from pipeline.manifest import Manifest
from pipeline.recipe import Recipe
from stages.options import ViewsOptions


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


def views(o: ViewsOptions) -> None:
    """Write a PNG grid of replayed (mixed) views of a few samples across epochs."""
    manifest, rec = Manifest.load(o.data), Recipe.load(o.recipe)
    epoch_list = parse_epochs(o.epochs)
    ds = ReplayViews(manifest, rec, o.seed, epoch_list, split=o.split, rank=0, world_size=1)
    ds.units = ds.units[:1]
    by_key: dict[str, dict[int, object]] = {}
    for view in ds:
        by_key.setdefault(view.key, {})[view.epoch] = view.image
    keys = manifest.shard_rows(o.split, ds.units[0].shard).column("key").to_pylist()[: o.samples]
    grid = view_grid([[by_key[k][e] for e in epoch_list] for k in keys], rec.mean, rec.std, o.cell)
    o.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(o.out) as tmp:
        grid.save(tmp, format="PNG")
    typer.echo(f"wrote {o.out}: {len(keys)} samples x epochs {epoch_list} (recipe {rec.name}, seed {o.seed})")
