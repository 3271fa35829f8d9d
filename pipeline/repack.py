"""A store's units rewritten into another layout, without the teacher: packing a finished loose store into Zarr
shard files (`cache pack`), and unpacking a packed or format 7 store into a loose one (`cache upgrade`). Every unit
is proved (its checksum, its record) as it is read; nothing is ever read as zeros."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from replaykd import storage as storages
from replaykd.cache import DamagedUnit, TeacherCache, open_group
from replaykd.errors import ReplayKDError
from replaykd.layouts import Packed
from replaykd.storage import Location

# Attributes that describe a store's layout, never carried over to another layout.
_LAYOUT_ATTRS = ("format", "config", "layout", "codecs", "packing", "upgraded_from", "packed_from")
Progress = Callable[[], None] | None


def _carried(src: TeacherCache) -> dict:
    return {k: v for k, v in src.attrs.items() if k not in _LAYOUT_ATTRS}


def _prepare_out(out: Location, unfinished: str) -> None:
    """Refuse an `out` that holds anything but an unfinished store of this kind (attribute `unfinished`), which is
    removed to start over."""
    storage = storages.for_root(out)
    meta = storage.read("zarr.json")
    attrs = {}
    if meta is not None:
        try:
            attrs = json.loads(meta).get("attributes", {})
        except (ValueError, AttributeError):
            attrs = {}
    if meta is None and not storage.children(""):
        return
    if unfinished not in attrs or "format" in attrs:
        raise ReplayKDError(f"{out} exists; give a new folder or URL to write to")
    storage.remove_all(keep="")


def pack(src: TeacherCache, out: Location, epochs_per_file: int, threads: int, progress: Progress = None) -> None:
    """Write the finished loose store `src` into a packed store at `out`: each data shard's units, `epochs_per_file`
    epochs to a Zarr shard file, then their completion records; the format last (a packing that stopped is no
    store, and is redone)."""
    missing = src.missing()
    if missing:
        e, s = missing[0]
        raise ReplayKDError(f"{src.path} is not finished ({len(missing)} units missing, e.g. (epoch {e}, "
                            f"{src.shards[s]})): only a finished store is packed; finish it with the teacher-cache "
                            "command that built it")
    _prepare_out(out, "packing")
    TeacherCache.create(out, src.config, src.shards, src.counts, src.repeats, src.paired,
                        {**_carried(src), "packed_from": str(src.path)}, packed_epochs=epochs_per_file)
    group = open_group(out, "a")
    layout = Packed(group, storages.for_root(out), group.attrs["layout"]["epochs_per_file"])
    epochs, epf = src.config.epochs, layout.epochs_per_file
    units = [(e, s) for s in range(len(src.shards)) for e in range(epochs)]
    block = np.zeros((epf, src.slots, src.columns), np.uint16)
    with storages.remote(out, "writing the packed store"):
        for (e, s), problems, rows in src.check_units(units, threads, progress):
            if problems:
                raise DamagedUnit(f"{src.path}: unit (epoch {e}, shard {src.shards[s]}) is damaged: {problems[0]}; "
                                  f"run `replaykd cache repair {src.path}`, rebuild, then pack")
            block[e % epf] = 0
            block[e % epf, :len(rows)] = rows
            if e % epf == epf - 1 or e == epochs - 1:
                first = e - e % epf
                layout.write_block(first, s, block[:e - first + 1],
                                   [src.unit_size(x, s) for x in range(first, e + 1)])
    TeacherCache.finish_packing(out)


def upgrade(src: TeacherCache, out: Location, threads: int, progress: Progress = None) -> tuple[int, int, list[str]]:
    """Copy every intact unit of `src` (format 7, or packed) into the loose store `out` (created, or continued when
    this command started it from the same store); returns (units copied now, units there already, what was
    damaged: left missing, for stage one to rebuild)."""
    if src.writable:
        raise ReplayKDError(f"{src.path} is a loose store of this format already: nothing to upgrade")
    marker = {"path": str(src.path), "format": src.version, "layout": src.layout.kind}
    storage = storages.for_root(out)
    if storage.read("zarr.json") is None:
        if storage.children(""):
            raise ReplayKDError(f"{out} exists and is not a teacher cache; give a new folder or URL")
        TeacherCache.create(out, src.config, src.shards, src.counts, src.repeats, src.paired,
                            {**_carried(src), "upgraded_from": marker})
    dst = TeacherCache.open(out, mode="a")
    if dst.attrs.get("upgraded_from") != marker or dst.config != src.config:
        raise ReplayKDError(f"{out} is a store, not one this command started from {src.path}; give a new folder")
    dst.storage.require_atomic_create()
    there = dst.recorded()
    written, unreadable = src.written()
    damaged = [f"{src.shards[s]}: {why}; its units are left missing" for s, why in unreadable]
    units = [(e, s) for e, s in written if not there[e, s]]
    copied = 0
    with ThreadPoolExecutor(max(1, threads)) as writers:
        pending = []
        for (e, s), problems, rows in src.check_units(units, threads, progress):
            if problems:
                damaged.append(f"unit (epoch {e}, shard {src.shards[s]}): {problems[0]}")
            else:
                pending.append(writers.submit(dst.write_rows, e, s, rows))
            if len(pending) >= 64 * threads:
                copied += sum(f.result() for f in pending)
                pending = []
        copied += sum(f.result() for f in pending)
    return copied, int(there.sum()), damaged
