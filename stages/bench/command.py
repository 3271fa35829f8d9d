"""`replaykd bench`: what the cache buys, measured side by side (interleaved repetitions, medians) into JSON."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import typer
from safetensors.torch import save_file

from replaykd.device import device_name, pick_device
from replaykd.errors import ReplayKDError
from replaykd.io import publish_markdown, write_json_atomic
from replaykd.manifest import Manifest
from replaykd.models import create_classifier
from replaykd.reader import read_shard
from replaykd.recipe import Recipe
from replaykd.shards import write_shards
from replaykd.sources import Source, digits_source
from replaykd.stages.bench import loader as loader_bench
from replaykd.stages.bench import measure
from replaykd.stages.options import BenchOptions

# P1's goal: cached KD at 97% or more of the images/s of the same student trained on labels only.
P1_GOAL = 0.97
# Issue 26's goal: a student reading 2 or 4 caches (an ensemble) at 95% or more of its images/s from one cache.
ENSEMBLE_GOAL = 0.95
# The loader at ImageNet's shard size: replay views/s per core over timm's, and a worker's private MB.
SHARD1000_GOAL, SHARD1000_MB = 1.5, 300
TINY_DEIT = {"student": "deit_tiny_distilled_patch16_224", "patch_size": 4, "depth": 6, "embed_dim": 96, "num_heads": 3}


@dataclass(frozen=True)
class Preset:
    """Sizes of one bench: data sets (stage one uses the first), recipe, teacher, students, batch and epochs per
    measurement."""

    sources: tuple[str, ...]
    recipe: str
    teacher: str
    teacher_input: int | None
    students: tuple[dict, ...]
    batch: int
    teacher_batch: int
    epochs: int
    cache_epochs: int
    fresh: bool = True  # run the measured commands in fresh processes, as users do (smoke: in this process)
    ensembles: tuple[int, ...] = (2, 4)  # caches per stage-two ensemble run, each measured against one cache
    big_shard: int = 1000  # photographs in the shard of the loader's ImageNet-sized measurement (smoke: fewer)
    # rounds of the runs started together, for P1 and for the ensembles' cost (multiples of 2 and 3: each run starts
    # first equally often): a round's ratio moves by about 4% on a shared 2-core host (measured 2026-12-03), so P1,
    # read against a goal 1-3% away, takes more of them
    p1_rounds: int = 12
    side_rounds: int = 6


PRESETS = {
    # CPU: the digits demo's sizes (16 px views, regnety_002 at 32 px) with DeiT-Ti's width at 6 blocks (0.7 M
    # parameters; the demo trains 4 blocks to fit its 8 minutes).
    # Stage two also on 64 px JPEG tiles of real photographs in 1000-image shards (JPEG decoding, bigger shards).
    "small": Preset(("digits", "photo-tiles"), "digits", "regnety_002", 32, (TINY_DEIT,), 64, 256, 4, 8),
    # The small preset on a few hundred digits alone: every section once, to check the bench itself runs (the tests
    # use it). Its student has 2 blocks, not 6: stage two trains it nine times (labels twice, one cache, online; P1's two arms; 1,
    # 2 and 4 caches), and the suite's time is spent on what the bench's code does, not on the student's depth.
    "smoke": Preset(("digits-few",), "digits", "regnety_002", 32, ({**TINY_DEIT, "depth": 2},), 64, 256, 1, 1,
                    fresh=False, big_shard=48, p1_rounds=1, side_rounds=1),
    # GPU: DeiT's sizes on ImageNet-sized JPEGs cut from real photographs (500x375, 1000 classes), regnety_160 at 224.
    "imagenet": Preset(("photographs",), "deit", "regnety_160", None,
                       tuple({"student": f"deit_{s}_distilled_patch16_224"} for s in ("tiny", "small", "base")), 256, 256, 1, 2),
}


SOURCES = {  # name -> (data set of n images, shard size, classes)
    "digits": (lambda n: digits_source(0.2, 0, 32), 200, 10),
    "digits-few": (lambda n: first_items(digits_source(0.2, 0, 32), n), 200, 10),
    "photo-tiles": (lambda n: loader_bench.photo_source(n, (64, 64), 10), 1000, 10),
    "photographs": (lambda n: loader_bench.photo_source(n, (500, 375), 1000), 1024, 1000),
}


def first_items(source: Source, n: int) -> Source:
    """`source` cut to its first `n` training items and a quarter as many of each other split's."""
    return dataclasses.replace(source, splits={name: items[:n if name == "train" else max(1, n // 4)]
                                               for name, items in source.splits.items()})


def bench_shards(work: Path, source: str, images: int) -> Path:
    """Shards of one of the bench's data sets (made once per bench folder)."""
    make, shard_size, _ = SOURCES[source]
    data = work / f"data-{source}"
    if not (data / "manifest.json").exists():
        write_shards(make(images), data, shard_size, 0, False)
    return data


def bench_data(work: Path, preset: Preset, source: str, images: int) -> tuple[Path, Path]:
    """Shards of a data set and a teacher checkpoint (random weights: throughput does not need trained ones)."""
    data, num_classes = bench_shards(work, source, images), SOURCES[source][2]
    ckpt = work / f"{preset.teacher}-{num_classes}.safetensors"
    if not ckpt.exists():
        save_file(create_classifier(preset.teacher, num_classes).state_dict(), str(ckpt))
    return data, ckpt


def bench_markdown(r: dict) -> str:
    """The bench results as markdown."""
    lines = [f"Device: {r['device']}; torch {r['torch']}; {r['date']}; command `{r['command']}`; medians of "
             f"{r['repeats']} interleaved repetitions.", ""]
    lo = r["loader"]
    lines += ["Loader, one core, views/s (timm's ordinary path: every view decoded, `create_transform`, `Mixup`; the "
              "replay: one decode per sample for its repeats, uint8 views + erasing/mixing parameters + fingerprints, "
              "float steps left to the consumer):", "",
              "| recipe, images | Pillow | timm views/s | replay views/s | replay / timm |", "|---|---|---|---|---|"]
    for x in lo["per_core"]:
        lines.append(f"| {x['recipe']} ({x['input_size']} px, {x['repeats']} repeats), {x['images']} {x['what']} | "
                     f"{x['pillow']} | {x['timm_views_per_s']:.0f} | {x['replay_views_per_s']:.0f} | "
                     f"**{x['replay_over_timm']:.2f}** |")
    deit = next(x for x in lo["per_core"] if x["recipe"] == "deit")
    lines += ["", f"`loader.replay_over_timm_per_core` **{lo['replay_over_timm_per_core']:.2f}** (speed-ups: "
              f"{', '.join(lo['speedups']) or 'none'}; the replay against stock timm); stock "
              f"**{lo['replay_over_timm_per_core_stock']:.2f}**. Replay ms per view (DeiT, stock): "
              + ", ".join(f"{k} {v:.3f}" for k, v in deit["replay_ms_per_view"].items())
              + f"; finishing on this CPU would add {deit['finish_on_cpu_ms_per_view']:.3f} (on a GPU it runs there; "
              f"erasing values included, drawn there from the states a worker sends). A worker sends "
              f"{deit['worker_bytes_per_view']['pickled'] / 1e3:.1f} KB a view in its batch's pickle besides the "
              f"{deit['worker_bytes_per_view']['pixels'] / 1e3:.1f} KB of pixels in shared memory. "
              f"Stage-two loader with {lo['full_loader']['workers']} workers: {lo['full_loader']['views_per_s']:.0f} "
              f"views/s (DeiT recipe, real photographs). Reduced-size JPEG decoding could serve "
              f"{100 * lo['draft_eligible']:.1f}% of decoded images (all their repeats' crops at least twice 224 px), "
              "so it is not implemented."]
    big = r.get("loader_shard1000")
    if big:
        lines += ["", f"At ImageNet's shard size ({big['images']} real photographs in one shard, {big['recipe']} "
                  f"recipe, {big['pillow']}): the stage-two loader with one worker at the default "
                  f"{big['decode_memory_mb']} MB decode budget made {big['views_per_cpu_s']:.0f} views per CPU second "
                  f"(its worker's and the consuming thread's; {big['views_per_s']:.0f} per second of wall time) against "
                  f"{big['timm_loader_views_per_cpu_s']:.0f} ({big['timm_loader_views_per_s']:.0f}) for timm's ordinary "
                  "path through the same DataLoader (one worker, the same views, epochs interleaved; "
                  f"{big['timm_in_process_views_per_s']:.0f} in-process on one core): "
                  "`loader_shard1000.replay_over_timm` per core "
                  f"**{big['replay_over_timm']:.2f}** (goal >= {SHARD1000_GOAL}), {big['decodes_per_view']:.3f} "
                  f"decodes per view (one per sample for its {big['repeats']} repeats: "
                  f"{1 / big['repeats']:.3f}), the worker's peak private memory **{big['worker_private_mb']} MB** "
                  f"(goal <= {SHARD1000_MB})."]
    s1 = r["stage_one"]
    lines += ["", f"Stage one ({s1['teacher']}, {s1['device']}, batch {s1['batch_size']}, {s1['workers']} workers): "
              f"teacher-cache {s1['teacher_cache_views_per_s']:.0f} views/s (its loop, start-up excluded) vs the bare teacher forward "
              f"{s1['bare_teacher_views_per_s']:.0f} views/s: ratio **{s1['ratio']:.2f}**."]
    d = lo["decodes_per_view"]
    lines += ["", f"Decodes per view ({d['recipe']} recipe, real photographs): {d['stage_one']:.3f} in stage one "
              f"({d['epochs']} epochs from one decode per shard), {d['stage_two']:.3f} in stage two (one decode serves "
              f"a sample's {d['repeats']} repeats)."]
    lines += ["", "| stage two student, data | labels only img/s: same student / DeiT's baseline | cached KD img/s | "
              "online KD img/s | P1: cached / same student on labels (below) | cached / baseline on labels | "
              "cached / online | FLOP bound online/cached |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {s['student']}, {s['data']} | {figure(s.get('no_kd_same_student_images_per_s'), '.0f')} / "
              f"{s['no_kd_images_per_s']:.0f} | {s['cache_kd_images_per_s']:.0f} | {s['online_kd_images_per_s']:.0f} | "
              f"**{figure(s.get('p1_same_student'), '.3f')}** | **{s['cached_over_no_kd']:.3f}** | "
              f"**{s['cached_over_online']:.2f}** | {s['flop_bound_online_cost']:.2f} |" for s in r["stage_two"]]
    p1 = r.get("p1_same_student")
    how = _measured(r).get("side_by_side_rates_are")
    spread = "; ".join(f"{s['data']} {min(s['p1_same_student_rounds']):.3f} to {max(s['p1_same_student_rounds']):.3f} "
                       f"over {len(s['p1_same_student_rounds'])} rounds, per second one after the other "
                       f"{s['p1_same_student_wall']:.3f}" for s in r["stage_two"] if s.get("p1_same_student_rounds"))
    measured = (", ".join(f"{d} **{v:.3f}**" for d, v in p1["per_data_set"].items())
                + f" ({'met' if p1['met'] else 'not met'}; a data set's figure is the lowest of its students"
                + (f"; each round's ratio: {spread})" if spread else ")")
                if p1 else "not measured (this bench.json was written before P1 was)")
    rates = {measure.SIDE_BY_SIDE: "images per CPU second (the run's process and its loader workers, the epochs after "
             "the first, one compute thread each)", None: "images/s"}.get(how, how)
    turns = ", each started first in turn" if _measured(r).get("side_by_side_turns") else ""
    way = (", the two runs started together so that both meet the machine as it is at the same moments (one after "
           f"the other, a short run's rate here moves by more than the few percent P1 must be read to){turns}, the "
           "median of its rounds" if how == measure.SIDE_BY_SIDE else ", the median of its rounds' ratios" if how else "")
    lines += ["", f"P1, what the cache costs, like for like: {rates} of one student (the distilled DeiT, its "
              "distillation token kept) with hard KD from the cache over the same on the labels only (both heads on "
              f"the labels, `--distillation none --keep-distillation-token`){way}, goal >= "
              f"{p1['goal'] if p1 else P1_GOAL:.2f}: {measured}"
              + ". Cached / baseline is DeiT's own comparison, the distilled DeiT with cached KD against DeiT's baseline "
              "without the distillation token trained on the labels (`--distillation none`): a "
              "cheaper model, so it prices the distillation token and its loss, not the cache."]
    lines += ensemble_markdown(r)
    cc = r.get("concurrent")
    if cc:
        lines += ["", f"Two train-student runs at once on {cc['cores']} cores ({cc['student']}, {cc['workers']} loader "
                  f"workers each, default threads): {' and '.join(f'{v:.0f}' for v in cc['concurrent_images_per_s'])} "
                  f"img/s, against {cc['alone_images_per_s']:.0f} img/s alone: together "
                  f"**{cc['concurrent_total_over_alone']:.2f}x** one run alone."]
    s3 = r.get("object_store")
    if s3:
        two, one = s3["stage_two_loader_views_per_s"], s3["stage_one_views_per_s"]
        lines += ["", f"Object storage ({s3['server']}; DeiT recipe, {s3['images']} real photographs in "
                  f"{s3['shards']} shards, {s3['workers']} workers): stage-two loader reading shards and cache from S3 "
                  f"{two['s3']:.0f} views/s vs local files {two['local']:.0f}: **{s3['stage_two_s3_over_local']:.2f}x**; "
                  f"stage one reading shards from S3 and writing its store there {one['s3']:.0f} views/s vs local "
                  f"{one['local']:.0f}: **{s3['stage_one_s3_over_local']:.2f}x**. The server process kept "
                  f"{s3['server_cores_busy']['stage_two']:.2f} and {s3['server_cores_busy']['stage_one']:.2f} of "
                  "this machine's cores busy meanwhile (on a cluster it runs elsewhere). Requests to the store, "
                  "counted by a proxy: stage one "
                  f"**{s3['stage_one_requests_per_unit']:.2f} per unit written** (claims included), stage two "
                  f"**{s3['stage_two_requests_per_unit']:.2f} per unit read** (plus "
                  f"{s3['stage_two_other_requests_per_epoch']} per epoch, the loader workers opening the store)."]
    lines += ["", "| cache, k of 1000 classes (synthetic teacher) | raw bytes/view | stored bytes/view | reads (records/s, 1 process) |",
              "|---|---|---|---|"]
    lines += [f"| {c['k']} | {c['raw_bytes_per_view']} | {c['stored_bytes_per_view']:.1f} | {c['read_records_per_s']:.0f} |"
              for c in r["cache_size"]]
    real = r.get("real_cache")
    lines += ["", f"Real teacher outputs ({real['teacher']}, top-{real['topk']} of {real['num_classes']} classes, "
              f"{real['views']} views of `{real['store']}`): **{real['stored_bytes_per_view']:.1f}** stored bytes/view."
              if real else "Real teacher outputs: not measured (no demo cache; run `make teacher-cache` first)."]
    cov = r["coverage"]
    deit = next(k for k in cov if k.startswith("deit_"))
    lines += ["", f"Coverage with {cov['repeats']} repeats ({cov['samples']} samples): distinct samples seen after 1 / 3 / "
              f"10 epochs: balanced (ours) " + " / ".join(f"{100 * v:.1f}%" for v in cov["balanced"].values())
              + f"; DeiT's RASampler ({deit.split('_')[2]} ranks) " + " / ".join(f"{100 * v:.1f}%" for v in cov[deit].values())
              + "."]
    return "\n".join(lines) + "\n"


def _measured(r: dict) -> dict:
    """The first stage-two entry of a bench.json, which says how its P1 and ensemble rates were measured ({}: none)."""
    return r["stage_two"][0] if r["stage_two"] else {}


def ensemble_markdown(r: dict) -> list[str]:
    """The ensemble's cost in images/s, a row per stage-two student (nothing for a bench.json from before it)."""
    ens = r.get("ensemble")
    if not ens:
        return []
    sizes = ens["caches"]
    unit = "img/CPU-s" if _measured(r).get("side_by_side_rates_are") == measure.SIDE_BY_SIDE else "img/s"
    lines = ["", f"| stage two student, data | one cache {unit} | "
             + " | ".join(f"{n} caches {unit}" for n in sizes)
             + " | " + " | ".join(f"{n} caches / one (rounds)" for n in sizes) + " |",
             "|---|---|" + "---|---|" * len(sizes)]
    for s in r["stage_two"]:
        rates, names = s.get("ensemble_rates"), [measure.ENSEMBLE_NAMES[n] for n in sizes]
        rounds = {name: ", ".join(f"{x:.2f}" for x in s.get(f"{name}_over_one_rounds", [])) for name in names}
        lines.append(f"| {s['student']}, {s['data']} | {figure(rates and rates['cache_kd'], '.0f')} | "
                     + " | ".join(figure(rates and rates[f'cache_kd_{n}'], ".0f") for n in sizes) + " | "
                     + " | ".join(f"**{s[f'{name}_over_one']:.3f}**" + (f" ({rounds[name]})" if rounds[name] else "")
                                  for name in names) + " |")
    lines += ["", f"Several teachers, what an ensemble costs: the same student with hard KD from "
              f"{' and '.join(map(str, sizes))} caches (copies of the stage-two store: the same views, each cache read "
              f"from its own files and their distributions averaged) over one cache, in the rates P1 is measured in "
              f"(the median round), goal >= {ens['goal']:.2f}: "
              + ", ".join(f"{d} **{v:.3f}**" for d, v in ens["per_data_set"].items())
              + f" ({'met' if ens['met'] else 'not met'}; a data set's figure is the lowest of its students and "
              "ensemble sizes)."]
    return lines


def ensemble_summary(stage_two: list[dict], preset: Preset) -> dict:
    """Issue 26's speed goal per data set: the lowest ratio, over its students and ensemble sizes, of the rate from
    several caches to the rate from one (the median round: side by side per CPU second on the CPU)."""
    ratios = {source: min(s[f"{measure.ENSEMBLE_NAMES[n]}_over_one"] for s in stage_two if s["data"] == source
                          for n in preset.ensembles) for source in preset.sources}
    return {"goal": ENSEMBLE_GOAL, "caches": list(preset.ensembles), "per_data_set": ratios,
            "met": min(ratios.values()) >= ENSEMBLE_GOAL}


def figure(value: float | None, spec: str) -> str:
    """A figure as `spec` formats it, or '-' where this bench.json does not hold it (written by an older bench)."""
    return "-" if value is None else format(value, spec)


def loader_section(o: BenchOptions, work: Path) -> dict:
    """Views/s per core of timm's ordinary path vs the replay (DeiT recipe on real photographs, and digits), with
    the accelerated Pillow build too when one is given; the stage-two loader with workers; draft decoding's reach."""
    deit, rounds = Recipe.load("deit"), o.repeats + 2
    photos = loader_bench.save_jpegs(loader_bench.photographs(max(24, o.views // 4)), work / "photographs")
    jpegs = loader_bench.load_jpegs(photos)
    stock = {**loader_bench.per_core(deit, jpegs, rounds), "what": "real photographs (500x375 JPEG)"}
    digits = Manifest.load(bench_shards(work, "digits", o.views * 4))
    records = [r for shard in digits.shards("train")[:2] for r in read_shard(digits, "train", shard)]
    rows = [stock, {**loader_bench.per_core(Recipe.load("digits"), [(r.key, r.data) for r in records], rounds),
                    "what": "digits (32 px PNG)"}]
    out = {"per_core": rows, "replay_over_timm_per_core_stock": stock["replay_over_timm"], "speedups": []}
    fast = None
    if o.pillow_simd is not None and o.pillow_simd.exists():
        fast = {**loader_bench.per_core_elsewhere(o.pillow_simd, "deit", photos, rounds), "what": stock["what"]}
        rows.insert(1, fast)
        out["speedups"] = [fast["pillow"]]
    # the replay (with the speed-ups) against timm's ordinary, stock path
    out["replay_over_timm_per_core"] = (fast or stock)["replay_views_per_s"] / stock["timm_views_per_s"]
    data = work / "loader-photographs"  # its own: the imagenet preset's "photographs" are 1000-class, 1024-image shards
    if not (data / "manifest.json").exists():
        write_shards(loader_bench.photo_source(max(64, o.views // 2), (500, 375)), data, 64, 0, False)
    out["full_loader"] = loader_bench.full_loader(data, deit, max(1, o.workers))
    out["decodes_per_view"] = measure.decodes_per_view(Manifest.load(data), deit, 8)
    out["draft_eligible"] = loader_bench.draft_eligible(deit, (500, 375))
    return out


def object_store_section(preset: Preset, workers: int, repeats: int, views: int, work: Path) -> dict | None:
    """S3 against local files, on 2 x `views` real photographs in 4 shards (None where moto, the local S3 server, is
    not installed: `pip install moto[server]`)."""
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError:
        return None
    from replaykd.stages.bench.object_store import object_store_vs_local

    data, images = work / "object-store-photographs", max(64, 2 * views)
    if not (data / "manifest.json").exists():
        write_shards(loader_bench.photo_source(images, (500, 375)), data, -(-images * 9 // 10 // 4), 0, False)
    return object_store_vs_local(data, preset, workers, repeats, work)


def bench(o: BenchOptions) -> None:
    """Measure the loader, stage one vs the bare teacher, stage two with/without KD, and cache size."""
    if o.render_only:
        if not (o.out / "bench.json").exists():
            raise ReplayKDError(f"no {o.out / 'bench.json'} to render; run 'make bench' first")
        return publish(o, json.loads((o.out / "bench.json").read_text()))
    dev = pick_device(o.device)
    name = o.preset or ("imagenet" if dev.type == "cuda" else "small")
    p, work = PRESETS[name], o.out / "work"
    if o.epochs is not None:
        p = dataclasses.replace(p, epochs=o.epochs, cache_epochs=o.epochs)
    work.mkdir(parents=True, exist_ok=True)
    device = o.device.value
    r = {"device": device_name(dev), "torch": torch.__version__, "preset": name, "repeats": o.repeats,
         "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
         "command": f"replaykd bench --preset {name} --device {dev.type} --repeats {o.repeats} --views {o.views}"
                    + (f" --epochs {o.epochs}" if o.epochs else "")}
    # at least a few full batches of every data set for the stage-two runs
    data = {source: bench_data(work, p, source, max(o.views * 4, 4 * p.batch)) for source in p.sources}
    r["loader"] = loader_section(o, work)
    r["loader_shard1000"] = loader_bench.shard_size_loader(work, r["loader"]["per_core"][0]["timm_views_per_s"],
                                                            p.big_shard, 3 if p.fresh else 1)
    r["stage_one"] = measure.teacher_cache_vs_bare(*data[p.sources[0]], p, o.workers, device, o.repeats, work)
    r["stage_two"] = [{"data": source, **measure.student_kd_modes(*data[source], p, s, o.workers, device, o.repeats,
                                                                  work / source)}
                      for source in p.sources for s in p.students]
    p1 = {source: min(s["p1_same_student"] for s in r["stage_two"] if s["data"] == source) for source in p.sources}
    r["p1_same_student"] = {"goal": P1_GOAL, "per_data_set": p1, "met": min(p1.values()) >= P1_GOAL}
    r["ensemble"] = ensemble_summary(r["stage_two"], p)
    if p.fresh:  # processes side by side: only where commands run in their own
        r["concurrent"] = measure.concurrent_students(*data[p.sources[0]][:1], p, p.students[0], o.workers, device,
                                                      work)
    r["object_store"] = object_store_section(p, o.workers, o.repeats, o.views, work)
    r["cache_size"] = measure.cache_size_and_reads(work)
    real = o.real_cache if o.real_cache is not None and (o.real_cache / "zarr.json").exists() else None
    r["real_cache"] = measure.stored_bytes_per_view(real) if real else None
    r["coverage"] = measure.coverage(1_281_167, 1000, Recipe.load("deit").repeats)
    write_json_atomic(o.out / "bench.json", r)
    publish(o, r)


def publish(o: BenchOptions, r: dict) -> None:
    """bench.md (and the README's bench section, if asked) from the results."""
    md = bench_markdown(r)
    publish_markdown(o.out, "bench", md, o.readme)
    typer.echo(md)
