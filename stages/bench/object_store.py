"""The bench's object-store section: stage two's loader and stage one reading shards and cache from an S3 API server
on this machine (moto's server mode, in its own process) against the same files on local disk, side by side."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from replaykd import storage
from replaykd.loader import Batched, ReplayViews, ViewCollate, loader_settings
from replaykd.manifest import Manifest
from replaykd.models import create_classifier
from replaykd.recipe import Recipe
from replaykd.targets import CachedTargets
from replaykd.stages.bench.measure import cache_args, interleaved
from replaykd.stages.bench.runner import replaykd

BUCKET = "bench"
ONE_EPOCHS = 3


class S3Server:
    """moto's S3 server in a child process on a free port of 127.0.0.1, with one bucket."""

    def __enter__(self) -> "S3Server":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "bench", "secret": "bench"}
        import s3fs

        deadline = time.time() + 60
        while True:
            try:
                s3fs.S3FileSystem(**self.options, skip_instance_cache=True).mkdir(BUCKET)
                break
            except Exception:  # not listening yet
                if time.time() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.2)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait()

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far (it shares this machine's cores with what is measured)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def upload(self, folder: Path, prefix: str) -> str:
        """Copy a local folder (recursively) into the bucket; its URL."""
        import s3fs

        s3fs.S3FileSystem(**self.options).put(str(folder), f"{BUCKET}/{prefix}", recursive=True)
        return f"s3://{BUCKET}/{prefix}"


def loader_views_per_s(manifest: Manifest, recipe: Recipe, store, workers: int, batch_size: int = 64) -> float:
    """Views/s of the stage-two loader with the cache's targets attached, over its second epoch (the first starts
    the workers)."""
    ds = ReplayViews(manifest, recipe, 0, 0, rank=0, world_size=1, shuffle_buffer=256,
                     annotate=CachedTargets(store).annotator())
    loader = DataLoader(Batched(ds, batch_size, ViewCollate(manifest.num_classes, recipe.smoothing), partial=True),
                        batch_size=None,
                        **loader_settings(workers, 2, torch.device("cpu")))  # as train-student's
    for epoch in range(2):
        ds.set_epoch(epoch)
        t0, n = time.perf_counter(), 0
        for batch in loader:
            n += len(batch)
    return n / (time.perf_counter() - t0)


def _stage_two_epochs(manifest: Manifest, recipe: Recipe, store: str, epochs: int, workers: int) -> int:
    """Load `epochs` epochs of views with their cached targets, as train-student's loader does; the units read."""
    ds = ReplayViews(manifest, recipe, 0, 0, rank=0, world_size=1, shuffle_buffer=256,
                     annotate=CachedTargets(store).annotator())
    loader = DataLoader(Batched(ds, 64, ViewCollate(manifest.num_classes, recipe.smoothing), partial=True),
                        batch_size=None, **loader_settings(workers, 2, torch.device("cpu")))
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for _ in loader:
            pass
    return epochs * len(manifest.shards("train"))


def requests_per_unit(data: Path, ckpt: Path, small, workers: int, server: "S3Server", local_store: Path) -> dict:
    """Requests to the store per unit written by stage one and per unit read by stage two, through a counting
    proxy in front of the S3 server: the difference between a shorter and a longer run over the difference in
    units (the marginal cost, without each run's fixed costs: opening, creating the store, claims per shard)."""
    from replaykd.stages.bench.http_proxy import Proxy

    manifest, recipe = Manifest.load(data), Recipe.load("deit")
    store_url = server.upload(local_store, "counted.zarr")
    with Proxy(server.options["endpoint_url"]) as proxy:
        options = {**server.options, "endpoint_url": proxy.endpoint}
        flag = ["--storage-options", json.dumps(options)]
        one = {}
        for epochs in (1, ONE_EPOCHS):
            name = f"count-{epochs}.zarr"
            args = cache_args(data, ckpt, small, f"s3://{BUCKET}/{name}", epochs, workers, "cpu")
            replaykd("teacher-cache", *args, *flag, fresh=small.fresh)
            one[epochs] = (sum(proxy.counted(f"/{name}/").values()), epochs * len(manifest.shards("train")),
                           dict(proxy.counted(f"/{name}/")))
        storage.configure(options)
        two = {}
        try:
            for epochs in (1, 2):
                before, units_before = proxy.counted("/counted.zarr/"), proxy.counted("/counted.zarr/units/")
                units = _stage_two_epochs(manifest, recipe, store_url, epochs, workers)
                all_ = proxy.counted("/counted.zarr/") - before
                on_units = proxy.counted("/counted.zarr/units/") - units_before
                two[epochs] = (sum(all_.values()), sum(on_units.values()), units, dict(all_))
        finally:
            storage.configure(server.options)
    return {"proxy": "counts every request to the store's prefix between the client and the S3 server",
            "stage_one_requests_per_unit": (one[ONE_EPOCHS][0] - one[1][0]) / (one[ONE_EPOCHS][1] - one[1][1]),
            "stage_one_requests": {f"{e}_epochs": {"requests": r, "units": u, "by_method": m}
                                   for e, (r, u, m) in one.items()},
            # requests for unit objects per unit read; what else an epoch asks for (each loader worker opens the
            # store: its metadata, a few requests) does not grow with the units an epoch holds
            "stage_two_requests_per_unit": (two[2][1] - two[1][1]) / (two[2][2] - two[1][2]),
            "stage_two_other_requests_per_epoch": (two[2][0] - two[2][1]) - (two[1][0] - two[1][1]),
            "stage_two_requests": {f"{e}_epochs": {"requests": r, "on_unit_objects": ru, "units": u, "by_method": m}
                                   for e, (r, ru, u, m) in two.items()}}


def object_store_vs_local(data: Path, preset, workers: int, repeats: int, work: Path) -> dict:
    """Stage two's loader (shards and cache read) and stage one's loop (shards read, store written) on S3 vs local
    files, DeiT's recipe on real photographs: views/s side by side and their ratios (S3 / local)."""
    recipe, manifest = Recipe.load("deit"), Manifest.load(data)
    # a tiny teacher at 32 px: the loop is then bound by reading and replaying, which is what storage changes
    small = dataclasses.replace(preset, recipe="deit", teacher="regnety_002", teacher_input=32, teacher_batch=64)
    ckpt = work / f"regnety_002-{manifest.num_classes}.safetensors"
    if not ckpt.exists():
        save_file(create_classifier("regnety_002", manifest.num_classes).state_dict(), str(ckpt))
    local_store = work / "s3-bench-store.zarr"
    shutil.rmtree(local_store, ignore_errors=True)
    replaykd("teacher-cache", *cache_args(data, ckpt, small, local_store, 2, workers, "cpu"), fresh=preset.fresh)
    with S3Server() as server_process:
        shards_url = server_process.upload(data, "shards")
        store_url = server_process.upload(local_store, "store.zarr")
        storage.configure(server_process.options)
        try:
            local, remote = manifest, Manifest.load(data, shard_root=shards_url)
            rates, server = {"local": [], "s3": []}, {"two": [], "one": []}

            def two(kind, manifest, store):
                def go():
                    c0, t0 = server_cpu(), time.perf_counter()
                    rates[kind].append(loader_views_per_s(manifest, recipe, store, workers))
                    if kind == "s3":
                        server["two"].append((server_cpu() - c0) / (time.perf_counter() - t0))
                return go

            server_cpu = server_process.cpu_seconds
            interleaved({"local": two("local", local, local_store), "s3": two("s3", remote, store_url)}, repeats)
            stage_two = {k: statistics.median(v) for k, v in rates.items()}
            one = {"local": [], "s3": []}
            flag = ["--storage-options", json.dumps(server_process.options)]

            def cache_run(kind):
                def go():
                    out = work / "s3-bench-one.zarr" if kind == "local" else f"s3://{BUCKET}/one-{len(one[kind])}.zarr"
                    shutil.rmtree(work / "s3-bench-one.zarr", ignore_errors=True)
                    # several epochs per shard read, as in a long run (whose fixed costs, the store's creation and
                    # the last writes, weigh less still)
                    args = cache_args(data, ckpt, small, out, ONE_EPOCHS, workers, "cpu")
                    if kind == "s3":
                        args += ["--shards", shards_url, *flag]
                    c0, t0 = server_cpu(), time.perf_counter()
                    s = json.loads(replaykd("teacher-cache", *args, "--json", fresh=preset.fresh))
                    one[kind].append(s["this_process"]["loop_views_per_s"])
                    if kind == "s3":
                        server["one"].append((server_cpu() - c0) / (time.perf_counter() - t0))
                return go

            interleaved({"local": cache_run("local"), "s3": cache_run("s3")}, repeats)
            stage_one = {k: statistics.median(v) for k, v in one.items()}
            counts = requests_per_unit(data, ckpt, small, workers, server_process, local_store)
        finally:
            storage.configure(None)
    return {"server": "moto (S3 API) in its own process on 127.0.0.1, sharing this machine's cores",
            "recipe": "deit", "images": local.count("train"), "shards": len(local.shards("train")),
            "workers": workers,
            "stage_two_loader_views_per_s": stage_two, "stage_two_s3_over_local": stage_two["s3"] / stage_two["local"],
            "stage_one_epochs": ONE_EPOCHS, "stage_one_views_per_s": stage_one, "stage_one_s3_over_local": stage_one["s3"] / stage_one["local"],
            **counts,
            # the server's CPU use while it served (cores busy on average): on a cluster it runs elsewhere
            "server_cores_busy": {"stage_two": statistics.median(server["two"]),
                                  "stage_one": statistics.median(server["one"])}}
