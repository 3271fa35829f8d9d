"""`replaykd report`: the demo's report (markdown + JSON) from what its runs wrote, and the README's results."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import typer

from pipeline.cache import TeacherCache
from pipeline.device import device_name
from pipeline.errors import ReplayKDError
from pipeline.io import atomic_path, replace_section, write_json_atomic
from pipeline.plots import plot_comparison
from pipeline.runs import RunFolder
from stages.options import ReportOptions, StudyReportOptions

ARMS = {"cache": "hard KD, targets from the cache", "online": "hard KD, online teacher", "labels": "no KD (labels only)"}
HEADS = ("cls_top1", "dist_top1", "avg_top1")

STUDENTS = {"student-hard": ARMS["cache"], "student-online": ARMS["online"], "student-none": ARMS["labels"]}


def collect(run: Path) -> dict:
    """Everything the report states, read from the run's files (nothing typed by hand)."""
    teacher = json.loads((run / "teacher" / "teacher.json").read_text())
    cache = TeacherCache.open(run / "cache.zarr")
    c = cache.summarize()
    students = {}
    for name, what in STUDENTS.items():
        folder = RunFolder(run / name)
        s = folder.summary()
        if s is not None:
            cfg = folder.config()
            students[name] = {"what": what, **{k: s[k] for k in (*HEADS, "epochs", "wall_seconds", "images_per_s")},
                              "model": f"{cfg['student']} img {cfg['img_size'] or cache.config.recipe['input_size']} patch {cfg['patch_size']} depth {cfg['depth']} dim {cfg['embed_dim']}"}
    finished = max((run / name / "summary.json").stat().st_mtime for name in students) if students else None
    return {"date": datetime.fromtimestamp(finished, timezone.utc).isoformat(timespec="seconds") if finished else None,
            "reported": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device_name(),
            "teacher": {"model": teacher["model"], "input_size": teacher["input_size"], "val_top1": teacher["val_top1"],
                        "epochs": teacher["epochs"], "seconds": teacher["seconds"]},
            "cache": {"epochs": c.epochs, "topk": c.topk, "views": c.views_cached, "bytes": c.bytes_on_disk,
                      "bytes_per_view": c.bytes_per_view, **cache.attrs.get("last_run", {})},
            "students": students}


def to_markdown(r: dict) -> str:
    """The report as a markdown table."""
    t, c = r["teacher"], r["cache"]
    lines = [f"# replaykd demo report (runs finished {r['date']}, {r['device']}, `make demo`)", "",
             f"- Teacher: `{t['model']}` at {t['input_size']} px, {t['epochs']} epochs: val top-1 **{t['val_top1']:.2f}%** ({t['seconds']:.0f} s)",
             f"- Cache: {c['epochs']} epochs x top-{c['topk']}: {c['views']} views, {c['bytes'] / 1e6:.2f} MB, "
             f"**{c['bytes_per_view']:.1f} bytes/view**" + (
                 f"; last built at {c['views_per_s']:.0f} views/s in {c['seconds']:.0f} s, teacher top-1 on the mixed views vs "
                 f"their majority label {c['teacher_top1_vs_majority']:.1f}%" if "views_per_s" in c else ""), "",
             "| student run | cls top-1 | dist top-1 | avg top-1 | epochs | images/s | time |", "|---|---|---|---|---|---|---|"]
    for s in r["students"].values():
        lines.append(f"| {s['what']} | {s['cls_top1']:.2f} | {s['dist_top1']:.2f} | {s['avg_top1']:.2f} | {s['epochs']} | "
                     f"{s['images_per_s']:.0f} | {s['wall_seconds']:.0f} s |")
    hard, online = r["students"].get("student-hard"), r["students"].get("student-online")
    if hard and online:
        same = all(hard[k] == online[k] for k in ("cls_top1", "dist_top1", "avg_top1"))
        lines += ["", "Cached and online hard KD reached " + ("identical accuracies: the cached targets are the online "
                  "teacher's, view for view." if same else "different accuracies (expected only across machines or GPUs).")
                  + f" Cached KD trained at {hard['images_per_s'] / online['images_per_s']:.2f}x the online run's images/s."]
    if r["students"]:
        lines += ["", f"Student: {next(iter(r['students'].values()))['model']}. Curves: `curves.png` (and each run's "
                  "`curves.png`); replayed views: `views.png`."]
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


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0


def study(o: StudyReportOptions) -> None:
    """Mean +- std of cls / dist / avg top-1 per arm over its seeds, and the KD gain, from the runs' summaries."""
    runs = sorted(p.parent for p in o.run.glob("*/summary.json"))
    if not runs:
        raise ReplayKDError(f"no finished runs (*/summary.json) in {o.run}")
    arms: dict[str, list[dict]] = {}
    for run in runs:
        s, cfg = RunFolder(run).summary(), RunFolder(run).config()
        arms.setdefault(s["source"], []).append({"run": run.name, "init_seed": cfg["init_seed"], "epochs": s["epochs"],
                                                 **{h: s[h] for h in HEADS}})
    r = {"study": str(o.run), "device": device_name(), "arms": {
        name: {"what": ARMS.get(name, name), "seeds": [x["init_seed"] for x in xs], "epochs": xs[0]["epochs"],
               **{h: dict(zip(("mean", "std"), mean_std([x[h] for x in xs]))) for h in HEADS}, "runs": xs}
        for name, xs in arms.items()}}
    lines = [f"# replaykd study ({o.run}, {r['device']}, `make study`)", "",
             "| arm | seeds | epochs | cls top-1 | dist top-1 | avg top-1 |", "|---|---|---|---|---|---|"]
    for a in r["arms"].values():
        lines.append(f"| {a['what']} | {', '.join(map(str, a['seeds']))} | {a['epochs']} | "
                     + " | ".join(f"{a[h]['mean']:.2f} ± {a[h]['std']:.2f}" for h in HEADS) + " |")
    kd, none = r["arms"].get("cache"), r["arms"].get("labels")
    if kd and none:
        gain = {h: kd[h]["mean"] - none[h]["mean"] for h in HEADS}
        spread = {h: (kd[h]["std"] ** 2 / len(kd["seeds"]) + none[h]["std"] ** 2 / len(none["seeds"])) ** 0.5 for h in HEADS}
        r["kd_gain"] = {h: {"mean": gain[h], "standard_error": spread[h]} for h in HEADS}
        lines += ["", "KD gain (cached hard KD minus no KD, mean ± standard error of the difference): "
                  + ", ".join(f"{h.split('_')[0]} {gain[h]:+.2f} ± {spread[h]:.2f}" for h in HEADS) + " points."]
    lines += ["", "± is the sample standard deviation over initialisation seeds (the same views and cache for all)."]
    md = "\n".join(lines) + "\n"
    write_json_atomic(o.run / "report.json", r)
    with atomic_path(o.run / "report.md") as tmp:
        tmp.write_text(md)
    typer.echo(md)
