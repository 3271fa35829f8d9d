"""The teacher cache: top-k targets per view in a Zarr v3 store, written in whole units.

Layout: arrays shaped (epochs, shards, slots[, k]), declared once by `UnitArrays`: a unit of work is one (epoch,
shard), its views are the unit's slots in the epoch plan's order (`pipeline/plan.py`), and only what cannot be
recomputed is stored: the teacher's top-k probabilities and classes, and the view's fingerprint (seeds, partners
and mix weights are derived from (run seed, epoch, key) again by every reader, and the fingerprint proves it). A
unit is one inner chunk per array, and all epochs of a data shard live in Zarr shard files that only that data
shard's writer touches (ranks own whole data shards), so no two writers ever share a file. Zarr's local store
writes each file atomically, and a unit's completion is recorded (in the `complete` array, one file per data
shard) only after its data, so a run killed at any point resumes to arrays identical to an uninterrupted run's.
Readers trust completed units only.
"""
from __future__ import annotations

import dataclasses
import json
import queue
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import zarr
from zarr.codecs import BloscCodec, TransposeCodec

from pipeline.errors import ReplayKDError
from pipeline.plan import max_unit_size, unit_size

if TYPE_CHECKING:
    from pipeline.manifest import Manifest
    from pipeline.recipe import Recipe

FORMAT_NAME = "replaykd.teacher-cache"
FORMAT_VERSION = 3  # 3: fingerprints of uint8 views and their parameters
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
COMPLETE = "complete"
# Epochs per file of the completion array: one small file per data shard for any realistic run.
COMPLETE_EPOCHS = 1024


def index_dtype(num_classes: int) -> str:
    """int16 class indices while the classes fit, else int32."""
    return "int16" if num_classes <= np.iinfo(np.int16).max + 1 else "int32"


def _stored(dtype: str, per_class: bool):
    # dtype "index": int16 or int32, by the number of classes; per_class: the array has a trailing k axis
    return field(metadata={"dtype": dtype, "per_class": per_class})


def encode_sorted_float16(values: np.ndarray) -> np.ndarray:
    """float16 rows -> uint16: each value's bit pattern as its difference from the previous one along the row.

    Exact for any input (modular arithmetic); for rows sorted in decreasing order (top-k probabilities) the
    differences are small non-negative numbers, which compress better than the values themselves.
    """
    bits = np.ascontiguousarray(values, dtype=np.float16).view(np.uint16)
    out = bits.copy()
    out[..., 1:] = bits[..., :-1] - bits[..., 1:]
    return out


def decode_sorted_float16(stored: np.ndarray) -> np.ndarray:
    """The inverse of `encode_sorted_float16`."""
    stored = np.asarray(stored, dtype=np.uint16)
    bits = stored.copy()
    bits[..., 1:] = stored[..., :1] - np.cumsum(stored[..., 1:], axis=-1, dtype=np.uint16)
    return bits.view(np.float16)


# How an array is held on disk when not as it is in memory: name -> (stored dtype, encode, decode).
ENCODED = {"probs": ("uint16", encode_sorted_float16, decode_sorted_float16)}


@dataclass
class UnitArrays:
    """The stored arrays of one unit (or of any rows), one row per view: this declaration is the store's layout."""

    probs: np.ndarray = _stored("float16", True)  # the teacher's top-k probabilities, sorted, of the mixed view
    classes: np.ndarray = _stored("index", True)  # their class indices
    fingerprint: np.ndarray = _stored("uint32", False)  # CRC-32C of the view (proves the replay)

    @staticmethod
    def specs(num_classes: int) -> dict[str, tuple[str, bool]]:
        """name -> (dtype, has a k axis) of every per-view array."""
        return {f.name: (index_dtype(num_classes) if f.metadata["dtype"] == "index" else f.metadata["dtype"],
                         f.metadata["per_class"]) for f in fields(UnitArrays)}

    @classmethod
    def zeros(cls, n: int, topk: int, num_classes: int) -> "UnitArrays":
        """Zero-filled arrays for `n` views."""
        return cls(**{name: np.zeros((n, topk) if per_class else (n,), dtype)
                      for name, (dtype, per_class) in cls.specs(num_classes).items()})

    def arrays(self) -> dict[str, np.ndarray]:
        """name -> array, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def select(self, rows) -> "UnitArrays":
        """The given rows (an index or a mask)."""
        return UnitArrays(**{name: arr[rows] for name, arr in self.arrays().items()})


@dataclass(frozen=True)
class CacheConfig:
    """What a cache was built from (stored in the store; stage two checks it against its own run)."""

    manifest_hash: str
    split: str
    recipe: dict
    recipe_hash: str
    run_seed: int
    epochs: int
    topk: int
    num_classes: int
    teacher: str
    teacher_sha256: str
    teacher_input_size: int | None = None
    image_library: str = "pillow"


@dataclass(frozen=True)
class TeacherIdentity:
    """Which teacher made a store's targets, and how many it kept per view."""

    teacher: str
    teacher_sha256: str
    teacher_input_size: int | None
    topk: int


