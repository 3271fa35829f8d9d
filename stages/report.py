"""`replaykd report`: the demo's report (markdown + JSON) from what its runs wrote, and the README's results."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import typer
from torch.utils.data import DataLoader

from replaykd.cache import TeacherCache
from replaykd.cache_report import summarize
from replaykd.device import device_name
from replaykd.export import eval_transform, load_exported
from replaykd.io import atomic_path, replace_section, write_json_atomic
from replaykd.loader import EvalViews
from replaykd.manifest import Manifest
from replaykd.plots import plot_comparison
from replaykd.runs import WEIGHTS, RunFolder
from replaykd.stages.options import ReportOptions

ARMS = {"cache": "hard KD, targets from the cache", "online": "hard KD, online teacher", "labels": "no KD (labels only)"}
HEADS = ("top1", "cls_top1", "dist_top1")  # the model's own prediction, then a distilled DeiT's heads

DEMO_START = "demo-start"
STUDENTS = {"student-hard": ARMS["cache"], "student-online": ARMS["online"], "student-none": ARMS["labels"]}


def collect(run: Path) -> dict:
    """Everything the report states, read from the run's files (nothing typed by hand)."""
    teacher = json.loads((run / "teacher" / "teacher.json").read_text())
    cache = TeacherCache.open(run / "cache.zarr")
    c = summarize(cache)
    students = {}
    for name, what in STUDENTS.items():
        folder = RunFolder(run / name)
        s = folder.summary()
        if s is not None:
            cfg = folder.config()
            students[name] = {"what": what, **{k: s.get(k) for k in (*HEADS, "epochs", "wall_seconds", "images_per_s")},
                              "model": f"{s['student']} img {cache.config.views['input_size']} patch "
                                       f"{cfg['patch_size']} depth {cfg['depth']} dim {cfg['embed_dim']}"}
    gain = paired_gain(run / "student-hard", run / "student-none") if {"student-hard", "student-none"} <= set(students) \
        else None
    finished = max((run / name / "summary.json").stat().st_mtime for name in students) if students else None
    started = run / DEMO_START  # written by `make demo` as its first step
    return {"date": datetime.fromtimestamp(finished, timezone.utc).isoformat(timespec="seconds") if finished else None,
            "reported": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device_name(),
            "demo_seconds": time.time() - float(started.read_text()) if started.exists() else None,
            "teacher": {"model": teacher["model"], "input_size": teacher["pretrained_cfg"]["input_size"][-1],
                        "val_top1": teacher["val_top1"], "epochs": teacher["epochs"], "seconds": teacher["seconds"]},
            "cache": {"epochs": c.epochs, "topk": c.topk, "views": c.views_cached, "bytes": c.bytes_on_disk,
                      "bytes_per_view": c.bytes_per_view, **c.totals},
            "students": students, "kd_gain": gain}


