"""`replaykd teacher-cache`: stage one. Run the teacher once over every view of every epoch; store top-k."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import typer
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.cache import CacheConfig, TeacherCache, UnitWriter, index_dtype
from pipeline.engine import autocast, barrier, init_distributed, pick_device, to_input
from pipeline.errors import ReplayKDError
from pipeline.loader import ReplayViews, Unit, ViewCollate
from pipeline.losses import teacher_targets
from pipeline.manifest import Manifest
from pipeline.models import file_sha256, load_teacher
from pipeline.recipe import Recipe


@dataclass
class TeacherCacheOptions:
    """Stage one's configuration, from the CLI options."""

    manifest: Path
    checkpoint: Path
    out: Path
    shards: Path | None = None
    split: str = "train"
    recipe: str = "deit"
    teacher: str = "regnety_160"
    teacher_input_size: int | None = None
    epochs: int = 300
    topk: int = 10
    seed: int = 0
    batch_size: int = 256
    workers: int = 4
    device: str = "auto"
    epochs_per_file: int = 8


def library_versions() -> dict:
    """Versions of the libraries that decide views and targets."""
    import PIL
    import timm
    import torchvision
    import zarr

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "pillow": PIL.__version__, "numpy": np.__version__, "zarr": zarr.__version__}


class UnitBuffers:
    """Collects units' per-view results in position order; hands back each unit when every view is in."""

    def __init__(self, counts: list[int], topk: int, num_classes: int):
        self.counts, self.topk, self.idx_dtype = counts, topk, index_dtype(num_classes)
        self.open: dict[tuple[int, int], tuple[dict, list]] = {}

    def _unit(self, key: tuple[int, int]) -> tuple[dict, list]:
        if key not in self.open:
            n = self.counts[key[1]]
            arrays = {"probs": np.zeros((n, self.topk), np.float16), "classes": np.zeros((n, self.topk), self.idx_dtype),
                      "seed": np.zeros(n, np.uint32), "fingerprint": np.zeros(n, np.uint32),
                      "partner": np.zeros(n, np.int32), "lam": np.zeros(n, np.float32)}
            self.open[key] = (arrays, [0])
        return self.open[key]

    def add(self, cols: dict[str, np.ndarray]) -> list[tuple[int, int, dict]]:
        """Store a batch's columns (per-view values plus epoch, shard_no, position), unit by unit, vectorised;
        returns the (epoch, shard_no, arrays) of units that became complete."""
        done = []
        units = np.stack([cols["epoch"], cols["shard_no"]], axis=1)
        for epoch, shard_no in np.unique(units, axis=0).tolist():
            sel = (units[:, 0] == epoch) & (units[:, 1] == shard_no)
            arrays, filled = self._unit((epoch, shard_no))
            positions = cols["position"][sel]
            for name, arr in arrays.items():
                arr[positions] = cols[name][sel]
            filled[0] += int(sel.sum())
            if filled[0] == self.counts[shard_no]:
                del self.open[(epoch, shard_no)]
                done.append((epoch, shard_no, arrays))
        return done