@dataclass(frozen=True)
class CacheRequest:
    """What a caller needs a store to be: its data, recipe and seed, and (to build or verify) its teacher."""

    manifest_hash: str
    split: str
    recipe: dict
    recipe_hash: str
    recipe_name: str
    run_seed: int
    num_classes: int
    image_library: str
    teacher: TeacherIdentity | None = None

    @classmethod
    def of(cls, manifest: Manifest, split: str, recipe: Recipe, run_seed: int,
           teacher: TeacherIdentity | None = None) -> "CacheRequest":
        """The request of a run on `manifest`'s `split` with `recipe` and `run_seed`, on this process's Pillow."""
        from pipeline.replay import image_library  # here: `cache info` needs no timm

        return cls(manifest.hash, split, recipe.as_dict(), recipe.hash, recipe.name, run_seed, manifest.num_classes,
                   image_library(), teacher)

    def config(self, epochs: int) -> CacheConfig:
        """The config a store built for this request (it names a teacher) with `epochs` epochs records."""
        t = self.teacher
        return CacheConfig(manifest_hash=self.manifest_hash, split=self.split, recipe=self.recipe,
                           recipe_hash=self.recipe_hash, run_seed=self.run_seed, epochs=epochs, topk=t.topk,
                           num_classes=self.num_classes, teacher=t.teacher, teacher_sha256=t.teacher_sha256,
                           teacher_input_size=t.teacher_input_size, image_library=self.image_library)


