"""Where a store keeps its units: loose (one object per unit, written once; what stage one builds) or packed (Zarr
shard files of several units, finished and read-only; what `cache pack` writes and what format 7 stores are).

Both answer the same questions: which units are complete, a unit's stored rows or why it has none, and which files
they take. Readers never see the difference.
"""
from __future__ import annotations

import json

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, TransposeCodec

from replaykd import unit_object
from replaykd.errors import ReplayKDError
from replaykd.reader import crc32c
from replaykd.unit_object import UNITS

LOOSE, PACKED = "loose", "packed"
TARGETS = "targets"  # a packed store's data array
COMPLETE = "complete"  # a packed store's completion records
# Epochs per file of the completion array: one small file per data shard for any realistic run.
COMPLETE_EPOCHS = 1024

# (what is wrong, or None when the unit is not complete) and the rows read
Check = tuple[list[str] | None, np.ndarray | None]


def little_endian(values: np.ndarray) -> np.ndarray:
    """The values as contiguous little-endian ones: the same bytes on any machine."""
    return np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))


def digest(values: np.ndarray) -> int:
    """A packed store's completion record of a unit: the CRC-32C of its stored rows' little-endian bytes with bit
    32 set (0 means not written)."""
    return (1 << 32) | crc32c(little_endian(values).view(np.uint8))


class Loose:
    """Units as objects `units/c/SHARD/EPOCH` (`pipeline/unit_object.py`), each created only if absent."""

    kind = LOOSE

    def __init__(self, group: zarr.Group, storage, slots: int, columns: int):
        self.group, self.storage, self.slots, self.columns = group, storage, slots, columns

    @staticmethod
    def create(group: zarr.Group, epochs: int, shards: int, slots: int, columns: int) -> None:
        """The `units` array's metadata (no unit is written)."""
        group.create_array(UNITS, shape=(shards, epochs * slots * columns), dtype="uint16",
                           chunks=(1, slots * columns), compressors=unit_object.codecs(), fill_value=0,
                           overwrite=True, dimension_names=("shard", "epoch_column_slot"))

    def grow(self, epochs: int) -> None:
        """Make room for `epochs` epochs (metadata only)."""
        arr = self.group[UNITS]
        arr.resize((arr.shape[0], epochs * self.slots * self.columns))

    def recorded(self, epochs: int, shards: int) -> np.ndarray:
        """(epochs, shards) bool: which units have an object (one listing of the store's units)."""
        out = np.zeros((epochs, shards), dtype=bool)
        for name in self.storage.files(f"{UNITS}/c"):
            s, _, e = name.partition("/")
            if s.isdigit() and e.isdigit() and int(e) < epochs and int(s) < shards:
                out[int(e), int(s)] = True
        return out

    def completed(self, shard_no: int, epochs: int) -> np.ndarray:
        """(epochs,) bool: which units of one data shard have an object (one listing of its folder)."""
        out = np.zeros(epochs, dtype=bool)
        found = [int(n) for n in self.storage.children(f"{UNITS}/c/{shard_no}") if n.isdigit()]
        out[[e for e in found if e < epochs]] = True
        return out

    def check(self, epoch: int, shard_no: int, n: int) -> Check:
        """A unit's `n` rows, or what is wrong with its object (None: it has none)."""
        key = unit_object.key(shard_no, epoch)
        data = self.storage.read(key)
        if data is None:
            return None, None
        try:
            return [], unit_object.decode(data, self.slots, self.columns)[:n]
        except unit_object.BadObject as exn:
            return [f"its object {key} {exn}"], None

    def write(self, epoch: int, shard_no: int, rows: np.ndarray) -> bool:
        """Create a unit's object only if absent; False when one was there (another process wrote it: the same
        views' targets, which stay)."""
        return self.storage.create(unit_object.key(shard_no, epoch), unit_object.encode(rows))

    def drop(self, units: list[tuple[int, int]]) -> None:
        """Delete the objects of damaged units (they are then missing, and rebuilt by the next stage-one run)."""
        for epoch, shard_no in units:
            self.storage.delete(unit_object.key(shard_no, epoch))


