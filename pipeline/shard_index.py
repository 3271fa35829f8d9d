"""Index shards that already exist: which split each belongs to, its samples (key, label, where the image lies),
and the data set's classes; for a manifest of them, or to re-shuffle them into new shards.

Layouts: replaykd's own (`train-000000.tar`, `val-000000.tar`) and the public `timm/imagenet-1k-wds`
(`imagenet1k-train-0000.tar`, `imagenet1k-validation-00.tar`, an `_info.json` at the root): the split is the part
of the name before the shard number, after any data-set prefix. Where `_info.json` lists a split's files and
their lengths, it names the split and every count is checked against it.
"""
from __future__ import annotations

import glob as globlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from braceexpand import braceexpand
from tqdm import tqdm

from pipeline.errors import ReplayKDError
from pipeline.reader import crc32c, image_field, iter_tar

# [prefix-]split-index.tar; the split is the last dash-separated part before the index
SHARD_RE = re.compile(r"^(?:(?P<prefix>.+)-)?(?P<split>[^-]+)-(?P<index>\d+)\.tar$")
CLASSES_FILE = "classes.txt"
INFO_FILES = ("_info.json", "info.json")
# Warn when more than this share of a split's shards hold one class: the loader shuffles within a few shards.
SORTED_SHARE = 0.5


@dataclass(frozen=True)
class IndexedSample:
    """One sample of an existing shard: manifest fields and where its image lies in the shard file."""

    key: str
    label: int
    ext: str
    shard: str
    position: int
    offset: int
    nbytes: int
    crc32c: int


@dataclass
class ShardIndex:
    """The samples of existing shards by split (in shard then position order), their folder, classes and sizes."""

    root: Path
    classes: list[str]
    splits: dict[str, list[IndexedSample]]
    sizes: dict[str, int]
    info: dict
    warnings: list[str] = field(default_factory=list)


def split_of(name: str, info_splits: dict[str, str]) -> str:
    """The split a shard file belongs to: `_info.json`'s, else the part of its name before the shard number."""
    if name in info_splits:
        return info_splits[name]
    m = SHARD_RE.match(name)
    return m.group("split") if m else "train"


def read_info(root: Path) -> dict:
    """The data set's `_info.json` (timm's wds layout), or {}."""
    for name in INFO_FILES:
        f = root / name
        if f.exists():
            try:
                return json.loads(f.read_text())
            except json.JSONDecodeError as exn:
                raise ReplayKDError(f"{f} is not valid JSON: {exn}") from exn
    return {}


def _info_files(info: dict) -> tuple[dict[str, str], dict[str, int]]:
    """shard file -> split, and shard file -> its length, from `_info.json`'s splits (brace patterns expanded)."""
    splits, lengths = {}, {}
    for split, s in (info.get("splits") or {}).items():
        names = [n for pattern in s.get("filenames", ()) for n in braceexpand(pattern)]
        for i, name in enumerate(names):
            splits[Path(name).name] = s.get("name", split)
            if i < len(s.get("shard_lengths", ())):
                lengths[Path(name).name] = int(s["shard_lengths"][i])
    return splits, lengths


def _label(sample, path: Path) -> int:
    """The integer label: the `cls` field, else `label` in the `json` field (as the wds layouts carry it)."""
    try:
        if "cls" in sample.fields:
            return int(sample.fields["cls"])
        return int(json.loads(sample.fields["json"])["label"])
    except (KeyError, ValueError, TypeError) as exn:
        raise ReplayKDError(f"shard {path}: sample '{sample.key}' has no integer label (a 'cls' field, or 'label' in "
                            "its 'json')") from exn


def index_shards(pattern: str, classes_file: Path | None = None, num_classes: int | None = None,
                 classes: list[str] | None = None) -> ShardIndex:
    """Index the shards matched by `pattern` (one folder); classes as given, else from `classes_file`, else
    classes.txt beside the shards, else `num_classes` numbered classes, else as many as the largest label needs."""
    paths = sorted(p for p in map(Path, globlib.glob(pattern)) if p.is_file())
    if not paths:
        raise ReplayKDError(f"no shard files match {pattern!r}")
    roots = {p.parent.resolve() for p in paths}
    if len(roots) > 1:
        raise ReplayKDError(f"shards matched by {pattern!r} lie in several folders "
                            f"({', '.join(map(str, sorted(roots)))}); use one folder")
    root = roots.pop()
    info = read_info(root)
    info_splits, info_lengths = _info_files(info)
    splits: dict[str, list[IndexedSample]] = defaultdict(list)
    sizes, first_seen = {}, {}
    for path in tqdm(paths, desc="index shards", unit="shard"):
        data = path.read_bytes()
        sizes[path.name] = len(data)
        rows = splits[split_of(path.name, info_splits)]
        count = 0
        for position, sample in enumerate(iter_tar(path, data)):
            ext = image_field(sample, str(path))
            seen = (split_of(path.name, info_splits), sample.key)
            if seen in first_seen:
                raise ReplayKDError(f"sample key '{sample.key}' appears twice in split '{seen[0]}' "
                                    f"({first_seen[seen]} and {path.name}): each view's seed comes from its key, so "
                                    "keys must be unique")
            first_seen[seen] = path.name
            offset, nbytes = sample.spans[ext]
            rows.append(IndexedSample(sample.key, _label(sample, path), ext, path.name, position, offset, nbytes,
                                      crc32c(sample.fields[ext])))
            count += 1
        if path.name in info_lengths and info_lengths[path.name] != count:
            raise ReplayKDError(f"shard {path} holds {count} samples, its _info.json says {info_lengths[path.name]} "
                                "(truncated or changed)")
    needed = 1 + max(r.label for rows in splits.values() for r in rows)
    if classes is None:
        classes = _classes(root, classes_file, num_classes, needed)
    elif len(classes) < needed:
        raise ReplayKDError(f"the shards use label {needed - 1} but only {len(classes)} classes are named")
    return ShardIndex(root, classes, dict(splits), sizes, info, _sorted_warnings(splits))


def _classes(root: Path, classes_file: Path | None, num_classes: int | None, needed: int) -> list[str]:
    classes_file = Path(classes_file) if classes_file else root / CLASSES_FILE
    if classes_file.exists():
        classes = [c for c in classes_file.read_text().splitlines() if c]
        where = str(classes_file)
    else:
        classes = [str(i) for i in range(num_classes or needed)]
        where = f"--num-classes {num_classes}"
    if len(classes) < needed:
        raise ReplayKDError(f"{where} names {len(classes)} classes but the shards use label {needed - 1}")
    return classes


def _sorted_warnings(splits: dict[str, list[IndexedSample]]) -> list[str]:
    out = []
    for split, rows in splits.items():
        labels: dict[str, set] = defaultdict(set)
        for r in rows:
            labels[r.shard].add(r.label)
        single = sum(len(v) == 1 for v in labels.values())
        if len(labels) > 1 and single > SORTED_SHARE * len(labels):
            out.append(f"{single} of {len(labels)} shards of split '{split}' hold a single class: the loader shuffles "
                       "within a few shards at a time, so batches would hold few classes. Re-shuffle them into mixed "
                       "shards with `replaykd shards 'GLOB' OUT`")
    return out
