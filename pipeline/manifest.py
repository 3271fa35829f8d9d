"""The dataset manifest: one parquet row per sample and a JSON header whose hash is the dataset's identity."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from replaykd.errors import ReplayKDError
from replaykd import storage
from replaykd.io import atomic_path, write_json_atomic
from replaykd.storage import Location

FORMAT = "replaykd.manifest/1"
HEADER = "manifest.json"
SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("key", pa.string()),
        ("shard", pa.string()),
        ("position", pa.int32()),
        ("label", pa.int32()),
        ("nbytes", pa.int64()),
        ("crc32c", pa.uint32()),
        ("ext", pa.string()),
    ]
)


def content_hash(classes: list[str], tables: dict[str, pa.Table]) -> str:
    """sha256 over class names and every row; independent of where the files live."""
    h = hashlib.sha256()
    h.update(json.dumps(classes).encode())
    for split in sorted(tables):
        t = tables[split]
        h.update(f"\0{split}\0{t.num_rows}\0".encode())
        for name in SCHEMA.names:
            col = t.column(name)
            if pa.types.is_string(col.type):
                h.update("\n".join(col.to_pylist()).encode())
            else:
                h.update(np.ascontiguousarray(col.to_numpy(), dtype=col.type.to_pandas_dtype()).tobytes())
            h.update(b"\0")
    return h.hexdigest()


def rows_to_table(rows: list[dict]) -> pa.Table:
    """A manifest table from row dicts (columns as in SCHEMA)."""
    return pa.Table.from_pylist(rows, schema=SCHEMA)


@dataclass
class Manifest:
    """Class names, a row table per split, where the shards are, and the content hash."""

    path: Location
    classes: list[str]
    tables: dict[str, pa.Table]
    shard_root: Location
    hash: str = ""
    info: dict = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # shard file -> bytes, where known
    _ranges: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.hash = self.hash or content_hash(self.classes, self.tables)
        for split, t in self.tables.items():
            shards = t.column("shard").to_numpy(zero_copy_only=False)
            names, starts = np.unique(shards, return_index=True)
            order = np.argsort(starts)
            bounds = list(starts[order]) + [len(shards)]
            self._ranges[split] = {names[o]: (int(bounds[i]), int(bounds[i + 1])) for i, o in enumerate(order)}

    @property
    def num_classes(self) -> int:
        """How many classes the labels index into."""
        return len(self.classes)

    def count(self, split: str) -> int:
        """Number of samples in `split`."""
        return self.table(split).num_rows

    def table(self, split: str) -> pa.Table:
        """The rows of `split`, in global-index order."""
        if split not in self.tables:
            raise ReplayKDError(f"manifest {self.path} has no split '{split}' (has: {', '.join(self.tables)})")
        return self.tables[split]

    def eval_split(self, wanted: str, option: str = "--eval-split") -> str | None:
        """The split to evaluate on: `wanted` ('val' is 'validation' where the manifest has that instead, as
        timm's wds layout names it); 'none': no evaluation. An absent split is an error naming the ones there are."""
        if wanted == "none":
            return None
        if wanted == "val" and "val" not in self.tables and "validation" in self.tables:
            return "validation"
        if wanted not in self.tables:
            raise ReplayKDError(f"manifest {self.path} has no split '{wanted}' to evaluate on (it has: "
                                f"{', '.join(self.tables)}); pass {option} with one of them, or {option} none")
        return wanted

    def shards(self, split: str) -> list[str]:
        """Shard file names of `split`, in order."""
        self.table(split)
        return list(self._ranges[split])

    def shard_range(self, split: str, shard: str) -> tuple[int, int]:
        """Global index range [start, stop) held by `shard`."""
        return self._ranges[split][shard]

    def shard_counts(self, split: str) -> list[int]:
        """Samples per shard of `split`, in shard order."""
        self.table(split)
        return [b - a for a, b in self._ranges[split].values()]

    def shard_rows(self, split: str, shard: str) -> pa.Table:
        """The manifest rows of one shard, in position order."""
        start, stop = self.shard_range(split, shard)
        return self.table(split).slice(start, stop - start)

    def check_files(self, split: str) -> None:
        """Refuse, before any work starts, a split whose shard files are missing or not the size recorded when the
        manifest was written (truncated or replaced); a shard changed in place is caught when it is read."""
        problems, found = [], storage.sizes(self.shard_root)  # one listing, for an object store too
        for shard in self.shards(split):
            path = self.shard_path(shard)
            if shard not in found:
                problems.append(f"{path} is missing")
            elif shard in self.sizes and found[shard] >= 0 and found[shard] != self.sizes[shard]:
                problems.append(f"{path} holds {found[shard]} bytes, the manifest recorded {self.sizes[shard]}")
        if problems:
            raise ReplayKDError(f"{len(problems)} shard(s) of split '{split}' do not match manifest {self.path}: "
                                + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))

    def shard_path(self, shard: str) -> Location:
        """Where a shard file is: a local path or a URL."""
        return storage.join(self.shard_root, shard)

    def header(self) -> dict:
        """The JSON header: identity, classes, counts and shard lists."""
        if storage.is_url(self.shard_root):
            root = "." if self.shard_root == self.path else str(self.shard_root)
        elif storage.is_url(self.path):
            root = str(Path(self.shard_root).resolve())
        else:
            try:
                root = os.path.relpath(self.shard_root, self.path)
            except ValueError:  # another drive on Windows
                root = str(self.shard_root)
        return {
            "format": FORMAT,
            "hash": self.hash,
            "classes": self.classes,
            "shard_root": root,
            "splits": {
                split: {
                    "count": t.num_rows,
                    "shards": [{"name": s, "count": n, **({"bytes": self.sizes[s]} if s in self.sizes else {})}
                               for s, n in zip(self.shards(split), self.shard_counts(split))],
                }
                for split, t in self.tables.items()
            },
            "info": self.info,
        }

    def write(self) -> None:
        """Write the parquet tables, then the header (the header's presence marks a complete manifest)."""
        if storage.is_url(self.path):
            records = storage.for_root(self.path)
            for split, t in self.tables.items():
                sink = pa.BufferOutputStream()
                pq.write_table(t, sink)
                records.write(f"{split}.parquet", sink.getvalue().to_pybytes())
            records.write(HEADER, (json.dumps(self.header(), indent=2) + "\n").encode())
            return
        self.path.mkdir(parents=True, exist_ok=True)
        for split, t in self.tables.items():
            with atomic_path(self.path / f"{split}.parquet") as tmp:
                pq.write_table(t, tmp)
        write_json_atomic(self.path / HEADER, self.header())

    @classmethod
    def load(cls, path: Location, shard_root: Location | None = None) -> "Manifest":
        """Read a manifest folder (or URL); `shard_root` overrides where the shards are looked for."""
        path = storage.as_location(str(path))
        if storage.basename(path) == HEADER:
            path = storage.parent(path)
        records = storage.for_root(path)
        header_file = storage.join(path, HEADER)
        data = records.read(HEADER)
        if data is None:
            raise ReplayKDError(f"no manifest at {path} (missing {HEADER}); run 'replaykd shards' or 'replaykd manifest'")
        again = "copy it again from where it was made, or make it again ('replaykd shards' or 'replaykd manifest')"
        try:
            header = json.loads(data)
        except ValueError:
            raise ReplayKDError(f"{header_file} is not JSON (damaged or cut short); {again}") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ReplayKDError(f"{header_file} is not a {FORMAT} manifest")
        missing = [k for k in ("hash", "classes", "shard_root", "splits") if k not in header]
        if missing:
            raise ReplayKDError(f"{header_file} lacks {', '.join(missing)} (incomplete); {again}")
        tables = {}
        for split in header["splits"]:
            parquet = records.read(f"{split}.parquet")
            if parquet is None:
                raise ReplayKDError(f"manifest {path} lacks {split}.parquet (copied only in part?)")
            tables[split] = pq.read_table(pa.BufferReader(parquet)).cast(SCHEMA)
        if shard_root is not None:
            root = storage.as_location(str(shard_root))
        elif storage.is_url(header["shard_root"]) or header["shard_root"].startswith("/"):
            root = storage.as_location(header["shard_root"])
        elif storage.is_url(path):
            root = path if header["shard_root"] in (".", "") else storage.join(path, header["shard_root"])
        else:
            root = (path / header["shard_root"]).resolve()
        sizes = {s["name"]: s["bytes"] for split in header["splits"].values() for s in split["shards"] if "bytes" in s}
        m = cls(path, header["classes"], tables, root, info=header.get("info", {}), sizes=sizes)
        if m.hash != header["hash"]:
            raise ReplayKDError(f"manifest {path} was changed after it was written: hash {m.hash[:12]} != {header['hash'][:12]}")
        return m
