"""What the held-out trial found besides (issue 24, item 6): each test failed before its fix. Shared fixtures are
copied into tmp_path before anything is changed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from replaykd.cache import TeacherCache
from replaykd.cache_report import summarize
from replaykd.errors import ReplayKDError
from replaykd.finish import Finisher
from replaykd.grid import EMPTY, GridLayout, to_pil
from replaykd.loader import ViewCollate
from replaykd.manifest import Manifest
from replaykd.models import create_classifier
from replaykd.reader import read_shard
from replaykd.recipe import Recipe
from replaykd.replay import Replayer
from replaykd.stages.cache_tools import pick_views
from replaykd.stages.inspect import view_cells
from replaykd.stages.options import ViewsOptions
from replaykd.stages.teacher_cache import run  # with replaykd.cache and .cache_writer: every ReplayKDError subclass
from tests.conftest import options, run_cli

STUDENT = ["--recipe", "digits-ra", "--patch-size", "4", "--depth", "1", "--embed-dim", "32", "--num-heads", "2",
           "--batch-size", "64", "--workers", "0", "--device", "cpu"]


def one_line(proc) -> str:
    """The one line a user error prints (exit code 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr
    lines = [line.rsplit("\r", 1)[-1].strip() for line in proc.stderr.splitlines()]
    lines = [line for line in lines if line and "%|" not in line]  # progress bars: a terminal erases them
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# --- a. an OUT that cannot be written --------------------------------------------------------------------------

def _command(name: str, out: Path, digits_dir: Path, request) -> list:
    if name == "shards":
        return ["shards", "digits", out]
    if name == "train-student":
        return ["train-student", "--out", out, "--manifest", digits_dir, "--distillation", "none", "--epochs", "1",
                *STUDENT]
    ckpt = request.getfixturevalue("teacher_ckpt")
    return ["teacher-cache", "--manifest", digits_dir, "--checkpoint", ckpt, "--teacher", "regnety_002", "--recipe",
            "digits-ra", "--epochs", "1", "--workers", "0", "--device", "cpu", "--out", out]


@pytest.mark.slow
@pytest.mark.parametrize("under", ["a file", "/sys"])
@pytest.mark.parametrize("name", ["shards", "train-student", "teacher-cache"])
def test_an_out_that_cannot_be_written_is_one_named_line_before_anything_is_written(name, under, digits_dir,
                                                                                    tmp_path, request):
    # chmod stops no root, so: a path under a regular file (ENOTDIR), or under /sys, where even root may create
    # nothing (EPERM; EACCES for others), as on a read-only mount (EROFS)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    out = afile / "out" if under == "a file" else Path("/sys") / f"replaykd-{tmp_path.name}"
    flag = "OUT" if name == "shards" else "--out"
    line = one_line(run_cli(*_command(name, out, digits_dir, request), check=False))
    assert line.startswith(f"error: {flag} {out} cannot be written: "), line
    assert afile.read_text() == "mine" and not out.exists()


# --- b. an error raised in a loader worker ------------------------------------------------------------------------

def _subclasses(cls) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


class Raises(torch.utils.data.Dataset):
    """A data set whose every item raises `error` (in a loader worker)."""

    def __init__(self, error: type):
        self.error = error

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i):
        raise self.error("shard x.tar: the project's message")


@pytest.mark.parametrize("error", [ReplayKDError, *_subclasses(ReplayKDError)], ids=lambda c: c.__name__)
def test_every_project_error_from_a_loader_worker_is_its_own_message(error):
    batches = iter(DataLoader(Raises(error), num_workers=1))
    with pytest.raises(error) as raised:
        next(batches)
    # stopped now: left to the garbage collector (the error's traceback holds the iterator), torch's shutdown waited
    # 5 s for the worker, its queues already closed by the same collection
    batches._shutdown_workers()
    assert str(raised.value) == "shard x.tar: the project's message"
    # the worker's traceback is kept for REPLAYKD_DEBUG=1, as a note
    assert "Caught" in raised.value.__notes__[0] and "__getitem__" in raised.value.__notes__[0]