def run(o: TeacherCacheOptions) -> dict:
    """Build (or resume, or grow) the cache; returns the summary."""
    t0 = time.perf_counter()
    dev = pick_device(o.device)
    rank, world = init_distributed(dev)
    manifest, recipe = Manifest.load(o.manifest, shard_root=o.shards), Recipe.load(o.recipe)
    if o.topk < 1 or o.topk > manifest.num_classes:
        raise ReplayKDError(f"--topk must be between 1 and the number of classes ({manifest.num_classes}), got {o.topk}")
    if o.epochs < 1:
        raise ReplayKDError(f"--epochs must be at least 1, got {o.epochs}")
    teacher = load_teacher(o.teacher, o.checkpoint, manifest.num_classes, o.teacher_input_size, dev)
    shards = manifest.shards(o.split)
    counts = [b - a for a, b in (manifest.shard_range(o.split, s) for s in shards)]
    config = CacheConfig(manifest_hash=manifest.hash, split=o.split, recipe=recipe.as_dict(), recipe_hash=recipe.hash,
                         run_seed=o.seed, epochs=o.epochs, topk=o.topk, num_classes=manifest.num_classes,
                         teacher=o.teacher, teacher_sha256=file_sha256(o.checkpoint), teacher_input_size=teacher.input_size)
    if rank == 0:
        hints = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": library_versions(),
                 "recipe_name": recipe.name, "data_path": str(Path(o.manifest).resolve()),
                 "checkpoint_path": str(Path(o.checkpoint).resolve())}
        TeacherCache.create_or_grow(o.out, config, shards, counts, o.epochs_per_file, hints)
    barrier()
    cache = TeacherCache.open(o.out, mode="a")
    # A data shard's units all go to one rank, so each Zarr shard file has one writer.
    units = []
    for s in range(rank, len(shards), world):
        done = set(cache.completed(s))
        todo = tuple(e for e in range(o.epochs) if e not in done)
        if todo:
            units.append(Unit(s, shards[s], todo))
    ds = ReplayViews(manifest, recipe, o.seed, [], o.split, units=units, rank=0, world_size=1)
    total_views = len(ds)
    loader = DataLoader(ds, batch_size=o.batch_size, num_workers=o.workers, pin_memory=dev.type == "cuda",
                        collate_fn=ViewCollate(manifest.num_classes, recipe.smoothing))
    writer, buffers = UnitWriter(cache), UnitBuffers(counts, o.topk, manifest.num_classes)
    correct = seen = 0
    bar = tqdm(total=total_views, desc=f"teacher-cache rank {rank}" if world > 1 else "teacher-cache", unit="view",
               unit_scale=True, disable=total_views == 0)
    t_loop = time.perf_counter()
    try:
        with torch.inference_mode():
            for batch in loader:
                with autocast(dev):
                    probs, classes = teacher_targets(teacher(to_input(batch["image"], dev)), o.topk)
                probs, classes = probs.cpu().numpy(), classes.cpu().numpy()
                majority = torch.where(batch["lam"] >= 0.5, batch["label"], batch["partner_label"]).numpy()
                correct += int((classes[:, 0] == majority).sum())
                seen += len(majority)
                cols = {n: batch[n].numpy() for n in ("epoch", "shard_no", "position", "seed", "fingerprint", "partner", "lam")}
                for epoch, shard_no, arrays in buffers.add({**cols, "probs": probs, "classes": classes}):
                    writer.put(epoch, shard_no, arrays)
                bar.update(len(majority))
    finally:
        bar.close()
        writer.close()
    loop_seconds = time.perf_counter() - t_loop
    stats = torch.tensor([correct, seen], dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(stats)
    barrier()
    elapsed = time.perf_counter() - t0
    run_stats = {"views_written": int(stats[1]), "teacher_top1_vs_majority": 100 * stats[0].item() / max(1, stats[1].item()),
                 "seconds": elapsed, "views_per_s": stats[1].item() / elapsed, "device": str(dev), "processes": world,
                 # views/s of the view-making + teacher + writing loop, without start-up (model load, hashing)
                 "loop_views_per_s": stats[1].item() / loop_seconds}
    if rank == 0 and run_stats["views_written"]:  # a rerun with nothing left to do keeps the real build's figures
        cache.group.attrs["last_run"] = run_stats
    return summarize(cache, run_stats)


def summarize(cache: TeacherCache, run_stats: dict | None = None) -> dict:
    """Identity, completeness and size of a store (plus this run's figures)."""
    c = cache.config
    done = [len(set(cache.completed(s)) & set(range(c.epochs))) for s in range(len(cache.shards))]
    views = sum(n * count for n, count in zip(done, cache.counts))
    size = cache.bytes_on_disk()
    return {"store": str(cache.path), "teacher": c.teacher, "teacher_sha256": c.teacher_sha256[:16],
            "teacher_input_size": c.teacher_input_size, "manifest_hash": c.manifest_hash[:16], "split": c.split,
            "recipe": cache.attrs.get("recipe_name"), "recipe_hash": c.recipe_hash[:16], "run_seed": c.run_seed,
            "epochs": c.epochs, "topk": c.topk, "num_classes": c.num_classes, "shards": len(cache.shards),
            "units_missing": c.epochs * len(cache.shards) - sum(done), "views_cached": views, "bytes_on_disk": size,
            "bytes_per_view": size / views if views else None, **(run_stats or {})}


def teacher_cache(
    manifest: Path = typer.Option(Path("data/digits"), help="Dataset folder with manifest.json (from 'replaykd shards' or 'replaykd manifest')."),
    checkpoint: Path = typer.Option(..., help="Teacher weights, a local .pth or .safetensors file (plain, or wrapped in 'model'/'state_dict')."),
    out: Path = typer.Option(..., help="Zarr store to create, resume or grow."),
    shards: Path = typer.Option(None, help="Folder of the shards, when not where the manifest says."),
    split: str = typer.Option("train", help="Split to cache."),
    recipe: str = typer.Option("deit", help="Augmentation recipe: a name under manifests/recipes/ or a YAML file."),
    teacher: str = typer.Option("regnety_160", help="timm model name of the teacher (DeiT's is regnety_160)."),
    teacher_input_size: int = typer.Option(None, help="Resize views to this side for the teacher (default: from the checkpoint's .json, else the view size)."),
    epochs: int = typer.Option(300, help="Epochs of views to cache (students can train this many epochs). A larger value grows an existing store."),
    topk: int = typer.Option(10, help="Teacher probabilities kept per view (sorted, float16) with their class indices."),
    seed: int = typer.Option(0, min=0, help="Run seed: views depend on (seed, epoch, sample key) only."),
    batch_size: int = typer.Option(256, min=1, help="Views per teacher forward."),
    workers: int = typer.Option(4, min=0, help="DataLoader worker processes making views (each decodes a shard once for all epochs)."),
    device: str = typer.Option("auto", help="'auto', 'cpu' or 'cuda' (bf16 autocast and channels_last on GPU)."),
    epochs_per_file: int = typer.Option(8, min=1, help="Epochs of one data shard stored per Zarr shard file (fewer, larger files)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Stage one: cache the teacher's top-k targets for every view of every epoch. Resumable; torchrun-parallel."""
    summary = run(TeacherCacheOptions(manifest=manifest, checkpoint=checkpoint, out=out, shards=shards, split=split,
                                      recipe=recipe, teacher=teacher, teacher_input_size=teacher_input_size,
                                      epochs=epochs, topk=topk, seed=seed, batch_size=batch_size, workers=workers,
                                      device=device, epochs_per_file=epochs_per_file))
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(json.dumps(summary, indent=2) if json_out else format_summary(summary))


def format_summary(s: dict) -> str:
    """Human-readable summary lines."""
    lines = [f"store {s['store']}: {s['teacher']} (sha256 {s['teacher_sha256']}), manifest {s['manifest_hash']}, "
             f"recipe {s['recipe']} ({s['recipe_hash']}), seed {s['run_seed']}, {s['epochs']} epochs x {s['shards']} shards, top-{s['topk']} of {s['num_classes']}",
             f"views cached {s['views_cached']}, units missing {s['units_missing']}, {s['bytes_on_disk'] / 1e6:.2f} MB on disk"
             + (f", {s['bytes_per_view']:.1f} bytes/view" if s["bytes_per_view"] else "")]
    if s.get("views_written") == 0:
        lines.append("this run: nothing to do, every unit was already complete")
    elif "views_written" in s:
        lines.append(f"this run: {s['views_written']} views in {s['seconds']:.1f} s ({s['views_per_s']:.0f} views/s), "
                     f"teacher top-1 vs majority label {s['teacher_top1_vs_majority']:.2f}%")
    return "\n".join(lines)
