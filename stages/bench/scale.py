"""`replaykd bench-scale`: ImageNet's shape on this machine. A synthetic data set shaped like ImageNet-1k (1,281,167
training and 50,000 validation samples in shards of 1000, 1000 classes; tiny JPEGs so it fits a small disk), a
300-epoch store over it, and the commands users run, timed in fresh processes; an ImageNet-21k-shaped manifest
through the plan and the store layout; loader workers' private memory at 224 px. Figures into scale.json."""
from __future__ import annotations

import io
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import typer
from PIL import Image
from safetensors.torch import save_file

from replaykd import storage as storages
from replaykd.cache import CacheRequest, TeacherCache, UnitArrays
from replaykd.claims import Claims
from replaykd.errors import ReplayKDError
from replaykd.io import publish_markdown, write_json_atomic
from replaykd.manifest import Manifest
from replaykd.models import create_classifier
from replaykd.plan import EpochPlan, max_unit_size
from replaykd.recipe import Recipe
from replaykd.shards import write_shards
from replaykd.sources import Source, SourceItem
from replaykd.teacher import TeacherIdentity
from replaykd.stages.bench.loader import photo_source
from replaykd.stages.bench.memory import PeakMemory
from replaykd.stages.bench.runner import CLI, replaykd
from replaykd.stages.options import ScaleBenchOptions

IN1K = {"train": 1_281_167, "val": 50_000, "classes": 1000, "shard": 1000}
IN21K = {"train": 14_197_122, "classes": 21_841, "shard": 1000}
# Where the simulated runs take their plan from: 8 ranks of 10 loader workers, DeiT's per-GPU batch.
RANKS, WORKERS_PER_RANK, BATCH = 8, 10, 128


def tiny_jpegs(count: int = 256, side: int = 16) -> list[bytes]:
    """A pool of small distinct JPEGs (random noise, seeded): the samples reuse them under their own keys."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def imagenet_shaped(train: int, val: int, classes: int) -> Source:
    """ImageNet-1k's shape with tiny images: `train` and `val` samples, labels cycling over `classes`."""
    pool = tiny_jpegs()
    splits = {split: [SourceItem(key=f"{split}{i:08d}", label=i % classes, ext="jpg", data=pool[i % len(pool)])
                      for i in range(n)] for split, n in (("train", train), ("val", val))}
    return Source("imagenet-shaped", [f"n{c:08d}" for c in range(classes)], splits)


def timed(*args) -> tuple[float, str]:
    """Seconds a replaykd command takes in a fresh process (its start included), and its stdout."""
    t0 = time.perf_counter()
    out = replaykd(*args)
    return time.perf_counter() - t0, out


def run_for(args: list, seconds: float, ready) -> dict:
    """Start a replaykd command, note when `ready(stdout so far)` first holds (seconds from launch), stop it with
    SIGTERM `seconds` later (SIGINT would not reach it from a background job of a non-interactive shell, which
    starts its children with SIGINT ignored); its peak memory and its output."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks, out, err = PeakMemory(proc.pid), [], []
    readers = [threading.Thread(target=lambda f=f, sink=sink: sink.extend(f), daemon=True)
               for f, sink in ((proc.stdout, out), (proc.stderr, err))]
    for t in readers:
        t.start()
    first = None
    while proc.poll() is None and first is None:
        if ready("".join(out)):
            first = time.perf_counter() - t0
        time.sleep(0.1)
    if first is None:
        raise RuntimeError(f"replaykd {' '.join(map(str, args))} ended early: {''.join(err)[-2000:]}")
    time.sleep(seconds)
    stopped = time.perf_counter() - t0
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    for t in readers:
        t.join()
    return {"ready_s": first, "stopped_s": stopped, "stdout": "".join(out), "stderr": "".join(err), **peaks.stop()}


def newest_completion(store: Path) -> float:
    """The newest modification time of the store's unit objects (0 when there are none)."""
    return max((f.stat().st_mtime for f in (store / "units" / "c").glob("*/*")), default=0.0)


