"""Index shards that already exist: which split each belongs to, its samples (key, label, where the image lies),
and the data set's classes; for a manifest of them, or to re-shuffle them into new shards.

Layouts: replaykd's own (`train-000000.tar`, `val-000000.tar`) and the public `timm/imagenet-1k-wds`
(`imagenet1k-train-0000.tar`, `imagenet1k-validation-00.tar`, an `_info.json` at the root): the split is the part
of the name before the shard number, after any data-set prefix. Where `_info.json` lists a split's files and
their lengths, it names the split and every count is checked against it.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from braceexpand import braceexpand

from replaykd import storage
from replaykd.errors import ReplayKDError
from replaykd.progress import Progress
from replaykd.reader import crc32c, image_field, iter_tar
from replaykd.storage import Location

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

    root: Location
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


def read_info(root: Location) -> dict:
    """The data set's `_info.json` (timm's wds layout), or {}."""
    for name in INFO_FILES:
        data = storage.for_root(root).read(name)
        if data is not None:
            try:
                return json.loads(data)
            except json.JSONDecodeError as exn:
                raise ReplayKDError(f"{storage.join(root, name)} is not valid JSON: {exn}") from exn
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


def _label(sample, path: Location) -> int:
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
    """Index the shards matched by `pattern` (one folder, local or an object-store URL, with globs and `{a..b}`
    braces); classes as given, else from `classes_file`, else classes.txt beside the shards, else `num_classes`
    numbered classes, else as many as the largest label needs."""
    paths = storage.expand(pattern)
    if not paths:
        raise ReplayKDError(f"no shard files match {pattern!r}")
    roots = {storage.parent(p) if storage.is_url(p) else p.parent.resolve() for p in paths}
    if len(roots) > 1:
        raise ReplayKDError(f"shards matched by {pattern!r} lie in several folders "
                            f"({', '.join(map(str, sorted(roots)))}); use one folder")
    root = roots.pop()
    where = "the class names given"
    if classes is None:  # read before the shards: a contradiction is refused before a long indexing
        classes, where = _named_classes(root, classes_file, num_classes)
    info = read_info(root)
    info_splits, info_lengths = _info_files(info)
    splits: dict[str, list[IndexedSample]] = defaultdict(list)
    sizes, first_seen = {}, {}
    for path in Progress(paths, desc="index shards", unit="shard"):
        name = storage.basename(path)
        data = storage.read_bytes(path)
        sizes[name] = len(data)
        split = split_of(name, info_splits)
        rows = splits[split]
        count = 0
        for position, sample in enumerate(iter_tar(path, data)):
            ext = image_field(sample, str(path))
            seen = (split, sample.key)
            if seen in first_seen:
                raise ReplayKDError(f"sample key '{sample.key}' appears twice in split '{seen[0]}' "
                                    f"({first_seen[seen]} and {name}): each view's seed comes from its key, so "
                                    "keys must be unique")
            first_seen[seen] = name
            offset, nbytes = sample.spans[ext]
            rows.append(IndexedSample(sample.key, _label(sample, path), ext, name, position, offset, nbytes,
                                      crc32c(sample.fields[ext])))
            count += 1
        if name in info_lengths and info_lengths[name] != count:
            raise ReplayKDError(f"shard {path} holds {count} samples, its _info.json says {info_lengths[name]} "
                                "(truncated or changed)")
    needed = 1 + max(r.label for rows in splits.values() for r in rows)
    if classes is None:
        classes = [str(i) for i in range(num_classes or needed)]
    if len(classes) < needed:
        raise ReplayKDError(f"the shards use label {needed - 1} but there are only {len(classes)} classes (from "
                            f"{where}); labels must be below the number of classes")
    return ShardIndex(root, classes, dict(splits), sizes, info, _sorted_warnings(splits))


def _named_classes(root: Location, classes_file: Path | None, num_classes: int | None) -> tuple[list[str] | None, str]:
    """The class names of `classes_file`, else of classes.txt beside the shards (None: neither), and where they
    come from; a --num-classes that contradicts them is refused."""
    if classes_file:
        text = Path(classes_file).read_text() if Path(classes_file).exists() else None
    else:
        text = storage.for_root(root).read(CLASSES_FILE)
        text = text.decode() if text is not None else None
    if text is None:
        return None, f"--num-classes {num_classes}"
    classes = [c for c in text.splitlines() if c]
    where = str(classes_file or storage.join(root, CLASSES_FILE))
    if num_classes is not None and num_classes != len(classes):
        raise ReplayKDError(f"{where} has {len(classes)} class names but --num-classes is {num_classes}: give one "
                            "that agrees with it, or drop --num-classes (the names fix the count)")
    return classes, where


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
