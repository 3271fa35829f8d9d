"""The teacher cache: top-k targets per view in a Zarr v3 store, written in whole units, each once.

A unit of work is one (epoch, data shard); its views are the unit's slots in the epoch plan's order
(`pipeline/plan.py`), and only what cannot be recomputed is stored, a row of uint16 columns per view
(`UnitArrays.packed`): the teacher's top-k probabilities and classes, and the view's fingerprint (seeds, partners and
mix weights are derived from (run seed, epoch, key) again by every reader, and the fingerprint proves it).

Stage one writes each unit as its own object, created only if absent (`pipeline/layouts.py`, `Loose`): a unit is
complete when its object exists, and its CRC-32C proves its bytes on every read. No file is ever read, modified and
written back, so no writer (a stalled one, two that took one shard) can change a finished unit, and no record beside
the data can disagree with it. A finished store can be packed into Zarr shard files of several units (`Packed`,
`replaykd cache pack`), read the same way. Damaged, short or missing data is an error naming the unit and the file,
never class 0 with probability 0. FORMAT.md describes the store for programs other than this one.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field, fields
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import zarr

from replaykd.claims import CHANGING, CLAIMS, Claims, newest
from replaykd.errors import ReplayKDError
from replaykd.layouts import LOOSE, PACKED, DamagedRecords, Loose, Packed, little_endian
from replaykd.plan import PAIR_GROUP, max_unit_size, unit_size
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
# fingerprints in one chunk of one array (one read per unit, not three); 8: each unit its own object, written once
# (loose), or Zarr shard files of a finished store (packed; a format 7 store is read as one)
FORMAT_VERSION = 8
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
# Format 7 stores are read as packed ones (never written): `replaykd cache upgrade` makes them loose.
READABLE = (7, FORMAT_VERSION)
WAIT_SECONDS = 600.0
# Units read at once by `damage` (verify and repair): object stores answer many requests at once.
CHECK_THREADS = 16


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


def _as_uint16(values: np.ndarray) -> np.ndarray:
    """Rows of fixed-size values as uint16 columns, a wider value as its little-endian halves."""
    return little_endian(values).view("<u2").astype(np.uint16)


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


class ReadOnlyStore(ReplayKDError):
    """A packed store, or one of an older format, is never written."""


def open_group(path: Location, mode: str) -> zarr.Group:
    """The store's root group: a local folder, or a URL through zarr's fsspec store with this process's options."""
    if storages.is_url(path):
        return zarr.open_group(str(path), mode=mode, storage_options=storages.options(str(path)))
    return zarr.open_group(str(path), mode=mode)


def _dict_differences(stored: dict, wanted: dict) -> str:
    names = sorted(set(stored) | set(wanted))
    return ", ".join(f"{n} {stored.get(n)!r} vs {wanted.get(n)!r}" for n in names if stored.get(n) != wanted.get(n))


def _version(path: Location, attrs: dict) -> int:
    """The format of a store's attributes; a foreign or unreadable one is refused by name."""
    found = str(attrs.get("format", ""))
    if not found.startswith(FORMAT_NAME + "/"):
        raise ReplayKDError(f"{path} is not a replaykd teacher cache")
    version = found.rsplit("/", 1)[-1]
    if not version.isdigit() or int(version) not in READABLE:
        raise ReplayKDError(f"{path} is a teacher cache of format {version}; this replaykd reads formats "
                            f"{' and '.join(map(str, READABLE))} (and upgrades 7). Rebuild it: delete it and rerun the "
                            "teacher-cache command that made it")
    return int(version)


