"""`replaykd study-report` on run folders written as train-student writes them (its config writer, the summary's
fields, teachers as TeacherRecords) and teachers exported as train-teacher exports them: arms named by their teachers,
mean ± std per arm, each teacher's own top-1, the KD and ensemble gains and the sentence they decide. Fast: no
training (tests/test_bench_report.py runs the report on real runs)."""
from __future__ import annotations

import dataclasses
import json
import statistics

import pytest
import torch

from replaykd.export import Preprocessing, export
from replaykd.models import create_classifier, file_sha256
from replaykd.records import TeacherRecord
from replaykd.runs import RunFolder
from replaykd.stages.options import StudentOptions
from tests.conftest import run_cli

A, B = [50.0, 52.0, 54.0], [51.0, 57.0, 54.0]  # each teacher's students alone, seeds 0-2: means 52 and 54
LABELS = [40.0, 43.0]


def teacher(folder, model: str, val_top1: float) -> TeacherRecord:
    """A teacher's weights and JSON as train-teacher writes them, and the record a run from its cache holds."""
    weights = folder / model / "teacher.safetensors"
    weights.parent.mkdir(parents=True)
    torch.manual_seed(0)
    export(create_classifier(model, 10), weights, model, {}, [str(i) for i in range(10)],
           Preprocessing((0.5,) * 3, (0.5,) * 3, 32, "bicubic"), epochs=8, val_top1=val_top1)
    return TeacherRecord(model, str(weights), file_sha256(weights), str(folder / f"{model}.zarr"), 10, 1.0)


def student_run(folder, seed: int, top1: float, teachers: tuple[TeacherRecord, ...] = ()) -> None:
    """A finished run's config.yaml and summary.json as train-student writes them (the fields a study reads)."""
    teachers = tuple(dataclasses.replace(t, weight=1 / len(teachers)) for t in teachers)  # equal weights
    kd = dict(cache=[t.cache for t in teachers]) if teachers else dict(distillation="none")
    o = StudentOptions.from_mapping(dict(out=folder, init_seed=seed, epochs=55, **kd))
    run = RunFolder(folder)
    run.create(o.to_config())
    run.finish({"run": str(folder), "distillation": o.distillation.value, "source": "cache" if teachers else "labels",
                **({"teachers": [dataclasses.asdict(t) for t in teachers]} if teachers else {}),
                "student": "deit_tiny_distilled_patch16_224" if teachers else "deit_tiny_patch16_224",
                "epochs": 55, "top1": top1})


@pytest.mark.parametrize("both, verdict", [([55.0, 56.0, 57.0], "does not help measurably"),
                                           ([60.0, 61.0, 62.0], "helps"), ([45.0, 46.0, 47.0], "hurts")])
def test_study_report_names_arms_by_their_teachers_and_weighs_the_ensemble(tmp_path, both, verdict):
    study = tmp_path / "study"
    a, b = teacher(tmp_path, "test_resnet", 76.0), teacher(tmp_path, "test_efficientnet", 96.5)
    for seed in range(3):
        student_run(study / f"a-seed{seed}", seed, A[seed], (a,))
        student_run(study / f"b-seed{seed}", seed, B[seed], (b,))
        student_run(study / f"ab-seed{seed}", seed, both[seed], (a, b))
    for seed, top1 in enumerate(LABELS):
        student_run(study / f"none-seed{seed}", seed, top1)
    run_cli("study-report", study)
    r = json.loads((study / "report.json").read_text())
    ensemble = "caches: test_resnet + test_efficientnet (0.5/0.5)"
    assert list(r["arms"]) == ["no KD (labels only)", "cache: test_efficientnet", "cache: test_resnet", ensemble]
    for name, tops in (("cache: test_resnet", A), ("cache: test_efficientnet", B), (ensemble, both)):
        arm = r["arms"][name]
        assert arm["seeds"] == [0, 1, 2] and arm["top1"]["mean"] == pytest.approx(statistics.mean(tops))
        assert arm["top1"]["std"] == pytest.approx(statistics.stdev(tops))
    assert [(t["name"], t["val_top1"], t["epochs"]) for t in r["teachers"]] == [("test_efficientnet", 96.5, 8),
                                                                                 ("test_resnet", 76.0, 8)]
    # the ensemble against the better of its teachers alone (b): the difference of means, its standard error
    g = r["ensemble_gain"][0]
    se = (statistics.variance(both) / 3 + statistics.variance(B) / 3) ** 0.5
    assert (g["arm"], g["over"], g["verdict"]) == (ensemble, "cache: test_efficientnet", verdict)
    assert g["mean"] == pytest.approx(statistics.mean(both) - statistics.mean(B))
    assert g["standard_error"] == pytest.approx(se)
    kd = {x["arm"]: (x["mean"], x["standard_error"]) for x in r["kd_gain"]}  # arms of 3 and 2 seeds
    assert kd["cache: test_resnet"] == pytest.approx((statistics.mean(A) - statistics.mean(LABELS),
                                                      (statistics.variance(A) / 3 + statistics.variance(LABELS) / 2) ** 0.5))
    md = (study / "report.md").read_text()
    assert f"top-1 **{g['mean']:+.2f} ± {se:.2f}** points. At this size the ensemble {verdict} (the difference is " \
        f"{abs(g['mean']) / se:.1f} standard errors" in md
    assert f"| {ensemble} | deit_tiny_distilled_patch16_224 | 0, 1, 2 | 55 | {statistics.mean(both):.2f} ± " in md
    assert "| test_efficientnet |" in md and "| 96.50 |" in md


def test_a_teacher_whose_weights_changed_has_no_top1_and_one_seed_judges_nothing(tmp_path):
    now, b = teacher(tmp_path, "test_resnet", 76.0), teacher(tmp_path, "test_efficientnet", 96.5)
    a = dataclasses.replace(now, sha256="0" * 64)  # the file was overwritten since these students learnt from it
    student_run(tmp_path / "study" / "a-seed0", 0, 50.0, (a,))
    student_run(tmp_path / "study" / "ab-seed0", 0, 60.0, (a, b))
    student_run(tmp_path / "study" / "retrained-seed0", 0, 55.0, (now,))  # the same name, other weights: its own arm
    run_cli("study-report", tmp_path / "study")
    r = json.loads((tmp_path / "study" / "report.json").read_text())
    assert [(t["name"], t["val_top1"]) for t in r["teachers"]] == [("test_resnet", None), ("test_resnet", 76.0),
                                                                   ("test_efficientnet", 96.5)]
    assert {name: a["top1"]["mean"] for name, a in r["arms"].items() if len(a["teachers"]) == 1} == {
        "cache: test_resnet [00000000]": 50.0, f"cache: test_resnet [{now.sha256[:8]}]": 55.0}
    g = r["ensemble_gain"][0]  # against the arm of its own teacher a, not the retrained one
    assert (g["over"], g["mean"], g["standard_error"], g["verdict"]) == ("cache: test_resnet [00000000]", 10.0, None,
                                                                         "cannot be judged") and r["kd_gain"] == []
    md = (tmp_path / "study" / "report.md").read_text()
    assert "| test_resnet | " in md and "top-1 **+10.00** points. Whether the ensemble helps at this size cannot be " \
        "judged" in md
