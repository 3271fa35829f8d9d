"""The teacher cache: top-k targets per (epoch, sample) in a Zarr v3 store, written in whole units.

Layout: arrays shaped (epochs, shards, max shard size[, k]). A unit of work is one (epoch, shard): one inner
chunk per array, and all epochs of a data shard live in Zarr shard files that only that data shard's writer
touches (ranks own whole data shards), so no two writers ever share a file. Zarr's local store writes each
file atomically, and a unit's completion is recorded (in `units/<shard>.json`) only after its data, so a run
killed at any point resumes to arrays identical to an uninterrupted run's. Readers trust completed units only.
"""
from __future__ import annotations

import dataclasses
import json
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pipeline.errors import ReplayKDError
from pipeline.io import write_json_atomic

FORMAT = "replaykd.teacher-cache/1"
UNITS = "units"
# What a store's identity is made of: a store built with any other value is refused, naming the field.
IDENTITY = ("manifest_hash", "split", "recipe_hash", "run_seed", "topk", "num_classes", "teacher", "teacher_sha256",
            "teacher_input_size")


@dataclass(frozen=True)
class CacheConfig:
    """What a cache was built from; stage two checks it against its own data, recipe and seed."""

    manifest_hash: str
    split: str
    recipe: dict
    recipe_hash: str
    run_seed: int
    epochs: int
    topk: int
    num_classes: int
    teacher: str
    teacher_sha256: str
    teacher_input_size: int | None = None

    def differences(self, other: "CacheConfig") -> list[str]:
        """The identity fields that differ, as 'field: store value != requested value'."""
        return [f"{f}: {getattr(other, f)!r} in the store, {getattr(self, f)!r} requested"
                for f in IDENTITY if getattr(self, f) != getattr(other, f)]


def index_dtype(num_classes: int) -> str:
    """int16 class indices while the classes fit, else int32."""
    return "int16" if num_classes <= np.iinfo(np.int16).max + 1 else "int32"