def predictions(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted, true) class of every image of a finished student run's evaluation split, from its exported weights
    loaded through timm (a distilled DeiT's prediction: the average of its heads, as timm's eval mode gives)."""
    cfg = RunFolder(run).config()
    manifest = Manifest.load(cfg["manifest"])
    model, _ = load_exported(run / WEIGHTS, torch.device("cpu"))
    split = manifest.eval_split(cfg.get("eval_split", "val"))
    views = EvalViews(manifest, eval_transform(model), split, rank=0, world_size=1)
    out, truth = [], []
    with torch.inference_mode():
        for images, labels in DataLoader(views, batch_size=256):
            out.append(model(images).argmax(-1))
            truth.append(labels)
    return torch.cat(out), torch.cat(truth)


def paired_gain(kd: Path, labels_only: Path) -> dict:
    """The KD run's top-1 minus the labels-only run's, image by image on the same evaluation images, with the standard
    error of that mean difference: how far a gain this size stands above what the choice of images alone moves."""
    (a, truth), (b, _) = predictions(kd), predictions(labels_only)
    d = (a == truth).double() - (b == truth).double()
    n = len(d)
    return {"images": n, "top1_points": 100 * d.mean().item(), "standard_error": 100 * (d.var() / n).sqrt().item(),
            "only_kd_right": int((d > 0).sum()), "only_labels_right": int((d < 0).sum())}


def to_markdown(r: dict) -> str:
    """The report as a markdown table."""
    t, c = r["teacher"], r["cache"]
    took = f", {r['demo_seconds'] / 60:.1f} min from its first step to this report" if r.get("demo_seconds") else ""
    lines = [f"# replaykd demo report (runs finished {r['date']}, {r['device']}, `make demo`{took})", "",
             f"- Teacher: `{t['model']}` at {t['input_size']} px, {t['epochs']} epochs: val top-1 **{t['val_top1']:.2f}%** ({t['seconds']:.0f} s)",
             f"- Cache: {c['epochs']} epochs x top-{c['topk']}: {c['views']} views, {c['bytes'] / 1e6:.2f} MB, "
             f"**{c['bytes_per_view']:.1f} bytes/view**" + (
                 f"; built at {c['views_recorded'] / c['process_seconds']:.0f} views/s in "
                 f"{c['process_seconds']:.0f} s, "
                 f"teacher top-1 on the mixed views vs their majority label {c['teacher_top1_vs_majority']:.1f}%"
                 if c.get("process_seconds") else ""), "",
             "| student run | top-1 | cls head | dist head | epochs | images/s | time |", "|---|---|---|---|---|---|---|"]
    for s in r["students"].values():
        lines.append(f"| {s['what']} | {s['top1']:.2f} | " + " | ".join(
            f"{s[h]:.2f}" if s.get(h) is not None else "-" for h in HEADS[1:])
            + f" | {s['epochs']} | {s['images_per_s']:.0f} | {s['wall_seconds']:.0f} s |")
    hard, online = r["students"].get("student-hard"), r["students"].get("student-online")
    if hard and online:
        same = all(hard[k] == online[k] for k in HEADS)
        lines += ["", "Cached and online hard KD reached " + ("identical accuracies: the cached targets are the online "
                  "teacher's, view for view." if same else "different accuracies (expected only across machines or GPUs).")
                  + f" Cached KD trained at {hard['images_per_s'] / online['images_per_s']:.2f}x the online run's images/s."]
    g = r.get("kd_gain")
    if g:
        lines += ["", f"KD gain, cached hard KD over no KD on the same {g['images']} validation images: "
                  f"**{g['top1_points']:+.2f} ± {g['standard_error']:.2f}** top-1 points (± the standard error of the "
                  f"per-image difference: {g['only_kd_right']} images only the KD student gets right, "
                  f"{g['only_labels_right']} only the labels-only one; "
                  + (f"{abs(g['top1_points']) / g['standard_error']:.1f} standard errors" if g["standard_error"]
                     else "the same images right") + "). Seed-to-seed spread: `make study`."]
    if r["students"]:
        lines += ["", f"Students: {', '.join(sorted({s['model'] for s in r['students'].values()}))}; top-1 is each "
                  "model's own prediction (a distilled DeiT's: the average of its heads). Curves: `curves.png` (and each "
                  "run's `curves.png`); replayed views: `views.png`."]
    return "\n".join(lines) + "\n"


def report(o: ReportOptions) -> None:
    """Write RUN/report.md and RUN/report.json from the runs' own files (and the README's demo section if asked)."""
    run = o.run
    r = collect(run)
    md = to_markdown(r)
    logs = {s["what"]: run / name / "log.jsonl" for name, s in r["students"].items()}
    if logs:
        plot_comparison(logs, run / "curves.png")
    write_json_atomic(run / "report.json", r)
    with atomic_path(run / "report.md") as tmp:
        tmp.write_text(md)
    if o.readme is not None:
        body = "\n".join(md.splitlines()[2:])
        replace_section(o.readme, "demo", f"From `{run}/report.md` ({r['date']}, {r['device']}, `make demo`):\n\n{body}")
    typer.echo(md)
