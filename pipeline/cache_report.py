"""What a store is and what built it: identity, completeness, size, and the figures of the runs that wrote it; and,
for several stores, whether they hold the same views and how often their teachers' top-1 agree on them.

Every process that writes units records its own figures in the store (a small Zarr group under `runs/`, one per
process, so no two writers share a file); `cache info` shows the store's totals and the last launch's, labelled
apart. The totals' views are those the store holds (a launch that is killed records nothing, yet its completed units
stay); their time and rates are the recorded processes'.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from replaykd.cache import TeacherCache

RUNS = "runs"
# Why a store's totals can exceed what its launches recorded.
KILLED = "a launch that is killed records no figures"


def launch_id() -> str:
    """One id per launch: shared by the ranks of a torchrun launch (and its restart), else per process."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"{run_id}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return uuid.uuid4().hex[:12]


def now() -> str:
    """The time, for records."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def record_run(cache: TeacherCache, launch: str, rank: int, stats: dict) -> None:
    """Record one process's figures in the store (its own group: runs/<launch>-<rank>)."""
    runs = cache.group.require_group(RUNS)
    runs.create_group(f"{launch}-r{rank}", overwrite=True,
                      attributes={"launch": launch, "rank": rank, "host": socket.gethostname(), **stats})


def run_records(cache: TeacherCache) -> list[dict]:
    """Every process's figures, oldest launch first."""
    if RUNS not in cache.group:
        return []
    records = [dict(g.attrs) for _, g in cache.group[RUNS].groups()]
    return sorted(records, key=lambda r: (r.get("finished", ""), r.get("rank", 0)))


def _totals(records: list[dict]) -> dict:
    if not records:
        return {}
    seen = sum(r.get("views_seen", 0) for r in records)
    return {"views_written": sum(r.get("views_written", 0) for r in records),
            "process_seconds": sum(r.get("seconds", 0.0) for r in records), "processes": len(records),
            "launches": len({r["launch"] for r in records}),
            "teacher_top1_vs_majority": 100 * sum(r.get("majority_hits", 0) for r in records) / seen if seen else None,
            "first_started": min(r.get("started", "") for r in records),
            "last_finished": max(r.get("finished", "") for r in records)}


@dataclass
class CacheSummary:
    """Identity, completeness and size of a store, with the totals of the runs that built it and its last launch."""

    store: str
    teacher: str
    teacher_sha256: str
    teacher_input_size: int
    manifest_hash: str
    split: str
    recipe: str | None
    views_hash: str
    run_seed: int
    epochs: int
    topk: int
    num_classes: int
    shards: int
    units_missing: int
    views_cached: int
    bytes_on_disk: int
    bytes_per_view: float | None
    format: int
    layout: str
    files: int
    totals: dict = field(default_factory=dict)
    last_launch: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Plain JSON values."""
        return dataclasses.asdict(self)

    def text(self) -> str:
        """Human-readable lines."""
        lines = [f"store {self.store}: teacher {self.teacher} (weights sha256 {self.teacher_sha256}, input "
                 f"{self.teacher_input_size} px), manifest {self.manifest_hash}, recipe {self.recipe} (views "
                 f"{self.views_hash}), seed {self.run_seed}, {self.epochs} epochs x {self.shards} shards, top-"
                 f"{self.topk} of {self.num_classes}",
                 f"views cached {self.views_cached}, units missing {self.units_missing}, "
                 f"{self.bytes_on_disk / 1e6:.2f} MB on disk in {self.files} files"
                 + (f", {self.bytes_per_view:.1f} bytes/view" if self.bytes_per_view else "")
                 + f"; format {self.format}, {self.layout} ("
                 + ("one object per unit, written once" if self.layout == "loose" else
                    "Zarr shard files of several units, read-only")
                 + "); every unit carries a CRC-32C checked on each read (`cache verify --full` reads them all)"]
        for label, r in (("store totals", self.totals), ("last launch", self.last_launch)):
            if not r:
                continue
            recorded = r.get("views_recorded", r["views_written"])
            if not r["processes"]:
                lines.append(f"{label}: {r['views_written']} views written; no launch recorded figures ({KILLED})")
                continue
            lines.append(f"{label}: {r['views_written']} views written"
                         + (f", {recorded} of them" if recorded != r["views_written"] else "")
                         + f" by {r['processes']} process(es)"
                         + (f" in {r['launches']} launch(es)" if "launches" in r else "")
                         + (f" ({KILLED})" if recorded != r["views_written"] else "")
                         + f", {r['process_seconds']:.1f} process-seconds"
                         + (f" ({recorded / r['process_seconds']:.0f} views/s per process)"
                            if r["process_seconds"] > 0 else "")
                         + (f", teacher top-1 vs majority label {r['teacher_top1_vs_majority']:.2f}%"
                            if r.get("teacher_top1_vs_majority") is not None else "")
                         + f", {r['first_started']} to {r['last_finished']}")
        return "\n".join(lines)


def summarize(cache: TeacherCache) -> CacheSummary:
    """Identity, completeness and size, and the runs' figures."""
    c = cache.config
    done = cache.done()
    # a unit's size depends on its shard and its epoch's place in the repeat cycle only
    phase = np.arange(done.shape[0]) % cache.repeats
    views = sum(int(done[phase == p].sum(0) @ np.array([cache.unit_size(p, s) for s in range(done.shape[1])]))
                for p in range(cache.repeats))
    size = cache.bytes_on_disk()
    records = run_records(cache)
    last = [r for r in records if records and r["launch"] == records[-1]["launch"]]
    last_launch = _totals(last)
    last_launch.pop("launches", None)
    recorded = _totals(records) or {"processes": 0, "launches": 0, "views_written": 0}
    # the views the store holds, whatever was recorded: a killed launch's units stay, its figures were never written
    totals = {**recorded, "views_written": views, "views_recorded": recorded["views_written"]}
    return CacheSummary(str(cache.path), c.teacher["name"], c.teacher["sha256"][:16], c.teacher["input_size"],
                        c.manifest_hash[:16], c.split, cache.attrs.get("recipe_name"), c.views_hash[:16], c.run_seed,
                        c.epochs, c.topk, c.num_classes, len(cache.shards), int((~done).sum()), views, size,
                        size / views if views else None, cache.version, cache.layout.kind, cache.file_count(), totals,
                        last_launch)