@pytest.mark.slow
def test_stage_one_says_a_changed_shard_met_by_a_loader_worker_in_one_line(digits_dir, teacher_ckpt, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    for shard in data.glob("train-*.tar"):  # every shard changed: whichever the worker reads first is caught
        raw = bytearray(shard.read_bytes())
        raw[raw.rindex(b"IDAT") + 8] ^= 0xFF
        shard.write_bytes(bytes(raw))
    out = tmp_path / "store"
    line = one_line(run_cli("teacher-cache", "--manifest", data, "--checkpoint", teacher_ckpt, "--teacher",
                            "regnety_002", "--recipe", "digits-ra", "--epochs", "1", "--workers", "1", "--device",
                            "cpu", "--out", out, check=False))
    assert line.startswith(f"error: shard {data}/train-") and "differs from the manifest" in line, line
    assert "Caught" not in line and "DataLoader worker" not in line


# --- c. weights of another model, without the JSON beside them ------------------------------------------------------

def test_weights_of_another_model_name_the_keys_that_do_not_fit(digits_dir, tmp_path):
    weights = tmp_path / "regnety.safetensors"  # no JSON beside it
    save_file(create_classifier("regnety_002", 10).state_dict(), str(weights))
    line = one_line(run_cli("teacher-cache", "--manifest", digits_dir, "--checkpoint", weights, "--teacher",
                            "resnet18", "--recipe", "digits-ra", "--epochs", "1", "--device", "cpu", "--out",
                            tmp_path / "c", check=False))
    assert line.startswith(f"error: checkpoint {weights} does not fit resnet18: missing keys: "), line
    assert "conv1.weight" in line and "unexpected keys: " in line and "s1.b1.conv1.conv.weight" in line
    assert not (tmp_path / "c").exists()


# --- d. --num-classes against classes.txt and the labels --------------------------------------------------------

def test_num_classes_that_contradicts_the_class_names_or_the_labels_is_refused(digits_dir, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for f in digits_dir.glob("*.tar"):
        shutil.copy(f, shards)
    shutil.copy(digits_dir / "classes.txt", shards)  # 10 names
    line = one_line(run_cli("manifest", f"{shards}/*.tar", tmp_path / "a", "--num-classes", "5", check=False))
    assert line == (f"error: {shards / 'classes.txt'} has 10 class names but --num-classes is 5: give one that agrees "
                    "with it, or drop --num-classes (the names fix the count)")
    run_cli("manifest", f"{shards}/*.tar", tmp_path / "b", "--num-classes", "10")  # agreeing is fine
    assert Manifest.load(tmp_path / "b").num_classes == 10
    (shards / "classes.txt").unlink()  # the count from --num-classes alone: labels 0-9 need 10
    line = one_line(run_cli("manifest", f"{shards}/*.tar", tmp_path / "c", "--num-classes", "5", check=False))
    assert line == ("error: the shards use label 9 but there are only 5 classes (from --num-classes 5); labels must "
                    "be below the number of classes")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


# --- e. cache info totals count what the store holds --------------------------------------------------------------

@pytest.mark.slow
def test_cache_info_totals_count_the_units_of_a_launch_that_recorded_nothing(store, digits_dir, teacher_ckpt,
                                                                               tmp_path):
    grown = tmp_path / "store"
    shutil.copytree(store, grown)
    first = summarize(TeacherCache.open(grown))  # one launch built it, and recorded its figures
    runs = zarr.open_group(str(grown / "runs"), mode="a")
    before = set(runs.group_keys())
    run(options(digits_dir, teacher_ckpt, grown, epochs=3))
    for name in set(runs.group_keys()) - before:  # as if that launch had been killed: its units stay, no figures
        del runs[name]
    cache = TeacherCache.open(grown)
    held = sum(cache.unit_size(e, s) for e, s in zip(*cache.done().nonzero()))
    summary = summarize(cache)
    assert summary.views_cached == summary.totals["views_written"] == held > first.views_cached
    assert summary.totals["views_recorded"] == first.views_cached and summary.totals["launches"] == 1
    text = run_cli("cache", "info", grown).stdout
    assert f"store totals: {held} views written, {first.views_cached} of them by 1 process(es) in 1 launch(es) (a " \
           "launch that is killed records no figures)" in text


# --- f. the views grid: a row per sample, a column per epoch --------------------------------------------------------

def test_views_grid_has_a_column_per_epoch_with_that_epochs_views(digits_dir, tmp_path):
    out, cell, epochs = tmp_path / "views.png", 32, [0, 1, 2, 3]
    proc = run_cli("views", digits_dir, "--recipe", "digits-ra", "--epochs", "0-3", "--samples", "4", "--cell", cell,
                   "--out", out)
    assert "4 samples of train-000000.tar (rows) x epochs [0, 1, 2, 3] (columns)" in proc.stdout
    assert "a sample is in 1 epoch of every 3, as 3 views: a grey cell is an epoch without it" in proc.stdout
    manifest, recipe = Manifest.load(digits_dir), Recipe.load("digits-ra")
    _, labels, cells = view_cells(manifest, recipe, ViewsOptions.from_mapping(
        dict(data=digits_dir, recipe="digits-ra", epochs="0-3", samples=4, cell=cell)))
    layout = GridLayout.of(cells, labels, cell, recipe.repeats)
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert (grid.shape[1], grid.shape[0]) == layout.size and layout.rows == 4 and len(layout.views) == 4
    assert layout.views == (3, 3, 3, 3)  # 3 repeats: a sample's views in one epoch side by side
    # each cell holds exactly its sample's views in its column's epoch, by repeat (remade here independently)
    records = read_shard(manifest, "train", "train-000000.tar")
    replayer, finish = Replayer(recipe, 0), Finisher(recipe)
    keys = [label.splitlines()[0] for label in labels]
    positions = [next(r.position for r in records if r.key == key) for key in keys]
    filled = 0
    for j, epoch in enumerate(epochs):
        plan = replayer.plan(len(records), epoch, "train-000000.tar")
        for i, position in enumerate(positions):
            slots = sorted((s.repeat, n) for n, s in enumerate(plan.slots) if s.position == position)
            y = layout.y(i)
            if not slots:  # not in this epoch: an empty cell, still under this epoch's header
                assert (grid[y:y + cell, layout.x(j):layout.x(j) + layout.width_of(j)] == EMPTY).all()
                continue
            views = [replayer.view_at(plan, records, n) for _, n in slots]
            images = finish(ViewCollate(10, recipe.smoothing)(views), torch.device("cpu"))
            for k, image in enumerate(images):
                want = np.asarray(to_pil(image, recipe.mean, recipe.std).resize((cell, cell), Image.NEAREST))
                x = layout.x(j, k)
                assert np.array_equal(grid[y:y + cell, x:x + cell], want), (epoch, keys[i], k)
                filled += 1
    assert filled == 4 * 2 * 3  # samples in two of the epochs (in one of 0-2, and in 3), three views each


# --- g. --distillation none with a distilled DeiT ------------------------------------------------------------------

@pytest.mark.slow
def test_the_baseline_that_replaces_a_distilled_deit_is_said_and_recorded(digits_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train-student", "--out", out, "--manifest", digits_dir, "--distillation", "none", "--epochs", "1",
                   "--student", "deit_tiny_distilled_patch16_224", *STUDENT)
    assert proc.stdout.splitlines()[0] == (
        "--distillation none: training deit_tiny_patch16_224, DeiT's baseline without the distillation token, in place "
        "of deit_tiny_distilled_patch16_224 (summary.json and the checkpoint's JSON name deit_tiny_patch16_224)")
    assert json.loads((out / "summary.json").read_text())["student"] == "deit_tiny_patch16_224"
    assert json.loads((out / "checkpoint.json").read_text())["model"] == "deit_tiny_patch16_224"
    # config.yaml keeps the options as given: --resume and --config compare and read them
    assert yaml.safe_load((out / "config.yaml").read_text())["student"] == "deit_tiny_distilled_patch16_224"


# --- h. cache verify --samples N checks N views -------------------------------------------------------------------

def test_verify_picks_exactly_the_views_asked_for_or_all_there_are():
    units = [(0, 0, 30), (0, 1, 2), (1, 0, 30), (1, 1, 1)]
    for samples in (1, 16, 62):
        picks = pick_views(units, samples, seed=0)
        assert len(picks) == len(set(picks)) == samples
        assert all(slot < n for shard_no, epoch, slot in picks for e, s, n in units if (e, s) == (epoch, shard_no))
    everything = pick_views(units, 64, seed=0)  # more than the 63 views there are: each of them once
    assert everything == sorted((s, e, slot) for e, s, n in units for slot in range(n))


@pytest.mark.slow
def test_verify_says_it_checked_the_views_asked_for(store):
    proc = run_cli("cache", "verify", store, "--samples", "64", "--device", "cpu")
    assert proc.stdout.startswith(f"verified 64 views of {store}: fingerprints OK"), proc.stdout


# --- i. an image that does not decode is named, not Pillow's buffer -------------------------------------------------

def test_an_image_that_does_not_decode_is_named_without_pillows_buffer(tmp_path):
    src = tmp_path / "src"
    for i in range(6):
        (src / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(src / f"c{i % 2}" / f"img{i}.png")
    bad = src / "c1" / "img3.png"
    bad.write_bytes(b"not an image at all")
    line = one_line(run_cli("shards", src, tmp_path / "out", "--val-fraction", "0", check=False))
    assert line == f"error: cannot decode image {bad}: not an image format Pillow reads, or its header is corrupt"
    run_cli("shards", src, tmp_path / "skipped", "--val-fraction", "0", "--skip-bad")
    listed = (tmp_path / "skipped" / "skipped.txt").read_text()
    assert listed == f"{bad}\tnot an image format Pillow reads, or its header is corrupt\n"


# --- j. a bad choice is the project's one line ------------------------------------------------------------------

def test_a_bad_choice_is_the_projects_one_line_and_help_lists_the_choices(tmp_path):
    line = one_line(run_cli("train-student", "--out", tmp_path / "run", "--distillation", "foo", check=False))
    assert line == "error: --distillation must be one of hard, soft, none, got 'foo' (the command line)"
    line = one_line(run_cli("teacher-cache", "--out", tmp_path / "c", "--device", "gpu", check=False))
    assert line == "error: --device must be one of auto, cpu, cuda, got 'gpu' (the command line)"
    help_text = run_cli("train-student", "--help").stdout
    assert "--distillation <hard|soft|none>" in help_text and "[default: hard]" in help_text
    assert "--check-fingerprints <all|sample|off>" in help_text
    assert not (tmp_path / "run").exists()
