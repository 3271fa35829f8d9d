"""The measurements behind `replaykd bench`, each side by side with its baseline (interleaved, medians)."""
from __future__ import annotations

import json
import queue
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

import replaykd.replay as replay_mod
from replaykd import teacher as teachers
from replaykd import storage as storages
from replaykd.cache import CacheRequest, TeacherCache, UnitArrays
from replaykd.claims import Claims
from replaykd.cache_report import summarize
from replaykd.device import autocast, pick_device
from replaykd.errors import ReplayKDError
from replaykd.finish import Finisher
from replaykd.loader import CacheViews, ReplayViews, ViewCollate
from replaykd.manifest import Manifest
from replaykd.plan import chosen_positions
from replaykd.recipe import Recipe
from replaykd.runs import RunFolder, mean_rate
from replaykd.student import build_student
from replaykd.threads import cores
from replaykd.work import ShardWork
from replaykd.stages.bench.runner import CLI, replaykd


# What the rates of P1 and of the ensembles' cost are, measured side by side (on the CPU).
SIDE_BY_SIDE = "images per CPU second of runs started together, one thread each, over the epochs after the first"
# The ensemble sizes the bench may measure, as its JSON names their ratios to one cache.
ENSEMBLE_NAMES = {2: "two_caches", 4: "four_caches"}


def interleaved(fns: dict, repeats: int) -> dict:
    """Run each timed function once per round, `repeats` rounds; medians."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def teacher_cache_vs_bare(data: Path, ckpt: Path, preset, workers: int, device: str, repeats: int, work: Path) -> dict:
    """Views/s of `teacher-cache` (views by workers, writes on a thread) vs the bare teacher forward on the same batches."""
    manifest, rec = Manifest.load(data), Recipe.load(preset.recipe)
    dev = pick_device(device)
    net = teachers.load(preset.teacher, ckpt, preset.teacher_input).wrap(rec.mean, rec.std, dev)
    ds = ReplayViews(manifest, rec, 0, 0, rank=0, world_size=1)
    collate, finish = ViewCollate(manifest.num_classes, rec.smoothing), Finisher(rec)
    views, size = list(ds), preset.teacher_batch
    batches = [finish(collate(views[i:i + size]), dev) for i in range(0, len(views), size)]  # finished, on the device
    def bare():
        with torch.inference_mode(), autocast(dev):
            for b in batches:
                net(b)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    rates = []

    def cache():
        out = work / "stage-one-store"
        shutil.rmtree(out, ignore_errors=True)
        s = json.loads(replaykd("teacher-cache", *cache_args(data, ckpt, preset, out, preset.cache_epochs, workers,
                                                             device), "--json", fresh=preset.fresh))
        rates.append(s["this_process"]["loop_views_per_s"])

    med = interleaved({"bare": bare, "cache": cache}, repeats)
    bare_rate, cache_rate = len(views) / med["bare"], statistics.median(rates)
    return {"teacher": preset.teacher, "recipe": preset.recipe, "epochs": preset.cache_epochs,
            "batch_size": preset.teacher_batch, "workers": workers, "device": str(dev), "bare_teacher_views_per_s": bare_rate,
            "teacher_cache_views_per_s": cache_rate, "ratio": cache_rate / bare_rate}


def cache_args(data: Path, ckpt: Path, preset, out: Path, epochs: int, workers: int, device: str) -> list:
    """teacher-cache's arguments for a preset."""
    size = ["--teacher-input-size", preset.teacher_input] if preset.teacher_input else []
    return ["--manifest", data, "--checkpoint", ckpt, "--out", out, "--recipe", preset.recipe, "--teacher",
            preset.teacher, *size, "--epochs", epochs, "--topk", 10, "--batch-size", preset.teacher_batch,
            "--workers", workers, "--device", device]


