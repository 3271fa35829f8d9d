"""`replaykd views`: a PNG grid of replayed views across epochs, to check a recipe by eye."""
from __future__ import annotations

import torch
import typer

from pipeline.errors import ReplayKDError
from pipeline.finish import Finisher
from pipeline.grid import Tile, view_grid
from pipeline.io import atomic_path
from pipeline.loader import ViewCollate
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
    """Write a labelled PNG grid of replayed views (finished, mixed) of a few samples across epochs."""
    manifest, rec = Manifest.load(o.data), Recipe.load(o.recipe)
    epoch_list = parse_epochs(o.epochs)
    shard = manifest.shards(o.split)[0]
    records = read_shard(manifest, o.split, shard)
    replayer, finish, collate = Replayer(rec, o.seed), Finisher(rec), ViewCollate(manifest.num_classes, rec.smoothing)
    shown = list(range(min(o.samples, len(records))))
    cells: list[list[list[Tile]]] = [[[] for _ in epoch_list] for _ in shown]
    for column, epoch in enumerate(epoch_list):
        plan = replayer.plan(len(records), epoch, shard)
        views = [replayer.view_at(plan, records, slot) for slot, s in enumerate(plan.slots) if s.position < len(shown)]
        if not views:
            continue
        finished = finish(collate(views), torch.device("cpu"))
        for view, image in zip(views, finished):
            mixed = view.partner != view.index and view.lam < 1
            cells[view.position][column].append(Tile(image, f"x{view.partner} {view.lam:.2f}" if mixed else ""))
    labels = [f"{records[p].key}\n{manifest.classes[records[p].label]} (#{records[p].index})" for p in shown]
    grid = view_grid(cells, labels, [f"epoch {e}" for e in epoch_list], rec.mean, rec.std, o.cell)
    o.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(o.out) as tmp:
        grid.save(tmp, format="PNG")
    typer.echo(f"wrote {o.out}: {len(shown)} samples x epochs {epoch_list} (recipe {rec.name}, {rec.repeats} repeats, "
               f"seed {o.seed}); a caption 'xN 0.63' marks a view mixed with sample #N, keeping 63% of its own image")
