"""`replaykd study-report`: each arm's top-1 over its seeds (mean ± std), from the runs' own files. An arm is how its
students were taught: no KD, or which teachers (cached or online, with their weights); the report also gives each
teacher's own top-1, the KD gain over no KD and an ensemble's gain over the best of its teachers alone."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import typer

from replaykd.device import device_name
from replaykd.errors import ReplayKDError
from replaykd.io import atomic_path, write_json_atomic
from replaykd.models import file_sha256
from replaykd.records import TeacherRecord
from replaykd.runs import RunFolder
from replaykd.stages.options import StudyReportOptions

LABELS_ARM = "no KD (labels only)"
# A difference is called a gain or a loss only beyond this many standard errors; within it, seeds alone explain it.
DECISIVE = 2.0


@dataclass(frozen=True)
class StudyRun:
    """One finished student run of a study, as its summary.json and config.yaml say."""

    folder: str
    source: str  # cache, online or labels
    distillation: str
    teachers: tuple[TeacherRecord, ...]
    init_seed: int
    epochs: int
    student: str
    top1: float

    @property
    def arm(self) -> str:
        """The arm's name: how the run was taught, e.g. 'cache: regnety_002', 'caches: regnety_002 + resnet10t
        (0.5/0.5)', 'online: regnety_002', or no KD; soft distillation is said."""
        if self.source == "labels":
            return LABELS_ARM
        several = len(self.teachers) > 1
        names = " + ".join(t.name for t in self.teachers)
        weights = f" ({'/'.join(f'{t.weight:g}' for t in self.teachers)})" if several else ""
        mode = "" if self.distillation == "hard" else f", {self.distillation} KD"
        return f"{self.source}{'s' if several and self.source == 'cache' else ''}: {names}{weights}{mode}"

    @property
    def taught(self) -> tuple:
        """What puts runs in one arm: the source, the distillation, and each teacher's weights (sha256) and weight."""
        return self.source, self.distillation, tuple((t.sha256, t.weight) for t in self.teachers)


@dataclass(frozen=True)
class Gain:
    """One arm's mean top-1 minus another's, and the standard error of that difference (from each arm's spread over
    its seeds, taken as independent; None where an arm has a single seed, so no spread)."""

    arm: str
    over: str
    mean: float
    standard_error: float | None

    def verdict(self) -> str:
        """'helps', 'hurts', 'does not help measurably' or 'cannot be judged', from the gain and its standard
        error."""
        if self.standard_error is None:
            return "cannot be judged"
        if self.mean > DECISIVE * self.standard_error:
            return "helps"
        return "hurts" if self.mean < -DECISIVE * self.standard_error else "does not help measurably"

    def text(self) -> str:
        """The gain in points, ± its standard error where there is one."""
        return f"{self.mean:+.2f}" + (f" ± {self.standard_error:.2f}" if self.standard_error is not None else "")


def read_run(folder: Path) -> StudyRun:
    """A finished run of the study folder."""
    run = RunFolder(folder)
    s, cfg = run.summary(), run.config()
    teachers = tuple(TeacherRecord(**t) for t in s.get("teachers", ()))
    return StudyRun(folder.name, s["source"], s["distillation"], teachers, cfg["init_seed"], s["epochs"], s["student"],
                    s["top1"])


def teacher_top1(t: TeacherRecord) -> dict:
    """A teacher and its own validation top-1, from the JSON `replaykd train-teacher` wrote beside its weights (None
    where there is none, or where the file no longer holds the weights the students learnt from)."""
    info = {}
    if t.file and Path(t.file).with_suffix(".json").exists() and file_sha256(t.file) == t.sha256:
        info = json.loads(Path(t.file).with_suffix(".json").read_text())
    return {"name": t.name, "file": t.file, "sha256": t.sha256, "val_top1": info.get("val_top1"),
            "epochs": info.get("epochs")}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0


def gain(arms: dict, arm: str, over: str) -> Gain:
    """`arm`'s mean top-1 minus `over`'s, with the standard error of the difference."""
    a, b = arms[arm], arms[over]
    spread = (a["top1"]["std"] ** 2 / len(a["seeds"]) + b["top1"]["std"] ** 2 / len(b["seeds"])) ** 0.5
    return Gain(arm, over, a["top1"]["mean"] - b["top1"]["mean"],
                spread if min(len(a["seeds"]), len(b["seeds"])) > 1 else None)


def ensemble_gains(arms: dict, first: dict[str, StudyRun]) -> list[Gain]:
    """Each ensemble arm (several teachers) over the best arm taught the same way (cached or online, hard or soft)
    by one of its teachers alone; an ensemble none of whose teachers has an arm of its own is left out."""
    out = []
    for name, run in first.items():
        members = {t.sha256 for t in run.teachers}
        alone = [other for other, r in first.items() if len(r.teachers) == 1 and r.teachers[0].sha256 in members
                 and (r.source, r.distillation) == (run.source, run.distillation)]
        if len(members) > 1 and alone:
            out.append(gain(arms, name, max(alone, key=lambda a: arms[a]["top1"]["mean"])))
    return out


