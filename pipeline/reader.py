"""Read WebDataset shards: raw samples, and a shard checked row by row against its manifest."""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import google_crc32c

from replaykd import storage
from replaykd.errors import ReplayKDError, ShardMismatch
from replaykd.manifest import Manifest
from replaykd.storage import Location

T, R = TypeVar("T"), TypeVar("R")
ZERO_BLOCK = bytes(512)
# Extensions a sample's image field may have (a WebDataset field is named by its file's extension).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")


@dataclass(frozen=True)
class Record:
    """One sample of a shard as the manifest describes it, with its encoded image bytes."""

    index: int
    key: str
    label: int
    position: int
    data: bytes


def crc32c(data) -> int:
    """CRC-32C of a bytes-like object."""
    return google_crc32c.value(data)


def crc32c_extend(crc: int, data) -> int:
    """The CRC-32C of the bytes behind `crc` followed by `data`."""
    return google_crc32c.extend(crc, data)


@dataclass(frozen=True)
class TarSample:
    """One WebDataset sample of a tar shard: its key, its fields by extension (lower case) and where each field's
    bytes lie in the shard file (offset, size)."""

    key: str
    fields: dict[str, bytes]
    spans: dict[str, tuple[int, int]]


def image_field(sample: TarSample, shard: str) -> str:
    """The name of the field that holds the encoded image."""
    for ext in IMAGE_EXTS:
        if ext in sample.fields:
            return ext
    raise ReplayKDError(f"{shard}: sample '{sample.key}' has no image field (fields: {', '.join(sample.fields)})")


def tar_members(data: bytes, path: Location) -> Iterator[tuple[str, int, int]]:
    """(name, offset, size) of each regular file of an uncompressed tar, in order: ustar headers, with pax and GNU
    long names. Python's tarfile does the same several times slower (in particular with a pax header per member),
    and every byte read here is checked against the manifest afterwards."""
    pos, long_name = 0, None
    while pos + 512 <= len(data):
        header = data[pos:pos + 512]
        if header == ZERO_BLOCK:
            return
        if header[257:262] != b"ustar":
            raise ShardMismatch(f"shard {path} is not an uncompressed tar (or is corrupt) at byte {pos}")
        try:
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            raise ShardMismatch(f"shard {path} has a corrupt tar header at byte {pos}") from None
        start, kind = pos + 512, header[156:157]
        if start + size > len(data):
            raise ShardMismatch(f"shard {path} is truncated at byte {len(data)} (a member needs {start + size})")
        pos = start + -(-size // 512) * 512
        if kind == b"x":  # pax extended header: 'path' names the next member
            for record in data[start:start + size].decode("utf-8", "replace").splitlines():
                key, _, value = record.partition(" ")[2].partition("=")
                if key == "path":
                    long_name = value
        elif kind == b"L":  # GNU long name of the next member
            long_name = data[start:start + size].rstrip(b"\0").decode("utf-8", "replace")
        elif kind in (b"0", b"\0", b"7"):
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            yield long_name or (f"{prefix}/{name}" if prefix else name), start, size
            long_name = None
        else:  # directories, links, global headers: not samples
            long_name = None if kind != b"g" else long_name
    if pos < len(data):
        raise ShardMismatch(f"shard {path} is truncated: {len(data) - pos} stray bytes at its end")


def iter_tar(path: Location, data: bytes | None = None) -> Iterator[TarSample]:
    """Samples of one tar shard (its bytes, read from `path` unless given: a file or an object URL)
    in file order, grouped as WebDataset does (key: the name up to the first dot of its last part; field: the
    rest); a broken tar is an error naming it."""
    if data is None:
        try:
            data = storage.read_bytes(path)
        except ReplayKDError as exn:
            raise ReplayKDError(f"shard {exn}") from exn
    key, fields, spans = None, {}, {}
    for name, start, size in tar_members(data, path):
        base, slash, last = name.rpartition("/")
        stem, dot, ext = last.partition(".")
        if not dot:
            continue  # no extension: not a field (webdataset skips these too)
        member_key = base + slash + stem
        if member_key != key and key is not None:
            yield TarSample(key, fields, spans)
            fields, spans = {}, {}
        key = member_key
        fields[ext.lower()] = data[start:start + size]
        spans[ext.lower()] = (start, size)
    if key is not None:
        yield TarSample(key, fields, spans)


def read_shard(manifest: Manifest, split: str, shard: str) -> list[Record]:
    """All samples of `shard` in manifest order; any difference from the manifest is a ShardMismatch."""
    rows = manifest.shard_rows(split, shard).to_pydict()
    path = manifest.shard_path(shard)
    n = len(rows["key"])
    out: list[Record] = []
    for pos, sample in enumerate(iter_tar(path)):
        key = sample.key
        if pos >= n:
            raise ShardMismatch(f"shard {path} has more samples than its manifest ({n}); first extra key '{key}'")
        if key != rows["key"][pos]:
            raise ShardMismatch(f"shard {path} position {pos}: key '{key}', manifest expects '{rows['key'][pos]}' (reordered or changed)")
        data = sample.fields.get(rows["ext"][pos])
        if data is None or crc32c(data) != rows["crc32c"][pos]:
            raise ShardMismatch(f"shard {path}: image of key '{key}' differs from the manifest (changed after it was written)")
        out.append(Record(rows["index"][pos], key, rows["label"][pos], pos, data))
    if len(out) < n:
        raise ShardMismatch(f"shard {path} is truncated: {len(out)} of {n} samples; first missing key '{rows['key'][len(out)]}'")
    return out


def read_ahead(items: Iterable[T], read: Callable[[T], R], depth: int) -> Iterator[R]:
    """`read(item)` of each item in order, with the next `depth` reads under way in a background thread while the
    caller works on the current result (object storage: a shard's latency hidden behind the previous shard's work,
    at the cost of holding `depth` more shards' bytes)."""
    if depth < 1:
        yield from map(read, items)
        return
    it = iter(items)
    with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as pool:
        pending = deque(pool.submit(read, x) for _, x in zip(range(depth), it))
        while pending:
            result = pending.popleft().result()
            x = next(it, _END)
            if x is not _END:
                pending.append(pool.submit(read, x))
            yield result


_END = object()
