"""One unit as one object, written once: the loose layout of format 8 (see FORMAT.md).

The object is a chunk of the store's `units` Zarr array, shaped (shards, epochs x slots x columns) with chunks of one
(shard, epoch), so its key is `units/c/SHARD/EPOCH`: one folder per data shard, one file per unit. It holds the
unit's rows transposed, (columns, slots) as little-endian uint16 in C order (each column's values side by side, which
compresses better; slots past the unit's views are zeros), compressed by Blosc (zstd level 5, bit-shuffle, typesize
2), then the CRC-32C of the compressed bytes as 4 little-endian bytes: Zarr's bytes -> blosc -> crc32c codecs. So
zarr reads it as any chunk, any program with a Blosc decoder reads it, and a unit's object proves its own bytes:
complete means present with its checksum holding, and no record beside it can disagree.
"""
from __future__ import annotations

import numpy as np
from numcodecs import Blosc
from zarr.codecs import BloscCodec, Crc32cCodec

from replaykd.reader import crc32c

UNITS = "units"  # the array (and folder) of a loose store's unit objects
_BLOSC = Blosc(cname="zstd", clevel=5, shuffle=Blosc.BITSHUFFLE, typesize=2)


def codecs() -> list:
    """The Zarr compressors of the `units` array: what `encode` writes."""
    return [BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle", typesize=2), Crc32cCodec()]


def key(shard_no: int, epoch: int) -> str:
    """The store key of a unit's object."""
    return f"{UNITS}/c/{shard_no}/{epoch}"


class BadObject(ValueError):
    """A unit object that fails its checksum, does not decompress, or is not a unit's size."""


def encode(rows: np.ndarray) -> bytes:
    """A unit's object: its rows (slots, columns) of uint16, transposed, compressed, with their CRC-32C."""
    packed = bytes(_BLOSC.encode(np.ascontiguousarray(rows.T, dtype="<u2")))
    return packed + crc32c(packed).to_bytes(4, "little")


def decode(data: bytes, slots: int, columns: int) -> np.ndarray:
    """The rows (slots, columns) an object holds; `BadObject` says why it holds none."""
    if len(data) < 5:
        raise BadObject(f"is cut short ({len(data)} bytes)")
    body, stored = data[:-4], int.from_bytes(data[-4:], "little")
    if crc32c(body) != stored:
        raise BadObject(f"fails its CRC-32C ({len(data)} bytes: damaged, cut short or edited)")
    try:
        raw = _BLOSC.decode(body)
    except (RuntimeError, ValueError) as exn:
        raise BadObject(f"does not decompress ({exn})") from exn
    if len(raw) != slots * columns * 2:
        raise BadObject(f"holds {len(raw)} bytes of rows where a unit takes {slots * columns * 2}")
    return np.frombuffer(raw, "<u2").reshape(columns, slots).T.astype(np.uint16)
