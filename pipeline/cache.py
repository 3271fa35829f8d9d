"""The teacher cache: top-k targets per view in a Zarr v3 store, written in whole units.

Layout: one data array, `targets`, shaped (epochs, shards, slots, columns): a unit of work is one (epoch, shard),
its views are the unit's slots in the epoch plan's order (`pipeline/plan.py`), and only what cannot be recomputed
is stored, a row of uint16 columns per view (`UnitArrays.packed`): the teacher's top-k probabilities and classes,
and the view's fingerprint (seeds, partners and mix weights are derived from (run seed, epoch, key) again by every
reader, and the fingerprint proves it). A unit is one inner chunk, read in one request: Zarr spends about 1.5 ms of
CPU per chunk read, and three arrays (format 6) made a digits unit's read 6.2 ms against 2.6 ms now. All epochs of
a data shard live in Zarr shard files that only that data shard's writer touches (a data shard has one writer at a
time: `pipeline/claims.py`), so no two writers ever share a file. Every chunk ends in a CRC-32C (Zarr's crc32c
codec), checked on every read: damaged bytes are an error naming the unit and the array, never wrong targets.
Zarr's local store writes each file atomically, and a unit's completion is recorded (in the `complete` array, one
file per data shard) only after its data, so a run killed at any point resumes to arrays identical to an
uninterrupted run's. Readers trust completed units only.

A completion record holds a CRC-32C of the unit's stored rows as written (one entry per data array). Zarr reads a
chunk that is absent (a file deleted, lost in a copy, or never written) as its fill value, zeros, which no chunk
checksum can catch; so every read compares the values it got with the record, and a unit whose data is missing,
short or not the data its record names is an error naming the unit, the array and the file, never class 0 with
probability 0.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, TransposeCodec

from replaykd.claims import CHANGING, CLAIMS, Claims, newest
from replaykd.errors import ReplayKDError
from replaykd.plan import PAIR_GROUP, max_unit_size, unit_size
from replaykd.reader import crc32c
from replaykd.recipe import stored_views
from replaykd import storage as storages
from replaykd.storage import Location

if TYPE_CHECKING:
    from replaykd.manifest import Manifest
    from replaykd.recipe import Recipe
    from replaykd.teacher import TeacherIdentity

FORMAT_NAME = "replaykd.teacher-cache"
# 4: CRC-32C per chunk, the teacher's identity and preprocessing, the views' fields only; 5: completion records
# hold each array's CRC-32C (a chunk that is absent reads as zeros: now refused); 6: pairs for Mixup/CutMix drawn
# inside pairing groups of ~64 samples (other views than format 5's); 7: a unit's probabilities, classes and
# fingerprints in one chunk of one array (one read per unit, not three)
FORMAT_VERSION = 7
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
COMPLETE = "complete"
WAIT_SECONDS = 600.0
# Epochs per file of the completion array: one small file per data shard for any realistic run.
COMPLETE_EPOCHS = 1024


def index_dtype(num_classes: int) -> str:
    """int16 class indices while the classes fit, else int32."""
    return "int16" if num_classes <= np.iinfo(np.int16).max + 1 else "int32"


def _column(dtype: str, per_class: bool, deltas: bool = False):
    # dtype "index": int16 or int32, by the number of classes; per_class: a trailing k axis; deltas: stored as
    # `encode_sorted_float16`'s bit-pattern differences, which compress better than the values
    return field(metadata={"dtype": dtype, "per_class": per_class, "deltas": deltas})


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


# The store's data array (beside the completion records).
TARGETS = "targets"


@dataclass
class UnitArrays:
    """The teacher's targets of one unit (or of any rows), one row per view, as stage two uses them."""

    probs: np.ndarray = _column("float16", True, deltas=True)  # the teacher's top-k probabilities of the mixed view
    classes: np.ndarray = _column("index", True)  # their class indices
    fingerprint: np.ndarray = _column("uint32", False)  # CRC-32C of the view (proves the replay)

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

    @staticmethod
    def columns(topk: int, num_classes: int) -> int:
        """How many uint16 columns a view's row takes in the store."""
        return sum(np.dtype(dtype).itemsize // 2 * (topk if per_class else 1)
                   for dtype, per_class in UnitArrays.specs(num_classes).values())

    def arrays(self) -> dict[str, np.ndarray]:
        """name -> array, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def select(self, rows) -> "UnitArrays":
        """The given rows (an index or a mask)."""
        return UnitArrays(**{name: arr[rows] for name, arr in self.arrays().items()})

    def packed(self, num_classes: int) -> np.ndarray:
        """The rows as the store holds them: uint16 columns, the fields in declaration order, each as its declared
        dtype (a value wider than 16 bits as its little-endian halves), probabilities as bit-pattern deltas."""
        columns, specs = [], self.specs(num_classes)
        for f in fields(self):
            dtype, per_class = specs[f.name]
            values = np.asarray(getattr(self, f.name), dtype)
            values = encode_sorted_float16(values) if f.metadata["deltas"] else values
            columns.append(_as_uint16(values if per_class else values[:, None]))
        return np.concatenate(columns, axis=1)

    @classmethod
    def unpack(cls, rows: np.ndarray, topk: int, num_classes: int) -> "UnitArrays":
        """The inverse of `packed`."""
        width = cls.columns(topk, num_classes)
        if rows.shape[1] != width:
            raise ValueError(f"rows of {rows.shape[1]} columns; top-{topk} of {num_classes} classes take {width}")
        out, start, specs = {}, 0, cls.specs(num_classes)
        for f in fields(cls):
            dtype, per_class = specs[f.name]
            kind = np.dtype("uint16" if f.metadata["deltas"] else dtype)
            width = kind.itemsize // 2 * (topk if per_class else 1)
            values = np.ascontiguousarray(rows[:, start:start + width], dtype="<u2").view(kind.newbyteorder("<"))
            values = decode_sorted_float16(values) if f.metadata["deltas"] else values.astype(kind)
            out[f.name] = values if per_class else values[:, 0]
            start += width
        return cls(**out)


def _little_endian(values: np.ndarray) -> np.ndarray:
    """The values as contiguous little-endian ones: the same bytes on any machine."""
    return np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))


def _as_uint16(values: np.ndarray) -> np.ndarray:
    """Rows of fixed-size values as uint16 columns, a wider value as its little-endian halves."""
    return _little_endian(values).view("<u2").astype(np.uint16)


def digest(values: np.ndarray) -> int:
    """A stored array's entry in a completion record: the CRC-32C of its little-endian bytes with bit 32 set (0
    means not written)."""
    return (1 << 32) | crc32c(_little_endian(values).view(np.uint8))


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
        from replaykd.replay import image_library  # here: `cache info` needs no timm

        return cls(manifest.hash, split, recipe.views(), recipe.views_hash, recipe.name, run_seed,
                   manifest.num_classes, image_library(), teacher, topk)

    def config(self, epochs: int) -> CacheConfig:
        """The config a store built for this request (it names a teacher) with `epochs` epochs records."""
        return CacheConfig(manifest_hash=self.manifest_hash, split=self.split, views=self.views,
                           views_hash=self.views_hash, run_seed=self.run_seed, epochs=epochs, topk=self.topk,
                           num_classes=self.num_classes, teacher=self.teacher.as_dict(),
                           image_library=self.image_library)


class DamagedUnit(ReplayKDError):
    """Stored bytes of a unit fail their checksum, do not decode, or are missing."""


class LostClaim(ReplayKDError):
    """Another process took over a data shard this one was writing."""


def _compressors(dtype: str):
    # Bit-shuffling exposes the shared high bits of small numbers (probability deltas, class indices) to zstd.
    # Measured on 8192 top-10 rows of a synthetic 1000-class teacher, bytes per view: float16 probabilities
    # 16.0 as they are, 14.0 as deltas of their bit patterns along k, 13.0 as deltas with k outermost in the chunk
    # (each k's values side by side); class indices 12.6 (close to their entropy); fingerprints 4.0. zstd level 9
    # instead of 5 saved 0.4 more on probabilities only. Quantising probabilities further would be lossy. The
    # CRC-32C after compression costs 4 bytes per chunk and proves every chunk read. All three as the columns of
    # one uint16 array (format 7) store 29.7 bytes per view of 1024 such rows against 29.6 as three arrays.
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
        self.arrays = {TARGETS: group[TARGETS]}
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
        finished = cls._is_store(path, meta)
        lock = newest(storage, CHANGING) if not finished else None
        if lock is not None and lock[1] is not None and not lock[1].stale(time.time()):
            raise ReplayKDError(f"{path} is being created by another run; try again when it has started")
        with storages.remote(path, "opening the store"):
            return cls(path, _open_group(path, mode))

    @classmethod
    def create_or_grow(cls, path: Location, request: CacheRequest, epochs: int, shards: list[str], counts: list[int],
                       repeats: int, paired: bool, epochs_per_file: int, extra_attrs: dict,
                       claims: Claims) -> "TeacherCache":
        """Create the store, or open one that fits `request` and grow it to `epochs` epochs, and record that this
        process has it open (`claims`, on the store's root). Of several processes doing this at once (independent
        runs, parts of a job array) one changes the store and the others wait for it; a creation interrupted by a
        kill is taken over."""
        path = storages.as_location(path)
        storage = claims.storage
        deadline = time.time() + WAIT_SECONDS
        while not claims.take(CHANGING):
            if time.time() > deadline:
                found = claims.current(CHANGING)
                holder = found[1].holder if found is not None and found[1] is not None else "another run"
                raise ReplayKDError(f"{path} is being created or grown by {holder} for over {WAIT_SECONDS:.0f} s; "
                                    "try again when it is done")
            time.sleep(0.2)
        try:
            if cls._is_store(path, storage.read("zarr.json")):
                cache = cls._grow(path, request, epochs, shards, counts)
            else:
                foreign = [n for n in storage.children("") if n != CLAIMS and not n.endswith(".partial")]
                if foreign and not claims.took_over(CHANGING):  # a creation killed half-way is redone
                    raise ReplayKDError(f"{path} exists and is not a teacher cache; choose another --out")
                try:
                    with storages.remote(path, "creating the store"):
                        cls._create(path, request.config(epochs), shards, counts, repeats, paired, epochs_per_file,
                                    extra_attrs)
                except BaseException:
                    storage.remove_all(keep=claims.key(CHANGING))  # nothing half-made: it held nothing of anyone's
                    raise
                cache = cls.open(path, mode="a")
            claims.open()  # before the lock goes: nobody removes a store this process has open
            return cache
        finally:
            claims.release(CHANGING)

    def remove_if_unused(self, claims: Claims) -> bool:
        """Remove the store if it holds no completed unit and no other live process has it open (a first run that
        failed before it finished anything leaves nothing behind); True if it was removed. `claims` are this
        process's on the store, all released here."""
        removed = False
        try:
            # not while another process creates or grows it; not when the store cannot say (out of reach)
            removed = claims.take(CHANGING) and not self.recorded().any() and not claims.others_active()
            if removed:  # everything but the lock, then the lock: nobody else can take it meanwhile
                lock = claims.key(CHANGING)
                claims.abandon()
                self.storage.remove_all(keep=lock)
                self.storage.delete(lock)
                self.storage.discard_root()
        except ReplayKDError:
            pass
        claims.release_all()
        return removed

    @staticmethod
    def _is_store(path: Location, meta: bytes | None) -> bool:
        """Whether a store's root metadata says its creation finished (its format is recorded, last)."""
        try:
            return meta is not None and "format" in json.loads(meta).get("attributes", {})
        except (ValueError, AttributeError):
            raise ReplayKDError(f"{storages.join(path, 'zarr.json')} is not JSON (damaged or cut short), so the store "
                                "cannot be opened: copy it again, or delete it and rerun the teacher-cache command "
                                "that made it") from None

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
        columns = UnitArrays.columns(config.topk, config.num_classes)
        # columns outermost in the chunk (each column's values side by side), as the measurement in `_compressors`
        arr = group.create_array(TARGETS, shape=(config.epochs, len(shards), width, columns), dtype="uint16",
                                 chunks=(1, 1, width, columns), shards=(block, 1, width, columns),
                                 filters=[TransposeCodec(order=(0, 1, 3, 2))], compressors=_compressors("uint16"),
                                 fill_value=0, overwrite=True, dimension_names=("epoch", "shard", "slot", "column"))
        codec_chain[TARGETS] = arr.metadata.to_dict()["codecs"]
        # one entry per (epoch, shard, array): its digest once the unit is written; one file per data shard
        group.create_array(COMPLETE, shape=(config.epochs, len(shards), len(codec_chain)), dtype="uint64",
                           chunks=(COMPLETE_EPOCHS, 1, len(codec_chain)), compressors=[Crc32cCodec()], fill_value=0,
                           overwrite=True, dimension_names=("epoch", "shard", "array"))
        group.require_group(CLAIMS)
        group.attrs.update({"format": FORMAT, "config": dataclasses.asdict(config),  # written last: now it is a store
                            "layout": {"shards": shards, "counts": counts, "repeats": repeats, "paired": paired,
                                       "pair_group": PAIR_GROUP, "slots": width, "epochs_per_file": block},
                            "codecs": json.loads(json.dumps(codec_chain, default=list)), **extra_attrs})

    # --- does it fit ---------------------------------------------------------------------------------
    def differences(self, request: CacheRequest) -> list[str]:
        """What differs between this store and `request`, one phrase per field, naming both values."""
        from replaykd.teacher import TeacherIdentity

        c, out = self.config, []
        if c.manifest_hash != request.manifest_hash:
            out.append(f"manifest: the store was built from {c.manifest_hash[:16]} ({self.attrs.get('data_path')}), "
                       f"this run's is {request.manifest_hash[:16]}")
        if c.views_hash != request.views_hash:
            out.append(f"views: the store's recipe '{self.attrs.get('recipe_name')}' and this run's "
                       f"'{request.recipe_name}' differ in "
                       f"{_dict_differences(stored_views(c.views), stored_views(request.views))}")
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
        """(epochs, shards) bool: which units are complete: recorded so, or holding no view at all (a shard too small
        to give one in that epoch is complete by construction: nothing will ever be written for it)."""
        recorded = self.recorded()
        return recorded | self._empty(len(recorded))

    def recorded(self) -> np.ndarray:
        """(epochs, shards) bool: which units have their completion recorded."""
        try:
            with storages.remote(self.path, "reading the completion records"):
                return (self.complete[:] != 0).all(axis=-1)
        except (ValueError, RuntimeError) as exn:
            raise DamagedUnit(f"cache {self.path}: its completion records are damaged ({exn}); run `replaykd cache "
                              f"repair {self.path}`") from exn

    def _empty(self, epochs: int, shards: Sequence[int] | None = None) -> np.ndarray:
        """(epochs, shards) bool: which units (of `shards`, default all) hold no view (a unit's size depends on its
        epoch only through the epoch's place in its cycle of repeats)."""
        counts = self.counts if shards is None else [self.counts[s] for s in shards]
        cycle = np.array([[unit_size(n, self.repeats, e, self.paired) == 0 for n in counts]
                          for e in range(self.repeats)], dtype=bool).reshape(self.repeats, len(counts))
        return cycle[np.arange(epochs) % self.repeats]

    def completed(self, shard_no: int) -> np.ndarray:
        """(epochs,) bool: which units of one data shard are complete (its one completion file, not the store's)."""
        try:
            with storages.remote(self.path, "reading the completion records"):
                recorded = (self.complete[:, shard_no] != 0).all(axis=-1)
        except (ValueError, RuntimeError) as exn:
            raise DamagedUnit(f"cache {self.path}: the completion records of {self.shards[shard_no]} are damaged "
                              f"({exn}); run `replaykd cache repair {self.path}`") from exn
        return recorded | self._empty(len(recorded), [shard_no])[:, 0]

    def missing(self, epochs: int | None = None) -> list[tuple[int, int]]:
        """(epoch, shard_no) units not yet complete among the first `epochs` epochs."""
        epochs = self.config.epochs if epochs is None else min(epochs, self.config.epochs)
        return [(int(e), int(s)) for e, s in np.argwhere(~self.done()[:epochs, :])]

    def write_unit(self, epoch: int, shard_no: int, data: UnitArrays,
                   still_mine: Callable[[], bool] | None = None) -> None:
        """Write one unit's rows, then record it complete with their digest. The caller owns this data shard;
        `still_mine`, asked before the rows are written and again right before the completion is recorded, says
        whether it still does (a process taken for gone stops rather than writing beside the new holder)."""
        n = self.unit_size(epoch, shard_no)
        stored = {TARGETS: data.packed(self.config.num_classes)}

        def check_claim() -> None:
            if still_mine is not None and not still_mine():
                raise LostClaim(f"this process no longer holds data shard {self.shards[shard_no]} of {self.path}: "
                                "another process took it over (this one was taken for gone); stopping rather than "
                                "writing beside it")

        with storages.remote(self.path, f"writing unit (epoch {epoch}, shard {self.shards[shard_no]})"):
            check_claim()
            for name, values in stored.items():
                self.arrays[name][epoch, shard_no, :n] = values
            check_claim()
            self.complete[epoch, shard_no] = [digest(v) for v in stored.values()]

    def read_unit(self, epoch: int, shard_no: int) -> UnitArrays:
        """One completed unit's arrays, one row per slot. Bytes that fail their checksum, and values that are not
        the ones its completion record names (a file missing or short), are a `DamagedUnit` error naming the unit,
        the array and the file; a unit not complete is an error too."""
        with storages.remote(self.path, f"reading unit (epoch {epoch}, shard {self.shards[shard_no]})"):
            problems, stored = self._check_unit(epoch, shard_no)
        if problems is None:
            raise ReplayKDError(f"{self.path}: unit (epoch {epoch}, shard {self.shards[shard_no]}) is not complete")
        if problems:
            name, why = problems[0]
            raise DamagedUnit(f"cache {self.path}: unit (epoch {epoch}, shard {self.shards[shard_no]}) is damaged: "
                              f"array '{name}' {why}. Run `replaykd cache repair {self.path}` (it drops the damaged "
                              "units), then the teacher-cache command that built the store to rebuild them")
        return UnitArrays.unpack(stored[TARGETS], self.config.topk, self.config.num_classes)

    def _check_unit(self, epoch: int, shard_no: int) -> tuple[list[tuple[str, str]] | None, dict[str, np.ndarray]]:
        """(problems, stored values) of one unit: problems None when it is not complete, else (array, what is wrong)
        for each array that fails its checksum or differs from its completion record."""
        n = self.unit_size(epoch, shard_no)
        if n == 0:  # complete by construction: nothing was, or will be, written
            return [], {name: np.empty((0, *arr.shape[3:]), arr.dtype) for name, arr in self.arrays.items()}
        record = self.complete[epoch, shard_no]
        if not record.all():
            return None, {}
        problems, stored = [], {}
        for (name, arr), expected in zip(self.arrays.items(), record.tolist()):
            try:
                stored[name] = arr[epoch, shard_no, :n]
            except (ValueError, RuntimeError) as exn:  # zarr's checksum mismatch, or a chunk that does not decode
                problems.append((name, f"fails its checksum in {self._file(arr, epoch, shard_no)} ({exn})"))
                continue
            if digest(stored[name]) != expected:
                key = self._file(arr, epoch, shard_no)
                state = "is missing" if not self.storage.exists(key) else "is shorter than written, or holds other data"
                problems.append((name, f"does not hold the data written for it: its file {key} {state}"))
        return problems, stored

    def _file(self, arr: zarr.Array, epoch: int, shard_no: int) -> str:
        """The store key of the Zarr shard file that holds a unit's chunk of `arr`."""
        coords = (epoch // self.epochs_per_file, shard_no) + (0,) * (arr.ndim - 2)
        return f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"

    def bytes_on_disk(self) -> int:
        """Total size of the store's files (objects)."""
        return self.storage.total_bytes()

    # --- integrity ---------------------------------------------------------------------------------
    def damage(self, progress=None) -> list[tuple[int | None, int, str]]:
        """Read every completed unit's every chunk, one unit at a time: (epoch, shard_no, array) of each one that
        fails its checksum, does not decode or is not the data its completion record names (epoch None: the
        shard's completion records themselves)."""
        found = []
        for s in range(len(self.shards)):
            try:
                epochs = np.flatnonzero(self.complete[:, s].any(axis=-1)).tolist()
            except (ValueError, RuntimeError):
                found.append((None, s, COMPLETE))
                continue
            for e in epochs:
                problems, _ = self._check_unit(e, s)
                found += [(e, s, name) for name, _ in ([(COMPLETE, "")] if problems is None else problems)]
                if progress is not None:
                    progress()
        return found

    def drop(self, damaged: list[tuple[int | None, int, str]]) -> list[tuple[int, int]]:
        """Remove the Zarr shard files that hold damaged units (of every data array, so a unit is never half there)
        and mark every unit they held missing; a shard whose completion records are damaged is marked missing
        whole. Returns the (block, shard_no) pairs dropped (a block: `epochs_per_file` epochs)."""
        epf = self.epochs_per_file
        blocks = sorted({(e // epf, s) for e, s, _ in damaged if e is not None})
        whole = sorted({s for e, s, _ in damaged if e is None})
        blocks += [(b, s) for s in whole for b in range(-(-self.config.epochs // epf)) if (b, s) not in blocks]
        # completion first: a repair killed midway leaves units missing (rebuilt later), never complete without data
        for s in {s for _, s in blocks}:
            column = np.zeros(self.complete.shape[::2], np.uint64)
            if s not in whole:
                column = self.complete[:, s]
                for b, _ in (x for x in blocks if x[1] == s):
                    column[b * epf:(b + 1) * epf] = 0
            self.complete[:, s] = column
        for b, s in blocks:
            for arr in self.arrays.values():
                self.storage.delete(self._file(arr, b * epf, s))
        return blocks
