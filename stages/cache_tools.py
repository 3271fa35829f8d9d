"""`replaykd cache verify | repair`: whether a store is still right, and dropping damage."""
from __future__ import annotations

import dataclasses
import time
from itertools import groupby
from pathlib import Path

import numpy as np
import torch
import typer

from replaykd import teacher as teachers
from replaykd.cache import CacheRequest, DamagedUnit, TeacherCache
from replaykd.cache_report import launch_id
from replaykd.claims import CHANGING, Claims
from replaykd.device import autocast, pick_device
from replaykd.errors import ReplayKDError
from replaykd.finish import Finisher
from replaykd.loader import ViewCollate
from replaykd.manifest import Manifest
from replaykd.progress import Progress
from replaykd.reader import read_shard
from replaykd.recipe import Recipe
from replaykd.replay import Replayer
from replaykd.stages.options import CacheRepairOptions, CacheVerifyOptions, TeacherCacheOptions, command_line

# Views re-run through the teacher at once by verify.
VERIFY_BATCH = 64


def open_sources(cache: TeacherCache, data: Path | None, checkpoint: Path | None):
    """The manifest, recipe and teacher a store was built from, each checked against the store."""
    c = cache.config
    manifest = Manifest.load(data or cache.attrs["data_path"])
    recipe = Recipe.of_views(c.views, cache.attrs.get("recipe_name", "cached"))
    ckpt = checkpoint or cache.attrs.get("checkpoint_path")
    if ckpt is not None and not Path(ckpt).exists():
        raise ReplayKDError(f"teacher checkpoint not found: {ckpt} (pass --checkpoint)")
    loaded = teachers.load(c.teacher["name"], ckpt, c.teacher["input_size"])
    cache.require(CacheRequest.of(manifest, c.split, recipe, c.run_seed, loaded.identity, c.topk))
    return manifest, recipe, loaded


