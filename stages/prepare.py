"""`replaykd shards` and `replaykd manifest`: turn images into checked WebDataset shards."""
from __future__ import annotations

import typer

from replaykd import storage
from replaykd.errors import ReplayKDError
from replaykd.io import check_writable
from replaykd.manifest import HEADER
from replaykd.shards import SKIPPED_FILE, prepare_out, publish, scan_shards, write_shards
from replaykd.sources import open_source, printable
from replaykd.stages.options import ManifestOptions, ShardsOptions


def shards(o: ShardsOptions) -> None:
    """Write SOURCE as shuffled WebDataset shards with a parquet manifest (images copied byte for byte)."""
    remote = storage.is_url(o.out)
    if not remote:
        prepare_out(o.out, o.overwrite)  # refuse early, before the source is read
        check_writable(o.out, "OUT")
    src = open_source(o.source, o.val_fraction, o.seed, o.digits_size)
    write = publish if remote else write_shards
    manifest, skipped = write(src, o.out, o.shard_size, o.seed, o.skip_bad, o.overwrite, o.max_pixels)
    counts = ", ".join(f"{s} {manifest.count(s)} in {len(manifest.shards(s))} shards" for s in manifest.tables)
    typer.echo(f"wrote {counts} to {o.out}; {len(manifest.classes)} classes; manifest {manifest.hash[:16]}")
    if src.non_images:
        typer.echo(f"skipped {len(src.non_images)} non-image files (e.g. {printable(str(src.non_images[0]))})")
    if skipped:
        shown = "; ".join(f"{origin} ({why})" for origin, why in skipped[:5])
        typer.echo(f"skipped {len(skipped)} images that failed to decode (--skip-bad): {shown}"
                   + (" ..." if len(skipped) > 5 else "") + f"; all listed in {storage.join(o.out, SKIPPED_FILE)}")


def manifest(o: ManifestOptions) -> None:
    """Build the manifest of shards that already exist, without rewriting them."""
    if storage.for_root(o.out).read(HEADER) is not None and not o.overwrite:
        raise ReplayKDError(f"{storage.join(o.out, HEADER)} exists; pass --overwrite to replace it")
    if o.classes is not None and not o.classes.exists():
        raise ReplayKDError(f"classes file not found: {o.classes}")
    check_writable(o.out, "OUT")
    m, warnings = scan_shards(o.shard_glob, o.out, o.classes, o.num_classes, o.decode_check, o.max_pixels)
    counts = ", ".join(f"{s} {m.count(s)} in {len(m.shards(s))} shards" for s in m.tables)
    typer.echo(f"manifest of {counts} written to {o.out}; {m.num_classes} classes; hash {m.hash[:16]}")
    for warning in warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
