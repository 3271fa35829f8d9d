"""The real user's path, offline: a pretrained teacher by timm name and tag from a Hugging Face cache laid out by
hand (read by the real huggingface_hub code with HF_HUB_OFFLINE=1), shards in the public imagenet-1k-wds layout,
a DeiT student and a ResNet student from one cache, and the exported students loaded back through timm."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from replaykd.cache import TeacherCache
from replaykd.export import load_exported
from replaykd.manifest import Manifest
from replaykd.models import file_sha256
from replaykd.reader import read_shard
from replaykd.recipe import Recipe
from replaykd.replay import Replayer
from tests.conftest import run_cli
from tests.test_shards import wds_layout

pytestmark = pytest.mark.slow

TEACHER = "test_resnet.r160_in1k"  # one of timm's tiny hub-tagged test models: mean/std 0.5, bilinear, 160 px
REVISION = "0123456789abcdef0123456789abcdef01234567"
STUDENT = ["--recipe", "digits-ra", "--epochs", "2", "--batch-size", "64", "--workers", "0", "--device", "cpu"]
DEIT = ["--student", "deit_tiny_distilled_patch16_224", "--patch-size", "4", "--depth", "2", "--embed-dim", "48",
        "--num-heads", "2"]


@pytest.fixture(scope="module")
def hub():
    """A Hugging Face cache laid out by hand where HF_HOME points (conftest): models--timm--NAME/refs/main and
    snapshots/REV/model.safetensors (random weights: nothing is downloaded), read by the real huggingface_hub."""
    home = Path(os.environ["HF_HOME"])
    repo = home / "hub" / f"models--timm--{TEACHER}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    (repo / "snapshots" / REVISION).mkdir(parents=True)
    torch.manual_seed(0)
    weights = repo / "snapshots" / REVISION / "model.safetensors"
    save_file(timm.create_model(TEACHER).state_dict(), str(weights))
    yield None, weights
    shutil.rmtree(repo)


@pytest.fixture(scope="module")
def in1k(tmp_path_factory, digits_dir):
    """Digits as imagenet-1k-wds shards (train and validation, _info.json) with a manifest of 1000 classes."""
    root = tmp_path_factory.mktemp("in1k")
    wds_layout(root / "wds", digits_dir, limit=400)
    run_cli("manifest", str(root / "wds" / "imagenet1k-*.tar"), root / "m", "--num-classes", "1000")
    return root / "m"


def test_a_teacher_by_tag_from_the_hub_cache_sees_its_own_preprocessing(hub, in1k, tmp_path):
    env, weights = hub
    store = tmp_path / "cache.zarr"
    run_cli("teacher-cache", "--manifest", in1k, "--teacher", TEACHER, "--teacher-input-size", "64", "--recipe",
            "digits-teacher", "--epochs", "1", "--topk", "5", "--workers", "0", "--device", "cpu", "--out", store,
            env=env)
    info = json.loads(run_cli("cache", "info", store, "--json", env=env).stdout)["teacher_identity"]
    assert info["name"] == TEACHER and info["hub_id"] == f"timm/{TEACHER}" and info["revision"] == REVISION
    assert info["sha256"] == file_sha256(weights) and info["mean"] == info["std"] == [0.5] * 3
    assert (info["input_size"], info["interpolation"], info["num_classes"]) == (64, "bilinear", 1000)
    # the cached targets are the teacher's on ITS normalisation of each view (the recipe's is ImageNet's)
    m, recipe = Manifest.load(in1k), Recipe.load("digits-teacher")
    assert recipe.mean != (0.5, 0.5, 0.5) and recipe.re_prob == 0 and not recipe.mixes
    model = timm.create_model(TEACHER, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights))).eval()
    cache, replayer = TeacherCache.open(store), Replayer(recipe, 0)
    records = read_shard(m, "train", cache.shards[0])
    unit, plan = cache.read_unit(0, 0), replayer.plan(len(records), 0, cache.shards[0])
    views = [replayer.view_at(plan, records, slot) for slot in range(8)]
    own = torch.stack([(v.image.permute(2, 0, 1).float() / 255 - 0.5) / 0.5 for v in views])
    own = torch.nn.functional.interpolate(own, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    with torch.inference_mode():
        probs = model(own).softmax(-1).topk(5)
    assert np.array_equal(probs.indices.numpy(), unit.classes[:8])
    assert np.allclose(probs.values.numpy(), unit.probs[:8].astype(np.float32), atol=1e-3)
    # a store is refused by a run whose teacher preprocessing differs
    proc = run_cli("teacher-cache", "--manifest", in1k, "--teacher", TEACHER, "--recipe", "digits-teacher",
                   "--epochs", "1", "--topk", "5", "--workers", "0", "--device", "cpu", "--out", store, env=env,
                   check=False)
    assert proc.returncode == 2 and "teacher input_size: 64 in the store, 160 in this run" in proc.stderr


def test_missing_weights_and_other_classes_are_named_before_anything_is_written(hub, digits_dir, tmp_path):
    env, _ = hub
    common = ["--manifest", digits_dir, "--recipe", "digits-ra", "--epochs", "1", "--workers", "0", "--device", "cpu"]
    proc = run_cli("teacher-cache", *common, "--teacher", "test_vit.r160_in1k", "--out", tmp_path / "a", env=env,
                   check=False)
    assert proc.returncode == 2 and "timm/test_vit.r160_in1k" in proc.stderr and "model.safetensors" in proc.stderr
    assert "HF_HUB_OFFLINE=1" in proc.stderr and "hf download" in proc.stderr
    proc = run_cli("teacher-cache", *common, "--teacher", TEACHER, "--out", tmp_path / "b", env=env, check=False)
    assert proc.returncode == 2 and "has 1000 classes, the data set has 10" in proc.stderr
    assert "train-teacher --init test_resnet.r160_in1k" in proc.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_pretrained_teacher_fine_tuned_on_the_data_sets_classes(hub, digits_dir, tmp_path):
    env, _ = hub
    out = tmp_path / "teacher" / "teacher.safetensors"
    run_cli("train-teacher", "--data", digits_dir, "--init", TEACHER, "--input-size", "32", "--epochs", "1",
            "--workers", "0", "--device", "cpu", "--out", out, env=env)
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["model"] == TEACHER and info["num_classes"] == 10 and info["classes"][:2] == ["0", "1"]
    assert info["pretrained_cfg"]["mean"] == [0.5] * 3 and info["init"] == TEACHER  # its own normalisation kept
    model, _ = load_exported(out)  # a new 10-class head, the pretrained body
    pretrained = timm.create_model(TEACHER, pretrained=True, pretrained_cfg_overlay=dict(file=str(hub[1])))
    assert model.fc.out_features == 10 and not torch.equal(model.conv1[0].weight, torch.zeros_like(model.conv1[0].weight))
    assert model.conv1[0].weight.shape == pretrained.conv1[0].weight.shape
    store = tmp_path / "cache.zarr"
    run_cli("teacher-cache", "--manifest", digits_dir, "--teacher", TEACHER, "--checkpoint", out, "--recipe",
            "digits-ra", "--epochs", "1", "--topk", "5", "--workers", "0", "--device", "cpu", "--out", store, env=env)
    assert TeacherCache.open(store).config.teacher["num_classes"] == 10


def test_a_deit_and_a_resnet_student_from_one_cache_export_what_timm_loads(hub, in1k, tmp_path):
    env, _ = hub
    store = tmp_path / "cache.zarr"
    run_cli("teacher-cache", "--manifest", in1k, "--teacher", TEACHER, "--teacher-input-size", "32", "--recipe",
            "digits-ra", "--epochs", "2", "--topk", "5", "--workers", "0", "--device", "cpu", "--out", store, env=env)
    results = {}
    for name, student in (("deit", DEIT), ("resnet", ["--student", "test_resnet"])):
        out = tmp_path / name
        run_cli("train-student", "--manifest", in1k, "--cache", store, "--eval-split", "validation", *student,
                *STUDENT, "--out", out, env=env)
        summary = json.loads((out / "summary.json").read_text())
        csv = (out / "summary.csv").read_text().splitlines()
        assert csv[0].startswith("epoch,train_loss,") and "eval_top1" in csv[0] and csv[0].endswith(",lr")
        assert len(csv) == 3
        evaluated = json.loads(run_cli("evaluate", "--checkpoint", out / "checkpoint.safetensors", "--manifest",
                                       in1k, "--split", "validation", "--device", "cpu", "--json", env=env).stdout)
        assert evaluated["top1"] == summary["top1"] and evaluated["top5"] == summary["top5"]
        results[name] = summary
        # the plain timm call a user makes (the JSON says which arguments) gives the same model
        info = json.loads((out / "checkpoint.json").read_text())
        model = timm.create_model(info["model"], pretrained=True, **info["model_args"], pretrained_cfg_overlay=dict(
            file=str(out / "checkpoint.safetensors"), **info["pretrained_cfg"])).eval()
        exported, _ = load_exported(out / "checkpoint.safetensors")
        x = torch.randn(4, 3, 16, 16)
        with torch.inference_mode():
            assert torch.equal(model(x), exported(x))
    assert results["deit"]["student"] == "deit_tiny_distilled_patch16_224" and "dist_top1" in results["deit"]
    assert results["resnet"]["student"] == "test_resnet" and "dist_top1" not in results["resnet"]


def test_a_manifest_without_an_eval_split_is_refused_before_training(in1k, tmp_path, digits_dir):
    train_only = tmp_path / "m"
    root = Manifest.load(in1k).shard_root
    run_cli("manifest", str(root / "imagenet1k-train-*.tar"), train_only)
    proc = run_cli("train-student", "--manifest", train_only, "--distillation", "none", *DEIT, *STUDENT, "--out",
                   tmp_path / "run", check=False)
    assert proc.returncode == 2 and "has no split 'val' to evaluate on (it has: train)" in proc.stderr
    assert "--eval-split none" in proc.stderr and not (tmp_path / "run").exists()
    run_cli("train-student", "--manifest", train_only, "--distillation", "none", "--eval-split", "none", *DEIT,
            *STUDENT[:2], "--epochs", "1", *STUDENT[4:], "--out", tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "top1" not in summary and summary["student"] == "deit_tiny_patch16_224"  # DeiT's baseline, no dist token
