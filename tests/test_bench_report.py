"""Smoke tests of `replaykd bench` and `replaykd report` (the code paths of `make bench` and `make demo`)."""
from __future__ import annotations

import json
import shutil

import pytest

from stages.options import StudentOptions
from stages.train_student import run
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

README = "# x\n<!-- demo:start -->\nold\n<!-- demo:end -->\n<!-- bench:start -->\nold\n<!-- bench:end -->\n"


def test_bench_writes_every_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    run_cli("bench", "--out", tmp_path / "bench", "--repeats", "1", "--views", "16", "--workers", "0",
            "--device", "cpu", "--readme", readme, "--real-cache", tmp_path / "none.zarr")
    r = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert [x["recipe"] for x in r["replay"]] == ["digits", "deit"]
    decodes = r["stage_one"]["decodes_per_view"]
    assert r["stage_one"]["teacher_cache_views_per_s"] > 0
    assert decodes["stage_one"] == pytest.approx(1 / r["stage_one"]["epochs"], rel=0.02)  # decode once per shard
    assert decodes["stage_two"] == pytest.approx(1 / r["coverage"]["repeats"], rel=0.02)  # one decode per repeats
    assert r["coverage"]["balanced"]["3"] == 1.0 and r["coverage"]["deit_rasampler_8_ranks"]["3"] < 0.8
    s2 = r["stage_two"][0]
    assert s2["cached_over_no_kd"] > 0 and s2["flop_bound_online_cost"] > 1.0
    assert [c["k"] for c in r["cache_size"]] == [5, 10, 100]
    assert all(c["stored_bytes_per_view"] < c["raw_bytes_per_view"] for c in r["cache_size"])
    text = readme.read_text()
    assert "old\n<!-- bench:end -->" not in text and f"{s2['cached_over_no_kd']:.3f}" in text


def test_report_states_what_the_runs_measured(tmp_path, digits_dir, store, teacher_ckpt):
    demo = tmp_path / "demo"
    (demo / "teacher").mkdir(parents=True)
    shutil.copy(teacher_ckpt.with_suffix(".json"), demo / "teacher" / "teacher.json")
    shutil.copytree(store, demo / "cache.zarr")
    s = run(StudentOptions.from_mapping(dict(out=demo / "student-hard", manifest=digits_dir, cache=store,
                                             recipe="digits", epochs=1, patch_size=4, depth=2, embed_dim=32,
                                             num_heads=2, batch_size=128, workers=0, device="cpu")))
    readme = tmp_path / "README.md"
    readme.write_text(README)
    run_cli("report", demo, "--readme", readme)
    md = (demo / "report.md").read_text()
    teacher = json.loads((demo / "teacher" / "teacher.json").read_text())
    assert f"{teacher['val_top1']:.2f}%" in md
    assert f"| {s['cls_top1']:.2f} | {s['dist_top1']:.2f} | {s['avg_top1']:.2f} |" in md
    assert json.loads((demo / "report.json").read_text())["students"]["student-hard"]["avg_top1"] == s["avg_top1"]
    assert (demo / "curves.png").exists() and f"{s['avg_top1']:.2f}" in readme.read_text()
