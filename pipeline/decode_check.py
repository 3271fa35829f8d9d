"""Every image of a data set decoded once, in parallel, before anything is built from it: an image that does not
decode is found where it can still be left out (a manifest records each image's bytes, and a teacher cache is tied
to its manifest, so one met later in stage one could never be made)."""
from __future__ import annotations

import multiprocessing
import signal

from replaykd.errors import ReplayKDError
from replaykd.manifest import Manifest
from replaykd.progress import Progress
from replaykd.reader import read_shard
from replaykd.sources import MAX_PIXELS, check_image
from replaykd.threads import cores

# The manifest the pool's forked processes check (inherited, not pickled: an ImageNet manifest is 1.3 M rows).
_CHECKED: Manifest | None = None


def _bad_in(task: tuple[str, str, int]) -> tuple[int, list[tuple[str, str]]]:
    """(images in the shard, [(shard:key, why)] of those that do not decode or have too many pixels)."""
    split, shard, max_pixels = task
    records, bad = read_shard(_CHECKED, split, shard), []
    for r in records:
        where = f"{shard}:{r.key}"
        try:
            check_image(r.data, where, max_pixels)
        except ReplayKDError as exn:
            bad.append((where, str(exn).split(f"{where}: ", 1)[-1]))
    return len(records), bad


def bad_images(manifest: Manifest, max_pixels: int = MAX_PIXELS, workers: int | None = None) -> list[tuple[str, str]]:
    """(shard:key, why) of every image of `manifest` that does not decode or has more than `max_pixels` pixels,
    each decoded in one of `workers` processes (default: one per core this process may use)."""
    global _CHECKED
    tasks = [(split, shard, max_pixels) for split in manifest.tables for shard in manifest.shards(split)]
    workers = workers or cores()
    _CHECKED, found = manifest, []
    # forked before the progress bar starts its thread; its processes leave signals to this one
    pool = multiprocessing.get_context("fork").Pool(max(1, min(workers, len(tasks))), initializer=_quiet_signals)
    bar = Progress(total=sum(manifest.count(s) for s in manifest.tables), desc="decode check", unit="img")
    try:
        for n, bad in pool.imap_unordered(_bad_in, tasks):
            found += bad
            bar.update(n)
        pool.close()
    finally:
        bar.close()
        pool.terminate()
        pool.join()
        _CHECKED = None
    return sorted(found)


def _quiet_signals() -> None:
    # the command line turns SIGTERM into a stop that says where it stopped: a pool process stopped by its pool
    # (terminate sends SIGTERM) has nothing to say, and Ctrl-C is the main process's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