def _packed_codecs() -> list:
    # Bit-shuffling exposes the shared high bits of small numbers (probability deltas, class indices) to zstd.
    # Measured on 8192 top-10 rows of a synthetic 1000-class teacher, bytes per view: float16 probabilities
    # 16.0 as they are, 14.0 as deltas of their bit patterns along k, 13.0 as deltas with k outermost in the chunk
    # (each k's values side by side); class indices 12.6 (close to their entropy); fingerprints 4.0. The CRC-32C
    # after compression costs 4 bytes per chunk and proves every chunk read.
    return [BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle", typesize=2), Crc32cCodec()]


class Packed:
    """Units as the inner chunks of Zarr shard files (`epochs_per_file` epochs of one data shard each) of the
    `targets` array, with a completion record per unit (`complete`: the digest of its rows, written after them).
    Zarr reads a chunk that is absent as zeros, which no chunk checksum can catch, so every read compares the rows
    with the record: a lost or cut file is named, never read as zeros."""

    kind = PACKED

    def __init__(self, group: zarr.Group, storage, epochs_per_file: int):
        self.group, self.storage, self.epochs_per_file = group, storage, epochs_per_file
        self.targets, self.complete = group[TARGETS], group[COMPLETE]

    @staticmethod
    def create(group: zarr.Group, epochs: int, shards: int, slots: int, columns: int, epochs_per_file: int) -> None:
        """The `targets` and `complete` arrays, empty."""
        block = max(1, min(epochs_per_file, epochs))
        # columns outermost in the chunk (each column's values side by side), as measured in `_packed_codecs`
        group.create_array(TARGETS, shape=(epochs, shards, slots, columns), dtype="uint16",
                           chunks=(1, 1, slots, columns), shards=(block, 1, slots, columns),
                           filters=[TransposeCodec(order=(0, 1, 3, 2))], compressors=_packed_codecs(), fill_value=0,
                           overwrite=True, dimension_names=("epoch", "shard", "slot", "column"))
        group.create_array(COMPLETE, shape=(epochs, shards, 1), dtype="uint64", chunks=(COMPLETE_EPOCHS, 1, 1),
                           compressors=[Crc32cCodec()], fill_value=0, overwrite=True,
                           dimension_names=("epoch", "shard", "array"))

    def codecs(self) -> dict:
        """The data array's codec chain, as recorded in the store's attributes."""
        return {TARGETS: json.loads(json.dumps(self.targets.metadata.to_dict()["codecs"], default=list))}

    def write_block(self, first_epoch: int, shard_no: int, rows: np.ndarray, sizes: list[int]) -> None:
        """Write units (epochs from `first_epoch` of one data shard, each padded to the store's slots, holding
        `sizes` views) whole, then record them complete."""
        self.targets[first_epoch:first_epoch + len(rows), shard_no] = rows
        self.complete[first_epoch:first_epoch + len(rows), shard_no] = np.array(
            [[digest(r[:n])] for r, n in zip(rows, sizes)], dtype=np.uint64)

    def _records(self, where) -> np.ndarray:
        try:
            return self.complete[where] != 0
        except (ValueError, RuntimeError) as exn:
            raise DamagedRecords(str(exn)) from exn

    def recorded(self, epochs: int, shards: int) -> np.ndarray:
        """(epochs, shards) bool: which units have their completion recorded."""
        return self._records(slice(None)).all(axis=-1)[:epochs, :shards]

    def completed(self, shard_no: int, epochs: int) -> np.ndarray:
        """(epochs,) bool: which units of one data shard are recorded complete."""
        return self._records((slice(None), shard_no)).all(axis=-1)[:epochs]

    def file(self, epoch: int, shard_no: int) -> str:
        """The store key of the Zarr shard file that holds a unit."""
        coords = (epoch // self.epochs_per_file, shard_no, 0, 0)
        return f"{TARGETS}/{self.targets.metadata.encode_chunk_key(coords)}"

    def check(self, epoch: int, shard_no: int, n: int) -> Check:
        """A unit's `n` rows, or what is wrong with them (None: not recorded complete)."""
        try:
            record = int(self.complete[epoch, shard_no, 0])
        except (ValueError, RuntimeError) as exn:
            return [f"its completion record does not decode ({exn})"], None
        if record == 0:
            return None, None
        key = self.file(epoch, shard_no)
        try:
            rows = self.targets[epoch, shard_no, :n]
        except (ValueError, RuntimeError) as exn:  # zarr's checksum mismatch, or a chunk that does not decode
            return [f"fails its checksum in {key} ({exn})"], None
        if digest(rows) != record:
            state = "is missing" if not self.storage.exists(key) else "is shorter than written, or holds other data"
            return [f"does not hold the data written for it: its file {key} {state}"], None
        return [], rows

    def drop(self, units) -> None:
        """A packed store is read-only."""
        raise ReplayKDError("a packed store is finished and read-only: nothing in it is dropped. Unpack it with "
                            "`replaykd cache upgrade PACKED NEW` (every intact unit is kept), rebuild the rest into "
                            "NEW with the teacher-cache command, and pack that again")


class DamagedRecords(ReplayKDError):
    """A packed store's completion records do not decode."""

