"""`replaykd views`: a PNG grid of replayed views across epochs, to check a recipe by eye."""
from __future__ import annotations


import typer

from pipeline.errors import ReplayKDError
from pipeline.grid import view_grid
from pipeline.io import atomic_path
from pipeline.manifest import Manifest
from pipeline.reader import read_shard
from pipeline.recipe import Recipe
from pipeline.replay import Replayer
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
    shard = manifest.shards(o.split)[0]
    records = read_shard(manifest, o.split, shard)
    replayer = Replayer(rec, o.seed)
    shown = range(min(o.samples, len(records)))
    rows: list[list] = [[] for _ in shown]
    for epoch in epoch_list:
        plan = replayer.plan(len(records), epoch, shard)
        first = {}
        for slot, s in enumerate(plan.slots):
            first.setdefault(s.position, slot)
        for row, p in zip(rows, shown):
            row.append(replayer.view_at(plan, records, first[p]).image if p in first else None)
    grid = view_grid(rows, rec.mean, rec.std, o.cell)
    o.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(o.out) as tmp:
        grid.save(tmp, format="PNG")
    typer.echo(f"wrote {o.out}: {len(rows)} samples x epochs {epoch_list} (recipe {rec.name}, seed {o.seed})")
