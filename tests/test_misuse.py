"""Hard to misuse: what broke when the pipeline was tried as a new user would (each test failed before its fix)."""
from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest
from PIL import Image

from pipeline.manifest import Manifest
from pipeline.shards import write_shards
from pipeline.sources import digits_source
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

STUDENT = ["--recipe", "digits-ra", "--patch-size", "4", "--depth", "1", "--embed-dim", "32", "--num-heads", "2",
           "--batch-size", "64", "--workers", "0", "--device", "cpu"]


def test_resume_of_a_finished_run_reports_it_and_rewrites_nothing(digits_dir, store, tmp_path):
    out = tmp_path / "run"
    run_cli("train-student", "--out", out, "--manifest", digits_dir, "--cache", store, "--epochs", "1", *STUDENT)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    proc = run_cli("train-student", "--out", out, "--manifest", digits_dir, "--cache", store, "--epochs", "1",
                   *STUDENT, "--resume")
    assert "finished run" in proc.stdout and "nothing to resume" in proc.stdout
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    summary = json.loads((out / "summary.json").read_text())
    assert "cls_top1" in summary and summary["images_per_s_is"].startswith("mean over 1 epochs")


def test_reported_speed_is_the_runs_mean_and_resume_says_where(digits_dir, store, tmp_path):
    out = tmp_path / "run"
    run_cli("train-student", "--out", out, "--manifest", digits_dir, "--cache", store, "--epochs", "2", *STUDENT,
            "--stop-after", "1")
    proc = run_cli("train-student", "--out", out, "--manifest", digits_dir, "--cache", store, "--epochs", "2",
                   *STUDENT, "--resume")
    assert f"resuming {out} at epoch 1 of 2" in proc.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    mean = sum(r["images"] for r in log) / sum(r["train_seconds"] for r in log)
    assert summary["images_per_s"] == pytest.approx(mean) and summary["last_epoch_images_per_s"] == log[-1]["images_per_s"]
    assert f"{mean:.0f} img/s (mean over 2 epochs, training only)" in proc.stdout


def test_options_that_cannot_apply_fail_before_anything_is_written(digits_dir, teacher_ckpt, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train-student", "--out", out, "--manifest", digits_dir, "--online-teacher", "regnety_002",
                   "--teacher-checkpoint", teacher_ckpt, "--topk", "20", "--epochs", "1", *STUDENT, check=False)
    assert proc.returncode == 2 and "--topk 20 is more than the dataset's 10 classes" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_a_loader_workers_error_is_the_projects_message_and_leaves_no_run_folder(digits_dir, store, tmp_path):
    moved = tmp_path / "data"
    shutil.copytree(digits_dir, moved)
    m = Manifest.load(moved)
    for shard in m.shards("train"):  # every shard changed: whichever a worker reads first is caught
        path = m.shard_path(shard)
        data = bytearray(path.read_bytes())
        data[data.index(b"IDAT") + 8] ^= 0xFF
        path.write_bytes(bytes(data))
    out = tmp_path / "run"
    args = [*STUDENT[:-4], "--workers", "2", "--device", "cpu"]  # the error comes from a loader worker
    proc = run_cli("train-student", "--out", out, "--manifest", moved, "--distillation", "none", "--epochs", "1",
                   *args, check=False)
    assert proc.returncode == 2, proc.stderr
    first = visible(proc.stderr)[0]
    assert first.startswith("error: shard ") and "differs from the manifest" in first
    assert "Traceback" not in proc.stderr and "DataLoader worker" not in proc.stderr
    assert not out.exists()
    debug = run_cli("train-student", "--out", out, "--manifest", moved, "--distillation", "none", "--epochs", "1",
                    *args, check=False, env={"REPLAYKD_DEBUG": "1"})
    assert "Traceback" in debug.stderr  # the traceback when asked for


def visible(stream: str) -> list[str]:
    """The lines of a stream other than progress bars (a terminal erases those) and blank ones."""
    lines = (line.rsplit("\r", 1)[-1].strip() for line in stream.split("\n"))
    return [line for line in lines if line and "%|" not in line]


def _folder_with_bad_images(root, n=40, bad=(3, 17)):
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        f = root / f"c{i % 2}" / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(f)
        if i in bad:
            f.write_bytes(f.read_bytes()[:30])
    return root


def test_skip_bad_keeps_every_other_shard_full(tmp_path):
    src = _folder_with_bad_images(tmp_path / "src")
    run_cli("shards", src, tmp_path / "out", "--skip-bad", "--shard-size", "10", "--val-fraction", "0")
    m = Manifest.load(tmp_path / "out")
    sizes = m.shard_counts("train")
    assert sizes == [10, 10, 10, 8]  # 38 readable images; only the last shard is short