def decodes_per_view(manifest: Manifest, recipe: Recipe, epochs: int) -> dict:
    """Image decodes per view made by stage one's loader over `epochs` (each shard decoded once: 1 / epochs) and by
    stage two's (only the images of an epoch's chosen samples, once for all their repeats: 1 / repeats), counted
    in-process."""
    count = [0]
    real = replay_mod.decode_image  # every loader decode goes through replay.decode_positions

    def counting(*args):
        count[0] += 1
        return real(*args)

    replay_mod.decode_image = counting
    try:
        jobs = queue.Queue()
        for s in range(len(manifest.shards("train"))):
            jobs.put(ShardWork(s, tuple(range(epochs))))
        jobs.put(None)
        views = sum(1 for _ in CacheViews(manifest, recipe, 0, jobs))
        stage_one, count[0] = count[0] / views, 0
        views = sum(1 for _ in ReplayViews(manifest, recipe, 0, 0, rank=0, world_size=1))
        return {"recipe": recipe.name, "repeats": recipe.repeats, "epochs": epochs, "stage_one": stage_one,
                "stage_two": count[0] / views}
    finally:
        replay_mod.decode_image = real


def coverage(n: int, shard_size: int, repeats: int, epochs=(1, 3, 10), ranks: int = 8) -> dict:
    """Fraction of n samples seen within the first 1, 3, 10 epochs: our balanced rule (the plan's own code, over
    shards of `shard_size`), and DeiT's RASampler (its index arithmetic, with `ranks` processes)."""
    shards = [(f"s{i}", min(shard_size, n - a)) for i, a in enumerate(range(0, n, shard_size))]
    ours, deit = np.zeros(n, bool), np.zeros(n, bool)
    out = {"samples": n, "repeats": repeats, "balanced": {}, f"deit_rasampler_{ranks}_ranks": {}}
    per_rank = int(np.ceil(n * repeats / ranks))
    selected = n // 256 * 256 // ranks
    for epoch in range(max(epochs)):
        start = 0
        for name, size in shards:
            ours[start + np.array(chosen_positions(size, repeats, 0, epoch, name), dtype=np.int64)] = True
            start += size
        perm = np.random.default_rng(epoch).permutation(n)
        copies = np.repeat(perm, repeats)
        copies = np.concatenate([copies, copies[: per_rank * ranks - len(copies)]])
        for rank in range(ranks):
            deit[copies[rank::ranks][:selected]] = True
        if epoch + 1 in epochs:
            out["balanced"][epoch + 1] = float(ours.mean())
            out[f"deit_rasampler_{ranks}_ranks"][epoch + 1] = float(deit.mean())
    return out


