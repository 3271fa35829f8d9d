"""`replaykd bench`: throughput measured side by side (interleaved repetitions, medians), written to JSON."""
from __future__ import annotations

import io
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import typer
from PIL import Image

from pipeline.io import write_json_atomic
from pipeline.recipe import Recipe
from pipeline.replay import Replayer


def synthetic_images(n: int, size: tuple[int, int], seed: int = 0) -> list[Image.Image]:
    """Decoded JPEG-like images with structure (smooth gradients + noise), so augmentations do real work."""
    rng = np.random.default_rng(seed)
    h, w = size
    out = []
    for _ in range(n):
        base = np.linspace(0, 255, w)[None, :, None] * rng.random(3) + np.linspace(0, 255, h)[:, None, None] * rng.random(3)
        arr = np.clip(base / 2 + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=85)
        out.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out


def interleaved(fns: dict, repeats: int) -> dict:
    """Run each timed function once per round, `repeats` rounds; the median seconds of each."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_replay(recipe: Recipe, images: list[Image.Image], repeats: int) -> dict:
    """Views/s on one core, timm's ordinary pipeline vs the replay, both ending in a stacked batch.

    'transform': create_transform per image vs the seeded, fingerprinted replay with mixing off;
    'mixed': the same plus timm's Mixup (pair mode, on the batch) vs the replay's per-pair mixing.
    """
    import dataclasses

    from timm.data import Mixup

    torch.set_num_threads(1)
    transform = recipe.train_transform()
    mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=recipe.mix_prob,
                  switch_prob=recipe.switch_prob, mode="pair", label_smoothing=recipe.smoothing, num_classes=10)
    labels = torch.arange(len(images)) % 10
    keys = [f"img{i:05d}" for i in range(len(images))]
    replay_mixed = Replayer(recipe, run_seed=0)
    replay_plain = Replayer(dataclasses.replace(recipe, mix_prob=0.0), run_seed=0)

    def replay(replayer):
        views = replayer.shard_views(images, keys, labels.tolist(), list(range(len(images))), 0, "shard")
        torch.stack([v["image"] for v in views])

    fns = {
        "timm_transform": lambda: torch.stack([transform(im) for im in images]),
        "replay_transform": lambda: replay(replay_plain),
        "timm_mixed": lambda: mixup(torch.stack([transform(im) for im in images]), labels),
        "replay_mixed": lambda: replay(replay_mixed),
    }
    rates = {k: len(images) / v for k, v in interleaved(fns, repeats).items()}
    return {"views": len(images), "input_size": recipe.input_size, "image_size": list(images[0].size),
            **{f"{k}_views_per_s": v for k, v in rates.items()},
            "overhead_transform": rates["timm_transform"] / rates["replay_transform"] - 1.0,
            "overhead_mixed": rates["timm_mixed"] / rates["replay_mixed"] - 1.0}


def digits_fixture(root: Path, teacher: str = "regnety_002") -> tuple[Path, Path]:
    """Digits shards and an (untrained: throughput only) teacher checkpoint under `root`."""
    from safetensors.torch import save_file

    from pipeline.models import create_classifier
    from pipeline.shards import write_shards
    from pipeline.sources import digits_source

    data = root / "digits"
    if not (data / "manifest.json").exists():
        write_shards(digits_source(0.2, 0, 32), data, 200, 0, False)
    ckpt = root / f"{teacher}.safetensors"
    save_file(create_classifier(teacher, 10).state_dict(), str(ckpt))
    ckpt.with_suffix(".json").write_text(json.dumps({"input_size": 32}))
    return data, ckpt


def bench_stage_one(root: Path, recipe: str, teacher: str, epochs: int, batch_size: int, workers: int,
                    device: str, repeats: int) -> dict:
    """Views/s of `teacher-cache` (views made by workers, writes on a thread) vs the bare teacher forward."""
    import shutil

    import pipeline.loader as loader_mod
    from pipeline.engine import autocast, pick_device
    from pipeline.loader import ReplayViews
    from pipeline.manifest import Manifest
    from pipeline.models import load_teacher
    from stages.teacher_cache import TeacherCacheOptions, run

    data, ckpt = digits_fixture(root, teacher)
    manifest, rec = Manifest.load(data), Recipe.load(recipe)
    dev = pick_device(device)
    net = load_teacher(teacher, ckpt, manifest.num_classes, 32).to(dev)
    if dev.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    views = torch.stack([v["image"] for v in ReplayViews(manifest, rec, 0, [0], rank=0, world_size=1)])
    batches = [views[i : i + batch_size] for i in range(0, len(views), batch_size)]

    def bare():
        with torch.inference_mode(), autocast(dev):
            for b in batches:
                x = b.to(dev, non_blocking=True)
                net(x.contiguous(memory_format=torch.channels_last) if dev.type == "cuda" else x)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    rates = []

    def cache():
        out = root / "bench-store"
        shutil.rmtree(out, ignore_errors=True)
        s = run(TeacherCacheOptions(manifest=data, checkpoint=ckpt, out=out, recipe=recipe, teacher=teacher,
                                    epochs=epochs, topk=10, batch_size=batch_size, workers=workers, device=device))
        rates.append(s["views_per_s"])

    med = interleaved({"bare": bare, "cache": cache}, repeats)
    # decode count: one more run in-process, counting decodes
    decodes = [0]
    real_decode = loader_mod.decode_image

    def counting(*a):
        decodes[0] += 1
        return real_decode(*a)

    loader_mod.decode_image = counting
    try:
        n_views = len(list(ReplayViews(manifest, rec, 0, list(range(epochs)), rank=0, world_size=1)))
    finally:
        loader_mod.decode_image = real_decode
    bare_rate = len(views) / med["bare"]
    cache_rate = statistics.median(rates)
    return {"teacher": teacher, "recipe": recipe, "epochs": epochs, "batch_size": batch_size, "workers": workers,
            "device": str(dev), "bare_teacher_views_per_s": bare_rate, "teacher_cache_views_per_s": cache_rate,
            "ratio": cache_rate / bare_rate, "decodes_per_view": decodes[0] / n_views}


def bench(
    out: Path = typer.Option(Path("runs/bench"), help="Folder for bench.json and bench.md."),
    repeats: int = typer.Option(5, min=1, help="Interleaved repetitions of each measurement (the median is reported)."),
    views: int = typer.Option(256, min=2, help="Images per replay measurement."),
    workers: int = typer.Option(2, min=0, help="DataLoader workers for the stage measurements."),
    device: str = typer.Option("auto", help="'auto', 'cpu' or 'cuda'."),
) -> None:
    """Measure replay throughput against timm's ordinary pipeline (more sections come with the stages)."""
    results = {"device": platform.processor() or platform.machine(), "torch": torch.__version__,
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "repeats": repeats, "replay": []}
    for recipe_name, size in (("digits", (32, 32)), ("deit", (375, 500))):
        n = views if size[0] <= 64 else max(2, views // 8)
        r = bench_replay(Recipe.load(recipe_name), synthetic_images(n, size), repeats)
        results["replay"].append({"recipe": recipe_name, **r})
        typer.echo(f"replay {recipe_name}: transform only: timm {r['timm_transform_views_per_s']:.0f} views/s, replay "
                   f"{r['replay_transform_views_per_s']:.0f} ({100 * r['overhead_transform']:+.1f}%); with mixing: timm "
                   f"{r['timm_mixed_views_per_s']:.0f}, replay {r['replay_mixed_views_per_s']:.0f} ({100 * r['overhead_mixed']:+.1f}%)")
    out.mkdir(parents=True, exist_ok=True)
    s1 = bench_stage_one(out / "work", "digits", "regnety_002", epochs=4, batch_size=256, workers=workers,
                         device=device, repeats=max(1, repeats // 2))
    results["stage_one"] = s1
    typer.echo(f"stage one ({s1['device']}): teacher-cache {s1['teacher_cache_views_per_s']:.0f} views/s, bare teacher "
               f"{s1['bare_teacher_views_per_s']:.0f} views/s, ratio {s1['ratio']:.2f}; decodes per view {s1['decodes_per_view']:.3f}")
    write_json_atomic(out / "bench.json", results)
    typer.echo(f"wrote {out / 'bench.json'}")