def views_done(cache: TeacherCache) -> int:
    """Views of the units recorded complete."""
    return sum(cache.unit_size(int(e), int(s)) for e, s in np.argwhere(cache.done()))


def store_layout(store: Path) -> dict:
    """The store's file count and the bytes of its metadata (zarr.json) and of everything."""
    files = [f for f in store.rglob("*") if f.is_file()]
    return {"store_files": len(files), "metadata_bytes": sum(f.stat().st_size for f in files if f.name == "zarr.json"),
            "store_bytes": sum(f.stat().st_size for f in files),
            "store_files_written": sum("/c/" in f.as_posix() for f in files)}


def plan_seconds(counts: list[int], repeats: int, paired: bool, epochs: int = 3) -> float:
    """Seconds to plan one epoch and cut one loader worker's segments (rank 0 of RANKS), the mean over epochs."""
    t0 = time.perf_counter()
    for epoch in range(epochs):
        EpochPlan(counts, repeats, paired, 0, epoch, epoch).segments(0, RANKS, 0, WORKERS_PER_RANK, BATCH)
    return (time.perf_counter() - t0) / epochs


def fill_epoch(store: Path | str, epoch: int) -> int:
    """Write every missing unit of `epoch` with synthetic targets as varied as a teacher's (seeded random sorted
    probabilities, classes and fingerprints: what stage two reads with its fingerprint check off, and what
    compresses like real targets); returns how many units were written."""
    cache = TeacherCache.open(store, mode="a")
    missing = np.flatnonzero(~cache.done()[epoch])
    rng = np.random.default_rng(epoch)
    for s in missing:
        n, c = cache.unit_size(epoch, int(s)), cache.config
        probs = rng.random((n, c.topk)) ** 4  # a peaked top-1, a long tail, like a teacher's
        probs = -np.sort(-probs / (probs.sum(1, keepdims=True) * 1.25), axis=1)
        cache.write_unit(epoch, int(s), UnitArrays(probs=probs.astype(np.float16),
                                                   classes=rng.integers(0, c.num_classes, (n, c.topk)),
                                                   fingerprint=rng.integers(0, 2 ** 32, n, dtype=np.uint32)))
    return len(missing)


def imagenet_store(work: Path, recipe: Recipe, epochs: int = 300) -> Path:
    """An empty store of ImageNet-1k's shape (1,282 data shards, `epochs` epochs, top-10 of 1000), from the shape
    alone (no shards are read)."""
    n, shard = IN1K["train"], IN1K["shard"]
    counts = [min(shard, n - s) for s in range(0, n, shard)]
    manifest_hash = "a" * 64
    teacher = TeacherIdentity("synthetic", "regnety_002", None, None, "0" * 64, IN1K["classes"], recipe.mean,
                              recipe.std, recipe.input_size, "bicubic")
    request = CacheRequest(manifest_hash, "train", recipe.views(), recipe.views_hash, recipe.name, 0, IN1K["classes"],
                           "pillow", teacher, 10)
    store = work / "verify.zarr"
    shutil.rmtree(store, ignore_errors=True)
    claims = Claims(storages.for_root(store), "bench-scale")
    TeacherCache.create_or_grow(store, request, epochs, [f"train-{s:06d}.tar" for s in range(len(counts))], counts,
                                recipe.repeats, recipe.mixes, {}, claims)
    claims.release_all()
    return store


def verify_rate(store: Path | str, *flags) -> tuple[float, int]:
    """(units/s, units) that `replaykd cache verify --full` reports reading, in a fresh process (it exits 1: the
    epochs not filled are missing units)."""
    proc = subprocess.run([*CLI, "cache", "verify", str(store), "--full", "--samples", "0", *flags],
                          capture_output=True, text=True)
    out = proc.stdout
    match = re.search(r"read every unit of .*: (\d+) units in [\d.]+ s \((\d+) units/s\)", out)
    if match is None:
        raise ReplayKDError(f"cache verify said: {out}")
    return float(match.group(2)), int(match.group(1))


