"""`replaykd teacher-cache`: stage one. Run the teacher once over every view of every epoch; store top-k."""
from __future__ import annotations

import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import torch
import typer
from torch.utils.data import DataLoader

from replaykd import teacher as teachers
from replaykd.cache import CacheRequest, TeacherCache, UnitArrays
from replaykd.cache_report import CacheSummary, launch_id, now, record_run, summarize
from replaykd.cache_writer import UnitBuffers, UnitWriter, WriteFailed
from replaykd.claims import ClaimNotRenewed, Claims
from replaykd.device import autocast, pick_device, set_threads
from replaykd.distributed import barrier, init_distributed, is_main_process
from replaykd.errors import BadImage, Interrupted, ReplayKDError
from replaykd.finish import Finisher
from replaykd.io import check_writable
from replaykd.loader import Batched, CacheViews, ViewCollate, loader_settings, regroup
from replaykd.manifest import Manifest
from replaykd.progress import Progress
from replaykd.recipe import Recipe
from replaykd.records import TeacherTargets
from replaykd import storage as storages
from replaykd.work import Dealer, Participant, deal, preference, remaining
from replaykd.stages.options import TeacherCacheOptions, rerun_command


def library_versions() -> dict:
    """Versions of the libraries that decide views and targets."""
    import PIL
    import timm
    import torchvision
    import zarr

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "pillow": PIL.__version__, "numpy": np.__version__, "zarr": zarr.__version__}


def main(o: TeacherCacheOptions) -> None:
    """Build the cache and print its summary."""
    summary, mine = run(o)
    if is_main_process():
        typer.echo(json.dumps({**summary.as_dict(), "this_process": mine}, indent=2) if o.json_out
                   else summary.text())


def run(o: TeacherCacheOptions) -> tuple[CacheSummary, dict]:
    """Build (or resume, or grow) the cache; returns its summary and this process's figures. Every input is checked
    before the store is created; a failure keeps every finished unit and says how to continue (a store this run
    created is removed only while it holds no finished unit and nobody else has it open)."""
    t0 = time.perf_counter()
    dev = pick_device(o.device)
    rank, world = init_distributed(dev)
    me = Participant.of(o.part, rank, world)
    set_threads(o.threads, o.workers, dev)
    check_writable(o.out, "--out")
    manifest, recipe = Manifest.load(o.manifest, shard_root=o.shards), Recipe.load(o.recipe)
    if o.topk > manifest.num_classes:
        raise ReplayKDError(f"--topk must be between 1 and the number of classes ({manifest.num_classes}), got {o.topk}")
    loaded, teacher = teachers.prepare(o.teacher, o.checkpoint, o.teacher_input_size, manifest.num_classes,
                                       manifest.classes, recipe.mean, recipe.std, recipe.input_size, dev)
    manifest.check_files(o.split)
    request = CacheRequest.of(manifest, o.split, recipe, o.seed, loaded.identity, o.topk)
    launch = launch_id()
    claims = Claims(storages.for_root(o.out), launch, lease=o.lease)
    claims.storage.require_atomic_create()
    created = False
    if rank == 0:
        hints = {"created": now(), "versions": library_versions(), "recipe_name": recipe.name,
                 "data_path": str(o.manifest if storages.is_url(o.manifest) else Path(o.manifest).resolve()), "options": o.to_config(),
                 "checkpoint_path": str(Path(o.checkpoint).resolve()) if o.checkpoint else None,
                 "created_by": launch}
        cache = TeacherCache.create_or_grow(o.out, request, o.epochs, manifest.shards(o.split),
                                            manifest.shard_counts(o.split), recipe.repeats, recipe.mixes, hints,
                                            claims)
        created = cache.attrs.get("created_by") == launch
    barrier()
    cache = TeacherCache.open(o.out, mode="a")
    cache.require_writable()
    claims.open()
    claims.renew_in_background()
    work = remaining(cache.done(), o.epochs)
    barrier()  # every rank has read the same store before any writes: their shares agree
    weights = [sum(cache.unit_size(e, w.shard_no) for e in w.epochs) for w in work]
    shares = deal(weights, me.count)
    expected = sum(weights[i] for i in shares[me.index])
    mine = {"started": now(), "views_written": 0, "views_seen": 0, "majority_hits": 0, "part": me.index,
            "parts": me.count, "device": str(dev), "share_views": expected}
    try:
        _build(o, cache, manifest, recipe, teacher, dev, work, preference(shares, me.index), claims, expected,
               rank, world, mine)
    except KeyboardInterrupt:
        raise Interrupted(f"teacher-cache stopped; {o.out} keeps every unit completed so far "
                          f"({len(cache.missing(o.epochs))} units still missing). Continue with: {rerun_command()}"
                          ) from None
    except ReplayKDError as exn:
        if isinstance(exn, (Interrupted, WriteFailed, ClaimNotRenewed)):  # they say what is kept, what next
            raise
        raise ReplayKDError(_failed(exn, o, cache, created and cache.remove_if_unused(claims))) from exn
    finally:
        claims.release_all()
    mine.update(finished=now(), seconds=time.perf_counter() - t0)
    if mine["views_written"]:
        record_run(cache, launch, me.index, mine)
    barrier()  # the summary rank 0 prints is of the store every rank has finished (it said "units missing 3")
    return summarize(cache), mine