def _compressors(dtype: str):
    # Bit-shuffling exposes the shared high bits of float16 probabilities and small class indices to zstd.
    # Measured on 8192 top-10 rows (digits teacher; synthetic 1000 classes): probabilities 20 -> 15.2 / 15.6
    # bytes per view, indices 20 -> 4.3 / 12.5; plain zstd gave 16.8 / 17.0 and 4.1 / 14.9; moving the k
    # axis first (TransposeCodec) gained nothing. Quantising sorted probabilities to uint16 deltas reached
    # 13.3 / 12.7 but is lossy, so the stored values stay exact float16.
    return [BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle", typesize=np.dtype(dtype).itemsize)]


def array_specs(topk: int, num_classes: int) -> dict[str, tuple[str, bool]]:
    """name -> (dtype, has a k axis) of every per-view array."""
    return {"probs": ("float16", True), "classes": (index_dtype(num_classes), True), "seed": ("uint32", False),
            "fingerprint": ("uint32", False), "partner": ("int32", False), "lam": ("float32", False)}


class TeacherCache:
    """An open teacher cache: its config, shard layout, completed units, and unit reads/writes."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path, self.group = Path(path), group
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMAT:
            raise ReplayKDError(f"{path} is not a replaykd teacher cache")
        self.attrs = attrs
        self.config = CacheConfig(**attrs["config"])
        self.shards: list[str] = attrs["layout"]["shards"]
        self.counts: list[int] = attrs["layout"]["counts"]
        self.arrays = {name: group[name] for name in array_specs(self.config.topk, self.config.num_classes)}

    # --- opening -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, mode: str = "r") -> "TeacherCache":
        """Open an existing store (read-only by default); a missing or foreign path is a clear error."""
        path = Path(path)
        if not (path / "zarr.json").exists():
            raise ReplayKDError(f"no teacher cache at {path} (run 'replaykd teacher-cache' first)")
        return cls(path, zarr.open_group(str(path), mode=mode))

    @classmethod
    def create_or_grow(cls, path: Path, config: CacheConfig, shards: list[str], counts: list[int],
                       epochs_per_file: int, extra_attrs: dict) -> "TeacherCache":
        """Create the store, or open one with the same identity and grow it to `config.epochs` epochs."""
        path = Path(path)
        if (path / "zarr.json").exists():
            cache = cls.open(path, mode="a")
            diffs = config.differences(cache.config)
            if diffs:
                raise ReplayKDError(f"{path} was built for something else; refusing to mix: " + "; ".join(diffs)
                                    + ". Use another --out, or delete the store to rebuild it.")
            if cache.shards != shards or cache.counts != counts:
                raise ReplayKDError(f"{path}: shard layout differs from the manifest's")
            if config.epochs > cache.config.epochs:
                for arr in cache.arrays.values():
                    arr.resize((config.epochs, *arr.shape[1:]))
                cache.group.attrs["config"] = {**cache.attrs["config"], "epochs": config.epochs}
                cache.config = dataclasses.replace(cache.config, epochs=config.epochs)
            return cache
        if path.exists() and any(path.iterdir()):
            raise ReplayKDError(f"{path} exists and is not a teacher cache; choose another --out")
        group = zarr.open_group(str(path), mode="w")
        width = max(counts)
        block = max(1, min(epochs_per_file, config.epochs))
        codec_chain = {}
        for name, (dtype, has_k) in array_specs(config.topk, config.num_classes).items():
            tail = (config.topk,) if has_k else ()
            arr = group.create_array(name, shape=(config.epochs, len(shards), width, *tail), dtype=dtype,
                                     chunks=(1, 1, width, *tail), shards=(block, 1, width, *tail),
                                     compressors=_compressors(dtype), fill_value=0,
                                     dimension_names=("epoch", "shard", "position", "k")[: 3 + has_k])
            codec_chain[name] = arr.metadata.to_dict()["codecs"]
        (path / UNITS).mkdir()
        group.attrs.update({"format": FORMAT, "config": dataclasses.asdict(config),
                            "layout": {"shards": shards, "counts": counts, "epochs_per_file": block},
                            "codecs": json.loads(json.dumps(codec_chain, default=list)), **extra_attrs})
        return cls.open(path, mode="a")

    # --- units -------------------------------------------------------------------------------------
    def _marker(self, shard_no: int) -> Path:
        return self.path / UNITS / f"{shard_no:06d}.json"

    def completed(self, shard_no: int) -> list[int]:
        """Epochs of `shard_no` whose data is complete."""
        marker = self._marker(shard_no)
        return json.loads(marker.read_text())["epochs"] if marker.exists() else []

    def missing(self, epochs: int | None = None) -> list[tuple[int, int]]:
        """(epoch, shard_no) units not yet complete among the first `epochs` epochs."""
        epochs = self.config.epochs if epochs is None else epochs
        out = []
        for s in range(len(self.shards)):
            done = set(self.completed(s))
            out.extend((e, s) for e in range(epochs) if e not in done)
        return sorted(out)

    def write_unit(self, epoch: int, shard_no: int, data: dict[str, np.ndarray]) -> None:
        """Write one unit's arrays, then record it complete (the caller owns this data shard)."""
        n = self.counts[shard_no]
        for name, arr in self.arrays.items():
            arr[epoch, shard_no, :n] = data[name]
        done = sorted(set(self.completed(shard_no)) | {epoch})
        write_json_atomic(self._marker(shard_no), {"shard": self.shards[shard_no], "epochs": done})

    def read_unit(self, epoch: int, shard_no: int) -> dict[str, np.ndarray]:
        """One completed unit's arrays, trimmed to the shard's sample count."""
        if epoch not in self.completed(shard_no):
            raise ReplayKDError(f"{self.path}: unit (epoch {epoch}, shard {self.shards[shard_no]}) is not complete")
        n = self.counts[shard_no]
        return {name: arr[epoch, shard_no, :n] for name, arr in self.arrays.items()}

    def bytes_on_disk(self) -> int:
        """Total size of the store's files."""
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


class UnitWriter:
    """Writes completed units on a background thread, off the teacher's compute path."""

    def __init__(self, cache: TeacherCache, depth: int = 8):
        self.cache, self.error = cache, None
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, name="unit-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.cache.write_unit(*job)
                except OSError as exn:
                    self.error = exn

    def _check(self) -> None:
        if self.error is not None:
            exn = self.error
            full = getattr(exn, "errno", None) == 28 or "No space" in str(exn)
            what = "the disk is full" if full else f"a write failed ({exn})"
            raise ReplayKDError(f"{what} while writing {self.cache.path}; completed units are kept: free space "
                                f"and rerun the same command to resume") from exn

    def put(self, epoch: int, shard_no: int, data: dict[str, np.ndarray]) -> None:
        """Queue one complete unit for writing (blocks when the queue is full)."""
        self._check()
        self.queue.put((epoch, shard_no, data))

    def close(self) -> None:
        """Finish all queued writes; raise if any failed."""
        self.queue.put(None)
        self.thread.join()
        self._check()