class TeacherCache:
    """An open teacher cache: its config, shard layout, completed units, and unit reads/writes."""

    def __init__(self, path: Location, group: zarr.Group):
        self.path, self.group = storages.as_location(path), group
        self.storage = storages.for_root(self.path)
        attrs = dict(group.attrs)
        self.version = _version(path, attrs)
        self.attrs = attrs
        self.config = CacheConfig(**attrs["config"])
        layout = attrs["layout"]
        self.shards: list[str] = layout["shards"]
        self.counts: list[int] = layout["counts"]
        self.repeats, self.paired = layout["repeats"], layout["paired"]
        self.slots = layout["slots"]
        self.columns = UnitArrays.columns(self.config.topk, self.config.num_classes)
        if layout.get("kind", PACKED) == LOOSE:
            self.layout: Loose | Packed = Loose(group, self.storage, self.slots, self.columns)
        else:
            self.layout = Packed(group, self.storage, layout["epochs_per_file"])

    def unit_size(self, epoch: int, shard_no: int) -> int:
        """How many views (slots) the unit (epoch, shard) holds."""
        return unit_size(self.counts[shard_no], self.repeats, epoch, self.paired)

    @property
    def writable(self) -> bool:
        """Whether stage one may write units into this store (a loose store of this format)."""
        return self.version == FORMAT_VERSION and self.layout.kind == LOOSE

    def require_writable(self) -> None:
        """Refuse to write into a packed store or one of an older format, saying what to do instead."""
        if self.version != FORMAT_VERSION:
            raise ReadOnlyStore(f"{self.path} is a teacher cache of format {self.version}, read as it is but never "
                                f"written: to continue or grow it, run `replaykd cache upgrade {self.path} NEW` "
                                "(its units are kept, no teacher runs) and build into NEW")
        if self.layout.kind != LOOSE:
            raise ReadOnlyStore(f"{self.path} is a packed store: finished and read-only. To continue or grow it, "
                                f"unpack it with `replaykd cache upgrade {self.path} NEW` and build into NEW")

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
        if not finished and "packing" in json.loads(meta).get("attributes", {}):
            raise ReplayKDError(f"{path} is being packed, or its packing stopped before the end: run `replaykd cache "
                                "pack` again (it starts over), or read the store it was packed from")
        lock = newest(storage, CHANGING) if not finished else None
        if lock is not None and lock[1] is not None and not lock[1].stale(time.time()):
            raise ReplayKDError(f"{path} is being created by another run; try again when it has started")
        with storages.remote(path, "opening the store"):
            return cls(path, open_group(path, mode))

    @classmethod
    def create_or_grow(cls, path: Location, request: CacheRequest, epochs: int, shards: list[str], counts: list[int],
                       repeats: int, paired: bool, extra_attrs: dict, claims: Claims) -> "TeacherCache":
        """Create a loose store, or open one that fits `request` and grow it to `epochs` epochs, and record that
        this process has it open (`claims`, on the store's root). Of several processes doing this at once
        (independent runs, parts of a job array) one changes the store and the others wait for it; a creation
        interrupted by a kill is taken over."""
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
                        cls.create(path, request.config(epochs), shards, counts, repeats, paired, extra_attrs)
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
        cache.require_writable()
        if cache.shards != shards or cache.counts != counts:
            raise ReplayKDError(f"{path}: shard layout differs from the manifest's")
        if epochs > cache.config.epochs:
            cache.layout.grow(epochs)
            cache.group.attrs["config"] = {**cache.attrs["config"], "epochs": epochs}
            cache.config = dataclasses.replace(cache.config, epochs=epochs)
        return cache

    @staticmethod
    def create(path: Location, config: CacheConfig, shards: list[str], counts: list[int], repeats: int,
               paired: bool, extra_attrs: dict, packed_epochs: int | None = None) -> None:
        """Write a new store's metadata: loose, or packed with `packed_epochs` epochs per Zarr shard file (then its
        format is recorded by `finish_packing`, once its units are in). Attributes last: then it is a store."""
        group = open_group(path, "a")
        width = max(max_unit_size(n, repeats, paired) for n in counts)
        columns = UnitArrays.columns(config.topk, config.num_classes)
        layout = {"shards": shards, "counts": counts, "repeats": repeats, "paired": paired, "pair_group": PAIR_GROUP,
                  "slots": width}
        if packed_epochs is None:
            Loose.create(group, config.epochs, len(shards), width, columns)
            layout["kind"] = LOOSE
        else:
            Packed.create(group, config.epochs, len(shards), width, columns, packed_epochs)
            layout.update(kind=PACKED, epochs_per_file=max(1, min(packed_epochs, config.epochs)))
        group.require_group(CLAIMS)
        attrs = {"config": dataclasses.asdict(config), "layout": layout, **extra_attrs}
        group.attrs.update({"packing": True, **attrs} if packed_epochs is not None else {"format": FORMAT, **attrs})

    @staticmethod
    def finish_packing(path: Location) -> None:
        """Record a packed store's format, after its every unit: now it is a store."""
        group = open_group(path, "a")
        attrs = {k: v for k, v in group.attrs.items() if k != "packing"}
        group.attrs.put({"format": FORMAT, **attrs})

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
        """(epochs, shards) bool: which units are complete: written, or holding no view at all (a shard too small
        to give one in that epoch is complete by construction: nothing will ever be written for it)."""
        recorded = self.recorded()
        return recorded | self._empty(len(recorded))

    def recorded(self) -> np.ndarray:
        """(epochs, shards) bool: which units are written (have an object, or a completion record when packed)."""
        try:
            with storages.remote(self.path, "listing the completed units"):
                return self.layout.recorded(self.config.epochs, len(self.shards))
        except DamagedRecords as exn:
            raise DamagedUnit(f"cache {self.path}: its completion records are damaged ({exn}); unpack what is intact "
                              f"with `replaykd cache upgrade {self.path} NEW`") from exn

    def _empty(self, epochs: int, shards: Sequence[int] | None = None) -> np.ndarray:
        """(epochs, shards) bool: which units (of `shards`, default all) hold no view (a unit's size depends on its
        epoch only through the epoch's place in its cycle of repeats)."""
        counts = self.counts if shards is None else [self.counts[s] for s in shards]
        cycle = np.array([[unit_size(n, self.repeats, e, self.paired) == 0 for n in counts]
                          for e in range(self.repeats)], dtype=bool).reshape(self.repeats, len(counts))
        return cycle[np.arange(epochs) % self.repeats]

    def completed(self, shard_no: int) -> np.ndarray:
        """(epochs,) bool: which units of one data shard are complete (one listing of its units, not the store's)."""
        try:
            with storages.remote(self.path, "listing the completed units"):
                recorded = self.layout.completed(shard_no, self.config.epochs)
        except DamagedRecords as exn:
            raise DamagedUnit(f"cache {self.path}: the completion records of {self.shards[shard_no]} are damaged "
                              f"({exn})") from exn
        return recorded | self._empty(len(recorded), [shard_no])[:, 0]

    def missing(self, epochs: int | None = None) -> list[tuple[int, int]]:
        """(epoch, shard_no) units not yet complete among the first `epochs` epochs."""
        epochs = self.config.epochs if epochs is None else min(epochs, self.config.epochs)
        return [(int(e), int(s)) for e, s in np.argwhere(~self.done()[:epochs, :])]

    def write_unit(self, epoch: int, shard_no: int, data: UnitArrays) -> bool:
        """Write one unit whole, once: True if this call wrote it, False if it was there already (another process
        wrote the same views' targets; theirs stay). A unit is never changed once written."""
        self.require_writable()
        n = self.unit_size(epoch, shard_no)
        if len(data.fingerprint) != n:
            raise ValueError(f"unit (epoch {epoch}, shard {self.shards[shard_no]}) holds {n} views, got "
                             f"{len(data.fingerprint)} rows")
        return self.write_rows(epoch, shard_no, data.packed(self.config.num_classes))

    def write_rows(self, epoch: int, shard_no: int, rows: np.ndarray) -> bool:
        """`write_unit` for a unit's rows as stored (`UnitArrays.packed`)."""
        self.require_writable()
        padded = np.zeros((self.slots, self.columns), np.uint16)
        padded[:len(rows)] = rows
        with storages.remote(self.path, f"writing unit (epoch {epoch}, shard {self.shards[shard_no]})"):
            return self.layout.write(epoch, shard_no, padded)

    def read_unit(self, epoch: int, shard_no: int) -> UnitArrays:
        """One completed unit's arrays, one row per slot. Bytes that fail their checksum, or are missing or short,
        are a `DamagedUnit` error naming the unit and the file; a unit not complete is an error too."""
        with storages.remote(self.path, f"reading unit (epoch {epoch}, shard {self.shards[shard_no]})"):
            problems, rows = self.check_unit(epoch, shard_no)
        if problems is None:
            raise ReplayKDError(f"{self.path}: unit (epoch {epoch}, shard {self.shards[shard_no]}) is not complete"
                                + (" (its object is not there)" if self.layout.kind == LOOSE else ""))
        if problems:
            raise DamagedUnit(f"cache {self.path}: unit (epoch {epoch}, shard {self.shards[shard_no]}) is damaged: "
                              f"{problems[0]}. " + self._repair_hint())
        return UnitArrays.unpack(rows, self.config.topk, self.config.num_classes)

    def _repair_hint(self) -> str:
        if self.writable:
            return (f"Run `replaykd cache repair {self.path}` (it drops the damaged units), then the teacher-cache "
                    "command that built the store to rebuild them")
        return (f"Unpack the intact units with `replaykd cache upgrade {self.path} NEW`, then rebuild the rest into "
                "NEW with the teacher-cache command that built the store")

    def check_unit(self, epoch: int, shard_no: int) -> tuple[list[str] | None, np.ndarray | None]:
        """(problems, stored rows) of one unit: problems None when it is not complete, else what is wrong with it
        (rows None then)."""
        n = self.unit_size(epoch, shard_no)
        if n == 0:  # complete by construction: nothing was, or will be, written
            return [], np.zeros((0, self.columns), np.uint16)
        return self.layout.check(epoch, shard_no, n)

    def bytes_on_disk(self) -> int:
        """Total size of the store's files (objects)."""
        return self.storage.total_bytes()

    def file_count(self) -> int:
        """How many files (objects) the store holds."""
        return len(self.storage.files(""))

    # --- integrity ---------------------------------------------------------------------------------
    def written(self) -> tuple[list[tuple[int, int]], list[tuple[int, str]]]:
        """(epoch, shard_no) of every written unit, shard by shard, and (shard_no, why) of each packed shard whose
        completion records do not decode (its units cannot be told)."""
        units, unreadable = [], []
        for s in range(len(self.shards)):
            try:
                with storages.remote(self.path, "listing the completed units"):
                    found = self.layout.completed(s, self.config.epochs)
            except DamagedRecords as exn:
                unreadable.append((s, f"its completion records do not decode ({exn})"))
                continue
            units += [(int(e), s) for e in np.flatnonzero(found)]
        return units, unreadable

    def check_units(self, units: list[tuple[int, int]], threads: int = CHECK_THREADS,
                    progress: Callable[[], None] | None = None) \
            -> Iterator[tuple[tuple[int, int], list[str], np.ndarray | None]]:
        """(unit, what is wrong, rows) of each of `units` in order, `threads` read at once and a bounded number in
        flight; a unit gone since it was listed is wrong too."""
        def check(unit: tuple[int, int]) -> tuple[list[str], np.ndarray | None]:
            with storages.remote(self.path, f"reading unit (epoch {unit[0]}, shard {self.shards[unit[1]]})"):
                problems, rows = self.check_unit(*unit)
            return (["it vanished while the store was read"] if problems is None else problems), rows

        with ThreadPoolExecutor(max(1, threads)) as pool:
            step = 64 * max(1, threads)
            for i in range(0, len(units), step):
                for unit, (problems, rows) in zip(units[i:i + step], pool.map(check, units[i:i + step])):
                    if progress is not None:
                        progress()
                    yield unit, problems, rows

    def damage(self, progress: Callable[[], None] | None = None,
               threads: int = CHECK_THREADS) -> list[tuple[int | None, int, str]]:
        """Read every written unit, `threads` at a time: (epoch, shard_no, what is wrong) of each one that fails
        its checksum, does not decode, or is gone or short (epoch None: a packed shard's completion records)."""
        units, unreadable = self.written()
        found: list[tuple[int | None, int, str]] = [(None, s, why) for s, why in unreadable]
        for (e, s), problems, _ in self.check_units(units, threads, progress):
            found += [(e, s, why) for why in problems]
        return found

    def drop(self, damaged: list[tuple[int | None, int, str]]) -> list[tuple[int, int]]:
        """Delete the objects of damaged units (they are then missing, and rebuilt by the next stage-one run);
        returns the (epoch, shard_no) units dropped. A packed store is never changed: refused."""
        units = sorted({(e, s) for e, s, _ in damaged if e is not None})
        self.layout.drop(units)
        return units
