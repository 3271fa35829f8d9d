"""The loader measurements of `replaykd bench`, on real photographs: views per second per core of timm's ordinary
path against the replay, where the replay's time goes, and the full stage-two loader."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

import replaykd.replay as replay_mod
from replaykd.augment import crop_box
from replaykd.cputime import cpu_seconds
from replaykd.finish import Finisher
from replaykd.loader import ReplayViews, ViewCollate
from replaykd.manifest import Manifest
from replaykd.reader import Record, read_shard
from replaykd.recipe import Recipe
from replaykd.replay import Replayer, decode_positions
from replaykd.shards import write_shards
from replaykd.stages.bench.memory import PeakMemory
from replaykd.sources import Source, SourceItem


def pillow_build() -> str:
    """Which Pillow is installed: 'pillow-simd X' or 'pillow X' (they decode and resample differently)."""
    for dist in ("pillow-simd", "pillow"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def photographs(n: int, size: tuple[int, int] = (500, 375), quality: int = 90, seed: int = 0) -> list[tuple[str, bytes]]:
    """n JPEGs cut from real photographs (scikit-learn's two sample images, offline): random crops, some flipped."""
    from sklearn.datasets import load_sample_images

    photos, rng, out = load_sample_images().images, np.random.default_rng(seed), []
    w, h = size
    for i in range(n):
        img = photos[i % len(photos)]
        scale = max(h / img.shape[0], w / img.shape[1]) * rng.uniform(1.0, 1.3)
        im = Image.fromarray(img).resize((round(img.shape[1] * scale), round(img.shape[0] * scale)), Image.BICUBIC)
        x, y = int(rng.integers(im.width - w + 1)), int(rng.integers(im.height - h + 1))
        im = im.crop((x, y, x + w, y + h))
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        out.append((f"photo_{i:05d}", buf.getvalue()))
    return out


def photo_source(n: int, size: tuple[int, int], classes: int = 10) -> Source:
    """A data set of n real-photograph JPEGs (labels are arbitrary: loaders and throughput do not need real ones)."""
    items = [SourceItem(key=k, label=i % classes, ext="jpg", data=d) for i, (k, d) in enumerate(photographs(n, size))]
    cut = len(items) * 9 // 10
    return Source("photographs", [f"class_{c}" for c in range(classes)], {"train": items[:cut], "val": items[cut:]})


def timm_decode(data: bytes) -> Image.Image:
    """An image decoded as timm's datasets decode one (`Image.open(f).convert('RGB')`)."""
    return Image.open(io.BytesIO(data)).convert("RGB")


class StepTimer:
    """Seconds spent in wrapped callables, by name."""

    def __init__(self):
        self.seconds: Counter = Counter()

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds[name] += time.perf_counter() - t0
            return out
        return timed


def per_core(recipe: Recipe, jpegs: list[tuple[str, bytes]], rounds: int) -> dict:
    """Views/s on one core: (a) timm's ordinary path, each view decoded (a repeat is decoded again, as with timm's
    RepeatAugSampler), `create_transform` and `Mixup` on the batch; (b) the replay: an epoch plan's views, each image
    decoded once for its repeats, uint8 views with their erasing and mixing parameters and fingerprints, collated.
    Interleaved rounds, each a fresh epoch; medians. Also where (b)'s time goes, and what finishing costs on a CPU."""
    from timm.data import Mixup

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    whole = recipe.train_transform()
    mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=recipe.mix_prob, label_smoothing=recipe.smoothing,
                  switch_prob=recipe.switch_prob, num_classes=10) if recipe.mixes else None
    records = [Record(i, k, i % 10, i, d) for i, (k, d) in enumerate(jpegs)]
    replayer, collate, finish = Replayer(recipe, 0), ViewCollate(10, recipe.smoothing), Finisher(recipe)
    times: dict[str, list[float]] = {"timm": [], "replay": []}
    views = 0
    timer = StepTimer()
    steps = replayer.augmentation.steps  # each a partial over its timm transform
    replayer.augmentation.steps = [timer.wrap(type(s.args[-1]).__name__, s) for s in steps]
    replayer.augmentation.erase = timer.wrap("erase draws", replayer.augmentation.erase)
    fingerprint = replay_mod.fingerprint
    replay_mod.fingerprint = timer.wrap("fingerprint", fingerprint)
    extra = Counter()
    sent = {"pickled": 0, "pixels": 0}  # what the views' batches would carry from a loader worker
    try:
        for epoch in range(rounds + 1):  # round 0 warms up
            plan = replayer.plan(len(records), epoch, "photos")
            order = [records[s.position] for s in plan.slots]  # the same samples and repeats for both paths
            t0 = time.perf_counter()
            x = torch.stack([whole(timm_decode(r.data)) for r in order])
            if mixup is not None:
                x = mixup(x[: len(x) - len(x) % 2], torch.tensor([r.label for r in order[: len(x) - len(x) % 2]]))
            t1 = time.perf_counter()
            images = decode_positions(records, plan.positions())
            t2 = time.perf_counter()
            made = [v for item in replayer.items(plan, records, images) for v in item]
            t3 = time.perf_counter()
            batch = collate(made)
            t4 = time.perf_counter()
            finish(batch, torch.device("cpu"))
            t5 = time.perf_counter()
            if epoch:
                times["timm"].append((t1 - t0) / len(order))
                times["replay"].append((t4 - t1) / len(batch))
                extra.update({"decode (one per sample, for all its repeats)": t2 - t1, "items": t3 - t2,
                              "collate": t4 - t3, "finish on this CPU": t5 - t4})
                # the pixels go through shared memory, the rest inside the batch's pickle
                sent["pickled"] += len(pickle.dumps(dataclasses.replace(batch, images=[])))
                sent["pixels"] += sum(c.nbytes for c in batch.images)
                views += len(batch)
            elif timer.seconds:
                timer.seconds.clear()
    finally:
        replay_mod.fingerprint = fingerprint
        torch.set_num_threads(threads)
    steps = {name: 1000 * s / views for name, s in timer.seconds.items()}
    steps["PIL image to uint8 array, pair bookkeeping"] = 1000 * extra["items"] / views - sum(steps.values())
    for name in ("decode (one per sample, for all its repeats)", "collate"):
        steps[name] = 1000 * extra[name] / views
    timm_rate, replay_rate = 1 / statistics.median(times["timm"]), 1 / statistics.median(times["replay"])
    return {"recipe": recipe.name, "repeats": recipe.repeats, "images": len(jpegs), "input_size": recipe.input_size,
            "pillow": pillow_build(), "timm_views_per_s": timm_rate, "replay_views_per_s": replay_rate,
            "replay_over_timm": replay_rate / timm_rate, "replay_ms_per_view": steps,
            "finish_on_cpu_ms_per_view": 1000 * extra["finish on this CPU"] / views,
            "worker_bytes_per_view": {k: v / views for k, v in sent.items()}}


