"""Smoke tests of `replaykd bench` and `replaykd report` (the code paths of `make bench` and `make demo`)."""
from __future__ import annotations

import json
import shutil

import pytest

from replaykd.errors import ReplayKDError
from replaykd.stages.bench.measure import SIDE_BY_SIDE, together
from replaykd.stages.options import StudentOptions
from replaykd.stages.train_student import run
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

README = "# x\n<!-- demo:start -->\nold\n<!-- demo:end -->\n<!-- bench:start -->\nold\n<!-- bench:end -->\n"


def test_bench_writes_every_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    run_cli("bench", "--out", tmp_path / "bench", "--preset", "smoke", "--repeats", "1", "--views", "16", "--workers", "0",
            "--device", "cpu", "--readme", readme, "--real-cache", tmp_path / "none.zarr", "--pillow-simd",
            tmp_path / "none")
    r = json.loads((tmp_path / "bench" / "bench.json").read_text())
    lo = r["loader"]
    assert [x["recipe"] for x in lo["per_core"]] == ["deit", "digits"] and lo["speedups"] == []
    assert lo["replay_over_timm_per_core"] == lo["replay_over_timm_per_core_stock"] > 0
    deit = lo["per_core"][0]
    assert deit["input_size"] == 224 and deit["repeats"] == 3 and deit["pillow"].startswith("pillow ")
    assert {"RandomResizedCropAndInterpolation", "RandAugment", "fingerprint", "erase draws"} <= set(deit["replay_ms_per_view"])
    assert 0 < deit["worker_bytes_per_view"]["pickled"] < deit["worker_bytes_per_view"]["pixels"]
    assert lo["full_loader"]["views_per_s"] > 0 and lo["draft_eligible"] == 0.0  # 500x375 photos never qualify
    decodes = r["loader"]["decodes_per_view"]
    assert r["stage_one"]["teacher_cache_views_per_s"] > 0 and decodes["repeats"] == 3
    assert decodes["stage_one"] == pytest.approx(1 / decodes["epochs"], rel=0.05)  # decode once per shard
    assert decodes["stage_two"] == pytest.approx(1 / 3, rel=0.05)  # one decode serves the 3 repeats
    big = r["loader_shard1000"]  # the loader's shard-size measurement (smoke: one shard of 48 photographs)
    assert big["images"] == 48 and big["shards"] == 1 and big["worker_private_mb"] > 0
    assert big["replay_over_timm"] == big["views_per_cpu_s"] / big["timm_loader_views_per_cpu_s"] > 0
    assert big["replay_over_timm_wall"] == big["views_per_s"] / big["timm_loader_views_per_s"] > 0
    assert 1 / 3 <= big["decodes_per_view"] < 0.5  # one decode per sample for its repeats, a unit's tail aside
    s3 = r["object_store"]  # the same loader and stage one on a local S3 server
    assert s3["stage_two_loader_views_per_s"]["s3"] > 0 and s3["stage_one_s3_over_local"] > 0
    assert r["coverage"]["balanced"]["3"] == 1.0 and r["coverage"]["deit_rasampler_8_ranks"]["3"] < 0.8
    s2 = r["stage_two"][0]
    assert s2["cached_over_no_kd"] > 0 and s2["flop_bound_online_cost"] > 1.0
    # P1 and the ensembles' cost: images per CPU second of runs side by side, the median round (smoke: one round,
    # one after the other); beside P1 the ratio of its arms' images per second
    def cpu(run):
        log = (tmp_path / "bench" / "work" / "digits-few" / run / "log.jsonl").read_text().splitlines()
        log = [json.loads(x) for x in log]
        log = log[1:] or log  # the epochs after the first (smoke: one epoch)
        return sum(x["images"] for x in log) / sum(x["train_cpu_seconds"] for x in log)

    assert s2["p1_same_student_rounds"] == [pytest.approx(cpu("p1-cache_kd") / cpu("p1-no_kd_same_student"))]
    assert s2["p1_same_student"] == s2["p1_same_student_rounds"][0]
    assert s2["p1_same_student_wall"] == s2["cache_kd_images_per_s"] / s2["no_kd_same_student_images_per_s"]
    assert s2["side_by_side_rates_are"] == SIDE_BY_SIDE  # the CPU's way
    assert r["p1_same_student"]["per_data_set"] == {"digits-few": s2["p1_same_student"]}
    for n, name in ((2, "two_caches_over_one"), (4, "four_caches_over_one")):
        assert s2[f"{name}_rounds"] == [pytest.approx(cpu(f"ensemble-cache_kd_{n}") / cpu("ensemble-cache_kd"))]
        assert s2[name] == s2[f"{name}_rounds"][0] > 0
    ens = r["ensemble"]
    assert ens["goal"] == 0.95 and ens["caches"] == [2, 4]
    assert ens["per_data_set"] == {"digits-few": min(s2["two_caches_over_one"], s2["four_caches_over_one"])}
    assert ens["met"] == (ens["per_data_set"]["digits-few"] >= 0.95)
    assert "concurrent" not in r  # measured side by side in fresh processes by the real presets only
    assert [c["k"] for c in r["cache_size"]] == [5, 10, 100]
    assert all(c["stored_bytes_per_view"] < c["raw_bytes_per_view"] for c in r["cache_size"])
    text = readme.read_text()
    assert "old\n<!-- bench:end -->" not in text and f"{s2['cached_over_no_kd']:.3f}" in text
    assert f"**{s2['four_caches_over_one']:.3f}** (" in text and f"digits-few **{ens['per_data_set']['digits-few']:.3f}**" in text
    readme.write_text(README)
    run_cli("bench", "--out", tmp_path / "bench", "--render-only", "--readme", readme)  # measures nothing
    assert readme.read_text() == text