def _failed(exn: ReplayKDError, o: TeacherCacheOptions, cache: TeacherCache, removed: bool) -> str:
    """A failed run's message: what failed (the shard and key, for bad data), what the store keeps, how to go on."""
    text = str(exn).rstrip(".")
    if removed:
        return f"{text}. The store this run had created at {o.out} held no finished unit and was removed"
    try:
        done = int(cache.done()[:o.epochs].sum())
    except ReplayKDError:
        done = None
    kept = f"{o.out} keeps every unit finished so far" + (f" ({done} of {o.epochs * len(cache.shards)})" if done
                                                          is not None else "")
    if isinstance(exn, BadImage):
        # the manifest records the image's bytes and the store is tied to the manifest: no rerun gets past it
        return (f"{text}. {kept}, but it can never be completed: its manifest records this image's bytes, so the "
                "units that show it cannot be made, and a manifest without it (or with another image in its place) "
                "is another data set, whose store starts afresh. Write the shards again without such images "
                "(`replaykd shards SOURCE OUT --skip-bad`; `replaykd manifest` over existing shards decodes every "
                "image and names those that fail), then build a store from the new manifest")
    return f"{text}. {kept}. Continue with: {rerun_command()}"


def _build(o: TeacherCacheOptions, cache: TeacherCache, manifest: Manifest, recipe: Recipe, teacher, dev, work,
           order: list[int], claims: Claims, expected: int, rank: int, world: int, mine: dict) -> None:
    """Claim data shards in `order`, make their missing units' views, run the teacher, write whole units."""
    jobs = multiprocessing.get_context("fork").Queue()
    pending: dict[int, int] = {}  # shard_no -> units still to write

    def todo(shard_no: int) -> tuple[int, ...]:
        epochs = tuple(int(e) for e in np.flatnonzero(~cache.completed(shard_no)[:o.epochs]))
        pending[shard_no] = len(epochs)
        return epochs

    dealer = Dealer(work, order, claims, todo, jobs, o.workers, depth=max(1, o.workers))

    def written(epoch: int, shard_no: int) -> None:
        pending[shard_no] -= 1
        if pending[shard_no] == 0:
            claims.release(shard_no)

    ds = CacheViews(manifest, recipe, o.seed, jobs, expected, o.split, o.decode_memory << 20)
    loader = DataLoader(Batched(ds, o.batch_size, ViewCollate(manifest.num_classes, recipe.smoothing), partial=True),
                        batch_size=None,
                        **{**loader_settings(o.workers, o.prefetch, dev, o.seed), "persistent_workers": False})
    writer = UnitWriter(cache, written=written, check=claims.check_renewed)
    buffers, finish = UnitBuffers(cache.unit_size, o.topk, manifest.num_classes), Finisher(recipe)
    bar = Progress(total=expected, desc=f"teacher-cache part {mine['part']}" if mine["parts"] > 1 else "teacher-cache",
               unit="view", unit_scale=True, disable=expected == 0)
    t_loop = time.perf_counter()
    failed = True
    try:
        with torch.inference_mode():
            for batch in regroup(loader, o.batch_size):
                with autocast(dev):
                    targets = TeacherTargets.from_logits(teacher(finish(batch, dev)), o.topk)
                probs, classes = targets.probs.cpu().numpy(), targets.classes.cpu().numpy()
                majority = torch.where(batch.lams >= 0.5, batch.labels, batch.partner_labels).numpy()
                mine["majority_hits"] += int((classes[:, 0] == majority).sum())
                mine["views_seen"] += len(majority)
                rows = UnitArrays(probs=probs, classes=classes, fingerprint=batch.fingerprints.numpy())
                for epoch, shard_no, arrays in buffers.add(batch.epochs.numpy(), batch.shard_nos.numpy(),
                                                           batch.slots.numpy(), rows):
                    writer.put(epoch, shard_no, arrays)
                    mine["views_written"] += len(arrays.fingerprint)
                    set_threads(o.threads, o.workers, dev)  # a unit done: follow runs started or ended since
                bar.update(len(majority))
        failed = False
    finally:
        dealer.stop()  # joined before the claims are released: it claims nothing after that
        bar.close()
        writer.close(check=not failed)
    if dealer.error is not None:
        raise dealer.error
    if writer.others:  # this process was taken for gone (stalled past its lease) and others built its shards
        Progress.write(f"note: {writer.others} units this process computed were written by another process first (it "
                   "took this one's data shards while this one was stalled or cut off); theirs are kept", file=sys.stderr)
    mine["units_written_by_others"] = writer.others
    mine["loop_views_per_s"] = mine["views_seen"] / max(1e-9, time.perf_counter() - t_loop)
