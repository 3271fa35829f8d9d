"""`replaykd shards` and `replaykd manifest`: turn images into checked WebDataset shards."""
from __future__ import annotations

from pathlib import Path

import typer

from pipeline.errors import ReplayKDError
from pipeline.manifest import HEADER
from pipeline.shards import prepare_out, scan_shards, write_shards
from pipeline.sources import open_source


def shards(
    source: str = typer.Argument(..., help="'digits' (built-in handwritten digits, offline) or an ImageFolder root: ROOT/<class>/<image>, or ROOT/train/... and ROOT/val/..."),
    out: Path = typer.Argument(..., help="Folder for the shards ({split}-{index:06d}.tar) and the manifest."),
    shard_size: int = typer.Option(1000, min=1, help="Samples per shard."),
    seed: int = typer.Option(0, help="Seed of the train/val split and of the shuffle across shards."),
    val_fraction: float = typer.Option(0.2, help="Fraction of each class held out as 'val' when the source has no val/ folder; 0 for none."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip (and count) images that fail to decode instead of stopping."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace shards and manifest already in OUT."),
    digits_size: int = typer.Option(32, min=8, help="Side in pixels of the PNGs written for the digits source."),
) -> None:
    """Write SOURCE as shuffled WebDataset shards with a parquet manifest (images copied byte for byte)."""
    src = open_source(source, val_fraction, seed, digits_size)
    prepare_out(out, overwrite)
    manifest, skipped = write_shards(src, out, shard_size, seed, skip_bad)
    counts = ", ".join(f"{s} {manifest.count(s)} in {len(manifest.shards(s))} shards" for s in manifest.tables)
    typer.echo(f"wrote {counts} to {out}; {len(manifest.classes)} classes; manifest {manifest.hash[:16]}")
    if src.non_images:
        typer.echo(f"skipped {len(src.non_images)} non-image files (e.g. {src.non_images[0]})")
    if skipped:
        typer.echo(f"skipped {skipped} images that failed to decode (--skip-bad)")


def manifest(
    shard_glob: str = typer.Argument(..., help="Glob of existing WebDataset shards, quoted, e.g. 'data/in1k/train-*.tar'. Each sample needs an image field and an integer 'cls'."),
    out: Path = typer.Argument(..., help="Folder for the manifest (parquet per split + manifest.json)."),
    classes: Path = typer.Option(None, help="Text file with one class name per line (default: classes.txt beside the shards, else the label numbers)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a manifest already in OUT."),
) -> None:
    """Build the manifest of shards that already exist, without rewriting them."""
    if (Path(out) / HEADER).exists() and not overwrite:
        raise ReplayKDError(f"{Path(out) / HEADER} exists; pass --overwrite to replace it")
    if classes is not None and not classes.exists():
        raise ReplayKDError(f"classes file not found: {classes}")
    m = scan_shards(shard_glob, out, classes)
    counts = ", ".join(f"{s} {m.count(s)} in {len(m.shards(s))} shards" for s in m.tables)
    typer.echo(f"manifest of {counts} written to {out}; hash {m.hash[:16]}")
