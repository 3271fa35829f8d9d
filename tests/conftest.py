"""Shared fixtures: real digits shards written once per test session."""
from __future__ import annotations

import atexit
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Weights come from a Hugging Face cache the tests lay out by hand (tests/test_real_path.py), never from a network.
# huggingface_hub reads these once, at import: set before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="replaykd-hf-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], True)

from replaykd.cache import TeacherCache, UnitArrays  # noqa: E402
from replaykd.manifest import Manifest  # noqa: E402
from replaykd.shards import write_shards  # noqa: E402
from replaykd.sources import digits_source  # noqa: E402
from replaykd.stages.options import TeacherCacheOptions  # noqa: E402
from replaykd.stages.teacher_cache import run  # noqa: E402

CLI = [sys.executable, "-c", "from replaykd.stages.cli import main; main()"]


def run_cli(*args, check=True, timeout=600, env=None, fresh=False):
    """Run `replaykd ARGS` through the command line's own entry point; returns a CompletedProcess.

    In this process by default (the same code path: options, checks, messages, exit codes), since starting Python
    with torch and timm costs ~9 s here; in a fresh process with `fresh`, or when `env` must be set before the
    libraries read it (huggingface_hub reads HF_HOME and HF_HUB_OFFLINE at import)."""
    if fresh or env:
        proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    else:
        proc = _in_process([str(a) for a in args])
    if check and proc.returncode != 0:
        raise AssertionError(f"replaykd {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _in_process(args: list[str]) -> subprocess.CompletedProcess:
    from replaykd.stages.cli import main

    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    code = 0
    sys.argv = ["replaykd", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exn:
        code = exn.code if isinstance(exn.code, int) else (0 if exn.code is None else 1)
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(["replaykd", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """Digits shards (16 px PNGs, 200 per shard) with their manifest."""
    out = tmp_path_factory.mktemp("digits")
    write_shards(digits_source(0.2, seed=0, size=16), out, shard_size=200, seed=0, skip_bad=False)
    return out


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory, digits_dir):
    """A regnety_002 trained for three epochs by `replaykd train-teacher` (real training, tiny budget: ~40% val top-1,
    enough for its targets to carry information)."""
    out = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    run_cli("train-teacher", "--data", digits_dir, "--epochs", "3", "--workers", "0", "--device", "cpu", "--out", out)
    return out


def options(digits_dir, ckpt, out, **kw) -> TeacherCacheOptions:
    """teacher-cache options for the digits tests (the demo teacher, regnety_002 at 32 px), checked as the command
    line's are."""
    base = dict(manifest=digits_dir, checkpoint=ckpt, out=out, recipe="digits-ra", teacher="regnety_002", epochs=2,
                topk=5, seed=0, batch_size=64, workers=0, device="cpu")
    return TeacherCacheOptions.from_mapping({**base, **kw})


def arrays(path) -> dict:
    """A store's probabilities, classes and fingerprints, each shaped (epoch, shard, slot[, k]) (zeros where a unit
    holds fewer views, or is not complete)."""
    cache = TeacherCache.open(path)
    c = cache.config
    out = UnitArrays.zeros(c.epochs * len(cache.shards) * cache.slots, c.topk, c.num_classes).arrays()
    out = {n: a.reshape(c.epochs, len(cache.shards), cache.slots, *a.shape[1:]) for n, a in out.items()}
    for e, s in zip(*cache.done().nonzero()):
        for n, a in cache.read_unit(e, s).arrays().items():
            out[n][e, s, :len(a)] = a
    return out


@pytest.fixture(scope="session")
def store(tmp_path_factory, digits_dir, teacher_ckpt):
    out = tmp_path_factory.mktemp("cache") / "store"
    summary, mine = run(options(digits_dir, teacher_ckpt, out))
    cache = TeacherCache.open(out)
    views = sum(cache.unit_size(e, s) for e in range(2) for s in range(len(cache.shards)))
    assert summary.units_missing == 0 and mine["views_written"] == summary.views_cached == views
    assert views > 1.95 * Manifest.load(digits_dir).count("train")  # about N views per epoch
    return out


SECRET = "not-a-real-secret-3f9a"


@pytest.fixture(scope="session")
def s3_server():
    """An S3 server on a free port of 127.0.0.1 with one bucket, for the session; yields (endpoint, options)."""
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    options = {"endpoint_url": endpoint, "key": "replaykd-test", "secret": SECRET}
    s3fs.S3FileSystem(**options).mkdir("bucket")
    yield endpoint, options
    server.stop()


@pytest.fixture
def s3(s3_server):
    """The session's S3 server with its bucket emptied, so that each test (and each rerun of one, pytest --count)
    starts afresh; yields (endpoint, storage options) and forgets the options `storage.configure` was given."""
    import s3fs

    from replaykd import storage

    fs = s3fs.S3FileSystem(**s3_server[1], skip_instance_cache=True, use_listings_cache=False)
    stale = fs.find("bucket")
    if stale:
        fs.rm(stale)
    yield s3_server
    storage.configure(None)
