"""Where images come from before they become shards: an ImageFolder tree or the built-in digits."""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from replaykd.errors import BadImage, ReplayKDError
from replaykd.reader import IMAGE_EXTS


@dataclass(frozen=True)
class SourceItem:
    """One image to be sharded: its key, label, extension and where its bytes are."""

    key: str
    label: int
    ext: str
    path: Path | None = None
    data: bytes | None = None
    span: tuple[int, int] | None = None  # (offset, size) of the image inside `path` (a shard)

    def read(self) -> bytes:
        """The encoded image bytes, exactly as found."""
        if self.data is not None:
            return self.data
        if self.span is None:
            return self.path.read_bytes()
        with open(self.path, "rb") as f:
            f.seek(self.span[0])
            return f.read(self.span[1])

    @property
    def origin(self) -> str:
        """What to name in an error message."""
        if self.span is not None:
            return f"{printable(str(self.path))}:{self.key}"
        return printable(str(self.path)) if self.path is not None else self.key


@dataclass
class Source:
    """Class names, items per split, and the non-image files passed over."""

    name: str
    classes: list[str]
    splits: dict[str, list[SourceItem]]
    non_images: list[Path] = field(default_factory=list)


# The most pixels an image may have (Pillow's own decompression-bomb limit): decoded it takes 4 bytes a pixel, and a
# loader worker holds at most --decode-memory (96 MB) of decoded images: a 144-megapixel PNG took 1.6 GB.
MAX_PIXELS = 89_478_485


def check_image(data: bytes, origin: str, max_pixels: int = MAX_PIXELS) -> None:
    """Decode `data` fully; a corrupt or truncated image, or one of more than `max_pixels` pixels (read from its
    header, before anything is decoded), raises an error naming `origin`."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                raise BadImage(f"cannot decode image {origin}: {im.width}x{im.height} = {im.width * im.height:,} "
                               f"pixels, over the limit of {max_pixels:,} (--max-pixels raises it)")
            im.load()
    except BadImage:
        raise
    except Exception as exn:  # PIL raises many types for bad files
        raise BadImage.of(origin, exn) from exn


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the items that go to val: `fraction` of each class, chosen by `seed`."""
    rng = np.random.default_rng([seed, 0x5EED])
    is_val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_val = int(round(len(idx) * fraction))
        is_val[rng.permutation(idx)[:n_val]] = True
    return is_val


def _split_by_fraction(items: list[SourceItem], fraction: float, seed: int) -> dict[str, list[SourceItem]]:
    if fraction <= 0:
        return {"train": items}
    is_val = stratified_split(np.array([it.label for it in items]), fraction, seed)
    return {
        "train": [it for it, v in zip(items, is_val) if not v],
        "val": [it for it, v in zip(items, is_val) if v],
    }