@dataclass
class CacheSummary:
    """Identity, completeness and size of a store, plus the figures of the run that built it (if any)."""

    store: str
    teacher: str
    teacher_sha256: str
    teacher_input_size: int | None
    manifest_hash: str
    split: str
    recipe: str | None
    recipe_hash: str
    run_seed: int
    epochs: int
    topk: int
    num_classes: int
    shards: int
    units_missing: int
    views_cached: int
    bytes_on_disk: int
    bytes_per_view: float | None
    run: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Plain JSON values (this run's figures flattened in)."""
        d = dataclasses.asdict(self)
        return {**{k: v for k, v in d.items() if k != "run"}, **d["run"]}

    def text(self) -> str:
        """Human-readable lines."""
        lines = [f"store {self.store}: {self.teacher} (sha256 {self.teacher_sha256}), manifest {self.manifest_hash}, "
                 f"recipe {self.recipe} ({self.recipe_hash}), seed {self.run_seed}, {self.epochs} epochs x {self.shards} "
                 f"shards, top-{self.topk} of {self.num_classes}",
                 f"views cached {self.views_cached}, units missing {self.units_missing}, "
                 f"{self.bytes_on_disk / 1e6:.2f} MB on disk"
                 + (f", {self.bytes_per_view:.1f} bytes/view" if self.bytes_per_view else "")]
        r = self.run
        if r.get("views_written") == 0:
            lines.append("this run: nothing to do, every unit was already complete")
        elif r:
            lines.append(f"this run: {r['views_written']} views in {r['seconds']:.1f} s ({r['views_per_s']:.0f} views/s), "
                         f"teacher top-1 vs majority label {r['teacher_top1_vs_majority']:.2f}%")
        return "\n".join(lines)


def _compressors(dtype: str):
    # Bit-shuffling exposes the shared high bits of small numbers (probability deltas, class indices) to zstd.
    # Measured on 8192 top-10 rows of a synthetic 1000-class teacher, bytes per view: float16 probabilities
    # 16.0 as they are, 14.0 as deltas of their bit patterns along k, 13.0 as deltas with k outermost in the chunk
    # (each k's values side by side); class indices 12.6 (close to their entropy); fingerprints 4.0. zstd level 9
    # instead of 5 saved 0.4 more on probabilities only. Quantising probabilities further would be lossy.
    return [BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle", typesize=np.dtype(dtype).itemsize)]


def _recipe_differences(stored: dict, wanted: dict) -> str:
    fields_ = sorted(set(stored) | set(wanted))
    return ", ".join(f"{f} {stored.get(f)!r} vs {wanted.get(f)!r}" for f in fields_ if stored.get(f) != wanted.get(f))


class TeacherCache:
    """An open teacher cache: its config, shard layout, completed units, and unit reads/writes."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path, self.group = Path(path), group
        attrs = dict(group.attrs)
        found = str(attrs.get("format", ""))
        if not found.startswith(FORMAT_NAME + "/"):
            raise ReplayKDError(f"{path} is not a replaykd teacher cache")
        if found != FORMAT:
            raise ReplayKDError(f"{path} is a teacher cache of format {found.rsplit('/', 1)[-1]}, written by an older "
                                f"replaykd; this one reads format {FORMAT_VERSION} only. Rebuild it: delete it and "
                                "rerun the teacher-cache command that made it")
        self.attrs = attrs
        self.config = CacheConfig(**attrs["config"])
        layout = attrs["layout"]
        self.shards: list[str] = layout["shards"]
        self.counts: list[int] = layout["counts"]
        self.repeats, self.paired = layout["repeats"], layout["paired"]
        self.arrays = {name: group[name] for name in UnitArrays.specs(self.config.num_classes)}
        self.complete = group[COMPLETE]

    def unit_size(self, epoch: int, shard_no: int) -> int:
        """How many views (slots) the unit (epoch, shard) holds."""
        return unit_size(self.counts[shard_no], self.repeats, epoch, self.paired)

    # --- opening -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, mode: str = "r") -> "TeacherCache":
        """Open an existing store (read-only by default); a missing or foreign path is a clear error."""
        path = Path(path)
        if not (path / "zarr.json").exists():
            raise ReplayKDError(f"no teacher cache at {path} (run 'replaykd teacher-cache' first)")
        return cls(path, zarr.open_group(str(path), mode=mode))

    @classmethod
    def create_or_grow(cls, path: Path, request: CacheRequest, epochs: int, shards: list[str], counts: list[int],
                       repeats: int, paired: bool, epochs_per_file: int, extra_attrs: dict) -> "TeacherCache":
        """Create the store, or open one that fits `request` and grow it to `epochs` epochs."""
        path, config = Path(path), request.config(epochs)
        if (path / "zarr.json").exists():
            cache = cls.open(path, mode="a")
            cache.require(request)
            if cache.shards != shards or cache.counts != counts:
                raise ReplayKDError(f"{path}: shard layout differs from the manifest's")
            if config.epochs > cache.config.epochs:
                for arr in (*cache.arrays.values(), cache.complete):
                    arr.resize((config.epochs, *arr.shape[1:]))
                cache.group.attrs["config"] = {**cache.attrs["config"], "epochs": config.epochs}
                cache.config = dataclasses.replace(cache.config, epochs=config.epochs)
            return cache
        if path.exists() and any(path.iterdir()):
            raise ReplayKDError(f"{path} exists and is not a teacher cache; choose another --out")
        group = zarr.open_group(str(path), mode="w")
        width = max(max_unit_size(n, repeats, paired) for n in counts)
        block = max(1, min(epochs_per_file, config.epochs))
        codec_chain = {}
        for name, (dtype, per_class) in UnitArrays.specs(config.num_classes).items():
            tail = (config.topk,) if per_class else ()
            dtype = ENCODED[name][0] if name in ENCODED else dtype
            arr = group.create_array(name, shape=(config.epochs, len(shards), width, *tail), dtype=dtype,
                                     chunks=(1, 1, width, *tail), shards=(block, 1, width, *tail),
                                     filters=[TransposeCodec(order=(0, 1, 3, 2))] if per_class else None,
                                     compressors=_compressors(dtype), fill_value=0,
                                     dimension_names=("epoch", "shard", "slot", "k")[: 3 + per_class])
            codec_chain[name] = arr.metadata.to_dict()["codecs"]
        group.create_array(COMPLETE, shape=(config.epochs, len(shards)), dtype="uint8", chunks=(COMPLETE_EPOCHS, 1),
                           fill_value=0, dimension_names=("epoch", "shard"))
        group.attrs.update({"format": FORMAT, "config": dataclasses.asdict(config),
                            "layout": {"shards": shards, "counts": counts, "repeats": repeats, "paired": paired,
                                       "slots": width, "epochs_per_file": block},
                            "codecs": json.loads(json.dumps(codec_chain, default=list)), **extra_attrs})
        return cls.open(path, mode="a")

    # --- does it fit ---------------------------------------------------------------------------------
    def differences(self, request: CacheRequest) -> list[str]:
        """What differs between this store and `request`, one phrase per field, naming both values."""
        c, out = self.config, []
        if c.manifest_hash != request.manifest_hash:
            out.append(f"manifest: the store was built from {c.manifest_hash[:16]} ({self.attrs.get('data_path')}), "
                       f"this run's is {request.manifest_hash[:16]}")
        if c.recipe_hash != request.recipe_hash:
            out.append(f"recipe: the store's '{self.attrs.get('recipe_name')}' and this run's '{request.recipe_name}' "
                       f"differ in {_recipe_differences(c.recipe, request.recipe)} (recipe_hash {c.recipe_hash[:16]} "
                       f"vs {request.recipe_hash[:16]})")
        checks = [("run_seed", "run seed", request), ("split", "split", request), ("num_classes", "classes", request),
                  ("image_library", "image library (its decoding and resampling make the views)", request)]
        if request.teacher is not None:
            checks += [("teacher", "teacher", request.teacher), ("teacher_sha256", "teacher checkpoint", request.teacher),
                       ("teacher_input_size", "teacher input size", request.teacher), ("topk", "topk", request.teacher)]
        for name, what, wanted in checks:
            have, want = getattr(c, name), getattr(wanted, name)
            if have != want:
                out.append(f"{what} ({name}): {have!r} in the store, {want!r} in this run")
        return out

    def require(self, request: CacheRequest, epochs: int | None = None, complete: bool = False) -> None:
        """Refuse a store that does not fit `request`, naming what differs; with `complete`, also one whose first
        `epochs` epochs (default: all) are not all complete, listing the missing units."""
        diffs = self.differences(request)
        if diffs:
            raise ReplayKDError(f"{self.path} was built for something else; refusing to mix: " + "; ".join(diffs)
                                + ". Use the data, recipe, seed and teacher it was built with, or another store.")
        missing = self.missing(epochs) if complete else []
        if missing:
            shown = ", ".join(f"(epoch {e}, {self.shards[s]})" for e, s in missing[:10])
            raise ReplayKDError(f"cache {self.path} is incomplete: {len(missing)} units not done, e.g. {shown}; "
                                "rerun the same teacher-cache command to finish it")

    # --- units -------------------------------------------------------------------------------------
    def completed(self, shard_no: int) -> list[int]:
        """Epochs of `shard_no` whose data is complete."""
        return np.flatnonzero(self.complete[:, shard_no]).tolist()

    def missing(self, epochs: int | None = None) -> list[tuple[int, int]]:
        """(epoch, shard_no) units not yet complete among the first `epochs` epochs."""
        epochs = self.config.epochs if epochs is None else min(epochs, self.config.epochs)
        return [(int(e), int(s)) for e, s in np.argwhere(self.complete[:epochs, :] == 0)]

    def write_unit(self, epoch: int, shard_no: int, data: UnitArrays) -> None:
        """Write one unit's arrays, then record it complete (the caller owns this data shard)."""
        n = self.unit_size(epoch, shard_no)
        for name, values in data.arrays().items():
            self.arrays[name][epoch, shard_no, :n] = ENCODED[name][1](values) if name in ENCODED else values
        self.complete[epoch, shard_no] = 1

    def read_unit(self, epoch: int, shard_no: int) -> UnitArrays:
        """One completed unit's arrays, one row per slot."""
        if not self.complete[epoch, shard_no]:
            raise ReplayKDError(f"{self.path}: unit (epoch {epoch}, shard {self.shards[shard_no]}) is not complete")
        n = self.unit_size(epoch, shard_no)
        stored = {name: arr[epoch, shard_no, :n] for name, arr in self.arrays.items()}
        return UnitArrays(**{name: ENCODED[name][2](v) if name in ENCODED else v for name, v in stored.items()})

    def bytes_on_disk(self) -> int:
        """Total size of the store's files."""
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def summarize(self, run: dict | None = None) -> CacheSummary:
        """Identity, completeness and size (plus a run's figures)."""
        c = self.config
        done = self.complete[:] != 0
        views = sum(self.unit_size(int(e), int(s)) for e, s in np.argwhere(done))
        size = self.bytes_on_disk()
        return CacheSummary(str(self.path), c.teacher, c.teacher_sha256[:16], c.teacher_input_size,
                            c.manifest_hash[:16], c.split, self.attrs.get("recipe_name"), c.recipe_hash[:16],
                            c.run_seed, c.epochs, c.topk, c.num_classes, len(self.shards), int((~done).sum()), views,
                            size, size / views if views else None, dict(run or {}))


class UnitBuffers:
    """Stage one's unit assembly: collects rows of views in slot order; hands back each unit once full."""

    def __init__(self, size: Callable[[int, int], int], topk: int, num_classes: int):
        self.size, self.topk, self.num_classes = size, topk, num_classes  # size(epoch, shard_no): views of a unit
        self.open: dict[tuple[int, int], tuple[UnitArrays, list]] = {}

    def add(self, epochs: np.ndarray, shard_nos: np.ndarray, slots: np.ndarray,
            rows: UnitArrays) -> list[tuple[int, int, UnitArrays]]:
        """Store a batch's rows (views at (epoch, shard_no, slot)), unit by unit, vectorised; returns the
        (epoch, shard_no, arrays) of the units that became complete."""
        done = []
        units = np.stack([epochs, shard_nos], axis=1)
        for epoch, shard_no in np.unique(units, axis=0).tolist():
            sel = (units[:, 0] == epoch) & (units[:, 1] == shard_no)
            size = self.size(epoch, shard_no)
            if (epoch, shard_no) not in self.open:
                self.open[(epoch, shard_no)] = (UnitArrays.zeros(size, self.topk, self.num_classes), [0])
            arrays, filled = self.open[(epoch, shard_no)]
            for name, values in rows.select(sel).arrays().items():
                getattr(arrays, name)[slots[sel]] = values
            filled[0] += int(sel.sum())
            if filled[0] == size:
                del self.open[(epoch, shard_no)]
                done.append((epoch, shard_no, arrays))
        return done


class UnitWriter:
    """Writes completed units on a background thread, off the teacher's compute path."""

    def __init__(self, cache: TeacherCache, depth: int = 8):
        self.cache, self.error = cache, None
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, name="unit-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.cache.write_unit(*job)
                except OSError as exn:
                    self.error = exn

    def _check(self) -> None:
        if self.error is not None:
            exn = self.error
            full = getattr(exn, "errno", None) == 28 or "No space" in str(exn)
            what = "the disk is full" if full else f"a write failed ({exn})"
            raise ReplayKDError(f"{what} while writing {self.cache.path}; completed units are kept: free space "
                                f"and rerun the same command to resume") from exn

    def put(self, epoch: int, shard_no: int, data: UnitArrays) -> None:
        """Queue one complete unit for writing (blocks when the queue is full)."""
        self._check()
        self.queue.put((epoch, shard_no, data))

    def close(self) -> None:
        """Finish all queued writes; raise if any failed."""
        self.queue.put(None)
        self.thread.join()
        self._check()