def arms_of(runs: list[StudyRun]) -> dict[str, list[StudyRun]]:
    """The runs by arm, named by their teachers (no KD first, then one teacher, then ensembles); arms whose teachers
    share names but not weights files (a teacher retrained) also say their teachers' sha256."""
    groups: dict[tuple, list[StudyRun]] = {}
    for run in sorted(runs, key=lambda r: (len(r.teachers), r.arm, r.init_seed)):
        groups.setdefault(run.taught, []).append(run)
    names = [xs[0].arm for xs in groups.values()]
    return {name + (f" [{' + '.join(t.sha256[:8] for t in xs[0].teachers)}]" if names.count(name) > 1 else ""): xs
            for name, xs in zip(names, groups.values())}


def study(o: StudyReportOptions) -> None:
    """Mean ± std of top-1 per arm over its seeds, each teacher's own top-1, the KD gain (each KD arm over no KD, as
    DeiT's table: the distilled student against its baseline without the distillation token) and each ensemble's
    gain over its best teacher alone, from the runs' own files, into RUN/report.md and RUN/report.json."""
    runs = [read_run(p.parent) for p in sorted(o.run.glob("*/summary.json"))]
    if not runs:
        raise ReplayKDError(f"no finished runs (*/summary.json) in {o.run}")
    by_arm = arms_of(runs)
    first = {name: xs[0] for name, xs in by_arm.items()}
    arms = {name: {"source": xs[0].source, "distillation": xs[0].distillation, "student": xs[0].student,
                   "teachers": [t.name for t in xs[0].teachers], "seeds": [x.init_seed for x in xs],
                   "epochs": xs[0].epochs, "top1": dict(zip(("mean", "std"), mean_std([x.top1 for x in xs]))),
                   "runs": [{"run": x.folder, "init_seed": x.init_seed, "top1": x.top1} for x in xs]}
            for name, xs in by_arm.items()}
    teachers = {t.sha256: t for run in first.values() for t in run.teachers}
    kd = [gain(arms, name, LABELS_ARM) for name in arms if name != LABELS_ARM] if LABELS_ARM in arms else []
    ensembles = ensemble_gains(arms, first)
    r = {"study": str(o.run), "device": device_name(), "teachers": [teacher_top1(t) for t in teachers.values()],
         "arms": arms, "kd_gain": [asdict(g) for g in kd],
         "ensemble_gain": [{**asdict(g), "verdict": g.verdict()} for g in ensembles]}
    md = to_markdown(r, kd, ensembles)
    write_json_atomic(o.run / "report.json", r)
    with atomic_path(o.run / "report.md") as tmp:
        tmp.write_text(md)
    typer.echo(md)


def to_markdown(r: dict, kd: list[Gain], ensembles: list[Gain]) -> str:
    """The study report as markdown: teachers, arms, gains and what they say."""
    lines = [f"# replaykd study ({r['study']}, {r['device']})", ""]
    if r["teachers"]:
        lines += ["| teacher | weights | epochs | val top-1 |", "|---|---|---|---|"]
        lines += [f"| {t['name']} | {t['file'] or 'pretrained'} | {t['epochs'] or '-'} | "
                  + (f"{t['val_top1']:.2f} |" if t["val_top1"] is not None else "- |") for t in r["teachers"]]
        lines += ["", "A teacher's top-1 is its own, on the same validation images, from the JSON `replaykd "
                  "train-teacher` wrote beside its weights ('-': none, or the file's weights have changed since).", ""]
    lines += ["| arm | student | seeds | epochs | top-1 |", "|---|---|---|---|---|"]
    for name, a in r["arms"].items():
        lines.append(f"| {name} | {a['student']} | {', '.join(map(str, a['seeds']))} | {a['epochs']} | "
                     f"{a['top1']['mean']:.2f} ± {a['top1']['std']:.2f} |")
    for g in kd:
        lines += ["", f"KD gain ({g.arm} minus no KD, mean ± standard error of the difference): top-1 {g.text()} "
                  "points."]
    for g in ensembles:
        lines += ["", f"Ensemble gain ({g.arm} minus the best of its teachers alone, {g.over}; mean ± standard error "
                  f"of the difference): top-1 **{g.text()}** points. " + (
                      "Whether the ensemble helps at this size cannot be judged: an arm has one seed, so nothing "
                      "says how far seeds alone move its top-1." if g.standard_error is None else
                      f"At this size the ensemble {g.verdict()} (the difference is "
                      + (f"{abs(g.mean) / g.standard_error:.1f} standard errors" if g.standard_error else
                         "exact: no spread over seeds")
                      + f"; a difference within {DECISIVE:g} standard errors is what the choice of seeds alone "
                      "moves).")]
    lines += ["", "± is the sample standard deviation over initialisation seeds (the same views and caches for all); "
              "top-1 is each model's own prediction (a distilled DeiT's: the average of its two heads)."]
    return "\n".join(lines) + "\n"