def save_jpegs(jpegs: list[tuple[str, bytes]], folder: Path) -> Path:
    """Write JPEGs as files (so another process measures the very same bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    for key, data in jpegs:
        (folder / f"{key}.jpg").write_bytes(data)
    return folder


def load_jpegs(folder: Path) -> list[tuple[str, bytes]]:
    """The JPEGs `save_jpegs` wrote, in key order."""
    return [(f.stem, f.read_bytes()) for f in sorted(Path(folder).glob("*.jpg"))]


def per_core_elsewhere(pythonpath: Path, recipe: str, folder: Path, rounds: int) -> dict:
    """`per_core` on the JPEGs in `folder`, in a fresh process whose imports come first from `pythonpath` (another
    Pillow build installed there with `pip install --target`)."""
    code = ("import json; from replaykd.recipe import Recipe; "
            "from replaykd.stages.bench.loader import load_jpegs, per_core; "
            f"print(json.dumps(per_core(Recipe.load({recipe!r}), load_jpegs({str(folder)!r}), {rounds})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{pythonpath}:{os.environ.get('PYTHONPATH', '')}"})
    if proc.returncode:
        raise RuntimeError(f"the loader bench under {pythonpath} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def full_loader(data: Path, recipe: Recipe, workers: int, batch_size: int = 64, epochs: int = 2) -> dict:
    """Views/s of the stage-two loader itself (persistent workers, uint8 batches), over whole epochs."""
    manifest = Manifest.load(data)
    ds = ReplayViews(manifest, recipe, 0, 0, rank=0, world_size=1, shuffle_buffer=256)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers,
                        persistent_workers=workers > 0, collate_fn=ViewCollate(manifest.num_classes, recipe.smoothing))
    rates = []
    for epoch in range(epochs + 1):  # epoch 0 starts the workers
        ds.set_epoch(epoch)
        t0, n = time.perf_counter(), 0
        for batch in loader:
            n += len(batch)
        if epoch:
            rates.append(n / (time.perf_counter() - t0))
    return {"workers": workers, "views_per_s": statistics.median(rates), "batch_size": batch_size}


def draft_eligible(recipe: Recipe, size: tuple[int, int], samples: int = 2000) -> float:
    """The share of decoded images that reduced-size JPEG decoding (1/2 scale) could serve without changing a
    pixel's source: every repeat's RandomResizedCrop box at least twice the output on both sides."""
    served = 0
    for i in range(samples):
        boxes = [crop_box(*size, recipe.scale, recipe.ratio, random.Random(replay_mod.view_seed(0, i, "eligible", r)))
                 for r in range(recipe.repeats)]
        served += all(h >= 2 * recipe.input_size and w >= 2 * recipe.input_size for _, _, h, w in boxes)
    return served / samples


def shard_size_loader(work: Path, timm_views_per_s: float, images: int = 1000, epochs: int = 3) -> dict:
    """The stage-two loader at ImageNet's shard size: `images` real photographs (500x375 JPEGs) in one shard, DeiT's
    recipe, one loader worker (one core) at the default decode budget, in a fresh process; its views/s against timm's
    ordinary path through the same DataLoader (one worker, the same samples and repeats, batches of the same size),
    epochs interleaved, and against timm's in-process rate on one core (`timm_views_per_s`); the worker's peak
    private MB, and image decodes per view (1 / repeats where each chosen sample is decoded once for its repeats)."""
    data = work / f"photographs-{images}"
    if not (data / "manifest.json").exists():
        write_shards(photo_source(images * 10 // 9 + 1, (500, 375)), data, images, 0, False)
    batch = 256 if images >= 512 else max(8, images // 4)  # DeiT's per-GPU batch; a smoke run's few images fill some
    code = f"from replaykd.stages.bench.loader import _one_worker; _one_worker({str(data)!r}, {epochs}, {batch})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"the shard-size loader bench failed:\n{err[-2000:]}")
    r = json.loads(out.strip().splitlines()[-1])
    return {**r, "replay_over_timm": r["views_per_cpu_s"] / r["timm_loader_views_per_cpu_s"],
            "replay_over_timm_wall": r["views_per_s"] / r["timm_loader_views_per_s"],
            "timm_in_process_views_per_s": timm_views_per_s, "pillow": pillow_build()}


class _TimmViews(torch.utils.data.Dataset):
    """timm's ordinary path over a shard's records: each view decoded and made by `create_transform` (a repeat is
    decoded again, as with timm's RepeatAugSampler)."""

    def __init__(self, records: list[Record], transform):
        self.records, self.transform = records, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        r = self.records[i]
        return self.transform(timm_decode(r.data)), r.label


def _one_worker(data: str, epochs: int, batch: int) -> None:
    """Epochs of timm's ordinary path through a DataLoader of one worker and of the stage-two loader with one worker
    at the defaults, interleaved, over the same samples and repeats (run by `shard_size_loader`): prints both median
    views/s over the epochs after the first (which starts the workers), per wall second and per CPU second (the
    worker's and the consuming thread's: what a core makes, whatever else the machine runs), the replay's decodes
    per view and its worker's peak private MB."""
    import multiprocessing

    from replaykd.loader import Batched, loader_settings, shuffle_views
    from replaykd.malloc import reuse_freed_memory

    reuse_freed_memory()
    decodes = multiprocessing.get_context("fork").Value("q", 0)
    real = replay_mod.decode_image

    def counting(*args):
        with decodes.get_lock():
            decodes.value += 1
        return real(*args)

    replay_mod.decode_image = counting  # every loader decode goes through replay.decode_positions
    m, recipe = Manifest.load(data), Recipe.load("deit")
    ds = ReplayViews(m, recipe, 0, 0, rank=0, world_size=1, shuffle_buffer=shuffle_views(recipe, None), batch_size=batch)
    loader = DataLoader(Batched(ds, batch, ViewCollate(m.num_classes, recipe.smoothing)), batch_size=None,
                        **loader_settings(1, 2, torch.device("cpu")))
    records = [r for shard in m.shards("train") for r in read_shard(m, "train", shard)]
    order: list[int] = []  # the epoch's samples and repeats, as the replay plans them; refilled each epoch
    timm_loader = DataLoader(_TimmViews(records, recipe.train_transform()), batch_size=batch, sampler=order,
                             drop_last=True, num_workers=1, persistent_workers=True)
    rates: dict[str, list[float]] = {"timm": [], "timm_cpu": [], "replay": [], "replay_cpu": []}
    views = counted = 0
    peaks = None  # sampled from the replay worker's start on: the children but timm's worker

    def one_epoch(name: str, epoch: int, run) -> tuple[int, int]:
        t0, c0, n = time.perf_counter(), time.thread_time(), 0
        it = iter(run)
        worker = it._workers[0].pid
        w0 = cpu_seconds(worker)
        for made in it:
            n += len(made[0]) if name == "timm" else len(made)
        if epoch:
            rates[name].append(n / (time.perf_counter() - t0))
            rates[f"{name}_cpu"].append(n / (cpu_seconds(worker) - w0 + time.thread_time() - c0))
        return worker, n

    for epoch in range(epochs + 1):
        order[:] = [s.position for s in Replayer(recipe, 0).plan(len(records), epoch, m.shards("train")[0]).slots]
        timm_worker, _ = one_epoch("timm", epoch, timm_loader)
        if peaks is None:
            peaks = PeakMemory(os.getpid(), skip={timm_worker})
        ds.set_epoch(epoch)
        before = decodes.value
        _, n = one_epoch("replay", epoch, loader)
        if epoch:
            views, counted = views + n, counted + decodes.value - before
    private = peaks.stop()["worker_private_mb"]
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(json.dumps({"images": sum(m.shard_counts("train")), "shards": len(m.shards("train")), "recipe": recipe.name,
                      "repeats": recipe.repeats, "workers": 1, "batch_size": batch, "decode_memory_mb": ds.decode_memory // 2**20,
                      "views_per_s": med["replay"], "timm_loader_views_per_s": med["timm"],
                      "views_per_cpu_s": med["replay_cpu"], "timm_loader_views_per_cpu_s": med["timm_cpu"],
                      "decodes_per_view": counted / views, "worker_private_mb": private}))
