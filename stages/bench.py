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


def bench(
    out: Path = typer.Option(Path("runs/bench"), help="Folder for bench.json and bench.md."),
    repeats: int = typer.Option(5, min=1, help="Interleaved repetitions of each measurement (the median is reported)."),
    views: int = typer.Option(256, min=2, help="Images per replay measurement."),
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
    write_json_atomic(out / "bench.json", results)
    typer.echo(f"wrote {out / 'bench.json'}")
