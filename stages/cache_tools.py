"""`replaykd cache info` and `replaykd cache verify`: what a store is, and whether it is still right."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import typer

from pipeline.cache import CacheRequest, TeacherCache, TeacherIdentity
from pipeline.device import autocast, pick_device
from pipeline.errors import ReplayKDError
from pipeline.finish import Finisher
from pipeline.loader import ViewCollate
from pipeline.manifest import Manifest
from pipeline.models import file_sha256, load_teacher
from pipeline.reader import read_shard
from pipeline.recipe import Recipe
from pipeline.replay import Replayer
from stages.options import CacheInfoOptions, CacheVerifyOptions


def info(o: CacheInfoOptions) -> None:
    """Print a store's identity, completeness and size."""
    cache = TeacherCache.open(o.store)
    s = cache.summarize(cache.attrs.get("last_run"))
    if o.json_out:
        extra = {k: cache.attrs.get(k) for k in ("created", "versions", "codecs", "options")}
        typer.echo(json.dumps({**s.as_dict(), **extra}, indent=2))
    else:
        typer.echo(s.text())


def open_sources(cache: TeacherCache, data: Path | None, checkpoint: Path | None) -> tuple[Manifest, Recipe, Path]:
    """The manifest, recipe and checkpoint a store was built from, each checked against the store."""
    c = cache.config
    manifest = Manifest.load(data or cache.attrs["data_path"])
    recipe = Recipe.from_dict(dict(c.recipe), cache.attrs.get("recipe_name", "cached"))
    ckpt = Path(checkpoint or cache.attrs["checkpoint_path"])
    if not ckpt.exists():
        raise ReplayKDError(f"teacher checkpoint not found: {ckpt} (pass --checkpoint)")
    cache.require(CacheRequest.of(manifest, c.split, recipe, c.run_seed,
                                  TeacherIdentity(c.teacher, file_sha256(ckpt), c.teacher_input_size, c.topk)))
    return manifest, recipe, ckpt


def verify(o: CacheVerifyOptions) -> None:
    """Remake random cached views, compare fingerprints, re-run the teacher; exit 1 on a mismatch."""
    cache = TeacherCache.open(o.store)
    c = cache.config
    manifest, recipe, ckpt = open_sources(cache, o.data, o.checkpoint)
    done = [(e, s) for s in range(len(cache.shards)) for e in cache.completed(s)]
    if not done:
        raise ReplayKDError(f"{o.store} has no completed units to verify")
    rng = np.random.default_rng(o.seed)
    units_picked = [done[i] for i in rng.integers(len(done), size=o.samples)]
    picks = sorted({(e, s, int(rng.integers(cache.unit_size(e, s)))) for e, s in units_picked})
    replayer, records, units, problems, views, stored = Replayer(recipe, c.run_seed), {}, {}, [], [], []
    for epoch, shard_no, slot in picks:
        shard = cache.shards[shard_no]
        if shard not in records:
            records[shard] = read_shard(manifest, c.split, shard)
        if (epoch, shard_no) not in units:
            units[(epoch, shard_no)] = cache.read_unit(epoch, shard_no)
        unit = units[(epoch, shard_no)]
        v = replayer.view_at(replayer.plan(len(records[shard]), epoch, shard, shard_no), records[shard], slot)
        if v.fingerprint != unit.fingerprint[slot]:
            problems.append(f"epoch {epoch} key '{v.key}' repeat {v.repeat}: fingerprint {unit.fingerprint[slot]:08x} "
                            f"stored, {v.fingerprint:08x} replayed")
        views.append(v)
        stored.append((unit.probs[slot].astype(np.float32), unit.classes[slot].astype(np.int64)))
    dev = pick_device(o.device)
    teacher = load_teacher(c.teacher, ckpt, c.num_classes, c.teacher_input_size, dev)
    finished = Finisher(recipe)(ViewCollate(c.num_classes, recipe.smoothing)(views), dev)
    with torch.inference_mode(), autocast(dev):
        probs = teacher(finished).float().softmax(-1).cpu().numpy()
    s_probs = np.stack([p for p, _ in stored])
    s_classes = np.stack([k for _, k in stored])
    agree = float((probs.argmax(1) == s_classes[:, 0]).mean())
    max_diff = float(np.abs(np.take_along_axis(probs, s_classes, 1) - s_probs).max())
    if max_diff > o.atol:
        problems.append(f"teacher probabilities differ by up to {max_diff:.4g} (> --atol {o.atol})")
    fingerprints_ok = not any("fingerprint" in p for p in problems)
    typer.echo(f"verified {len(picks)} views of {o.store}: fingerprints {'OK' if fingerprints_ok else 'MISMATCH'}, "
               f"teacher top-1 agreement {100 * agree:.1f}%, max |prob difference| {max_diff:.2e}")
    if problems:
        for p in problems[:20]:
            typer.secho(f"mismatch: {p}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
