"""`replaykd teacher-cache`: stage one. Run the teacher once over every view of every epoch; store top-k."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import typer
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.cache import (CacheRequest, CacheSummary, TeacherCache, TeacherIdentity, UnitArrays,
                            UnitBuffers, UnitWriter)
from pipeline.device import autocast, pick_device
from pipeline.distributed import barrier, init_distributed, is_main_process, sum_across_ranks
from pipeline.errors import ReplayKDError
from pipeline.finish import Finisher
from pipeline.loader import CacheViews, ShardWork, ViewCollate, loader_settings
from pipeline.manifest import Manifest
from pipeline.models import file_sha256, load_teacher
from pipeline.recipe import Recipe
from pipeline.targets import TeacherTargets
from stages.options import TeacherCacheOptions


def library_versions() -> dict:
    """Versions of the libraries that decide views and targets."""
    import PIL
    import timm
    import torchvision
    import zarr

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "pillow": PIL.__version__, "numpy": np.__version__, "zarr": zarr.__version__}


def main(o: TeacherCacheOptions) -> None:
    """Build the cache and print its summary."""
    summary = run(o)
    if is_main_process():
        typer.echo(json.dumps(summary.as_dict(), indent=2) if o.json_out else summary.text())


def run(o: TeacherCacheOptions) -> CacheSummary:
    """Build (or resume, or grow) the cache; returns its summary with this run's figures."""
    t0 = time.perf_counter()
    dev = pick_device(o.device)
    rank, world = init_distributed(dev)
    manifest, recipe = Manifest.load(o.manifest, shard_root=o.shards), Recipe.load(o.recipe)
    if o.topk > manifest.num_classes:
        raise ReplayKDError(f"--topk must be between 1 and the number of classes ({manifest.num_classes}), got {o.topk}")
    teacher = load_teacher(o.teacher, o.checkpoint, manifest.num_classes, o.teacher_input_size, dev)
    shards = manifest.shards(o.split)
    identity = TeacherIdentity(o.teacher, file_sha256(o.checkpoint), teacher.input_size, o.topk)
    request = CacheRequest.of(manifest, o.split, recipe, o.seed, identity)
    if rank == 0:
        hints = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": library_versions(),
                 "recipe_name": recipe.name, "data_path": str(Path(o.manifest).resolve()),
                 "checkpoint_path": str(Path(o.checkpoint).resolve()), "options": o.to_config()}
        TeacherCache.create_or_grow(o.out, request, o.epochs, shards, manifest.shard_counts(o.split), recipe.repeats,
                                    recipe.mixes, o.epochs_per_file, hints)
    barrier()
    cache = TeacherCache.open(o.out, mode="a")
    # A data shard's units all go to one rank, so each Zarr shard file has one writer.
    work = []
    for s in range(rank, len(shards), world):
        done = set(cache.completed(s))
        todo = tuple(e for e in range(o.epochs) if e not in done)
        if todo:
            work.append(ShardWork(s, todo))
    ds = CacheViews(manifest, recipe, o.seed, work, o.split)
    total_views = len(ds)
    loader = DataLoader(ds, batch_size=o.batch_size, collate_fn=ViewCollate(manifest.num_classes, recipe.smoothing),
                        **loader_settings(o.workers, o.prefetch, dev))
    writer, buffers = UnitWriter(cache), UnitBuffers(cache.unit_size, o.topk, manifest.num_classes)
    finish = Finisher(recipe)
    correct = seen = 0
    bar = tqdm(total=total_views, desc=f"teacher-cache rank {rank}" if world > 1 else "teacher-cache", unit="view",
               unit_scale=True, disable=total_views == 0)
    t_loop = time.perf_counter()
    try:
        with torch.inference_mode():
            for batch in loader:
                with autocast(dev):
                    targets = TeacherTargets.from_logits(teacher(finish(batch, dev)), o.topk)
                probs, classes = targets.probs.cpu().numpy(), targets.classes.cpu().numpy()
                majority = torch.where(batch.lams >= 0.5, batch.labels, batch.partner_labels).numpy()
                correct += int((classes[:, 0] == majority).sum())
                seen += len(majority)
                rows = UnitArrays(probs=probs, classes=classes, fingerprint=batch.fingerprints.numpy())
                for epoch, shard_no, arrays in buffers.add(batch.epochs.numpy(), batch.shard_nos.numpy(),
                                                           batch.slots.numpy(), rows):
                    writer.put(epoch, shard_no, arrays)
                bar.update(len(majority))
    finally:
        bar.close()
        writer.close()
    loop_seconds = time.perf_counter() - t_loop
    stats = sum_across_ranks(torch.tensor([correct, seen], dtype=torch.float64), dev)
    barrier()
    elapsed = time.perf_counter() - t0
    run_stats = {"views_written": int(stats[1]), "teacher_top1_vs_majority": 100 * stats[0].item() / max(1, stats[1].item()),
                 "seconds": elapsed, "views_per_s": stats[1].item() / elapsed, "device": str(dev), "processes": world,
                 # views/s of the view-making + teacher + writing loop, without start-up (model load, hashing)
                 "loop_views_per_s": stats[1].item() / loop_seconds}
    if rank == 0 and run_stats["views_written"]:  # a rerun with nothing left to do keeps the real build's figures
        cache.group.attrs["last_run"] = run_stats
    return cache.summarize(run_stats)