def verify(o: CacheVerifyOptions) -> None:
    """Remake random cached views, compare fingerprints, re-run the teacher (with --full, also check every stored
    byte); exit 1 on a mismatch or damage."""
    cache = TeacherCache.open(o.store)
    problems = []
    if o.full:
        problems += _check_every_unit(cache, o.threads, o.store)
    if o.samples and not any(p.startswith("damaged") for p in problems):
        problems += _replay_samples(cache, o)
    if problems:
        for p in problems[:20]:
            typer.secho(f"mismatch: {p}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


def _check_every_unit(cache: TeacherCache, threads: int, store) -> list[str]:
    """Read every written unit (`threads` at once) and list what is damaged and what is missing, with the rate."""
    t0 = time.perf_counter()
    bar = Progress(total=int(cache.recorded().sum()), desc="check every unit", unit="unit")
    damaged = cache.damage(progress=lambda: bar.update(), threads=threads)
    bar.close()
    read, seconds = bar.n, time.perf_counter() - t0
    problems = [f"damaged: {_where(cache, e, s)}: {why}" for e, s, why in damaged]
    try:
        missing = cache.missing()
    except DamagedUnit:  # a packed store's completion records: damage() named them
        missing = []
    problems += [f"missing: {_where(cache, e, s)} is not in the store" for e, s in missing]
    typer.echo(f"read every unit of {store}: {read} units in {seconds:.1f} s ({read / max(seconds, 1e-9):.0f} "
               f"units/s); " + (f"{len(damaged)} damaged" if damaged else "all intact")
               + (f"; {len(missing)} of {cache.done().size} units missing" if missing else "; none missing"))
    if damaged:
        problems.append(f"run `replaykd cache repair {store}`, then the teacher-cache command that built it")
    elif missing:
        problems.append(f"finish them with the teacher-cache command that built {store} (`replaykd cache "
                        f"repair {store}` prints it)")
    return problems


def _where(cache: TeacherCache, epoch: int | None, shard_no: int) -> str:
    return (f"unit (epoch {epoch}, shard {cache.shards[shard_no]})" if epoch is not None
            else f"completion records of shard {cache.shards[shard_no]}")


def pick_views(units: list[tuple[int, int, int]], samples: int, seed: int) -> list[tuple[int, int, int]]:
    """`samples` distinct views drawn uniformly from `units` (epoch, shard_no, views), or all of them when they hold
    fewer; as (shard_no, epoch, slot), sorted: shard by shard."""
    sizes = np.array([n for _, _, n in units], dtype=np.int64)
    ends = np.cumsum(sizes)
    chosen = np.random.default_rng(seed).choice(int(ends[-1]), size=min(samples, int(ends[-1])), replace=False)
    picks = []
    for view in chosen:
        u = int(np.searchsorted(ends, view, side="right"))
        epoch, shard_no, _ = units[u]
        picks.append((shard_no, epoch, int(view - (ends[u] - sizes[u]))))
    return sorted(picks)


def _replay_samples(cache: TeacherCache, o: CacheVerifyOptions) -> list[str]:
    """Remake `o.samples` random completed views, shard by shard (one shard in memory at a time), compare their
    fingerprints and re-run the teacher on them."""
    c = cache.config
    manifest, recipe, loaded = open_sources(cache, o.data, o.checkpoint)
    done = [(e, s) for e, s in zip(*cache.done().nonzero())]
    if not done:
        raise ReplayKDError(f"{o.store} has no completed units to verify")
    picks = pick_views([(int(e), int(s), cache.unit_size(e, s)) for e, s in done], o.samples, o.seed)
    dev = pick_device(o.device)
    teacher = loaded.wrap(recipe.mean, recipe.std, dev)
    replayer, finish, collate = Replayer(recipe, c.run_seed), Finisher(recipe), ViewCollate(c.num_classes, 0.0)
    problems, max_diff, agree, n, mismatched, unreadable = [], 0.0, 0, 0, 0, 0
    for shard_no, shard_picks in groupby(picks, key=lambda p: p[0]):
        shard = cache.shards[shard_no]
        records = read_shard(manifest, c.split, shard)
        views, stored = [], []
        for epoch, unit_picks in groupby(shard_picks, key=lambda p: p[1]):  # each unit read once, named once
            slots = [slot for _, _, slot in unit_picks]
            try:
                unit = cache.read_unit(epoch, shard_no)
            except DamagedUnit as exn:
                problems.append(str(exn))
                unreadable += len(slots)
                continue
            plan = replayer.plan(len(records), epoch, shard, shard_no)
            for slot in slots:
                v = replayer.view_at(plan, records, slot)
                if v.fingerprint != unit.fingerprint[slot]:
                    mismatched += 1
                    problems.append(f"epoch {epoch} key '{v.key}' repeat {v.repeat}: fingerprint "
                                    f"{unit.fingerprint[slot]:08x} stored, {v.fingerprint:08x} replayed")
                views.append(v)
                stored.append((unit.probs[slot].astype(np.float32), unit.classes[slot].astype(np.int64)))
        for i in range(0, len(views), VERIFY_BATCH):
            with torch.inference_mode(), autocast(dev):
                probs = teacher(finish(collate(views[i:i + VERIFY_BATCH]), dev)).float().softmax(-1).cpu().numpy()
            s_probs = np.stack([p for p, _ in stored[i:i + VERIFY_BATCH]])
            s_classes = np.stack([k for _, k in stored[i:i + VERIFY_BATCH]])
            agree += int((probs.argmax(1) == s_classes[:, 0]).sum())
            max_diff = max(max_diff, float(np.abs(np.take_along_axis(probs, s_classes, 1) - s_probs).max()))
            n += len(s_probs)
    if max_diff > o.atol:
        problems.append(f"teacher probabilities differ by up to {max_diff:.4g} (> --atol {o.atol})")
    typer.echo(f"verified {n} views of {o.store}"
               + (f" (every view it holds: fewer than --samples {o.samples})" if len(picks) < o.samples else "")
               + (f", {unreadable} not (their units are damaged)" if unreadable else "")
               + (": fingerprints OK" if not mismatched else f": fingerprints: {mismatched} of {n} mismatch") + ", teacher "
               f"top-1 agreement {100 * agree / max(1, n):.1f}%, max |prob difference| {max_diff:.2e}")
    return problems


def repair(o: CacheRepairOptions) -> None:
    """Find damaged units (every unit's checksum), delete their objects, and say how to rebuild them. It holds the
    store's lock (renewed) for as long as it runs, so no stage-one run starts meanwhile."""
    cache = TeacherCache.open(o.store, mode="a")
    cache.require_writable()
    cache.storage.require_atomic_create()
    claims = Claims(cache.storage, launch_id())
    try:
        busy = claims.others_active() if claims.take(CHANGING) else ["a run that is creating or growing it"]
        if busy:
            raise ReplayKDError(f"{o.store} is being built right now (by {getattr(busy[0], 'holder', busy[0])}); "
                                "repair it when that run has stopped")
        claims.renew_in_background()
        _repair(cache, o)
    finally:
        claims.release_all()


def _repair(cache: TeacherCache, o: CacheRepairOptions) -> None:
    t0 = time.perf_counter()
    bar = Progress(total=int(cache.recorded().sum()), desc="check every unit", unit="unit")
    damaged = cache.damage(progress=lambda: bar.update(), threads=o.threads)
    bar.close()
    typer.echo(f"read {bar.n} units in {time.perf_counter() - t0:.1f} s "
               f"({bar.n / max(time.perf_counter() - t0, 1e-9):.0f} units/s)")
    if damaged:
        for e, s, why in damaged:
            typer.echo(f"damaged: {_where(cache, e, s)}: {why}")
        dropped = cache.drop(damaged)
        typer.echo(f"dropped {len(dropped)} damaged unit(s)")
    missing = len(cache.missing())
    if not damaged and not missing:
        typer.echo(f"{o.store}: every unit is intact and complete; nothing to repair")
        return
    # the store repaired is where it is now: copied or moved since it was built, its recorded --out is another one
    known = {f.name for f in dataclasses.fields(TeacherCacheOptions)}
    recorded = {k: v for k, v in (cache.attrs.get("options") or {}).items() if k in known and k != "json_out"}
    options = {**recorded, "out": str(o.store)}
    command = (command_line("teacher-cache", TeacherCacheOptions, options) if len(options) > 1
               else f"the teacher-cache command that built it, with --out {o.store}")
    typer.echo(f"{o.store}: {missing} units are {'now ' if damaged else ''}missing. Rebuild them with:\n  {command}")
