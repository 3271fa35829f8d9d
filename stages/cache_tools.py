"""`replaykd cache info` and `replaykd cache verify`: what a store is, and whether it is still right."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import typer

from pipeline.cache import TeacherCache
from pipeline.engine import autocast, pick_device, to_input
from pipeline.errors import ReplayKDError
from pipeline.manifest import Manifest
from pipeline.models import file_sha256, load_teacher
from pipeline.reader import read_shard
from pipeline.recipe import Recipe
from pipeline.replay import Replayer
from stages.teacher_cache import format_summary, summarize

app = typer.Typer(help="Inspect and verify teacher caches.", no_args_is_help=True, add_completion=False)


@app.command("info")
def info(
    store: Path = typer.Argument(..., help="Teacher cache (Zarr store)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Identity (teacher, manifest, recipe, seed), completeness and size of a store."""
    cache = TeacherCache.open(store)
    s = summarize(cache)
    s["created"], s["versions"], s["codecs"] = cache.attrs.get("created"), cache.attrs.get("versions"), cache.attrs.get("codecs")
    typer.echo(json.dumps(s, indent=2) if json_out else format_summary(s))


def open_sources(cache: TeacherCache, data: Path | None, checkpoint: Path | None) -> tuple[Manifest, Recipe, Path]:
    """The manifest, recipe and checkpoint a store was built from, each checked against its identity."""
    c = cache.config
    manifest = Manifest.load(data or cache.attrs["data_path"])
    if manifest.hash != c.manifest_hash:
        raise ReplayKDError(f"manifest {manifest.path} (hash {manifest.hash[:16]}) is not the one {cache.path} was built from ({c.manifest_hash[:16]})")
    recipe = Recipe.from_dict(dict(c.recipe), cache.attrs.get("recipe_name", "cached"))
    ckpt = Path(checkpoint or cache.attrs["checkpoint_path"])
    if not ckpt.exists():
        raise ReplayKDError(f"teacher checkpoint not found: {ckpt} (pass --checkpoint)")
    if file_sha256(ckpt) != c.teacher_sha256:
        raise ReplayKDError(f"checkpoint {ckpt} is not the teacher {cache.path} was built with (sha256 differs)")
    return manifest, recipe, ckpt


@app.command("verify")
def verify(
    store: Path = typer.Argument(..., help="Teacher cache (Zarr store)."),
    samples: int = typer.Option(64, min=1, help="Random cached views to remake and re-run through the teacher."),
    data: Path = typer.Option(None, help="Dataset folder (default: the one recorded in the store)."),
    checkpoint: Path = typer.Option(None, help="Teacher weights (default: the file recorded in the store; its sha256 must match)."),
    atol: float = typer.Option(5e-3, help="Largest |stored - recomputed| probability accepted."),
    seed: int = typer.Option(0, help="Seed of the choice of views."),
    device: str = typer.Option("auto", help="'auto', 'cpu' or 'cuda'."),
) -> None:
    """Remake random views, check their fingerprints, re-run the teacher and compare targets; exit 1 on a mismatch."""
    cache = TeacherCache.open(store)
    c = cache.config
    manifest, recipe, ckpt = open_sources(cache, data, checkpoint)
    done = [(e, s) for s in range(len(cache.shards)) for e in cache.completed(s)]
    if not done:
        raise ReplayKDError(f"{store} has no completed units to verify")
    rng = np.random.default_rng(seed)
    picks = sorted({(e, s, int(rng.integers(cache.counts[s]))) for e, s in (done[i] for i in rng.integers(len(done), size=samples))})
    replayer, records, units, problems, views, stored = Replayer(recipe, c.run_seed), {}, {}, [], [], []
    for epoch, shard_no, pos in picks:
        shard = cache.shards[shard_no]
        if shard not in records:
            records[shard] = read_shard(manifest, c.split, shard)
        if (epoch, shard_no) not in units:
            units[(epoch, shard_no)] = cache.read_unit(epoch, shard_no)
        unit = units[(epoch, shard_no)]
        v = replayer.view_at(records[shard], pos, epoch, shard)
        key = records[shard][pos].key
        for name in ("fingerprint", "seed", "partner", "lam"):
            if v[name] != unit[name][pos]:
                problems.append(f"epoch {epoch} key '{key}': {name} {unit[name][pos]} stored, {v[name]} replayed")
        views.append(v["image"])
        stored.append((unit["probs"][pos].astype(np.float32), unit["classes"][pos].astype(np.int64)))
    dev = pick_device(device)
    teacher = load_teacher(c.teacher, ckpt, c.num_classes, c.teacher_input_size, dev)
    with torch.inference_mode(), autocast(dev):
        probs = teacher(to_input(torch.stack(views), dev)).float().softmax(-1).cpu().numpy()
    s_probs = np.stack([p for p, _ in stored])
    s_classes = np.stack([k for _, k in stored])
    agree = float((probs.argmax(1) == s_classes[:, 0]).mean())
    max_diff = float(np.abs(np.take_along_axis(probs, s_classes, 1) - s_probs).max())
    if max_diff > atol:
        problems.append(f"teacher probabilities differ by up to {max_diff:.4g} (> --atol {atol})")
    typer.echo(f"verified {len(picks)} views of {store}: fingerprints {'OK' if not any('fingerprint' in p for p in problems) else 'MISMATCH'}, "
               f"teacher top-1 agreement {100 * agree:.1f}%, max |prob difference| {max_diff:.2e}")
    if problems:
        for p in problems[:20]:
            typer.secho(f"mismatch: {p}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
