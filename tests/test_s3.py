"""Shards, manifests and caches on object storage, against a real S3 API server (moto's server mode) on 127.0.0.1:
s3fs, zarr's FsspecStore and every replaykd command run as they would against AWS, MinIO or Ceph."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import s3fs
from moto.server import ThreadedMotoServer

from replaykd import storage
from replaykd.cache import TeacherCache
from replaykd.errors import ReplayKDError
from replaykd.manifest import Manifest
from replaykd.shards import write_shards
from replaykd.sources import digits_source
from tests.conftest import CLI, SECRET, arrays, run_cli
from tests.flaky_proxy import FlakyProxy
from tests.test_teacher_cache import assert_same_arrays

def upload(options: dict, folder, prefix: str) -> None:
    fs = s3fs.S3FileSystem(**options)
    for f in sorted(folder.iterdir()):
        if f.suffix == ".tar" or f.name == "classes.txt":
            fs.put_file(str(f), f"bucket/{prefix}/{f.name}")


def test_storage_records_on_s3(s3):
    _, options = s3
    storage.configure(options)
    records = storage.for_root("s3://bucket/records")
    assert records.read("a/b") is None and records.children("a") == []
    assert records.create("a/b", b"first") and not records.create("a/b", b"second")  # If-None-Match: one creator wins
    assert records.read("a/b") == b"first" and records.children("a") == ["b"] and records.children("") == ["a"]
    records.write("a/b", b"third")
    assert records.read("a/b") == b"third" and records.total_bytes() == 5
    records.delete("a/b")
    records.delete("a/b")  # absent: nothing to do
    assert records.read("a/b") is None
    with pytest.raises(ReplayKDError, match=r"s3://no-such-bucket/x: reading failed: not found"):
        storage.read_bytes("s3://no-such-bucket/x")


def test_a_contended_conditional_write_is_tried_again(s3):
    # S3 answers 409 ConditionalRequestConflict to conditional writes of one key at once, and neither may have won;
    # s3fs raised it as an OSError, which failed the run
    endpoint, options = s3
    with FlakyProxy(endpoint, every=10**9, conflicts=2) as proxy:
        storage.configure({**options, "endpoint_url": proxy.endpoint})
        records = storage.for_root("s3://bucket/contended")
        assert records.create("claims/s0-g0/zarr.json", b"mine")  # tried again: nobody else had it
        assert proxy.conflicts == 0 and records.read("claims/s0-g0/zarr.json") == b"mine"
        assert not records.create("claims/s0-g0/zarr.json", b"theirs")  # there now: a lost race
    with FlakyProxy(endpoint, every=10**9, conflicts=100) as proxy:
        storage.configure({**options, "endpoint_url": proxy.endpoint})
        with pytest.raises(ReplayKDError, match="creating failed: .*ConditionalRequestConflict"):
            storage.for_root("s3://bucket/contended-forever").create("k", b"x")  # it never ends: named


def test_missing_credentials_are_named(s3, monkeypatch):
    endpoint, _ = s3
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup on this machine
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    storage.configure({"endpoint_url": endpoint, "skip_instance_cache": True})
    with pytest.raises(ReplayKDError, match=r"s3://bucket/records/a: reading failed: no credentials"):
        storage.read_bytes("s3://bucket/records/a")


def test_shards_written_to_s3_are_the_local_data_set(s3, tmp_path):
    _, options = s3
    run_cli("shards", "digits", "s3://bucket/published", "--shard-size", "500", "--digits-size", "16",
            "--storage-options", json.dumps(options))
    local, _ = write_shards(digits_source(0.2, seed=0, size=16), tmp_path / "local", 500, 0, False)
    remote = Manifest.load("s3://bucket/published")
    assert remote.hash == local.hash and remote.shard_root == "s3://bucket/published"
    remote.check_files("train")
    again = run_cli("shards", "digits", "s3://bucket/published", "--storage-options", json.dumps(options), check=False)
    assert again.returncode == 2 and "already holds a data set" in again.stderr


def test_both_stages_on_s3_equal_the_local_runs(s3, digits_dir, teacher_ckpt, store, tmp_path):
    endpoint, options = s3
    upload(options, digits_dir, "digits")
    flag = ["--storage-options", json.dumps(options)]
    manifest = tmp_path / "manifest"  # a local manifest of shards in a bucket (braces and globs both expand)
    run_cli("manifest", "s3://bucket/digits/{train,val}-*.tar", manifest, *flag)
    m = Manifest.load(manifest)
    assert m.hash == Manifest.load(digits_dir).hash and m.shard_root == "s3://bucket/digits"

    # stage one into a store in the bucket, SIGKILLed once some units are written, then rerun
    out = "s3://bucket/caches/digits.zarr"
    args = ["teacher-cache", "--manifest", manifest, "--checkpoint", teacher_ckpt, "--out", out, "--recipe",
            "digits-ra", "--teacher", "regnety_002", "--epochs", "2", "--topk", "5", "--workers", "1",
            "--batch-size", "16", "--device", "cpu"]
    # the run that creates the store is given the secret in --storage-options (which the store records, less its
    # credentials); the rerun takes its credentials from the ordinary environment
    proc = subprocess.Popen([*CLI, *map(str, args), *flag], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    fs = s3fs.S3FileSystem(**options, use_listings_cache=False)
    deadline = time.time() + 120
    while time.time() < deadline and not fs.glob("bucket/caches/digits.zarr/units/c/*/*"):
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.5))
    assert proc.poll() is None, f"the run finished before it could be killed: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    storage.configure(options)
    assert TeacherCache.open(out).missing(), "the kill came after every unit was written"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "replaykd-test", "AWS_SECRET_ACCESS_KEY": SECRET}
    run_cli(*args, env=env)
    storage.configure(options)
    assert not TeacherCache.open(out).missing()
    assert_same_arrays(arrays(out), arrays(store))
    stored = fs.cat_file("bucket/caches/digits.zarr/zarr.json").decode()
    assert SECRET not in stored and endpoint in stored  # the options are recorded without their credentials

    info = run_cli("cache", "info", out, *flag).stdout
    assert f"store {out}" in info and "units missing 0" in info
    verify = run_cli("cache", "verify", out, "--full", *flag).stdout
    assert "all intact" in verify and "fingerprints OK" in verify

    # stage two from the bucket (shards and cache, read in loader workers) logs what the local run logs
    student = ["--recipe", "digits-ra", "--patch-size", "4", "--depth", "2", "--embed-dim", "48", "--num-heads", "2",
               "--batch-size", "64", "--epochs", "1", "--workers", "2", "--device", "cpu", "--eval-split", "none"]
    run_cli("train-student", "--out", tmp_path / "local", "--manifest", digits_dir, "--cache", store, *student)
    run_cli("train-student", "--out", tmp_path / "s3", "--manifest", manifest, "--cache", out, *student, *flag)
    logs = [[{k: v for k, v in json.loads(r).items() if "seconds" not in k and "per_s" not in k}
             for r in (tmp_path / run / "log.jsonl").read_text().splitlines()] for run in ("local", "s3")]
    assert logs[0] == logs[1] and logs[0][0]["steps"] > 0
    config = (tmp_path / "s3" / "config.yaml").read_text()
    assert endpoint in config and SECRET not in config  # the options are recorded without their credentials


def test_a_server_that_goes_away_is_one_named_error(digits_dir, tmp_path):
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # few retries, short timeouts: the default (5 attempts with backoff) takes ~10 s to give up
    options = {"endpoint_url": f"http://{host}:{port}", "key": "k", "secret": "s",
               "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}, "connect_timeout": 1}}
    plain = {k: options[k] for k in ("endpoint_url", "key", "secret")}
    fs = s3fs.S3FileSystem(**plain)
    fs.makedirs("gone", exist_ok=True)  # moto's servers of one process share their buckets: a rerun finds it
    for f in sorted(digits_dir.glob("train-*.tar")):
        fs.put_file(str(f), f"gone/{f.name}")
    storage.configure(options)
    m = Manifest.load(digits_dir, shard_root="s3://gone")
    m.check_files("train")
    server.stop()
    t0 = time.time()
    with pytest.raises(ReplayKDError, match=r"s3://gone/train-000000.tar: reading failed: cannot reach the "
                                            r"server"):
        storage.read_bytes(m.shard_path("train-000000.tar"))
    assert time.time() - t0 < 30
    proc = run_cli("cache", "info", "s3://gone/cache.zarr", "--storage-options", json.dumps(options), check=False)
    assert proc.returncode == 2 and "s3://gone/cache.zarr" in proc.stderr and "cannot reach the server" in proc.stderr
    assert "Traceback" not in proc.stderr
    storage.configure(None)


def test_locations_keep_urls_whole_and_configs_drop_secrets():
    from pathlib import Path

    from replaykd.stages.options import TeacherCacheOptions, public

    assert storage.as_location("s3://b/x.zarr") == "s3://b/x.zarr" and storage.as_location("a/b") == Path("a/b")
    assert storage.join("s3://b/d/", "t.tar") == "s3://b/d/t.tar" and storage.join(Path("d"), "t.tar") == Path("d/t.tar")
    assert storage.parent("s3://b/d/t.tar") == "s3://b/d" and storage.basename("s3://b/d/t.tar") == "t.tar"
    assert public({"endpoint_url": "http://x", "key": "k", "client_kwargs": {"aws_secret_access_key": "s",
                                                                             "region_name": "r"}}) == \
        {"endpoint_url": "http://x", "client_kwargs": {"region_name": "r"}}
    o = TeacherCacheOptions.from_mapping({"out": "s3://b/c.zarr", "storage_options": '{"profile": "p", "token": "t"}'})
    assert o.out == "s3://b/c.zarr" and o.storage_options == {"profile": "p", "token": "t"}
    assert o.to_config()["storage_options"] == {"profile": "p"}
    with pytest.raises(ReplayKDError, match="--storage-options must be a JSON mapping"):
        TeacherCacheOptions.from_mapping({"out": "x", "storage_options": "[1]"})
    # nor does the command a message says to rerun
    from replaykd.stages.options import rerun_command

    argv = sys.argv
    sys.argv = ["replaykd", "teacher-cache", "--storage-options", json.dumps({"endpoint_url": "http://x", "key": "k",
                                                                                  "secret": SECRET})]
    try:
        again = rerun_command()
    finally:
        sys.argv = argv
    assert SECRET not in again and "http://x" in again and '"key"' not in again


@pytest.mark.slow
def test_stage_one_through_a_flaky_endpoint_equals_the_local_build(s3, digits_dir, teacher_ckpt, store, tmp_path):
    # botocore retries the failed requests with a jittered back-off drawn from Python's `random`, in the threads
    # that read shards ahead and write units, while the views are made beside them
    endpoint, options = s3
    upload(options, digits_dir, "flaky")
    with FlakyProxy(endpoint, every=20) as proxy:
        flaky = {**options, "endpoint_url": proxy.endpoint}
        flag = ["--storage-options", json.dumps(flaky)]
        manifest = tmp_path / "manifest"
        run_cli("manifest", "s3://bucket/flaky/{train,val}-*.tar", manifest, *flag)
        out = "s3://bucket/caches/flaky.zarr"
        t0 = time.time()
        built = run_cli("teacher-cache", "--manifest", manifest, "--checkpoint", teacher_ckpt, "--out", out,
                        "--recipe", "digits-ra", "--teacher", "regnety_002", "--epochs", "2", "--topk", "5",
                        "--workers", "0", "--batch-size", "64", "--device", "cpu", *flag)
        # a retried request's failure is botocore's to handle, not a traceback in the command's output
        assert "Traceback" not in built.stderr and "exception was never retrieved" not in built.stderr, built.stderr
        print(f"flaky build: {time.time() - t0:.1f} s, {proxy.count} requests, {proxy.failed} failed on purpose")
        storage.configure(options)
        assert_same_arrays(arrays(out), arrays(store))
        assert proxy.failed > 5
