"""Write a Source as WebDataset tar shards plus manifest, and build manifests for existing shards."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import webdataset as wds

from replaykd import storage
from replaykd.decode_check import bad_images
from replaykd.errors import ReplayKDError
from replaykd.manifest import HEADER, Manifest, rows_to_table
from replaykd.progress import Progress
from replaykd.reader import crc32c
from replaykd.shard_index import CLASSES_FILE, SHARD_RE, index_shards
from replaykd.sources import MAX_PIXELS, Source, check_image

STAGING = ".replaykd-staging"
SKIPPED_FILE = "skipped.txt"  # images --skip-bad left out: path, tab, why


def _ours(f: Path) -> bool:
    return f.is_file() and (SHARD_RE.match(f.name) is not None or f.suffix == ".parquet"
                            or f.name in (HEADER, CLASSES_FILE, SKIPPED_FILE))


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


def write_shards(source: Source, out: Path, shard_size: int, seed: int, skip_bad: bool, overwrite: bool = False,
                 max_pixels: int = MAX_PIXELS) -> tuple[Manifest, list[tuple[str, str]]]:
    """Shuffle each split with `seed` and write it in shards of `shard_size` images (the last one of a split may
    hold fewer; images that do not decode or have more than `max_pixels` pixels are an error, or with `skip_bad`
    skipped, changing no other shard, and listed in skipped.txt); returns the manifest and the skipped images' names
    and reasons.

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
        tables, skipped = {}, []
        for split_no, (split, items) in enumerate(source.splits.items()):
            if items:
                rows, bad = _write_split(split, items, np.random.default_rng([seed, split_no]), staging, shard_size,
                                         skip_bad, max_pixels)
                skipped += bad
                if rows:
                    tables[split] = rows_to_table(rows)
        if not tables:
            raise ReplayKDError(f"no readable images in {source.name}")
        (staging / CLASSES_FILE).write_text("\n".join(source.classes) + "\n")
        if skipped:
            (staging / SKIPPED_FILE).write_text("".join(f"{origin}\t{why}\n" for origin, why in skipped))
        for f in out.iterdir() if overwrite else ():
            if _ours(f):
                f.unlink()
        sizes = {f.name: f.stat().st_size for f in staging.iterdir() if f.suffix == ".tar"}
        for f in staging.iterdir():
            os.replace(f, out / f.name)
        manifest = Manifest(out, source.classes, tables, out, info={
            "source": source.name, "seed": seed, "shard_size": shard_size,
            "non_images_skipped": len(source.non_images), "bad_images_skipped": len(skipped)}, sizes=sizes)
        manifest.write()  # its header, written last, marks a complete data set
        return manifest, skipped
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_split(split: str, items, rng: np.random.Generator, folder: Path, shard_size: int,
                 skip_bad: bool, max_pixels: int) -> tuple[list[dict], list[tuple[str, str]]]:
    """One split's shards, filled with readable images in shuffled order; returns its manifest rows and skips."""
    rows, skipped, sink, position = [], [], None, 0
    bar = Progress(total=len(items), desc=f"shards {split}", unit="img")
    try:
        for i in rng.permutation(len(items)):
            item = items[i]
            data = item.read()
            bar.update()
            try:
                check_image(data, item.origin, max_pixels)
            except ReplayKDError as exn:
                if not skip_bad:
                    raise
                skipped.append((item.origin, str(exn).split(f"{item.origin}: ", 1)[-1]))
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


def publish(source: Source, url: str, shard_size: int, seed: int, skip_bad: bool, overwrite: bool = False,
            max_pixels: int = MAX_PIXELS) -> tuple[Manifest, list[tuple[str, str]]]:
    """`write_shards` to an object store: the data set is written in a local temporary folder ($TMPDIR), then
    uploaded shard by shard, the manifest's header last, so readers never see a half-uploaded data set; with
    `overwrite`, shards of an earlier data set there that this one does not replace are removed afterwards."""
    records = storage.for_root(url)
    before = [n for n in records.children("") if SHARD_RE.match(n) or n.endswith(".parquet")
              or n in (HEADER, CLASSES_FILE, SKIPPED_FILE)]
    if before and not overwrite:
        raise ReplayKDError(f"{url} already holds a data set ({len(before)} files); pass --overwrite to replace it")
    with tempfile.TemporaryDirectory(prefix="replaykd-shards-") as tmp:
        local, skipped = write_shards(source, Path(tmp) / "out", shard_size, seed, skip_bad, max_pixels=max_pixels)
        if HEADER in before:
            records.delete(HEADER)  # the old data set is no longer whole from here on
        files = sorted(Path(tmp, "out").iterdir(), key=lambda f: f.name == HEADER)  # the header last
        fs, root = storage.filesystem(url)
        for f in Progress(files, desc="upload", unit="file"):
            with storage.remote(storage.join(url, f.name), "uploading"):
                fs.put_file(str(f), f"{root.rstrip('/')}/{f.name}")
        for name in set(before) - {f.name for f in files}:
            records.delete(name)
    manifest = Manifest.load(url)
    return manifest, skipped


def scan_shards(pattern: str, out: storage.Location, classes_file: Path | None = None,
                num_classes: int | None = None, decode_check: bool = True,
                max_pixels: int = MAX_PIXELS) -> tuple[Manifest, list[str]]:
    """A manifest for existing shards matched by `pattern` (splits from their names or `_info.json`); returns it and
    warnings about the shards (e.g. most shards hold a single class). With `decode_check`, every image is decoded
    first and any that does not decode, or has more than `max_pixels` pixels, is refused by name (nothing is
    written)."""
    index = index_shards(pattern, classes_file, num_classes)
    tables = {split: rows_to_table([dict(index=i, key=r.key, shard=r.shard, position=r.position, label=r.label,
                                         nbytes=r.nbytes, crc32c=r.crc32c, ext=r.ext) for i, r in enumerate(rows)])
              for split, rows in index.splits.items()}
    manifest = Manifest(storage.as_location(str(out)), index.classes, tables, index.root, info={"source": pattern},
                        sizes=index.sizes)
    bad = bad_images(manifest, max_pixels) if decode_check else []
    if bad:
        shown = "; ".join(f"{where} ({why})" for where, why in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise ReplayKDError(f"{len(bad)} images do not decode: {shown}. A manifest records every image's bytes and a "
                            "teacher cache is tied to its manifest, so stage one could never make their views: "
                            f"write the shards again without them (`replaykd shards '{pattern}' OUT --skip-bad`) or "
                            "replace them in their shards, then build the manifest (--no-decode-check skips this "
                            "check)")
    manifest.write()
    return manifest, index.warnings
