"""Read WebDataset shards: raw samples, and a shard checked row by row against its manifest."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import google_crc32c
import webdataset as wds

from pipeline.errors import ReplayKDError, ShardMismatch
from pipeline.manifest import Manifest
from pipeline.sources import IMAGE_EXTS


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


def image_field(sample: dict, shard: str) -> str:
    """The name of the field that holds the encoded image."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    raise ReplayKDError(f"{shard}: sample '{sample['__key__']}' has no image field (fields: {', '.join(k for k in sample if not k.startswith('__'))})")


def iter_tar(path: Path) -> Iterator[dict]:
    """Samples of one tar shard in file order (WebDataset grouping); a broken tar is an error naming it."""
    path = Path(path)
    if not path.exists():
        raise ReplayKDError(f"shard not found: {path}")
    last = None
    try:
        for sample in wds.tariterators.tarfile_samples([{"url": str(path)}]):
            last = sample["__key__"]
            yield sample
    except ReplayKDError:
        raise
    except Exception as exn:
        where = f"after key '{last}'" if last is not None else "at its start"
        raise ShardMismatch(f"shard {path} is unreadable or truncated {where}: {exn.args[0] if exn.args else exn}") from exn


def read_shard(manifest: Manifest, split: str, shard: str) -> list[Record]:
    """All samples of `shard` in manifest order; any difference from the manifest is a ShardMismatch."""
    rows = manifest.shard_rows(split, shard).to_pydict()
    path = manifest.shard_path(shard)
    n = len(rows["key"])
    out: list[Record] = []
    for pos, sample in enumerate(iter_tar(path)):
        key = sample["__key__"]
        if pos >= n:
            raise ShardMismatch(f"shard {path} has more samples than its manifest ({n}); first extra key '{key}'")
        if key != rows["key"][pos]:
            raise ShardMismatch(f"shard {path} position {pos}: key '{key}', manifest expects '{rows['key'][pos]}' (reordered or changed)")
        data = sample.get(rows["ext"][pos])
        if data is None or crc32c(data) != rows["crc32c"][pos]:
            raise ShardMismatch(f"shard {path}: image of key '{key}' differs from the manifest (changed after it was written)")
        out.append(Record(rows["index"][pos], key, rows["label"][pos], pos, data))
    if len(out) < n:
        raise ShardMismatch(f"shard {path} is truncated: {len(out)} of {n} samples; first missing key '{rows['key'][len(out)]}'")
    return out
