"""`replaykd views`: a PNG grid of replayed views across epochs, to check a recipe by eye."""
from __future__ import annotations

from collections import Counter, defaultdict

import torch
import typer

from replaykd.errors import ReplayKDError
from replaykd.finish import Finisher
from replaykd.grid import Tile, view_grid
from replaykd.io import atomic_path
from replaykd.loader import ViewCollate
from replaykd.manifest import Manifest
from replaykd.reader import read_shard
from replaykd.recipe import Recipe
from replaykd.replay import Replayer
from replaykd.stages.options import ViewsOptions


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


def view_cells(manifest: Manifest, rec: Recipe, o: ViewsOptions) -> tuple[str, list[str], list[list[list[Tile]]]]:
    """The grid's content: the first shard of `o.split`, a label per shown sample, and each sample's views per epoch
    of `o.epochs` (by repeat; none where the sample is not in that epoch)."""
    epoch_list = parse_epochs(o.epochs)
    shard = manifest.shards(o.split)[0]
    records = read_shard(manifest, o.split, shard)
    replayer, finish, collate = Replayer(rec, o.seed), Finisher(rec), ViewCollate(manifest.num_classes, rec.smoothing)
    plans = [replayer.plan(len(records), epoch, shard) for epoch in epoch_list]
    # With repeats a sample is in 1 epoch of every `repeats`: take the samples in most of the chosen epochs, and
    # among those the ones in the epochs least shown so far (no column left empty while another fills), the first
    # by position among equals
    columns_of: dict[int, set[int]] = defaultdict(set)
    for column, plan in enumerate(plans):
        for s in plan.slots:
            columns_of[s.position].add(column)
    shown, filled = [], Counter()
    for _ in range(min(o.samples, len(columns_of))):
        p = min((p for p in columns_of if p not in shown),
                key=lambda p: (-len(columns_of[p]), sum(filled[c] for c in columns_of[p]), p))
        shown.append(p)
        filled.update(columns_of[p])
    shown.sort()
    cells: dict[int, list[list[Tile]]] = {p: [[] for _ in plans] for p in shown}
    for column, plan in enumerate(plans):
        slots = sorted((s.position, s.repeat, n) for n, s in enumerate(plan.slots) if s.position in cells)
        views = [replayer.view_at(plan, records, n) for _, _, n in slots]
        if not views:
            continue
        for view, image in zip(views, finish(collate(views), torch.device("cpu"))):
            mixed = view.partner != view.index and view.lam < 1
            share = [f"{100 * view.lam:.0f}%"] if mixed else []
            first = " ".join([f"r{view.repeat}"] * (rec.repeats > 1) + share)
            caption = first + (f"\n+{manifest.classes[view.partner_label]} #{view.partner}" if mixed else "")
            cells[view.position][column].append(Tile(image, caption))
    labels = [f"{records[p].key}\n{manifest.classes[records[p].label]} (#{records[p].index})" for p in shown]
    return shard, labels, [cells[p] for p in shown]


def views(o: ViewsOptions) -> None:
    """Write a labelled PNG grid of replayed views (finished, mixed): a row per sample of the first shard that the
    epochs show, a column per epoch holding the sample's views in that epoch (empty where it has none)."""
    manifest, rec = Manifest.load(o.data), Recipe.load(o.recipe)
    epoch_list = parse_epochs(o.epochs)
    shard, labels, cells = view_cells(manifest, rec, o)
    grid = view_grid(cells, labels, [f"epoch {e}" for e in epoch_list], rec.mean, rec.std, o.cell, rec.repeats)
    o.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(o.out) as tmp:
        grid.save(tmp, format="PNG")
    cycle = (f"with {rec.repeats} repeats a sample is in 1 epoch of every {rec.repeats}, as {rec.repeats} views: a "
             "grey cell is an epoch without it" if rec.repeats > 1 else "one view per epoch")
    typer.echo(f"wrote {o.out}: {len(cells)} samples of {shard} (rows) x epochs {epoch_list} (columns) (recipe "
               f"{rec.name}, seed {o.seed}; {cycle}). A caption "
               + ("'r1 63%' is the view's repeat and its" if rec.repeats > 1 else "'63%' is the view's")
               + " own share of a mix; '+7 #1234' the class and index of the sample it is mixed with")
