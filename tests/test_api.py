"""The public API is what train-student runs on: a loop of one's own over `ReplayLoader` (examples/) trains the same
weights, step for step, and the loader resumes within an epoch and refuses caches of other views by name."""
from __future__ import annotations

import contextlib
import io
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import replaykd
from replaykd import ReplayKDError, ReplayLoader, TeacherTargets, TrainBatch
from replaykd.stages.options import StudentOptions
from replaykd.stages.train_student import run as train

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY = {"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}  # 2 blocks: drop path draws in the second


def example(name: str, *args) -> str:
    """Run examples/NAME as a script with ARGS, in this process (starting Python with torch costs seconds); its
    standard output."""
    out, argv = io.StringIO(), sys.argv
    sys.argv = [str(EXAMPLES / name), *map(str, args)]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv = argv
    return out.getvalue()


@pytest.mark.parametrize("distillation, student, workers, init_seed", [
    ("hard", "deit_tiny_distilled_patch16_224", 0, 0),  # DeiT's two heads
    ("soft", "vit_tiny_patch16_224", 2, 1),  # one head learns labels and teacher
])
def test_the_example_loop_trains_the_weights_train_student_trains(digits_dir, store, tmp_path, distillation, student,
                                                                   workers, init_seed):
    common = {"recipe": "digits-ra", "epochs": 2, "batch_size": 32, "lr": 2e-3, "warmup_epochs": 1,
              "drop_path": 0.2, "workers": workers, "init_seed": init_seed, **TINY}
    summary = train(StudentOptions.from_mapping({
        "out": tmp_path / "cli", "manifest": digits_dir, "cache": [store], "student": student,
        "distillation": distillation, "eval_split": "none", "device": "cpu", "threads": 1, "log_interval": 1,
        **common}))
    assert summary["epochs"] == 2 and summary["threads"] == 1  # each epoch's thread count: the run's arithmetic
    flags = [x for k, v in common.items() for x in (f"--{k.replace('_', '-')}", v)]
    example("train_loop.py", "--manifest", digits_dir, "--cache", store, "--student", student, "--distillation",
            distillation, "--device", "cpu", "--threads", 1, "--out", tmp_path / "mine.pt", *flags)
    rows = [json.loads(line) for line in (tmp_path / "cli" / "log.jsonl").read_text().splitlines()]
    theirs = [(step, loss) for row in rows for step, loss in row["step_losses"]]
    assert [row["threads"] for row in rows] == [1, 1]
    mine = [(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / "mine.pt.steps.jsonl").read_text().splitlines())]
    assert len(mine) == sum(r["steps"] for r in rows) > 40 and mine == theirs  # every step's loss, to the bit
    weights = torch.load(tmp_path / "cli" / "train_state.pt", weights_only=True)["model"]
    own = torch.load(tmp_path / "mine.pt", weights_only=True)
    assert own.keys() == weights.keys() and all(torch.equal(own[k], weights[k]) for k in own)


def test_timms_train_loop_learns_from_the_cache(digits_dir, store, tmp_path):
    out = example("timm_train.py", "--manifest", digits_dir, "--cache", store, "--recipe", "digits-ra", "--epochs", 2,
                  "--batch-size", 32, "--lr", 4e-2, "--warmup-epochs", 1, "--workers", 0, "--device", "cpu",
                  "--model-kwargs", json.dumps(TINY), "--log-interval", 10, "--output", tmp_path / "model.pth.tar")
    result = json.loads(out.strip().splitlines()[-1])
    steps = ReplayLoader(digits_dir, "digits-ra", store, batch_size=32, workers=0, device="cpu").steps_per_epoch(2)
    assert result["epochs"] == 2 and result["updates"] == sum(steps)
    losses = result["train_loss"]
    assert losses[1] < losses[0] and 0 <= result["val_top1"] <= 100  # 2 epochs of a tiny model: it learns a little
    state = torch.load(tmp_path / "model.pth.tar", weights_only=True)
    assert state["arch"] == "deit_tiny_distilled_patch16_224" and "head_dist.weight" in state["state_dict"]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_resumed_at_a_step_yields_the_rest_of_that_epoch(digits_dir, store, workers):
    loader = ReplayLoader(digits_dir, "digits-ra", store, batch_size=32, workers=workers, device="cpu")
    with loader:
        loader.set_epoch(1)
        whole = list(loader)
        loader.set_epoch(1, step=5)
        assert len(loader) == loader.steps(1) - 5 == len(whole) - 5
        rest = list(loader)
    assert len(rest) == len(whole) - 5 > 0
    for a, b in zip(whole[5:], rest):
        assert isinstance(b, TrainBatch) and isinstance(b.teacher, TeacherTargets)
        assert a.views.keys == b.views.keys and torch.equal(a.images, b.images)
        assert torch.equal(a.targets, b.targets) and torch.equal(a.teacher.probs, b.teacher.probs)
    assert set(whole[0].views.epochs.tolist()) == {1}
    with pytest.raises(ReplayKDError, match="step 1000 is outside epoch 1"):
        loader.set_epoch(1, step=1000)


def test_a_cache_of_other_views_is_refused_by_name_through_the_api(digits_dir, store):
    with pytest.raises(ReplayKDError, match=f"{store} was built for something else; refusing to mix: .*seed"):
        ReplayLoader(digits_dir, "digits-ra", store, seed=1, workers=0)
    with pytest.raises(ReplayKDError, match=rf"3 epochs asked for but {store} holds 2"):
        ReplayLoader(digits_dir, "digits-ra", store, epochs=3, workers=0)
    assert ReplayLoader(digits_dir, "digits-ra", store, epochs=3, reuse_epochs=True, workers=0).view_epochs == 2


def test_import_replaykd_alone_loads_neither_torch_nor_timm():
    code = "import sys, replaykd; print(replaykd.__version__, sorted({'torch', 'timm'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [replaykd.__version__, "[]"]
    assert set(replaykd.__all__) <= set(dir(replaykd)) and all(getattr(replaykd, n) is not None for n in replaykd.__all__)


@pytest.mark.parametrize("batch_size", [134, 66])  # 134 = 2 x 67: once pieces of 2 views; 66: once odd pieces of 33
def test_a_pair_stays_in_one_batch_at_an_awkward_batch_size(digits_dir, store, batch_size):
    with ReplayLoader(digits_dir, "digits-ra", store, batch_size=batch_size, workers=2, device="cpu") as loader:
        loader.set_epoch(0)
        batches = [b.views for b in loader]
        assert len(batches) == loader.steps(0) > 4 and all(len(b) == batch_size for b in batches)
    seen = set()
    for b in batches:
        views = set(zip(b.shard_nos.tolist(), b.slots.tolist()))
        assert all((shard, slot ^ 1) in views for shard, slot in views)  # slots 2i and 2i+1 are a pair
        assert len(views) == batch_size and not views & seen
        seen |= views
        assert min(len(chunk) for chunk in b.images) >= 16  # the workers' pieces: pixel rows, one per view