# What decides a store's views (with its data shards' layout): stores that agree on all hold the same views.
VIEW_FIELDS = (("manifest_hash", "manifest"), ("split", "split"), ("views_hash", "recipe (views)"),
               ("run_seed", "run seed"), ("num_classes", "classes"), ("image_library", "image library"))


@dataclass
class CacheComparison:
    """Two stores side by side: whether they hold the same views (else what differs), and over units both hold
    (complete in both, within the epochs both hold; at most a given number, spread evenly) how often their
    teachers' top-1 classes agree, on the views whose fingerprints agree."""

    first: str
    second: str
    differences: list[str]
    epochs: int
    units_in_common: int
    units_compared: int
    views_compared: int
    fingerprints_differ: int
    top1_agree: float | None

    @property
    def shared_views(self) -> bool:
        """Whether both stores hold targets for exactly the same views."""
        return not self.differences

    def as_dict(self) -> dict:
        """Plain JSON values."""
        return {**dataclasses.asdict(self), "shared_views": self.shared_views}

    def text(self) -> str:
        """One human-readable line."""
        pair = f"{self.first} and {self.second}"
        if not self.shared_views:
            return (f"{pair} do not share views ({'; '.join(self.differences)}): their targets are for other views "
                    "and cannot be combined")
        line = (f"{pair} share views (same manifest, split, recipe, seed, classes, image library; they can be "
                f"combined: train-student --cache {self.first} --cache {self.second})")
        if not self.views_compared:
            return line + f"; no unit is complete in both within the {self.epochs} epochs both hold"
        line += (f"; top-1 agrees on {self.top1_agree:.2f}% of {self.views_compared} views ({self.units_compared} of "
                 f"the {self.units_in_common} units both hold, epochs 0-{self.epochs - 1})")
        if self.fingerprints_differ:
            line += f"; {self.fingerprints_differ} views have other fingerprints in the two stores (left out)"
        return line


def compare(a: TeacherCache, b: TeacherCache, units: int = 0) -> CacheComparison:
    """Whether `a` and `b` hold the same views and, if so, how often their top-1 agree over at most `units` units
    both hold (0: every one), read as stage two reads them (each chunk's checksum checked)."""
    differences = [f"{what} {getattr(a.config, name)!r} vs {getattr(b.config, name)!r}"
                   for name, what in VIEW_FIELDS if getattr(a.config, name) != getattr(b.config, name)]
    layout = ("shards", "counts", "repeats", "paired")
    if not differences and any(getattr(a, n) != getattr(b, n) for n in layout):
        differences.append("data shards' layout")
    epochs = min(a.config.epochs, b.config.epochs)
    common = [] if differences else np.argwhere(a.done()[:epochs] & b.done()[:epochs]).tolist()
    chosen = common if not units or len(common) <= units else \
        [common[i] for i in np.linspace(0, len(common) - 1, units).round().astype(int)]
    agree = views = differ = 0
    for epoch, shard_no in chosen:
        x, y = a.read_unit(epoch, shard_no), b.read_unit(epoch, shard_no)
        same = x.fingerprint == y.fingerprint
        agree += int((x.classes[same, 0] == y.classes[same, 0]).sum())
        views += int(same.sum())
        differ += int((~same).sum())
    return CacheComparison(str(a.path), str(b.path), differences, epochs, len(common), len(chosen), views, differ,
                           100 * agree / views if views else None)