def test_report_states_what_the_runs_measured(tmp_path, digits_dir, store, teacher_ckpt):
    demo = tmp_path / "demo"
    (demo / "teacher").mkdir(parents=True)
    shutil.copy(teacher_ckpt.with_suffix(".json"), demo / "teacher" / "teacher.json")
    shutil.copytree(store, demo / "cache.zarr")
    s = run(StudentOptions.from_mapping(dict(out=demo / "student-hard", manifest=digits_dir, cache=store,
                                             recipe="digits-ra", epochs=1, patch_size=4, depth=2, embed_dim=32,
                                             num_heads=2, batch_size=128, workers=0, device="cpu")))
    none = run(StudentOptions.from_mapping(dict(out=demo / "student-none", manifest=digits_dir, distillation="none",
                                                recipe="digits-ra", epochs=1, patch_size=4, depth=2, embed_dim=32,
                                                num_heads=2, batch_size=128, workers=0, device="cpu")))
    readme = tmp_path / "README.md"
    readme.write_text(README)
    run_cli("report", demo, "--readme", readme)
    md = (demo / "report.md").read_text()
    # the KD gain image by image: the exported weights loaded through timm agree with the runs' own evaluation
    g = json.loads((demo / "report.json").read_text())["kd_gain"]
    assert abs(g["top1_points"] - (s["top1"] - none["top1"])) < 1e-6
    assert g["only_kd_right"] - g["only_labels_right"] == round(g["top1_points"] * g["images"] / 100)
    assert g["standard_error"] > 0 and f"{g['top1_points']:+.2f} ± {g['standard_error']:.2f}" in md
    teacher = json.loads((demo / "teacher" / "teacher.json").read_text())
    assert f"{teacher['val_top1']:.2f}%" in md
    assert f"| {s['top1']:.2f} | {s['cls_top1']:.2f} | {s['dist_top1']:.2f} |" in md
    assert json.loads((demo / "report.json").read_text())["students"]["student-hard"]["top1"] == s["top1"]
    assert (demo / "curves.png").exists() and f"{s['top1']:.2f}" in readme.read_text()


def test_study_report_gives_mean_and_spread_per_arm(tmp_path, digits_dir, store, teacher_ckpt):
    study = tmp_path / "study"
    accs = {}
    for arm, source in (("hard", {"cache": store}), ("none", {"distillation": "none"})):
        for seed in (0, 1):
            s = run(StudentOptions.from_mapping(dict(out=study / f"{arm}-seed{seed}", manifest=digits_dir, recipe="digits-ra",
                                                     epochs=1, patch_size=4, depth=1, embed_dim=32, num_heads=2,
                                                     batch_size=128, workers=0, device="cpu", init_seed=seed, **source)))
            accs.setdefault(arm, []).append(s["top1"])
    run_cli("study-report", study)
    r = json.loads((study / "report.json").read_text())
    for arm, name in (("hard", "cache: regnety_002"), ("none", "no KD (labels only)")):
        a = r["arms"][name]
        assert a["seeds"] == [0, 1] and a["top1"]["mean"] == pytest.approx(sum(accs[arm]) / 2)
        assert a["top1"]["std"] == pytest.approx(abs(accs[arm][0] - accs[arm][1]) / 2 ** 0.5)
    # DeiT's comparison: the distilled student against its baseline without the distillation token
    assert r["arms"]["cache: regnety_002"]["student"] == "deit_tiny_distilled_patch16_224"
    assert r["arms"]["no KD (labels only)"]["student"] == "deit_tiny_patch16_224"
    assert r["kd_gain"][0]["mean"] == pytest.approx((sum(accs["hard"]) - sum(accs["none"])) / 2)
    # the cache's teacher, found from the students' own files, with the top-1 train-teacher wrote beside it
    teacher = json.loads(teacher_ckpt.with_suffix(".json").read_text())
    assert [(t["file"], t["val_top1"]) for t in r["teachers"]] == [(str(teacher_ckpt.resolve()), teacher["val_top1"])]
    assert f"{r['arms']['cache: regnety_002']['top1']['mean']:.2f} ± " in (study / "report.md").read_text()


def test_runs_started_together_a_failure_names_its_run(tmp_path):
    # the run that ends well beside the broken one is waited for, the broken one named with its own error
    with pytest.raises(ReplayKDError, match=r"replaykd train-student \(broken\) failed during the bench:(.|\n)*nowhere"):
        together({"help": ["train-student", "--help"],
                  "broken": ["train-student", "--manifest", tmp_path / "nowhere", "--out", tmp_path / "o",
                             "--distillation", "none"]}, tmp_path)
    assert not (tmp_path / "o").exists()