def flops(fn) -> int:
    """FLOPs counted by torch.utils.flop_counter for one call of `fn`."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def store_copies(store: Path, count: int) -> list[Path]:
    """`store` and count - 1 fresh copies of it beside it: valid caches of the same views, each read from its own
    files, so that a run given all of them reads and combines `count` caches as an ensemble run does."""
    copies = [store]
    for i in range(2, count + 1):
        copy = store.with_name(f"{store.name}-{i}")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(store, copy)
        copies.append(copy)
    return copies


def student_kd_modes(data: Path, ckpt: Path, preset, student: dict, workers: int, device: str, repeats: int,
                     work: Path) -> dict:
    """Student images/s on labels only (the same distilled student, and DeiT's baseline without the distillation
    token), with KD from the cache and from the online teacher; P1 and the cost of 2 and 4 caches (an ensemble's)
    side by side; and the FLOP bound."""
    store = work / "stage-two-store"
    replaykd("teacher-cache", *cache_args(data, ckpt, preset, store, preset.epochs, workers, device),
             fresh=preset.fresh)  # creates or finds it
    stores = store_copies(store, max(preset.ensembles))
    common = ["--manifest", data, "--recipe", preset.recipe, "--epochs", preset.epochs, "--batch-size", preset.batch,
              "--workers", workers, "--device", device, "--student", student["student"],
              *[a for k in ("patch_size", "depth", "embed_dim", "num_heads") if student.get(k)
                for a in (f"--{k.replace('_', '-')}", student[k])]]
    size = ["--teacher-input-size", preset.teacher_input] if preset.teacher_input else []
    variants = {"no_kd": ["--distillation", "none"],
                "no_kd_same_student": ["--distillation", "none", "--keep-distillation-token"],
                "cache_kd": ["--cache", store],
                "online_kd": ["--online-teacher", preset.teacher, "--teacher-checkpoint", ckpt, *size]}
    ensembles = {f"cache_kd_{n}": [a for s in stores[:n] for a in ("--cache", s)] for n in preset.ensembles}
    dev = pick_device(device)
    # on the CPU, P1 and an ensemble's cost (ratios near 1, read to a few percent) are measured side by side per CPU
    # second; on a GPU the cache's cost shows in wall time (whether the loader keeps up), one run at a time
    side = dev.type == "cpu"
    if not side:
        variants.update(ensembles)
    rates: dict[str, list[float]] = {k: [] for k in variants}

    def one(name):
        out = work / f"student-{name}"
        shutil.rmtree(out, ignore_errors=True)
        replaykd("train-student", "--out", out, *common, *variants[name], fresh=preset.fresh)
        rates[name].append(mean_rate(RunFolder(out).log()))

    interleaved({k: (lambda k=k: one(k)) for k in variants}, repeats)
    med = {k: statistics.median(v) for k, v in rates.items()}
    if side:
        arms = {k: [*common, *variants[k]] for k in ("cache_kd", "no_kd_same_student")}
        p1 = side_by_side("p1", arms, preset.p1_rounds, preset.fresh, work)
        ens = side_by_side("ensemble", {"cache_kd": arms["cache_kd"], **{k: [*common, *v]
                                                                         for k, v in ensembles.items()}},
                           preset.side_rounds, preset.fresh, work)
    else:
        p1, ens = ({k: rates[k] for k in names} for names in (("cache_kd", "no_kd_same_student"),
                                                               ("cache_kd", *ensembles)))
    p1_ratios = ratios(p1, "cache_kd", "no_kd_same_student")
    ens_rounds = {n: ratios(ens, f"cache_kd_{n}", "cache_kd") for n in preset.ensembles}
    m, rec = Manifest.load(data), Recipe.load(preset.recipe)
    net = build_student(student["student"], m.num_classes, rec.input_size, False, 0.1,
                        {k: student.get(k) for k in ("patch_size", "depth", "embed_dim", "num_heads")}).model.to(dev)
    teacher = teachers.load(preset.teacher, ckpt, preset.teacher_input).wrap(rec.mean, rec.std, dev)
    x = torch.randn(2, 3, rec.input_size, rec.input_size, device=dev)  # FLOPs are linear in the batch
    s_fb = flops(lambda: net(x)[0].sum().backward()) // 2
    with torch.no_grad():
        t_f = flops(lambda: teacher(x)) // 2
    return {"student": describe(student), "teacher": preset.teacher, "batch_size": preset.batch, "device": str(dev),
            **{f"{k}_images_per_s": v for k, v in med.items()},
            # P1, what the cache costs: the same model, its distillation head fed from the cache or by the labels
            "p1_same_student": statistics.median(p1_ratios), "p1_same_student_rounds": p1_ratios,
            "side_by_side_rates_are": SIDE_BY_SIDE if side else "images per second, one run at a time (interleaved)",
            "side_by_side_turns": side,  # each run started first in turn, round by round
            "p1_rates": {k: statistics.median(v) for k, v in p1.items()},
            "p1_same_student_wall": med["cache_kd"] / med["no_kd_same_student"],
            # DeiT's comparison: the distilled model against its baseline, a model without the distillation token
            "cached_over_no_kd": med["cache_kd"] / med["no_kd"], "cached_over_online": med["cache_kd"] / med["online_kd"],
            # what an ensemble of n caches costs over one (n copies of the store: the same views, n reads per unit)
            **{f"{ENSEMBLE_NAMES[n]}_over_one": statistics.median(v) for n, v in ens_rounds.items()},
            **{f"{ENSEMBLE_NAMES[n]}_over_one_rounds": v for n, v in ens_rounds.items()},
            "ensemble_rates": {k: statistics.median(v) for k, v in ens.items()},
            "student_fwd_bwd_flops_per_image": s_fb, "teacher_fwd_flops_per_image": t_f, "flop_bound_online_cost": (s_fb + t_f) / s_fb}


def side_by_side(tag: str, args: dict[str, list], rounds: int, fresh: bool, work: Path) -> dict[str, list[float]]:
    """Each train-student run's images per CPU second (its process and loader workers, over the epochs after the
    first, which starts the workers beside the other runs' start-up), the runs started together `rounds` times with
    one compute thread each (not `fresh`: one after the other, in this process), round by round.

    One after the other, a short run's rate moves by more than the few percent these ratios must be read to on a
    shared machine, as the host's other work takes its cores away (and with them what a CPU second does); side by
    side, the runs meet the same machine at the same moments, and what one does more than the other (reading a
    cache, checking and attaching its rows) shows as the CPU it adds per image, as on a machine whose cores are all
    busy.
    """
    outs = {name: work / f"{tag}-{name}" for name in args}  # each run's folder
    rates: dict[str, list[float]] = {name: [] for name in args}
    names = list(args)
    for r in range(rounds):
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
        # side by side, one thread each throughout: by default a run takes more once the other has ended, for its
        # last epochs only; and each run started first in turn, as the one started last tends to end last and
        # have the machine to itself for a moment (measured: that favoured it by a few percent)
        threads = ["--threads", 1] if fresh else []
        order = names[r % len(names):] + names[:r % len(names)]
        runs = {name: ["train-student", "--out", outs[name], *args[name], *threads] for name in order}
        if fresh:
            together(runs, work)
        else:
            for command in runs.values():
                replaykd(*command, fresh=False)
        for name, out in outs.items():
            log = RunFolder(out).log()
            rate = mean_rate(log[1:] or log, "train_cpu_seconds")
            if rate is None:
                raise ReplayKDError("the bench measures CPU seconds from /proc, which this system does not have")
            rates[name].append(rate)
    return rates


def ratios(rates: dict[str, list[float]], over: str, under: str) -> list[float]:
    """Round by round, one run's rate over another's."""
    return [a / b for a, b in zip(rates[over], rates[under])]


def together(commands: dict[str, list], work: Path) -> None:
    """Start replaykd commands at once in fresh processes and wait for all (their errors into files under `work`, so
    that no pipe fills and stalls one of them)."""
    procs = {}
    try:
        for name, args in commands.items():
            with open(work / f"{name}.stderr", "w") as err:
                procs[name] = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.DEVNULL, stderr=err)
        for name, proc in procs.items():
            if proc.wait():
                tail = (work / f"{name}.stderr").read_text()[-3000:]
                raise ReplayKDError(f"replaykd {commands[name][0]} ({name}) failed during the bench:\n{tail}")
    finally:  # one failed (or the bench was stopped): the others stop too, rather than run on unwatched
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def describe(student: dict) -> str:
    """A student entry in words."""
    extra = ", ".join(f"{k} {v}" for k, v in student.items() if k != "student" and v)
    return student["student"] + (f" ({extra})" if extra else "")


def stored_bytes_per_view(store: Path) -> dict:
    """Bytes per cached view of a real store (its unit objects, metadata excluded)."""
    cache = TeacherCache.open(store)
    s = summarize(cache)
    data = sum(f.stat().st_size for f in (Path(store) / "units" / "c").rglob("*") if f.is_file())
    return {"store": str(store), "topk": s.topk, "num_classes": s.num_classes, "views": s.views_cached,
            "stored_bytes_per_view": data / max(1, s.views_cached), "teacher": s.teacher}


def cache_size_and_reads(work: Path, views: int = 4096) -> list[dict]:
    """Bytes per view for k = 5, 10, 100 over 1000 classes (raw vs the stored codec chain) and read rate."""
    rng = np.random.default_rng(0)
    out, per_shard = [], 1024
    shards = [f"train-{i:06d}.tar" for i in range(max(1, views // per_shard))]
    views = per_shard * len(shards)
    for k in (5, 10, 100):
        store = work / f"size-k{k}"
        shutil.rmtree(store, ignore_errors=True)
        teacher = teachers.TeacherIdentity("synthetic", "synthetic", None, None, "synthetic", 1000, (0.5,) * 3,
                                           (0.5,) * 3, 224, "bicubic")
        request = CacheRequest("synthetic", "train", {}, "synthetic", "synthetic", 0, 1000, "pillow", teacher, k)
        claims = Claims(storages.for_root(store), "bench")
        cache = TeacherCache.create_or_grow(store, request, 1, shards, [per_shard] * len(shards), 1, False, {},
                                            claims)
        claims.release_all()
        for s in range(len(shards)):
            # a confident teacher: one class ~6 logits above N(0, 1.5) noise over 1000 classes
            logits = torch.from_numpy(rng.normal(0, 1.5, (per_shard, 1000)).astype(np.float32))
            logits[torch.arange(per_shard), torch.from_numpy(rng.integers(1000, size=per_shard))] += 6.0
            p, c = logits.softmax(-1).topk(k)
            unit = UnitArrays.zeros(per_shard, k, 1000)
            unit.probs[:], unit.classes[:] = p.half().numpy(), c.numpy()
            unit.fingerprint[:] = rng.integers(2**32, size=per_shard, dtype=np.uint32)
            cache.write_unit(0, s, unit)
        data_bytes = sum(f.stat().st_size for f in (store / "units" / "c").rglob("*") if f.is_file())
        t0 = time.perf_counter()
        for s in range(len(shards)):
            cache.read_unit(0, s)
        read_s = time.perf_counter() - t0
        raw = sum(getattr(unit, name).itemsize * (k if per_class else 1)
                  for name, (_, per_class) in UnitArrays.specs(1000).items())
        out.append({"k": k, "raw_bytes_per_view": raw, "stored_bytes_per_view": data_bytes / views,
                    "read_records_per_s": views / read_s,
                    "distribution": "synthetic: 1000 classes, one ~6 logits above N(0, 1.5)"})
    return out


def concurrent_students(data: Path, preset, student: dict, workers: int, device: str, work: Path) -> dict:
    """Images/s of a train-student run alone, and of each of two started together on the same machine (with the
    defaults: each process takes its share of the cores among the runs computing)."""
    common = ["train-student", "--manifest", data, "--recipe", preset.recipe, "--epochs", preset.epochs,
              "--batch-size", preset.batch, "--workers", workers, "--device", device, "--distillation", "none",
              "--student", student["student"], *[a for k in ("patch_size", "depth", "embed_dim", "num_heads")
                                                 if student.get(k) for a in (f"--{k.replace('_', '-')}", student[k])]]
    outs = [work / f"concurrent-{i}" for i in range(3)]
    for out in outs:
        shutil.rmtree(out, ignore_errors=True)
    replaykd(*common, "--out", outs[0])
    together({out.name: [*common, "--out", out] for out in outs[1:]}, work)
    alone, both = mean_rate(RunFolder(outs[0]).log()), [mean_rate(RunFolder(out).log()) for out in outs[1:]]
    return {"student": describe(student), "workers": workers, "cores": cores(),
            "alone_images_per_s": alone, "concurrent_images_per_s": both,
            "concurrent_total_over_alone": sum(both) / alone}
