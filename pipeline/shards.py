"""Write a Source as WebDataset tar shards plus manifest, and build manifests for existing shards."""
from __future__ import annotations

import glob as globlib
import re
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from pipeline.errors import ReplayKDError
from pipeline.io import atomic_path
from pipeline.manifest import HEADER, Manifest, rows_to_table
from pipeline.reader import crc32c, image_field, iter_tar
from pipeline.sources import Source, check_image

SHARD_RE = re.compile(r"^(?P<split>.+?)-(?P<index>\d+)\.tar$")
CLASSES_FILE = "classes.txt"


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty `out` unless overwriting; then remove only files this tool writes."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReplayKDError(f"output path exists and is not a folder: {out}")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ReplayKDError(f"output folder {out} is not empty; pass --overwrite to replace its shards and manifest")
        for f in out.iterdir():
            if f.is_file() and (SHARD_RE.match(f.name) or f.suffix == ".parquet" or f.name in (HEADER, CLASSES_FILE)):
                f.unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_shards(source: Source, out: Path, shard_size: int, seed: int, skip_bad: bool) -> tuple[Manifest, int]:
    """Shuffle each split with `seed` and write it in shards of `shard_size`; returns (manifest, images skipped)."""
    if shard_size < 1:
        raise ReplayKDError(f"--shard-size must be at least 1, got {shard_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables, skipped = {}, 0
    for split_no, (split, items) in enumerate(source.splits.items()):
        if not items:
            continue
        order = np.random.default_rng([seed, split_no]).permutation(len(items))
        rows: list[dict] = []
        bar = tqdm(total=len(items), desc=f"shards {split}", unit="img")
        for shard_no, start in enumerate(range(0, len(items), shard_size)):
            shard = f"{split}-{shard_no:06d}.tar"
            position = 0
            with atomic_path(out / shard) as tmp:
                with wds.TarWriter(str(tmp), mtime=0.0) as sink:
                    for i in order[start : start + shard_size]:
                        item = items[i]
                        data = item.read()
                        try:
                            check_image(data, item.origin)
                        except ReplayKDError:
                            if not skip_bad:
                                raise
                            skipped += 1
                            bar.update()
                            continue
                        sink.write({"__key__": item.key, item.ext: data, "cls": str(item.label)})
                        rows.append(dict(index=len(rows), key=item.key, shard=shard, position=position, label=item.label,
                                         nbytes=len(data), crc32c=crc32c(data), ext=item.ext))
                        position += 1
                        bar.update()
            if position == 0:
                (out / shard).unlink()
        bar.close()
        if rows:
            tables[split] = rows_to_table(rows)
    if not tables:
        raise ReplayKDError(f"no readable images in {source.name}")
    (out / CLASSES_FILE).write_text("\n".join(source.classes) + "\n")
    manifest = Manifest(out, source.classes, tables, out, info={"source": source.name, "seed": seed, "shard_size": shard_size,
                                                               "non_images_skipped": len(source.non_images), "bad_images_skipped": skipped})
    manifest.write()
    return manifest, skipped


def scan_shards(pattern: str, out: Path, classes_file: Path | None = None) -> Manifest:
    """A manifest for existing shards matched by `pattern` (splits from names like `train-000000.tar`)."""
    paths = sorted(Path(p) for p in globlib.glob(pattern))
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise ReplayKDError(f"no shard files match {pattern!r}")
    roots = {p.parent.resolve() for p in paths}
    if len(roots) > 1:
        raise ReplayKDError(f"shards matched by {pattern!r} lie in several folders ({', '.join(map(str, sorted(roots)))}); use one folder")
    rows_by_split: dict[str, list[dict]] = {}
    for path in tqdm(paths, desc="scan shards", unit="shard"):
        m = SHARD_RE.match(path.name)
        rows = rows_by_split.setdefault(m.group("split") if m else "train", [])
        for position, sample in enumerate(iter_tar(path)):
            ext = image_field(sample, str(path))
            try:
                label = int(sample["cls"])
            except (KeyError, ValueError) as exn:
                raise ReplayKDError(f"shard {path}: sample '{sample['__key__']}' has no integer 'cls' field") from exn
            data = sample[ext]
            rows.append(dict(index=len(rows), key=sample["__key__"], shard=path.name, position=position, label=label,
                             nbytes=len(data), crc32c=crc32c(data), ext=ext))
    root = roots.pop()
    classes_file = classes_file or (root / CLASSES_FILE)
    n_classes = 1 + max(r["label"] for rows in rows_by_split.values() for r in rows)
    if Path(classes_file).exists():
        classes = [c for c in Path(classes_file).read_text().splitlines() if c]
        if len(classes) < n_classes:
            raise ReplayKDError(f"{classes_file} names {len(classes)} classes but the shards use label {n_classes - 1}")
    else:
        classes = [str(i) for i in range(n_classes)]
    manifest = Manifest(Path(out), classes, {s: rows_to_table(r) for s, r in rows_by_split.items()}, root,
                        info={"source": pattern})
    manifest.write()
    return manifest
