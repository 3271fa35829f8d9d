"""The teacher cache: top-k targets per view in a Zarr v3 store, written in whole units.

Layout: arrays shaped (epochs, shards, slots[, k]), declared once by `UnitArrays`: a unit of work is one (epoch,
shard), its views are the unit's slots in the epoch plan's order (`pipeline/plan.py`), and only what cannot be
recomputed is stored: the teacher's top-k probabilities and classes, and the view's fingerprint (seeds, partners
and mix weights are derived from (run seed, epoch, key) again by every reader, and the fingerprint proves it). A
unit is one inner chunk per array, and all epochs of a data shard live in Zarr shard files that only that data
shard's writer touches (a data shard has one writer at a time: `pipeline/claims.py`), so no two writers ever share
a file. Every chunk ends in a CRC-32C (Zarr's crc32c codec), checked on every read: damaged bytes are an error
naming the unit and the array, never wrong targets. Zarr's local store writes each file atomically, and a unit's
completion is recorded (in the `complete` array, one file per data shard) only after its data, so a run killed at
any point resumes to arrays identical to an uninterrupted run's. Readers trust completed units only.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, TransposeCodec

from pipeline.claims import CLAIMS, read_claim, this_process
from pipeline.errors import ReplayKDError
from pipeline.plan import max_unit_size, unit_size
from pipeline import storage as storages
from pipeline.storage import Location

if TYPE_CHECKING:
    from pipeline.manifest import Manifest
    from pipeline.recipe import Recipe
    from pipeline.teacher import TeacherIdentity

FORMAT_NAME = "replaykd.teacher-cache"
FORMAT_VERSION = 4  # 4: CRC-32C per chunk, the teacher's identity and preprocessing, the views' fields only
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
COMPLETE = "complete"
# Held (a claim record, created only if absent) while a process creates or grows the store's arrays.
CHANGING = ".replaykd-changing"
WAIT_SECONDS = 600.0
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
    views: dict
    views_hash: str
    run_seed: int
    epochs: int
    topk: int
    num_classes: int
    teacher: dict
    image_library: str = "pillow"


@dataclass(frozen=True)
class CacheRequest:
    """What a caller needs a store to be: its data, views and seed, and (to build or verify) its teacher and k."""

    manifest_hash: str
    split: str
    views: dict
    views_hash: str
    recipe_name: str
    run_seed: int
    num_classes: int
    image_library: str
    teacher: TeacherIdentity | None = None
    topk: int | None = None

    @classmethod
    def of(cls, manifest: Manifest, split: str, recipe: Recipe, run_seed: int, teacher: TeacherIdentity | None = None,
           topk: int | None = None) -> "CacheRequest":
        """The request of a run on `manifest`'s `split` with `recipe` and `run_seed`, on this process's Pillow."""
        from pipeline.replay import image_library  # here: `cache info` needs no timm

        return cls(manifest.hash, split, recipe.views(), recipe.views_hash, recipe.name, run_seed,
                   manifest.num_classes, image_library(), teacher, topk)

    def config(self, epochs: int) -> CacheConfig:
        """The config a store built for this request (it names a teacher) with `epochs` epochs records."""
        return CacheConfig(manifest_hash=self.manifest_hash, split=self.split, views=self.views,
                           views_hash=self.views_hash, run_seed=self.run_seed, epochs=epochs, topk=self.topk,
                           num_classes=self.num_classes, teacher=self.teacher.as_dict(),
                           image_library=self.image_library)


class DamagedUnit(ReplayKDError):
    """Stored bytes of a unit fail their checksum (or do not decode)."""


def _compressors(dtype: str):
    # Bit-shuffling exposes the shared high bits of small numbers (probability deltas, class indices) to zstd.
    # Measured on 8192 top-10 rows of a synthetic 1000-class teacher, bytes per view: float16 probabilities
    # 16.0 as they are, 14.0 as deltas of their bit patterns along k, 13.0 as deltas with k outermost in the chunk
    # (each k's values side by side); class indices 12.6 (close to their entropy); fingerprints 4.0. zstd level 9
    # instead of 5 saved 0.4 more on probabilities only. Quantising probabilities further would be lossy. The
    # CRC-32C after compression costs 4 bytes per chunk and proves every chunk read.
    return [BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle", typesize=np.dtype(dtype).itemsize),
            Crc32cCodec()]


def _open_group(path: Location, mode: str) -> zarr.Group:
    """The store's root group: a local folder, or a URL through zarr's fsspec store with this process's options."""
    if storages.is_url(path):
        return zarr.open_group(str(path), mode=mode, storage_options=storages.options(str(path)))
    return zarr.open_group(str(path), mode=mode)


