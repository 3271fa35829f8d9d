"""`replaykd bench`: throughput measured side by side (interleaved repetitions, medians), written to JSON."""
from __future__ import annotations

import io
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import typer
from PIL import Image

from pipeline.io import atomic_path, write_json_atomic
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


def flops(fn) -> int:
    """FLOPs counted by torch.utils.flop_counter for one call of `fn`."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def bench_stage_two(root: Path, epochs: int, batch_size: int, workers: int, device: str, repeats: int) -> dict:
    """Student images/s with no KD, KD from the cache and KD from the online teacher; and the FLOP bound."""
    import shutil

    from pipeline.manifest import Manifest
    from pipeline.models import create_student, load_teacher
    from stages.teacher_cache import TeacherCacheOptions
    from stages.teacher_cache import run as build_cache
    from stages.train_student import StudentOptions
    from stages.train_student import run as train

    data, ckpt = digits_fixture(root)
    store = root / "stage-two-store"
    shutil.rmtree(store, ignore_errors=True)
    build_cache(TeacherCacheOptions(manifest=data, checkpoint=ckpt, out=store, recipe="digits", teacher="regnety_002",
                                    epochs=epochs, topk=10, workers=workers, device=device))
    student_args = dict(student="deit_tiny_distilled_patch16_224", patch_size=4, depth=6, embed_dim=96, num_heads=3)
    common = dict(manifest=data, recipe="digits", epochs=epochs, batch_size=batch_size, workers=workers, device=device,
                  **student_args)
    variants = {"no_kd": dict(distillation="none"), "cache_kd": dict(cache=store),
                "online_kd": dict(online_teacher="regnety_002", teacher_checkpoint=ckpt, teacher_input_size=32)}
    rates: dict[str, list[float]] = {k: [] for k in variants}

    def one(name):
        out = root / f"student-{name}"
        shutil.rmtree(out, ignore_errors=True)
        train(StudentOptions(out=out, **common, **variants[name]))
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        rates[name].append(sum(r["images"] for r in log) / sum(r["train_seconds"] for r in log))

    interleaved({k: (lambda k=k: one(k)) for k in variants}, repeats)
    med = {k: statistics.median(v) for k, v in rates.items()}
    m = Manifest.load(data)
    student = create_student(num_classes=m.num_classes, img_size=16, name=student_args["student"],
                             **{k: v for k, v in student_args.items() if k != "student"})
    teacher = load_teacher("regnety_002", ckpt, m.num_classes, 32)
    x = torch.randn(batch_size, 3, 16, 16)
    s_fb = flops(lambda: student(x)[0].sum().backward())
    with torch.no_grad():
        t_f = flops(lambda: teacher(x))
    return {"student": "deit_tiny_distilled (patch 4, depth 6, dim 96) @16px", "teacher": "regnety_002 @32px",
            "batch_size": batch_size, "epochs_per_measurement": epochs, "device": device,
            **{f"{k}_images_per_s": v for k, v in med.items()},
            "cached_over_no_kd": med["cache_kd"] / med["no_kd"], "cached_over_online": med["cache_kd"] / med["online_kd"],
            "student_fwd_bwd_flops": s_fb, "teacher_fwd_flops": t_f, "flop_bound_online_cost": (s_fb + t_f) / s_fb}


def bench_cache_size(root: Path, views: int = 4096) -> list[dict]:
    """Bytes per view for k = 5, 10, 100 over 1000 classes: raw, and with the stored codec chain; read rate."""
    import shutil

    from pipeline.cache import CacheConfig, TeacherCache

    rng = np.random.default_rng(0)
    out = []
    per_shard = 1024
    shards = [f"train-{i:06d}.tar" for i in range(views // per_shard)]
    for k in (5, 10, 100):
        store = root / f"size-k{k}"
        shutil.rmtree(store, ignore_errors=True)
        config = CacheConfig(manifest_hash="synthetic", split="train", recipe={}, recipe_hash="synthetic", run_seed=0,
                             epochs=1, topk=k, num_classes=1000, teacher="synthetic", teacher_sha256="synthetic")
        cache = TeacherCache.create_or_grow(store, config, shards, [per_shard] * len(shards), 1, {})
        for s in range(len(shards)):
            # a confident teacher: one class ~6 logits above N(0, 1.5) noise over 1000 classes
            logits = torch.from_numpy(rng.normal(0, 1.5, (per_shard, 1000)).astype(np.float32))
            logits[torch.arange(per_shard), torch.from_numpy(rng.integers(1000, size=per_shard))] += 6.0
            p, c = logits.softmax(-1).topk(k)
            cache.write_unit(0, s, {"probs": p.half().numpy(), "classes": c.to(torch.int16).numpy(),
                                    "seed": rng.integers(2**32, size=per_shard, dtype=np.uint32),
                                    "fingerprint": rng.integers(2**32, size=per_shard, dtype=np.uint32),
                                    "partner": rng.integers(per_shard, size=per_shard).astype(np.int32),
                                    "lam": rng.random(per_shard).astype(np.float32)})
        data_bytes = sum(f.stat().st_size for name in cache.arrays for f in (store / name).rglob("*") if f.is_file())
        t0 = time.perf_counter()
        for s in range(len(shards)):
            cache.read_unit(0, s)
        read_s = time.perf_counter() - t0
        out.append({"k": k, "raw_bytes_per_view": 4 * k + 16, "stored_bytes_per_view": data_bytes / views,
                    "store_bytes_per_view_with_metadata": cache.bytes_on_disk() / views,
                    "read_records_per_s": views / read_s, "distribution": "synthetic: 1000 classes, one ~6 logits above N(0, 1.5)"})
    return out


def bench_markdown(r: dict) -> str:
    """The bench results as markdown tables."""
    lines = [f"Bench ({r['date']}, {r['device']}, torch {r['torch']}, `make bench`, medians of interleaved repetitions)", "",
             "| replay | timm views/s | replay views/s | overhead | timm+mix views/s | replay+mix views/s | overhead |",
             "|---|---|---|---|---|---|---|"]
    for x in r["replay"]:
        lines.append(f"| {x['recipe']} ({x['image_size'][0]}x{x['image_size'][1]} -> {x['input_size']}) | {x['timm_transform_views_per_s']:.0f} | "
                     f"{x['replay_transform_views_per_s']:.0f} | {100 * x['overhead_transform']:+.1f}% | {x['timm_mixed_views_per_s']:.0f} | "
                     f"{x['replay_mixed_views_per_s']:.0f} | {100 * x['overhead_mixed']:+.1f}% |")
    s1 = r["stage_one"]
    lines += ["", f"Stage one ({s1['teacher']}, {s1['device']}): teacher-cache {s1['teacher_cache_views_per_s']:.0f} views/s vs bare "
              f"teacher forward {s1['bare_teacher_views_per_s']:.0f} views/s: ratio **{s1['ratio']:.2f}**; decodes per cached view "
              f"{s1['decodes_per_view']:.3f} ({s1['epochs']} epochs)."]
    s2 = r.get("stage_two")
    if s2:
        lines += ["", f"Stage two ({s2['student']}, teacher {s2['teacher']}, batch {s2['batch_size']}, {s2['device']}): no KD "
                  f"{s2['no_kd_images_per_s']:.0f} img/s, KD from the cache {s2['cache_kd_images_per_s']:.0f}, online KD "
                  f"{s2['online_kd_images_per_s']:.0f}: cached/no-KD **{s2['cached_over_no_kd']:.3f}**, cached/online "
                  f"**{s2['cached_over_online']:.2f}** (FLOP bound {s2['flop_bound_online_cost']:.2f})."]
    if r.get("cache_size"):
        lines += ["", "| k | raw bytes/view | stored bytes/view | read records/s |", "|---|---|---|---|"]
        lines += [f"| {c['k']} | {c['raw_bytes_per_view']} | {c['stored_bytes_per_view']:.1f} | {c['read_records_per_s']:.0f} |"
                  for c in r["cache_size"]]
    return "\n".join(lines) + "\n"


def bench(
    out: Path = typer.Option(Path("runs/bench"), help="Folder for bench.json and bench.md."),
    repeats: int = typer.Option(5, min=1, help="Interleaved repetitions of each measurement (the median is reported)."),
    views: int = typer.Option(256, min=2, help="Images per replay measurement."),
    workers: int = typer.Option(2, min=0, help="DataLoader workers for the stage measurements."),
    device: str = typer.Option("auto", help="'auto', 'cpu' or 'cuda'."),
) -> None:
    """Measure replay throughput against timm's ordinary pipeline (more sections come with the stages)."""
    from pipeline.engine import device_name, pick_device

    results = {"device": device_name(pick_device(device)), "torch": torch.__version__,
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
    s2 = bench_stage_two(out / "work", epochs=2, batch_size=64, workers=workers, device=device, repeats=max(1, repeats // 2))
    results["stage_two"] = s2
    typer.echo(f"stage two: no KD {s2['no_kd_images_per_s']:.0f} img/s, cached KD {s2['cache_kd_images_per_s']:.0f}, "
               f"online KD {s2['online_kd_images_per_s']:.0f}; cached/no-KD {s2['cached_over_no_kd']:.3f}, "
               f"cached/online {s2['cached_over_online']:.2f} (FLOP bound {s2['flop_bound_online_cost']:.2f})")
    results["cache_size"] = bench_cache_size(out / "work")
    for c in results["cache_size"]:
        typer.echo(f"cache k={c['k']}: raw {c['raw_bytes_per_view']} B/view, stored {c['stored_bytes_per_view']:.1f} B/view, "
                   f"read {c['read_records_per_s']:.0f} records/s")
    write_json_atomic(out / "bench.json", results)
    with atomic_path(out / "bench.md") as tmp:
        tmp.write_text(bench_markdown(results))
    typer.echo(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
