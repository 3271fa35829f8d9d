"""Damaged or wrong inputs: each is one named line (what is wrong with which file or variable, and what to do), exit
code 2 and no traceback. Every file is damaged in a copy under tmp_path, never in a shared fixture."""
from __future__ import annotations

import json
import shutil

import pytest
import zarr

from replaykd.runs import RunFolder
from replaykd.stages.options import StudentOptions
from tests.conftest import run_cli

# A tiny student on labels only: the run folders below are made by hand, so no epoch is trained.
STUDENT = dict(distillation="none", epochs=1, recipe="digits-ra", patch_size=4, depth=1, embed_dim=32, num_heads=2,
               batch_size=64, workers=0, device="cpu")


def student_args(data, out) -> list:
    """train-student --resume of OUT with the STUDENT options."""
    return ["train-student", "--out", out, "--manifest", data, "--resume",
            *(a for k, v in STUDENT.items() for a in (f"--{k.replace('_', '-')}", v))]


def unknown_tag(data, tmp, monkeypatch):
    return (["teacher-cache", "--manifest", data, "--teacher", "regnety_002.no_such_tag", "--out", tmp / "c.zarr",
             "--device", "cpu"],
            "timm model regnety_002 has no tag 'no_such_tag' (it has: regnety_002.pycls_in1k); name one of these")


def manifest_copy(data, tmp, header: str):
    copy = tmp / "data"
    shutil.copytree(data, copy)
    (copy / "manifest.json").write_text(header)
    return copy


def manifest_not_json(data, tmp, monkeypatch):
    whole = (data / "manifest.json").read_text()
    copy = manifest_copy(data, tmp, whole[: len(whole) // 2])  # cut short, as by an interrupted copy
    return ["views", copy], (f"{copy / 'manifest.json'} is not JSON (damaged or cut short); copy it again from where "
                             "it was made, or make it again ('replaykd shards' or 'replaykd manifest')")


def manifest_incomplete(data, tmp, monkeypatch):
    header = json.loads((data / "manifest.json").read_text())
    copy = manifest_copy(data, tmp, json.dumps({k: v for k, v in header.items() if k not in ("hash", "splits")}))
    return ["views", copy], f"{copy / 'manifest.json'} lacks hash, splits (incomplete); copy it again"


def store_not_json(data, tmp, monkeypatch):
    store = tmp / "store.zarr"
    zarr.open_group(str(store), mode="w")
    meta = store / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:-20])
    return ["cache", "info", store], (f"{meta} is not JSON (damaged or cut short), so the store cannot be opened: "
                                      "copy it again, or delete it and rerun the teacher-cache command that made it")


def run_folder(data, tmp, *, config: bool):
    """A run folder as train-student starts one (its config.yaml, when `config`), with a damaged train_state.pt."""
    out = tmp / "run"
    if config:
        RunFolder(out).create(StudentOptions.from_mapping(dict(out=out, manifest=data, **STUDENT)).to_config())
    out.mkdir(exist_ok=True)
    (out / "train_state.pt").write_bytes(b"PK\x03\x04 cut short")
    return out


def state_damaged(data, tmp, monkeypatch):
    out = run_folder(data, tmp, config=True)
    return student_args(data, out), (f"{out / 'train_state.pt'} cannot be read (damaged or cut short), so the run "
                                     "cannot continue from it: start it again without --resume in another --out")


def config_missing(data, tmp, monkeypatch):
    out = run_folder(data, tmp, config=False)
    return student_args(data, out), (f"{out / 'config.yaml'} is missing, so the options {out} was started with are "
                                     "unknown: put it back from a copy of the run folder, or start the run again in "
                                     "another --out")


def summary_not_json(data, tmp, monkeypatch):
    out = run_folder(data, tmp, config=True)
    (out / "summary.json").write_text('{"run": "')
    return student_args(data, out), (f"{out / 'summary.json'} is not JSON (damaged): the finished run's summary "
                                     "cannot be read; delete it and run the run's train-student command with "
                                     "--resume, which writes it again from train_state.pt")


def slurm_task_not_a_number(data, tmp, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3a")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    return (["teacher-cache", "--manifest", data, "--teacher", "regnety_002", "--out", tmp / "c.zarr", "--device",
             "cpu"],
            "SLURM_ARRAY_TASK_ID='3a' is not an integer (a Slurm job array sets it to a task number): unset it, or "
            "pass --part I/N")


@pytest.mark.parametrize("case", [unknown_tag, manifest_not_json, manifest_incomplete, store_not_json,
                                  state_damaged, config_missing, summary_not_json, slurm_task_not_a_number],
                         ids=lambda case: case.__name__)
def test_bad_input_is_one_named_line(case, digits_dir, tmp_path, monkeypatch):
    args, message = case(digits_dir, tmp_path, monkeypatch)
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"error: {message}" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
