"""Hard to misuse: what broke when the pipeline was tried as a new user would (each test failed before its fix)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from replaykd.manifest import Manifest
from replaykd.shards import write_shards
from replaykd.sources import digits_source
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
    # each launch's first epoch says how long that launch took to reach its first step (here: since pytest started)
    assert [("startup_seconds" in r) for r in log] == [True, True] and all(r["startup_seconds"] > 0 for r in log)
    assert f"first step {log[1]['startup_seconds']:.1f} s after this process started" in proc.stdout


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
    proc = run_cli("shards", src, tmp_path / "out", "--skip-bad", "--shard-size", "10", "--val-fraction", "0")
    m = Manifest.load(tmp_path / "out")
    sizes = m.shard_counts("train")
    assert sizes == [10, 10, 10, 8]  # 38 readable images; only the last shard is short
    listed = (tmp_path / "out" / "skipped.txt").read_text().splitlines()  # every skipped image, named, and why
    assert sorted(line.split("\t")[0] for line in listed) == [str(src / "c1" / "img003.png"), str(src / "c1" / "img017.png")]
    assert all(line.split("\t")[1] for line in listed) and "img003.png" in proc.stdout and "skipped.txt" in proc.stdout


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


def test_progress_total_is_the_epochs_views(digits_dir):
    from torch.utils.data import DataLoader

    from replaykd.loader import ReplayViews, ViewCollate
    from replaykd.recipe import Recipe

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
    (["--student", "test_resnet", "--keep-distillation-token", True],
     "--keep-distillation-token applies to a distilled DeiT student; test_resnet has no distillation token"),
])
def test_student_options_are_checked_against_the_student_before_a_run(digits_dir, tmp_path, args, message):
    from replaykd.errors import ReplayKDError
    from replaykd.stages.options import StudentOptions
    from replaykd.stages.train_student import run

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


def _interrupt_when(proc, ready, timeout=180, sig=signal.SIGINT):
    """Send `sig` to `proc` once `ready()`; its exit code, its standard error, and the processes it had started
    (its loader workers) that are still alive once it has exited."""
    deadline = time.time() + timeout
    while time.time() < deadline and not ready() and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    children = [int(p) for t in os.listdir(f"/proc/{proc.pid}/task")
                for p in open(f"/proc/{proc.pid}/task/{t}/children").read().split()]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, [p for p in children if _alive(p)]


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _stopped_while_made(bar_class) -> list:
    """Make a `bar_class` progress bar with a stop (KeyboardInterrupt, as the command line's SIGINT and SIGTERM
    handlers raise) landing inside its construction; what its finaliser then reported as unraisable."""
    import gc
    import sys

    class StopsWhenShown:
        def __str__(self):  # tqdm shows its postfix between setting `disable` and `pos`: the stop lands there
            raise KeyboardInterrupt

    def make() -> bool:
        try:
            bar_class(total=3, postfix={"at": StopsWhenShown()})
        except KeyboardInterrupt:
            return True
        return False

    unraisable, hook = [], sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        assert make(), "the stop did not reach the caller"
        gc.collect()
    finally:
        sys.unraisablehook = hook
    return [(u.exc_type, str(u.exc_value)) for u in unraisable]


def test_a_stop_while_a_progress_bar_is_made_prints_nothing_more():
    # seen in CI: SIGTERM arrived as train-student made an epoch's bar, and tqdm's finaliser printed "Exception
    # ignored ... AttributeError: 'tqdm' object has no attribute 'pos'" with a traceback under "stopped by SIGTERM"
    from tqdm import tqdm

    from replaykd.progress import Progress

    assert any(t is AttributeError for t, _ in _stopped_while_made(tqdm))  # the case is real: plain tqdm trips on it
    assert _stopped_while_made(Progress) == []


def test_ctrl_c_says_where_it_stopped_and_how_to_continue(digits_dir, store, teacher_ckpt, tmp_path):
    import shlex
    import subprocess

    from replaykd.cache import TeacherCache
    from tests.conftest import CLI

    out = tmp_path / "run"
    args = ["train-student", "--out", out, "--manifest", digits_dir, "--cache", store, "--epochs", "2", *STUDENT[:-4],
            "--workers", "1", "--device", "cpu"]
    proc = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # SIGTERM, as Slurm preempts: it used to end the main process at once (exit 143, nothing said) and leave its
    # loader worker running on
    code, err, left = _interrupt_when(proc, lambda: (out / "train_state.pt").exists(), sig=signal.SIGTERM)
    lines = visible(err)
    assert code == 143 and "Traceback" not in err and not left, (err, left)
    # epoch 0's checkpoint appears just before the run logs it and moves on: the signal may find it still in epoch 0
    assert re.match(r"stopped by SIGTERM: train-student stopped in epoch [01] \(step \d+\)", lines[-1]), lines
    assert "--resume" in lines[-1]
    command = shlex.split(lines[-1].split("Continue with: ", 1)[1])
    assert command[0] == "replaykd" and command[-1] == "--resume"
    run_cli(*command[1:])  # the command it printed finishes the run
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2
    # stage one: the completed units stay, and the same command resumes
    cache = tmp_path / "cache"
    args = ["teacher-cache", "--manifest", digits_dir, "--checkpoint", teacher_ckpt, "--teacher", "regnety_002",
            "--out", cache, "--recipe", "digits-ra", "--epochs", "2", "--topk", "5", "--workers", "0", "--batch-size",
            "16", "--device", "cpu"]
    proc = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, err, _ = _interrupt_when(proc, lambda: any((cache / "units" / "c").glob("*/*")))
    lines = visible(err)
    assert code == 130 and "Traceback" not in err and "units" in lines[-1] and "still missing" in lines[-1], err
    assert TeacherCache.open(cache).missing()
    run_cli(*shlex.split(lines[-1].split("Continue with: ", 1)[1])[1:])
    assert not TeacherCache.open(cache).missing()


def test_a_teacher_input_under_its_stride_and_a_longer_resume_of_a_finished_run_are_refused(digits_dir, store,
                                                                                          teacher_ckpt, tmp_path):
    proc = run_cli("teacher-cache", "--manifest", digits_dir, "--checkpoint", teacher_ckpt, "--teacher", "regnety_002",
                   "--teacher-input-size", "8", "--recipe", "digits-ra", "--epochs", "1", "--out", tmp_path / "c",
                   "--device", "cpu", check=False)
    assert proc.returncode == 2 and "8 px is smaller than the teacher's total stride (32)" in proc.stderr
    assert not (tmp_path / "c").exists()
    out = tmp_path / "run"
    run_cli("train-student", "--out", out, "--manifest", digits_dir, "--cache", store, "--epochs", "1", *STUDENT)
    proc = run_cli("train-student", "--out", out, "--manifest", digits_dir, "--cache", store, "--epochs", "2",
                   "--resume", *STUDENT, check=False)
    assert proc.returncode == 2 and "is a finished run of 1 epochs; --epochs 2 cannot continue it" in proc.stderr
    assert "train a new run with --epochs 2" in proc.stderr


def test_runs_leave_the_temporary_folder_as_they_found_it(digits_dir, store, teacher_ckpt, tmp_path):
    # each loader worker that sends batches makes a multiprocessing temp folder (pymp-*); the workers must exit
    # through their own clean-up, which removes it
    # a short folder: the workers' sockets go under it (pytest's own paths, under xdist, leave them too little room)
    temp = Path(tempfile.mkdtemp(prefix="rkd-", dir="/tmp"))
    try:
        common = ["--manifest", digits_dir, "--epochs", "1", *STUDENT[:-4], "--workers", "2", "--device", "cpu"]
        for name, source in (("cached", ["--cache", store]),
                             ("online", ["--online-teacher", "regnety_002", "--teacher-checkpoint", teacher_ckpt])):
            run_cli("train-student", "--out", tmp_path / name, *common, *source, env={"TMPDIR": str(temp)})
        assert not [p.name for p in temp.iterdir() if p.name.startswith("pymp-")]
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_a_temporary_folder_too_long_for_the_workers_sockets_is_refused(digits_dir, store, tmp_path):
    # a worker's socket path over 107 bytes cannot be made: multiprocessing printed the error, dropped the batch
    # whose shared memory it should hand over, and the run waited for it for ever
    temp = tmp_path / ("t" * max(1, 80 - len(str(tmp_path))))
    temp.mkdir()
    proc = run_cli("train-student", "--out", tmp_path / "run", "--manifest", digits_dir, "--cache", store, "--epochs",
                   "1", *STUDENT[:-4], "--workers", "2", "--device", "cpu", env={"TMPDIR": str(temp)}, check=False,
                   timeout=120)
    assert proc.returncode == 2 and "too long a path for loader workers" in proc.stderr, proc.stderr
    assert "Set TMPDIR to a shorter folder" in proc.stderr and not (tmp_path / "run").exists()