def verify_section(work: Path, recipe: Recipe, epochs: int) -> dict:
    """`cache verify --full` over `epochs` epochs of an ImageNet-1k x 300-epoch store of synthetic units, locally
    and on the local S3 server (moto, in its own process): units per second, and the whole shape's time at that
    rate."""
    from replaykd.stages.bench.object_store import S3Server

    store = imagenet_store(work, recipe)
    for epoch in range(epochs):
        fill_epoch(store, epoch)
    local, units = verify_rate(store)
    whole = 300 * len(TeacherCache.open(store).shards)
    with S3Server() as server:
        url = server.upload(store, "verify.zarr")
        s3, _ = verify_rate(url, "--storage-options", json.dumps(server.options))
    return {"epochs_filled": epochs, "units_read": units, "local_units_per_s": local, "s3_units_per_s": s3,
            "whole_shape_units": whole, "whole_shape_local_minutes": whole / local / 60,
            "whole_shape_s3_minutes": whole / s3 / 60,
            "s3_server": "moto in its own process on this machine, sharing its 2 cores"}


def in21k_layout(work: Path, recipe: Recipe) -> dict:
    """An ImageNet-21k-shaped manifest (rows only, no shards) through its hash, write and load, the plan, and a
    300-epoch store's creation."""
    n, shard = IN21K["train"], IN21K["shard"]
    t0 = time.perf_counter()
    index = np.arange(n, dtype=np.int64)
    names = np.array([f"train-{s:06d}.tar" for s in range(-(-n // shard))])
    table = pa.table({"index": index, "key": pa.array([f"k{i:09d}" for i in range(n)]),
                      "shard": pa.DictionaryArray.from_arrays(pa.array(index // shard, pa.int32()),
                                                              pa.array(names)).cast(pa.string()),
                      "position": pa.array(index % shard, pa.int32()),
                      "label": pa.array(index % IN21K["classes"], pa.int32()),
                      "nbytes": pa.array(np.full(n, 300), pa.int64()), "crc32c": pa.array(np.zeros(n), pa.uint32()),
                      "ext": pa.array(["jpg"] * n)})
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = Manifest(work / "in21k-manifest", [f"c{c}" for c in range(IN21K["classes"])], {"train": table},
                 work / "in21k-shards")
    m.write()
    written = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = Manifest.load(work / "in21k-manifest")
    loaded = time.perf_counter() - t0
    counts = m.shard_counts("train")
    store = work / "in21k.zarr"
    teacher = TeacherIdentity("synthetic", "regnety_002", None, None, "0" * 64, IN21K["classes"],
                              recipe.mean, recipe.std, recipe.input_size, "bicubic")
    request = CacheRequest.of(m, "train", recipe, 0, teacher, 10)
    t0 = time.perf_counter()
    if not store.exists():
        claims = Claims(storages.for_root(store), "bench-scale")
        TeacherCache.create_or_grow(store, request, 300, m.shards("train"), counts, recipe.repeats, recipe.mixes,
                                    {}, claims)
        claims.release_all()
    created = time.perf_counter() - t0
    t0 = time.perf_counter()
    TeacherCache.open(store).done()
    opened = time.perf_counter() - t0
    return {"train_samples": n, "classes": IN21K["classes"], "shards": len(counts),
            "manifest_table_s": built, "manifest_write_s": written, "manifest_load_s": loaded,
            "plan_s_per_epoch": plan_seconds(counts, recipe.repeats, recipe.mixes),
            "store_create_s": created, "store_open_and_read_completion_s": opened,
            "slots_per_unit": max_unit_size(max(counts), recipe.repeats, recipe.mixes), **store_layout(store)}


def worker_private_memory(work: Path) -> dict:
    """Peak private MB of a loader worker (2 workers) in stage one and stage two at the defaults, DeiT's recipe at
    224 px on real photographs (500x375 JPEGs) in one shard of 1000, measured in a separate process each."""
    data = work / "photographs-1000"
    if not (data / "manifest.json").exists():
        write_shards(photo_source(1112, (500, 375)), data, 1000, 0, False)
    out = {}
    for stage in ("stage_one", "stage_two"):
        proc = subprocess.Popen([sys.executable, "-c", f"from replaykd.stages.bench.scale import _loader_epoch; "
                                 f"_loader_epoch({str(data)!r}, {stage!r})"], stdout=subprocess.PIPE, text=True)
        peaks = PeakMemory(proc.pid)
        proc.communicate()
        out[stage] = peaks.stop()["worker_private_mb"]
    return out


def _loader_epoch(data: str, stage: str) -> None:
    """One pass of a stage's loader over `data` with 2 workers at the defaults (run by `worker_private_memory`)."""
    import torch
    from torch.utils.data import DataLoader

    from replaykd.loader import Batched, CacheViews, ReplayViews, ViewCollate, loader_settings, shuffle_views
    from replaykd.malloc import reuse_freed_memory
    from replaykd.work import ShardWork

    reuse_freed_memory()
    m, recipe = Manifest.load(data), Recipe.load("deit")
    collate = ViewCollate(m.num_classes, recipe.smoothing)
    if stage == "stage_one":
        jobs = torch.multiprocessing.get_context("fork").Queue()
        for s in range(len(m.shards("train"))):
            jobs.put(ShardWork(s, (0, 1, 2)))
        for _ in range(2):
            jobs.put(None)
        ds = Batched(CacheViews(m, recipe, 0, jobs), 256, collate, partial=True)
    else:
        ds = Batched(ReplayViews(m, recipe, 0, 0, rank=0, world_size=1, shuffle_buffer=shuffle_views(recipe, None),
                                 batch_size=256), 256, collate)
    settings = {**loader_settings(2, 2, torch.device("cpu")), "persistent_workers": False}
    for _ in DataLoader(ds, batch_size=None, **settings):
        pass


def scale_markdown(r: dict) -> str:
    """The figures as markdown."""
    one, two, s21 = r["stage_one"], r["stage_two"], r["in21k"]
    return "\n".join([
        f"{r['date']}, `{r['command']}`, {r['device']}. A synthetic data set of ImageNet-1k's shape "
        f"({r['train_samples']:,} training and {r['val_samples']:,} validation samples in {r['shards']} shards of "
        f"1000, 1000 classes, {r['image_side']} px JPEGs, recipe `{r['recipe']}`) and a {r['epochs']}-epoch store "
        "over it; every command in a fresh process, as users run them.", "",
        "| figure | value |", "|---|---|",
        f"| shards written (`write_shards`) | {r['write_shards_s']:.0f} s |",
        f"| manifest of the existing shards (`replaykd manifest --no-decode-check`, reads every shard) | "
        f"{r['manifest_build_s']:.0f} s |",
        f"| plan of one epoch, one worker's segments (rank 0 of {RANKS}, {WORKERS_PER_RANK} workers) | "
        f"{r['plan_s_per_epoch'] * 1000:.0f} ms |",
        f"| teacher-cache: launch to its first completed unit (`teacher_cache_startup_s`) | "
        f"{r['teacher_cache_startup_s']:.1f} s |",
        f"| teacher-cache rerun: launch to its first new unit, completed ones skipped | {one['rerun_first_unit_s']:.1f} s |",
        f"| stage one, views/s over {one['window_s']:.0f} s (not a full epoch) | {one['views_per_s']:.0f} |",
        f"| stage one peak memory: main / a worker resident / a worker private | {one['main_rss_mb']} / "
        f"{one['worker_rss_mb']} / {one['worker_private_mb']} MB |",
        f"| store after stage one's window: files, metadata (zarr.json) bytes, all bytes | {r['store_files']:,}, "
        f"{r['metadata_bytes']:,}, {r['store_bytes']:,} |",
        f"| store files once all {r['epochs']} epochs are written (from its layout): loose / packed | "
        f"{r['store_files_complete']:,} / {r['store_files_packed']:,} |",
        f"| `cache verify --full`, {r['verify']['units_read']:,} synthetic units ({r['verify']['epochs_filled']} "
        f"epochs): units/s local / local S3 server | {r['verify']['local_units_per_s']:.0f} / "
        f"{r['verify']['s3_units_per_s']:.0f} |",
        f"| `cache verify --full` of the whole shape ({r['verify']['whole_shape_units']:,} units) at those rates | "
        f"{r['verify']['whole_shape_local_minutes']:.1f} / {r['verify']['whole_shape_s3_minutes']:.1f} min |",
        f"| `replaykd cache info` (`cache_info_s`) | {r['cache_info_s']:.1f} s |",
        f"| train-student: launch to its first optimiser step (`student_startup_s`) | {r['student_startup_s']:.1f} s |",
        f"| stage two, images/s over {two['window_s']:.0f} s (not a full epoch) | {two['images_per_s']:.0f} |",
        f"| stage two peak memory: main / a worker resident / a worker private | {two['main_rss_mb']} / "
        f"{two['worker_rss_mb']} / {two['worker_private_mb']} MB |",
        f"| loader worker private memory at 224 px, DeiT recipe, photographs in a shard of 1000 (`worker_private_mb`)"
        f" | stage one {r['worker_private_mb']['stage_one']} MB, stage two {r['worker_private_mb']['stage_two']} MB |",
        f"| ImageNet-21k shape ({s21['train_samples']:,} samples, {s21['classes']:,} classes, {s21['shards']:,} "
        f"shards): manifest write / load | {s21['manifest_write_s']:.0f} / {s21['manifest_load_s']:.1f} s |",
        f"| ImageNet-21k: plan of one epoch | {s21['plan_s_per_epoch'] * 1000:.0f} ms |",
        f"| ImageNet-21k: 300-epoch store creation, files, metadata bytes | {s21['store_create_s']:.1f} s, "
        f"{s21['store_files']:,}, {s21['metadata_bytes']:,} |",
    ]) + "\n"


def bench_scale(o: ScaleBenchOptions) -> None:
    """Build (once) the ImageNet-shaped data, run and time the commands, write scale.json and scale.md."""
    from replaykd.device import device_name, pick_device

    if o.render_only:
        if not (o.out / "scale.json").exists():
            raise ReplayKDError(f"no {o.out / 'scale.json'} to render; run 'make bench-scale' first")
        return publish(o, json.loads((o.out / "scale.json").read_text()))
    work = o.out / "scale"
    work.mkdir(parents=True, exist_ok=True)
    recipe = Recipe.load(o.recipe)
    r = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device_name(pick_device("cpu")),
         "command": f"replaykd bench-scale --out {o.out} --window {o.window:g}", "recipe": o.recipe,
         "train_samples": IN1K["train"], "val_samples": IN1K["val"], "image_side": 16, "epochs": 300}
    data = work / "in1k-shaped"
    t0 = time.perf_counter()
    if not (data / "manifest.json").exists():
        write_shards(imagenet_shaped(IN1K["train"], IN1K["val"], IN1K["classes"]), data, IN1K["shard"], 0, False,
                     overwrite=True)
    r["write_shards_s"] = time.perf_counter() - t0
    indexed = work / "in1k-manifest"
    r["manifest_build_s"], _ = timed("manifest", f"{data}/*.tar", indexed, "--num-classes", 1000, "--overwrite",
                                     "--no-decode-check")
    manifest = Manifest.load(indexed)
    r["shards"] = len(manifest.shards("train"))
    r["plan_s_per_epoch"] = plan_seconds(manifest.shard_counts("train"), recipe.repeats, recipe.mixes)

    ckpt = work / "regnety_002-1000.safetensors"
    if not ckpt.exists():
        save_file(create_classifier("regnety_002", 1000).state_dict(), str(ckpt))
    store = work / "in1k.zarr"
    shutil.rmtree(store, ignore_errors=True)
    cache = ["teacher-cache", "--manifest", indexed, "--checkpoint", ckpt, "--teacher", "regnety_002",
             "--teacher-input-size", 32, "--recipe", o.recipe, "--epochs", 300, "--topk", 10, "--workers", o.workers,
             "--device", "cpu", "--out", store]
    launched = time.time()
    first = run_for(cache, o.window, lambda _: newest_completion(store) > launched)
    built = TeacherCache.open(store)  # as another process sees it
    views, unit = views_done(built), built.unit_size(0, 0)
    r["teacher_cache_startup_s"] = first["ready_s"]
    relaunched = time.time()
    rerun = run_for(cache, 2, lambda _: newest_completion(store) > relaunched)
    window = first["stopped_s"] - first["ready_s"]
    # the views completed after the first unit over the time after it (units under way at the stop are not
    # counted: a slight underestimate)
    r["stage_one"] = {"window_s": window, "views_per_s": (views - unit) / window,
                      "rerun_first_unit_s": rerun["ready_s"],
                      **{k: first[k] for k in ("main_rss_mb", "worker_rss_mb", "worker_private_mb")}}
    r.update(store_layout(store))
    # a finished store's files: one object per unit; packed (`cache pack`, 8 epochs a file): a shard file per data
    # shard and block of epochs, and a completion file per data shard
    metadata_files = r["store_files"] - r["store_files_written"]
    r["store_files_complete"] = metadata_files + len(built.shards) * built.config.epochs
    r["store_files_packed"] = metadata_files + len(built.shards) * (-(-built.config.epochs // 8) + 1)
    r["cache_info_s"], _ = timed("cache", "info", store)

    fill_epoch(store, 0)
    run = work / "student"
    shutil.rmtree(run, ignore_errors=True)
    student = ["train-student", "--manifest", indexed, "--cache", store, "--recipe", o.recipe, "--epochs", 1,
               "--student", "deit_tiny_distilled_patch16_224", "--img-size", recipe.input_size, "--patch-size", 4,
               "--depth", 2, "--embed-dim", 48, "--num-heads", 3, "--batch-size", 128, "--workers", o.workers,
               "--device", "cpu", "--check-fingerprints", "off", "--eval-split", "none", "--out", run]
    proc_out = run_for(student, o.window, lambda out: "first step" in out)
    match = re.search(r"first step ([\d.]+) s after", proc_out["stdout"])
    steps = re.search(r"\(step (\d+)\)", proc_out["stderr"])
    r["student_startup_s"] = float(match.group(1)) if match else float("nan")
    r["stage_two"] = {"window_s": proc_out["stopped_s"] - r["student_startup_s"],
                      "images_per_s": int(steps.group(1)) * 128 / (proc_out["stopped_s"] - r["student_startup_s"])
                      if steps else float("nan"),
                      **{k: proc_out[k] for k in ("main_rss_mb", "worker_rss_mb", "worker_private_mb")}}
    r["worker_private_mb"] = worker_private_memory(work)
    r["in21k"] = in21k_layout(work, recipe)
    r["verify"] = verify_section(work, Recipe.load("deit"), o.verify_epochs)
    write_json_atomic(o.out / "scale.json", r)
    publish(o, r)
    typer.echo(json.dumps({k: r[k] for k in ("train_samples", "student_startup_s", "teacher_cache_startup_s",
                                             "cache_info_s", "store_files", "worker_private_mb")}))


def publish(o: ScaleBenchOptions, r: dict) -> None:
    """scale.md (and the README's scale section, if asked) from the figures."""
    md = scale_markdown(r)
    publish_markdown(o.out, "scale", md, o.readme)
    typer.echo(md)