def test_a_failed_shards_run_leaves_out_as_it_found_it(tmp_path):
    src = _folder_with_bad_images(tmp_path / "src")
    proc = run_cli("shards", src, tmp_path / "new", "--shard-size", "4", check=False)
    assert proc.returncode == 2 and not (tmp_path / "new").exists()
    old = tmp_path / "old"
    write_shards(digits_source(0.2, seed=0, size=16), old, 500, 0, False)
    before = {f.name: f.read_bytes() for f in old.iterdir()}
    proc = run_cli("shards", src, old, "--shard-size", "4", "--overwrite", check=False)
    assert proc.returncode == 2 and {f.name: f.read_bytes() for f in old.iterdir()} == before
    run_cli("shards", src, tmp_path / "new", "--shard-size", "4", "--skip-bad")  # a retry needs no --overwrite


def test_written_files_respect_the_umask(digits_dir, store, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        run_cli("train-student", "--out", out, "--manifest", digits_dir, "--cache", store, "--epochs", "1", *STUDENT)
        for name in ("checkpoint.safetensors", "train_state.pt", "summary.json", "config.yaml"):
            assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    finally:
        os.umask(old)


def test_views_grid_is_labelled(digits_dir, tmp_path):
    out = tmp_path / "views.png"
    run_cli("views", digits_dir, "--recipe", "digits-ra", "--epochs", "0-2", "--samples", "3", "--out", out)
    grid = np.asarray(Image.open(out).convert("L"))
    assert (grid[:10, 60:] < 128).any()  # column headers (epoch numbers)
    assert (grid[30:, :40] < 128).any()  # row labels (key and class)


def test_progress_total_is_the_epochs_views(digits_dir):
    from torch.utils.data import DataLoader

    from pipeline.loader import ReplayViews, ViewCollate
    from pipeline.recipe import Recipe

    m, recipe = Manifest.load(digits_dir), Recipe.load("digits-ra")
    ds = ReplayViews(m, recipe, 0, 3, rank=0, world_size=1, batch_size=64)
    batches = list(DataLoader(ds, batch_size=64, num_workers=2, collate_fn=ViewCollate(10, 0.1)))
    assert sum(len(b) for b in batches) == ds.views() and len(batches) == ds.batches()


@pytest.mark.parametrize("args, message", [
    (["--img-size", "32"], "--img-size 32 differs from the recipe's input_size 16"),
    (["--embed-dim", "100", "--num-heads", "3"], "--embed-dim 100, --num-heads 3: dim should be divisible by num_heads"),
    (["--patch-size", "5"], "--patch-size 5 does not divide the 16 px views"),
    (["--student", "test_resnet", "--depth", "2"], "--depth does not apply to test_resnet"),
    (["--student", "no_such_model"], "unknown timm model 'no_such_model'"),
])
def test_student_options_are_checked_against_the_student_before_a_run(digits_dir, tmp_path, args, message):
    from pipeline.errors import ReplayKDError
    from stages.options import StudentOptions
    from stages.train_student import run

    values = dict(out=tmp_path / "run", manifest=digits_dir, recipe="digits-ra", distillation="none", epochs=1,
                  workers=0, device="cpu", patch_size=4, depth=1, embed_dim=32, num_heads=2)
    given = {k.lstrip("-").replace("-", "_"): v for k, v in zip(args[::2], args[1::2])}
    if given.get("student") == "test_resnet":  # a CNN: no ViT options but the one under test
        values = {k: v for k, v in values.items() if k not in ("patch_size", "depth", "embed_dim", "num_heads")}
    with pytest.raises(ReplayKDError, match=message.replace("(", r"\(")):
        run(StudentOptions.from_mapping({**values, **given}))
    assert not (tmp_path / "run").exists()


def test_metrics_go_to_tensorboard_when_asked(digits_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run_cli("train-student", "--out", out, "--manifest", digits_dir, "--distillation", "none", "--epochs", "2",
            "--log-tensorboard", *STUDENT)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for key in ("loss", "top1", "eval_loss", "lr"):
        assert [round(e.value, 4) for e in events.Scalars(key)] == [round(r[key], 4) for r in log]
        assert [e.step for e in events.Scalars(key)] == [0, 1]


def test_a_sink_without_its_package_is_refused_before_a_run(digits_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    proc = run_cli("train-student", "--out", tmp_path / "run", "--manifest", digits_dir, "--distillation", "none",
                   "--epochs", "1", "--log-wandb", *STUDENT, check=False)
    assert proc.returncode == 2 and "--log-wandb needs the wandb package" in proc.stderr
    assert "pip install 'replaykd[wandb]'" in proc.stderr and not (tmp_path / "run").exists()
