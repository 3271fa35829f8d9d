"""`replaykd cache pack | upgrade`: a store's units into another layout, without the teacher."""
from __future__ import annotations

import time

import typer

from replaykd.cache import TeacherCache
from replaykd.errors import ReplayKDError
from replaykd.progress import Progress
from replaykd.repack import pack as pack_units
from replaykd.repack import upgrade as upgrade_units
from replaykd.stages.options import CachePackOptions, CacheUpgradeOptions


def pack(o: CachePackOptions) -> None:
    """Pack a finished loose store into Zarr shard files."""
    src = TeacherCache.open(o.store)
    t0, bar = time.perf_counter(), Progress(total=len(src.shards) * src.config.epochs, desc="pack", unit="unit")
    pack_units(src, o.out, o.epochs_per_file, o.threads, progress=lambda: bar.update())
    bar.close()
    packed = TeacherCache.open(o.out)
    typer.echo(f"packed {o.store} ({src.file_count()} files) into {o.out}: {packed.file_count()} files, "
               f"{packed.bytes_on_disk() / 1e6:.2f} MB, {o.epochs_per_file} epochs of a data shard per file, in "
               f"{time.perf_counter() - t0:.1f} s; it is read-only (`replaykd cache upgrade` unpacks it)")


def upgrade(o: CacheUpgradeOptions) -> None:
    """Rewrite a format 7 or packed store into a loose store of this format; exit 1 when units were damaged."""
    src = TeacherCache.open(o.store)
    t0, bar = time.perf_counter(), Progress(total=int(src.recorded().sum()), desc="upgrade", unit="unit")
    try:
        copied, there, damaged = upgrade_units(src, o.out, o.threads, progress=lambda: bar.update())
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    typer.echo(f"upgraded {o.store} (format {src.version}, {src.layout.kind}) into {o.out} (format "
               f"{TeacherCache.open(o.out).version}, loose): {copied} units copied"
               + (f", {there} there already" if there else "") + f" in {seconds:.1f} s "
               f"({copied / max(seconds, 1e-9):.0f} units/s)")
    missing = len(TeacherCache.open(o.out).missing())
    if missing:
        typer.echo(f"{o.out}: {missing} units missing; the teacher-cache command that built {o.store}, with --out "
                   f"{o.out}, builds them")
    if damaged:
        for d in damaged[:20]:
            typer.secho(f"damaged, left missing: {d}", fg=typer.colors.RED, err=True)
        raise ReplayKDError(f"{len(damaged)} damaged unit(s) of {o.store} were not copied (listed above); the "
                            f"teacher-cache command rebuilds them into {o.out}")