def digits_source(val_fraction: float, seed: int, size: int = 32) -> Source:
    """scikit-learn's handwritten digits (offline), as `size` px RGB PNGs, split train/val by `seed`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    items = []
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        gray = np.round(img * (255.0 / 16.0)).astype(np.uint8)
        im = Image.fromarray(gray, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        items.append(SourceItem(key=f"digits_{i:04d}", label=int(label), ext="png", data=buf.getvalue()))
    classes = [str(c) for c in digits.target_names]
    return Source("digits", classes, _split_by_fraction(items, val_fraction, seed))


def printable(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (a name from another encoding) written as escapes (\\xff),
    so the name still tells them apart and every manifest, key and message can hold it."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _key_for(class_name: str, rel: Path) -> str:
    # WebDataset splits a member name at the first dot of its basename, so keys must hold none.
    return re.sub(r"[.\s]", "_", printable(f"{class_name}/{rel.with_suffix('').as_posix()}"))


def _scan_class_dirs(root: Path, classes: list[str], non_images: list[Path]) -> list[SourceItem]:
    items, seen = [], set()
    for label, name in enumerate(classes):
        class_dir = root / name
        if not class_dir.is_dir():
            continue
        for f in sorted(p for p in class_dir.rglob("*") if p.is_file()):
            ext = f.suffix.lower().lstrip(".")
            if ext not in IMAGE_EXTS:
                non_images.append(f)
                continue
            key = base = _key_for(name, f.relative_to(class_dir))
            n = 1
            while key in seen:
                key, n = f"{base}_{n}", n + 1
            seen.add(key)
            items.append(SourceItem(key=key, label=label, ext=ext, path=f))
    return items


def folder_source(root: Path, val_fraction: float, seed: int) -> Source:
    """An ImageFolder tree (`root/<class>/<image>`, or `root/train/...` and `root/val/...`)."""
    root = Path(root)
    if not root.exists():
        raise ReplayKDError(f"source folder does not exist: {root}")
    if not root.is_dir():
        raise ReplayKDError(f"source is not a folder (nor 'digits'): {root}")
    has_splits = (root / "train").is_dir()
    train_root = root / "train" if has_splits else root
    classes = sorted(p.name for p in train_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ReplayKDError(f"no class folders in {train_root} (expected {train_root}/<class>/<image>)")
    non_images: list[Path] = []
    train = _scan_class_dirs(train_root, classes, non_images)
    if not train:
        raise ReplayKDError(f"no images found under {train_root} (looked for {', '.join(IMAGE_EXTS)})")
    empty = sorted(set(range(len(classes))) - {it.label for it in train})
    if empty:  # as torchvision's ImageFolder: a class with no image is a mistake, not a class
        shown = ", ".join(printable(str(train_root / classes[c])) for c in empty[:5])
        raise ReplayKDError(f"{len(empty)} class folders hold no image ({', '.join(IMAGE_EXTS)}): {shown}; add their "
                            "images or remove the folders")
    if has_splits and (root / "val").is_dir():
        extra = sorted(p.name for p in (root / "val").iterdir() if p.is_dir() and p.name not in classes)
        if extra:
            raise ReplayKDError(f"{root / 'val'} has classes not in {train_root}: {', '.join(extra[:5])}")
        splits = {"train": train, "val": _scan_class_dirs(root / "val", classes, non_images)}
    else:
        splits = _split_by_fraction(train, val_fraction, seed)
    return Source(printable(root.name), [printable(c) for c in classes], splits, non_images)


def shards_source(pattern: str, val_fraction: float, seed: int, classes: list[str] | None = None) -> Source:
    """Existing WebDataset shards (a glob), to be re-shuffled into new ones: their splits as named (`train`,
    `val`, `validation`, ...), `val_fraction` of each class held out when they hold training samples only."""
    from replaykd.shard_index import index_shards

    index = index_shards(pattern, classes=classes)
    splits = {split: [SourceItem(r.key, r.label, r.ext, path=index.root / r.shard, span=(r.offset, r.nbytes))
                      for r in rows] for split, rows in index.splits.items()}
    if list(splits) == ["train"]:
        splits = _split_by_fraction(splits["train"], val_fraction, seed)
    return Source(pattern, index.classes, splits)


def open_source(source: str, val_fraction: float, seed: int, digits_size: int = 32) -> Source:
    """`digits` for the built-in demo data; existing shards (a glob of .tar files, or a folder with a replaykd
    manifest); otherwise an ImageFolder path."""
    if not 0.0 <= val_fraction < 1.0:
        raise ReplayKDError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if source == "digits":
        return digits_source(val_fraction, seed, digits_size)
    if "://" in source or source.startswith("pipe:"):
        raise ReplayKDError(f"SOURCE {source!r}: shards are re-shuffled from local files only; copy them here first "
                            "(OUT may be a URL)")
    if any(c in source for c in "*?[") or source.endswith(".tar"):
        return shards_source(source, val_fraction, seed)
    if (Path(source) / "manifest.json").exists():
        from replaykd.manifest import Manifest

        m = Manifest.load(source)
        return shards_source(str(m.shard_root / "*.tar"), val_fraction, seed, m.classes)
    return folder_source(Path(source), val_fraction, seed)
