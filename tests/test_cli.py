"""The command line is derived from each command's options dataclass; --config files; values checked up front."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
import yaml

from replaykd.stages import options as O
from tests.conftest import run_cli

COMMANDS = {"shards": O.ShardsOptions, "manifest": O.ManifestOptions, "views": O.ViewsOptions,
            "train-teacher": O.TrainTeacherOptions, "teacher-cache": O.TeacherCacheOptions,
            "cache info": O.CacheInfoOptions, "cache verify": O.CacheVerifyOptions, "cache repair": O.CacheRepairOptions,
            "train-student": O.StudentOptions, "evaluate": O.EvaluateOptions, "report": O.ReportOptions,
            "bench": O.BenchOptions}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_a_flag_with_help(command):
    text = run_cli(*command.split(), "--help").stdout
    for f in dataclasses.fields(COMMANDS[command]):
        assert f.metadata["help"], f"{command}: {f.name} has no help"
        if f.metadata["argument"]:
            assert f.name.upper() in text, f"{command}: argument {f.name} missing from --help"
        else:
            flag = f.metadata["flags"][0] if f.metadata["flags"] else "--" + f.name.replace("_", "-")
            assert re.search(re.escape(flag) + r"\b", text), f"{command}: {flag} missing from --help"
    for choice in ("hard|soft|none", "all|sample|off"):
        if command == "train-student":
            assert choice in text


def test_help_imports_nothing_heavy():
    # --help's speed (< 1 s) is measured by hand, not timed here; what makes it slow is a heavy import.
    out = subprocess.run([sys.executable, "-c", "from replaykd.stages.cli import main; main()", "--help"], check=True,
                         capture_output=True, text=True).stdout
    assert "train-student" in out
    imported = subprocess.run([sys.executable, "-c", "import sys; from replaykd.stages import cli; "
                               "print(sorted(m for m in ('torch', 'timm', 'zarr', 'numpy') if m in sys.modules))"],
                              check=True, capture_output=True, text=True).stdout.strip()
    assert imported == "[]"


@pytest.mark.parametrize("args, message", [
    (["--distillation", "foo"], "error: --distillation must be one of hard, soft, none, got 'foo'"),
    (["--batch-size", "0", "--cache", "C"], "--batch-size must be at least 1, got 0"),
    (["--cache", "C", "--distillation", "none"], "--cache would not be used"),
    (["--cache", "C", "--topk", "3"], "--topk applies to --online-teacher only"),
    (["--distillation", "none", "--reuse-epochs"], "--reuse-epochs cycles a cache's epochs; without --cache"),
    (["--cache", "C", "--tau", "2"], "--tau is the temperature of soft distillation; --distillation hard does not"),
    (["--device", "tpu", "--cache", "C"], "error: --device must be one of auto, cpu, cuda, got 'tpu'"),
    (["--cache", "C", "--keep-distillation-token"], "--keep-distillation-token applies to --distillation none"),
])
def test_bad_options_exit_2_before_anything_is_written(tmp_path, args, message):
    out = tmp_path / "run"
    proc = run_cli("train-student", "--out", out, *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not out.exists()


def test_config_file_then_flags(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"out": str(tmp_path / "x"), "epochs": 7, "batch-size": 32, "distillation": "soft",
                                   "cache": "somewhere.zarr"}))
    opts = O.StudentOptions.from_mapping({**yaml.safe_load(cfg.read_text()), "batch_size": 64}, "test")
    assert (opts.epochs, opts.batch_size, opts.distillation) == (7, 64, O.Distillation.soft)
    assert O.StudentOptions.from_mapping(opts.to_config()) == opts  # what a run folder saves reads back
    # the command line itself: the file's values are read, and a flag overrides the file's value
    cfg.write_text(yaml.safe_dump({"out": str(tmp_path / "y"), "batch-size": 0, "distillation": "none", "cache": "C"}))
    proc = run_cli("train-student", "--config", cfg, check=False)
    assert proc.returncode == 2 and "--batch-size must be at least 1, got 0" in proc.stderr, proc.stderr
    proc = run_cli("train-student", "--config", cfg, "--batch-size", "32", check=False)
    assert proc.returncode == 2 and "--cache would not be used" in proc.stderr, proc.stderr
    assert not (tmp_path / "y").exists()
    cfg.write_text("out: x\nbatchsize: 3\n")
    proc = run_cli("train-student", "--config", cfg, check=False)
    assert proc.returncode == 2 and "unknown options batchsize" in proc.stderr
    cfg.write_text("epochs: 3\n")
    proc = run_cli("train-student", "--config", cfg, check=False)
    assert proc.returncode == 2 and "missing option --out" in proc.stderr


def test_the_commands_messages_give_run_as_typed_and_without_secrets(monkeypatch):
    # the rebuild command `cache repair` prints, from the options recorded in the store
    recorded = O.TeacherCacheOptions.from_mapping({
        "out": "s3://b/my cache.zarr", "json_out": True, "part": None,
        "storage_options": '{"endpoint_url": "http://x", "key": "K", "client_kwargs": {"region_name": "r"}}'})
    line = O.command_line("teacher-cache", O.TeacherCacheOptions, recorded.to_config())
    assert line.startswith("replaykd teacher-cache --out 's3://b/my cache.zarr' ") and " --json" in line
    assert "--part" not in line and '"K"' not in line and '"key"' not in line
    assert '--storage-options \'{"endpoint_url": "http://x", "client_kwargs": {"region_name": "r"}}\'' in line
    # the command a failed or stopped run says to rerun: the same quoting, either spelling of --storage-options
    for spelling in (["--storage-options", '{"profile": "p", "secret": "S"}'],
                     ['--storage-options={"profile": "p", "secret": "S"}']):
        monkeypatch.setattr(sys, "argv", ["replaykd", "train-student", "--out", "a b", *spelling])
        again = O.rerun_command("--resume")
        assert '"secret"' not in again and '"S"' not in again and '"profile": "p"' in again
        assert again.startswith("replaykd train-student --out 'a b' ") and again.endswith(" --resume")
