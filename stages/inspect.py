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
    """Write a labelled PNG grid of replayed views (finished, mixed): each row a sample of the first shard that the
    epochs show, with all its views in those epochs."""
    manifest, rec = Manifest.load(o.data), Recipe.load(o.recipe)
    epoch_list = parse_epochs(o.epochs)
    shard = manifest.shards(o.split)[0]
    records = read_shard(manifest, o.split, shard)
    replayer, finish, collate = Replayer(rec, o.seed), Finisher(rec), ViewCollate(manifest.num_classes, rec.smoothing)
    plans = [replayer.plan(len(records), epoch, shard) for epoch in epoch_list]
    shown: list[int] = []  # the first samples (by position) that appear in the chosen epochs
    for position in range(len(records)):
        if len(shown) < o.samples and any(s.position == position for plan in plans for s in plan.slots):
            shown.append(position)
    rows: dict[int, list[Tile]] = {p: [] for p in shown}
    for plan in plans:
        slots = sorted((s.position, s.repeat, n) for n, s in enumerate(plan.slots) if s.position in rows)
        views = [replayer.view_at(plan, records, n) for _, _, n in slots]
        if not views:
            continue
        for view, image in zip(views, finish(collate(views), torch.device("cpu"))):
            mixed = view.partner != view.index and view.lam < 1
            partner = f"+ {manifest.classes[view.partner_label]} (#{view.partner})" if mixed else ""
            rows[view.position].append(Tile(image, f"e{plan.epoch} r{view.repeat}"
                                            + (f" {100 * view.lam:.0f}%" if mixed else "") + f"\n{partner}"))
    labels = [f"{records[p].key}\n{manifest.classes[records[p].label]} (#{records[p].index})" for p in shown]
    grid = view_grid([rows[p] for p in shown], labels, rec.mean, rec.std, o.cell)
    o.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(o.out) as tmp:
        grid.save(tmp, format="PNG")
    cycle = (f"with {rec.repeats} repeats a sample is in 1 epoch of every {rec.repeats}, as {rec.repeats} views, so a "
             "row holds the views its sample has in these epochs" if rec.repeats > 1 else "one view per epoch")
    typer.echo(f"wrote {o.out}: {len(shown)} samples of {shard}, their views in epochs {epoch_list} (recipe "
               f"{rec.name}, seed {o.seed}; {cycle}). A caption 'e2 r1 63%' is the epoch, the repeat and the view's "
               "own share of a mix; '+ 7 (#1234)' the class and index of the sample it is mixed with")
