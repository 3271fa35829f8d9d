"""`replaykd bench`: what the cache buys, measured side by side (interleaved repetitions, medians) into JSON."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import typer
from safetensors.torch import save_file

from pipeline.device import device_name, pick_device
from pipeline.io import atomic_path, replace_section, write_json_atomic
from pipeline.models import create_classifier
from pipeline.recipe import Recipe
from pipeline.shards import write_shards
from pipeline.sources import Source, SourceItem, digits_source
from stages import measure
from stages.options import BenchOptions

TINY_DEIT = {"student": "deit_tiny_distilled_patch16_224", "patch_size": 4, "depth": 6, "embed_dim": 96, "num_heads": 3}


@dataclass(frozen=True)
class Preset:
    """Sizes of one bench: data, recipe, teacher, students, batch and epochs per measurement."""

    source: str
    recipe: str
    teacher: str
    teacher_input: int | None
    students: tuple[dict, ...]
    batch: int
    teacher_batch: int
    epochs: int
    cache_epochs: int


PRESETS = {
    # CPU: the digits demo's sizes (16 px views, a 0.7 M-parameter DeiT, regnety_002 at 32 px).
    "small": Preset("digits", "digits", "regnety_002", 32, (TINY_DEIT,), 64, 256, 4, 8),
    # GPU: DeiT's sizes on synthetic ImageNet-like JPEGs (500x375, 1000 classes), teacher regnety_160 at 224.
    "imagenet": Preset("synthetic", "deit", "regnety_160", None,
                       tuple({"student": f"deit_{s}_distilled_patch16_224"} for s in ("tiny", "small", "base")), 256, 256, 1, 2),
}


def bench_data(work: Path, preset: Preset, images: int) -> tuple[Path, Path]:
    """Shards for the preset and a teacher checkpoint (random weights: throughput does not need trained ones)."""
    data = work / f"data-{preset.source}"
    if not (data / "manifest.json").exists():
        if preset.source == "digits":
            source = digits_source(0.2, 0, 32)
        else:
            rng = np.random.default_rng(0)
            items = [SourceItem(key=f"img_{i:07d}", label=int(rng.integers(1000)), ext="jpg",
                                data=measure.synthetic_jpeg(rng, (375, 500))) for i in range(images)]
            source = Source("synthetic", [f"class_{c:04d}" for c in range(1000)], {"train": items[: images * 9 // 10],
                                                                                   "val": items[images * 9 // 10 :]})
        write_shards(source, data, 1024 if preset.source != "digits" else 200, 0, False)
    num_classes = 10 if preset.source == "digits" else 1000
    ckpt = work / f"{preset.teacher}.safetensors"
    if not ckpt.exists():
        save_file(create_classifier(preset.teacher, num_classes).state_dict(), str(ckpt))
    return data, ckpt


def bench_markdown(r: dict) -> str:
    """The bench results as markdown."""
    lines = [f"Device: {r['device']}; torch {r['torch']}; {r['date']}; command `{r['command']}`; medians of "
             f"{r['repeats']} interleaved repetitions.", "",
             "| replay (1 core) | timm views/s | replay views/s | overhead | timm + Mixup views/s | replay mixed views/s | overhead |",
             "|---|---|---|---|---|---|---|"]
    for x in r["replay"]:
        lines.append(f"| {x['recipe']} ({x['image_size'][0]}x{x['image_size'][1]} -> {x['input_size']}) | "
                     f"{x['timm_transform_views_per_s']:.0f} | {x['replay_transform_views_per_s']:.0f} | "
                     f"{100 * x['overhead_transform']:+.1f}% | {x['timm_mixed_views_per_s']:.0f} | "
                     f"{x['replay_mixed_views_per_s']:.0f} | {100 * x['overhead_mixed']:+.1f}% |")
    s1 = r["stage_one"]
    lines += ["", f"Stage one ({s1['teacher']}, {s1['device']}, batch {s1['batch_size']}, {s1['workers']} workers): "
              f"teacher-cache {s1['teacher_cache_views_per_s']:.0f} views/s (its loop, start-up excluded) vs the bare teacher forward "
              f"{s1['bare_teacher_views_per_s']:.0f} views/s: ratio **{s1['ratio']:.2f}**. Decodes per view: "
              f"{s1['decodes_per_view']['stage_one']:.3f} in stage one ({s1['epochs']} epochs from one decode per "
              f"shard), {s1['decodes_per_view']['stage_two']:.3f} in stage two (one decode serves a sample's "
              f"{r['coverage']['repeats']} repeats)."]
    lines += ["", "| stage two student | no KD img/s | cached KD img/s | online KD img/s | cached / no KD | cached / online | FLOP bound online/cached |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {s['student']} | {s['no_kd_images_per_s']:.0f} | {s['cache_kd_images_per_s']:.0f} | "
              f"{s['online_kd_images_per_s']:.0f} | **{s['cached_over_no_kd']:.3f}** | **{s['cached_over_online']:.2f}** | "
              f"{s['flop_bound_online_cost']:.2f} |" for s in r["stage_two"]]
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


def bench(o: BenchOptions) -> None:
    """Measure replay vs timm, stage one vs the bare teacher, stage two with/without KD, and cache size."""
    dev = pick_device(o.device)
    name = o.preset or ("imagenet" if dev.type == "cuda" else "small")
    p, work = PRESETS[name], o.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    device = o.device.value
    r = {"device": device_name(dev), "torch": torch.__version__, "preset": name, "repeats": o.repeats,
         "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
         "command": f"replaykd bench --preset {name} --device {dev.type} --repeats {o.repeats} --views {o.views}"}
    r["replay"] = [measure.replay_vs_timm(Recipe.load(rec), measure.synthetic_images(n, size), o.repeats)
                   for rec, size, n in (("digits", (32, 32), o.views), ("deit", (375, 500), max(8, o.views // 8)))]
    data, ckpt = bench_data(work, p, o.views * 10)
    r["stage_one"] = measure.teacher_cache_vs_bare(data, ckpt, p, o.workers, device, o.repeats, work)
    r["stage_two"] = [measure.student_kd_modes(data, ckpt, p, s, o.workers, device, o.repeats, work) for s in p.students]
    r["cache_size"] = measure.cache_size_and_reads(work)
    real = o.real_cache if o.real_cache is not None and (o.real_cache / "zarr.json").exists() else None
    r["real_cache"] = measure.stored_bytes_per_view(real) if real else None
    deit = Recipe.load("deit")
    r["coverage"] = measure.coverage(1_281_167, 1000, deit.repeats)
    md = bench_markdown(r)
    write_json_atomic(o.out / "bench.json", r)
    with atomic_path(o.out / "bench.md") as tmp:
        tmp.write_text(md)
    if o.readme is not None:
        replace_section(o.readme, "bench", f"From `{o.out}/bench.json`:\n\n{md}")
    typer.echo(md)
