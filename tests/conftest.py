"""Shared fixtures: real digits shards written once per test session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.shards import write_shards  # noqa: E402
from pipeline.sources import digits_source  # noqa: E402

CLI = [sys.executable, "-c", "from stages.cli import main; main()"]


def run_cli(*args, check=True, timeout=600, env=None):
    """Run `replaykd ARGS` in a fresh process; returns the CompletedProcess."""
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"replaykd {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """Digits shards (16 px PNGs, 200 per shard) with their manifest."""
    out = tmp_path_factory.mktemp("digits")
    write_shards(digits_source(0.2, seed=0, size=16), out, shard_size=200, seed=0, skip_bad=False)
    return out