def _dict_differences(stored: dict, wanted: dict) -> str:
    names = sorted(set(stored) | set(wanted))
    return ", ".join(f"{n} {stored.get(n)!r} vs {wanted.get(n)!r}" for n in names if stored.get(n) != wanted.get(n))


class TeacherCache:
    """An open teacher cache: its config, shard layout, completed units, and unit reads/writes."""

    def __init__(self, path: Location, group: zarr.Group):
        self.path, self.group = storages.as_location(path), group
        self.storage = storages.for_root(self.path)
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
        self.epochs_per_file = layout["epochs_per_file"]
        self.arrays = {name: group[name] for name in UnitArrays.specs(self.config.num_classes)}
        self.complete = group[COMPLETE]

    def unit_size(self, epoch: int, shard_no: int) -> int:
        """How many views (slots) the unit (epoch, shard) holds."""
        return unit_size(self.counts[shard_no], self.repeats, epoch, self.paired)

    # --- opening -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Location, mode: str = "r") -> "TeacherCache":
        """Open an existing store (read-only by default); a missing or foreign path is a clear error."""
        path = storages.as_location(path)
        storage = storages.for_root(path)
        meta = storage.read("zarr.json")
        if meta is None:
            raise ReplayKDError(f"no teacher cache at {path} (run 'replaykd teacher-cache' first)")
        if not cls._is_store(meta) and storage.read(CHANGING) is not None:
            raise ReplayKDError(f"{path} is being created by another run; try again when it has started")
        with storages.remote(path, "opening the store"):
            return cls(path, _open_group(path, mode))

    @classmethod
    def create_or_grow(cls, path: Location, request: CacheRequest, epochs: int, shards: list[str], counts: list[int],
                       repeats: int, paired: bool, epochs_per_file: int, extra_attrs: dict,
                       launch: str) -> "TeacherCache":
        """Create the store, or open one that fits `request` and grow it to `epochs` epochs. Of several processes
        doing this at once (independent runs, parts of a job array) one changes the store and the others wait for
        it; a creation interrupted by a kill is taken over."""
        path = storages.as_location(path)
        storage = storages.for_root(path)
        deadline, took_over = time.time() + WAIT_SECONDS, False
        while not storage.create(CHANGING, json.dumps(dataclasses.asdict(this_process(launch))).encode()):
            holder = read_claim(storage, CHANGING)
            if holder is not None and holder.stale(time.time()):
                storage.delete(CHANGING)  # its process was killed: take over (a partial creation is redone)
                took_over = True
            elif time.time() > deadline:
                raise ReplayKDError(f"{path} is being created or grown by {holder.holder if holder else 'another run'} "
                                    f"for over {WAIT_SECONDS:.0f} s; try again when it is done")
            else:
                time.sleep(0.2)
        try:
            if cls._is_store(storage.read("zarr.json")):
                return cls._grow(path, request, epochs, shards, counts)
            if not took_over and any(not name.endswith(".partial") for name in storage.children("")):
                raise ReplayKDError(f"{path} exists and is not a teacher cache; choose another --out")
            try:
                with storages.remote(path, "creating the store"):
                    cls._create(path, request.config(epochs), shards, counts, repeats, paired, epochs_per_file,
                                extra_attrs)
            except BaseException:
                storage.remove_all(keep=CHANGING)  # leave nothing half-made: it held nothing of anyone's before
                raise
            return cls.open(path, mode="a")
        finally:
            storage.delete(CHANGING)

    @staticmethod
    def _is_store(meta: bytes | None) -> bool:
        """Whether a store's root metadata says its creation finished (its format is recorded, last)."""
        return meta is not None and "format" in json.loads(meta).get("attributes", {})

    @classmethod
    def _grow(cls, path: Location, request: CacheRequest, epochs: int, shards: list[str], counts: list[int]):
        cache = cls.open(path, mode="a")
        cache.require(request)
        if cache.shards != shards or cache.counts != counts:
            raise ReplayKDError(f"{path}: shard layout differs from the manifest's")
        if epochs > cache.config.epochs:
            for arr in (*cache.arrays.values(), cache.complete):
                arr.resize((epochs, *arr.shape[1:]))
            cache.group.attrs["config"] = {**cache.attrs["config"], "epochs": epochs}
            cache.config = dataclasses.replace(cache.config, epochs=epochs)
        return cache

    @staticmethod
    def _create(path: Location, config: CacheConfig, shards: list[str], counts: list[int], repeats: int, paired: bool,
                epochs_per_file: int, extra_attrs: dict) -> None:
        # overwrite: a creation a kill interrupted is redone from the start (the lock file itself is not zarr's)
        group = _open_group(path, "a")
        width = max(max_unit_size(n, repeats, paired) for n in counts)
        block = max(1, min(epochs_per_file, config.epochs))
        codec_chain = {}
        for name, (dtype, per_class) in UnitArrays.specs(config.num_classes).items():
            tail = (config.topk,) if per_class else ()
            dtype = ENCODED[name][0] if name in ENCODED else dtype
            arr = group.create_array(name, shape=(config.epochs, len(shards), width, *tail), dtype=dtype,
                                     chunks=(1, 1, width, *tail), shards=(block, 1, width, *tail),
                                     filters=[TransposeCodec(order=(0, 1, 3, 2))] if per_class else None,
                                     compressors=_compressors(dtype), fill_value=0, overwrite=True,
                                     dimension_names=("epoch", "shard", "slot", "k")[: 3 + per_class])
            codec_chain[name] = arr.metadata.to_dict()["codecs"]
        group.create_array(COMPLETE, shape=(config.epochs, len(shards)), dtype="uint8", chunks=(COMPLETE_EPOCHS, 1),
                           compressors=[Crc32cCodec()], fill_value=0, overwrite=True,
                           dimension_names=("epoch", "shard"))
        group.require_group(CLAIMS)
        group.attrs.update({"format": FORMAT, "config": dataclasses.asdict(config),  # written last: now it is a store
                            "layout": {"shards": shards, "counts": counts, "repeats": repeats, "paired": paired,
                                       "slots": width, "epochs_per_file": block},
                            "codecs": json.loads(json.dumps(codec_chain, default=list)), **extra_attrs})

    # --- does it fit ---------------------------------------------------------------------------------
    def differences(self, request: CacheRequest) -> list[str]:
        """What differs between this store and `request`, one phrase per field, naming both values."""
        from pipeline.teacher import TeacherIdentity

        c, out = self.config, []
        if c.manifest_hash != request.manifest_hash:
            out.append(f"manifest: the store was built from {c.manifest_hash[:16]} ({self.attrs.get('data_path')}), "
                       f"this run's is {request.manifest_hash[:16]}")
        if c.views_hash != request.views_hash:
            out.append(f"views: the store's recipe '{self.attrs.get('recipe_name')}' and this run's "
                       f"'{request.recipe_name}' differ in {_dict_differences(c.views, request.views)}")
        checks = [("run_seed", "run seed"), ("split", "split"), ("num_classes", "classes"),
                  ("image_library", "image library (its decoding and resampling make the views)")]
        if request.teacher is not None:
            out += TeacherIdentity.from_dict(c.teacher).differences(request.teacher)
            checks.append(("topk", "topk"))
        for name, what in checks:
            have, want = getattr(c, name), getattr(request, name)
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
    def done(self) -> np.ndarray:
        """(epochs, shards) bool: which units are complete."""
        try:
            with storages.remote(self.path, "reading the completion records"):
                return self.complete[:] != 0
        except (ValueError, RuntimeError) as exn:
            raise DamagedUnit(f"cache {self.path}: its completion records are damaged ({exn}); run `replaykd cache "
                              f"repair {self.path}`") from exn

    def completed(self, shard_no: int) -> np.ndarray:
        """(epochs,) bool: which units of one data shard are complete (its one completion file, not the store's)."""
        try:
            with storages.remote(self.path, "reading the completion records"):
                return self.complete[:, shard_no] != 0
        except (ValueError, RuntimeError) as exn:
            raise DamagedUnit(f"cache {self.path}: the completion records of {self.shards[shard_no]} are damaged "
                              f"({exn}); run `replaykd cache repair {self.path}`") from exn

    def missing(self, epochs: int | None = None) -> list[tuple[int, int]]:
        """(epoch, shard_no) units not yet complete among the first `epochs` epochs."""
        epochs = self.config.epochs if epochs is None else min(epochs, self.config.epochs)
        return [(int(e), int(s)) for e, s in np.argwhere(~self.done()[:epochs, :])]

    def write_unit(self, epoch: int, shard_no: int, data: UnitArrays) -> None:
        """Write one unit's arrays, then record it complete (the caller owns this data shard)."""
        n = self.unit_size(epoch, shard_no)
        with storages.remote(self.path, f"writing unit (epoch {epoch}, shard {self.shards[shard_no]})"):
            for name, values in data.arrays().items():
                self.arrays[name][epoch, shard_no, :n] = ENCODED[name][1](values) if name in ENCODED else values
            self.complete[epoch, shard_no] = 1

    def read_unit(self, epoch: int, shard_no: int, check_complete: bool = True) -> UnitArrays:
        """One completed unit's arrays, one row per slot; bytes that fail their checksum are a `DamagedUnit` error
        naming the unit and the array."""
        with storages.remote(self.path, f"reading unit (epoch {epoch}, shard {self.shards[shard_no]})"):
            return self._read_unit(epoch, shard_no, check_complete)

    def _read_unit(self, epoch: int, shard_no: int, check_complete: bool) -> UnitArrays:
        if check_complete and not self.complete[epoch, shard_no]:
            raise ReplayKDError(f"{self.path}: unit (epoch {epoch}, shard {self.shards[shard_no]}) is not complete")
        n = self.unit_size(epoch, shard_no)
        stored = {}
        for name, arr in self.arrays.items():
            try:
                stored[name] = arr[epoch, shard_no, :n]
            except (ValueError, RuntimeError) as exn:  # zarr's checksum mismatch, or a chunk that does not decode
                raise DamagedUnit(
                    f"cache {self.path}: unit (epoch {epoch}, shard {self.shards[shard_no]}) is damaged: array "
                    f"'{name}' fails its checksum ({exn}). Run `replaykd cache repair {self.path}` (it drops the "
                    "damaged units), then the teacher-cache command that built the store to rebuild them") from exn
        return UnitArrays(**{name: ENCODED[name][2](v) if name in ENCODED else v for name, v in stored.items()})

    def bytes_on_disk(self) -> int:
        """Total size of the store's files (objects)."""
        return self.storage.total_bytes()

    # --- integrity ---------------------------------------------------------------------------------
    def damage(self, progress=None) -> list[tuple[int | None, int, str]]:
        """Read every completed unit's every chunk, one unit at a time: (epoch, shard_no, array) of each one that
        fails its checksum or does not decode (epoch None: the shard's completion records themselves)."""
        found = []
        for s in range(len(self.shards)):
            try:
                epochs = np.flatnonzero(self.complete[:, s]).tolist()
            except (ValueError, RuntimeError):
                found.append((None, s, COMPLETE))
                continue
            for e in epochs:
                n = self.unit_size(e, s)
                for name, arr in self.arrays.items():
                    try:
                        arr[e, s, :n]
                    except (ValueError, RuntimeError):
                        found.append((e, s, name))
                if progress is not None:
                    progress()
        return found

    def drop(self, damaged: list[tuple[int | None, int, str]]) -> list[tuple[int, int]]:
        """Remove the Zarr shard files that hold damaged units (all arrays, so a unit is never half there) and mark
        every unit they held missing; a shard whose completion records are damaged is marked missing whole. Returns
        the (block, shard_no) pairs dropped (a block: `epochs_per_file` epochs)."""
        epf = self.epochs_per_file
        blocks = sorted({(e // epf, s) for e, s, _ in damaged if e is not None})
        whole = sorted({s for e, s, _ in damaged if e is None})
        blocks += [(b, s) for s in whole for b in range(-(-self.config.epochs // epf)) if (b, s) not in blocks]
        for b, s in blocks:
            for arr in self.arrays.values():
                coords = (b, s) + (0,) * (arr.ndim - 2)
                self.storage.delete(f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}")
        for s in {s for _, s in blocks}:
            column = np.zeros(self.config.epochs, np.uint8)
            if s not in whole:
                column = self.complete[:, s]
                for b, _ in (x for x in blocks if x[1] == s):
                    column[b * epf:(b + 1) * epf] = 0
            self.complete[:, s] = column
        return blocks
