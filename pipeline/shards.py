"""Write a Source as WebDataset tar shards plus manifest, and build manifests for existing shards."""
from __future__ import annotations

import glob as globlib
import os
import re
import shutil
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from pipeline.errors import ReplayKDError
from pipeline.manifest import HEADER, Manifest, rows_to_table
from pipeline.reader import crc32c, image_field, iter_tar
from pipeline.sources import Source, check_image

SHARD_RE = re.compile(r"^(?P<split>.+?)-(?P<index>\d+)\.tar$")
CLASSES_FILE = "classes.txt"
STAGING = ".replaykd-staging"


def _ours(f: Path) -> bool:
    return f.is_file() and (SHARD_RE.match(f.name) is not None or f.suffix == ".parquet" or f.name in (HEADER, CLASSES_FILE))


def prepare_out(out: Path, overwrite: bool) -> None:
    """Check that `out` can take a data set: a folder (or nothing yet), empty unless `overwrite`. Removes only the
    staging folders of runs that were killed; the files a finished run replaces go when the new run commits."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReplayKDError(f"output path exists and is not a folder: {out}")
    for stale in out.glob(f"{STAGING}-*") if out.exists() else ():
        shutil.rmtree(stale, ignore_errors=True)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ReplayKDError(f"output folder {out} is not empty; pass --overwrite to replace its shards and manifest")


def write_shards(source: Source, out: Path, shard_size: int, seed: int, skip_bad: bool,
                 overwrite: bool = False) -> tuple[Manifest, int]:
    """Shuffle each split with `seed` and write it in shards of `shard_size` images (the last one of a split may
    hold fewer; images skipped with `skip_bad` change no other shard); returns (manifest, images skipped).

    Shards are written to a staging folder inside `out` and moved into place only when every split is done, the
    manifest last: a run that fails or is interrupted leaves `out` as it found it.
    """
    if shard_size < 1:
        raise ReplayKDError(f"--shard-size must be at least 1, got {shard_size}")
    out = Path(out)
    prepare_out(out, overwrite)
    created = not out.exists()
    staging = out / f"{STAGING}-{os.getpid()}"
    staging.mkdir(parents=True)
    try:
        tables, skipped = {}, 0
        for split_no, (split, items) in enumerate(source.splits.items()):
            if items:
                rows, bad = _write_split(split, items, np.random.default_rng([seed, split_no]), staging, shard_size,
                                         skip_bad)
                skipped += bad
                if rows:
                    tables[split] = rows_to_table(rows)
        if not tables:
            raise ReplayKDError(f"no readable images in {source.name}")
        (staging / CLASSES_FILE).write_text("\n".join(source.classes) + "\n")
        for f in out.iterdir() if overwrite else ():
            if _ours(f):
                f.unlink()
        for f in staging.iterdir():
            os.replace(f, out / f.name)
        manifest = Manifest(out, source.classes, tables, out, info={
            "source": source.name, "seed": seed, "shard_size": shard_size,
            "non_images_skipped": len(source.non_images), "bad_images_skipped": skipped})
        manifest.write()  # its header, written last, marks a complete data set
        return manifest, skipped
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_split(split: str, items, rng: np.random.Generator, folder: Path, shard_size: int,
                 skip_bad: bool) -> tuple[list[dict], int]:
    """One split's shards, filled with readable images in shuffled order; returns its manifest rows and skips."""
    rows, skipped, sink, position = [], 0, None, 0
    bar = tqdm(total=len(items), desc=f"shards {split}", unit="img")
    try:
        for i in rng.permutation(len(items)):
            item = items[i]
            data = item.read()
            bar.update()
            try:
                check_image(data, item.origin)
            except ReplayKDError:
                if not skip_bad:
                    raise
                skipped += 1
                continue
            shard = f"{split}-{len(rows) // shard_size:06d}.tar"
            if sink is None:
                # an integer mtime: a float makes tarfile add a pax header to every member (twice the size for
                # small images, and twice the parsing)
                sink = wds.TarWriter(str(folder / shard), mtime=0)
            sink.write({"__key__": item.key, item.ext: data, "cls": str(item.label)})
            rows.append(dict(index=len(rows), key=item.key, shard=shard, position=position, label=item.label,
                             nbytes=len(data), crc32c=crc32c(data), ext=item.ext))
            position += 1
            if position == shard_size:
                sink.close()
                sink, position = None, 0
    finally:
        if sink is not None:
            sink.close()
        bar.close()
    return rows, skipped


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
                label = int(sample.fields["cls"])
            except (KeyError, ValueError) as exn:
                raise ReplayKDError(f"shard {path}: sample '{sample.key}' has no integer 'cls' field") from exn
            data = sample.fields[ext]
            rows.append(dict(index=len(rows), key=sample.key, shard=path.name, position=position, label=label,
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
