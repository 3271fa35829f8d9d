"""Foundation: shards, manifests and the checked reader, on real digits and real JPEG files."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from replaykd.errors import ReplayKDError, ShardMismatch
from replaykd.manifest import Manifest
from replaykd.reader import read_shard
from replaykd.shards import prepare_out, scan_shards, write_shards
from replaykd.sources import digits_source, folder_source
from tests.conftest import run_cli


def test_digits_round_trip(digits_dir):
    m = Manifest.load(digits_dir)
    src = digits_source(0.2, seed=0, size=16)
    by_key = {it.key: it for items in src.splits.values() for it in items}
    assert m.count("train") + m.count("val") == 1797
    for split in ("train", "val"):
        seen = []
        for shard in m.shards(split):
            for rec in read_shard(m, split, shard):
                assert rec.data == by_key[rec.key].data
                assert rec.label == by_key[rec.key].label
                seen.append(rec.index)
        assert seen == list(range(m.count(split)))
    # shuffled across shards: every shard holds several classes
    for shard in m.shards("train"):
        assert len(set(m.shard_rows("train", shard).column("label").to_pylist())) >= 5


def test_manifest_hash_depends_on_seed_only(tmp_path, digits_dir):
    again = write_shards(digits_source(0.2, seed=0, size=16), tmp_path / "a", 200, 0, False)[0]
    other = write_shards(digits_source(0.2, seed=1, size=16), tmp_path / "b", 200, 1, False)[0]
    assert again.hash == Manifest.load(digits_dir).hash
    assert other.hash != again.hash


def _jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (24, 20, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture()
def image_folder(tmp_path):
    root = tmp_path / "folder"
    for c, name in enumerate(["cat", "dog", "eel"]):
        (root / name).mkdir(parents=True)
        for i in range(5):
            (root / name / f"img.{i}.jpg").write_bytes(_jpeg(10 * c + i))
    (root / "dog" / "broken.jpg").write_bytes(_jpeg(99)[:200])
    (root / "eel" / "notes.txt").write_text("not an image")
    return root


def test_folder_corrupt_image_is_an_error_naming_it(image_folder, tmp_path):
    proc = run_cli("shards", image_folder, tmp_path / "out", check=False)
    assert proc.returncode == 2
    assert "broken.jpg" in proc.stderr


def test_folder_skip_bad_keeps_jpeg_bytes(image_folder, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("shards", image_folder, out, "--skip-bad", "--shard-size", "4", "--val-fraction", "0")
    assert "skipped 1 non-image" in proc.stdout and "skipped 1 images" in proc.stdout
    m = Manifest.load(out)
    assert m.classes == ["cat", "dog", "eel"] and m.count("train") == 15
    files = {f"{p.parent.name}/{p.name.split('.jpg')[0].replace('.', '_')}": p.read_bytes()
             for p in image_folder.rglob("img*.jpg")}
    for shard in m.shards("train"):
        for rec in read_shard(m, "train", shard):
            assert rec.data == files[rec.key]  # copied, never re-encoded
            assert m.classes[rec.label] == rec.key.split("/")[0]


@pytest.mark.parametrize("args, message", [
    (["shards", "/nonexistent/images", "OUT"], "does not exist"),
    (["shards", "digits", "OUT", "--val-fraction", "1.5"], "--val-fraction"),
    (["manifest", "/nonexistent/*.tar", "OUT"], "no shard files match"),
])
def test_bad_input_messages(tmp_path, args, message):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2 and message in proc.stderr


def test_empty_folder_and_existing_out(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReplayKDError, match="no class folders"):
        folder_source(tmp_path / "empty", 0.2, 0)
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(ReplayKDError, match="no images"):
        folder_source(tmp_path / "empty", 0.2, 0)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ReplayKDError, match="not empty"):
        prepare_out(tmp_path / "out", overwrite=False)
    prepare_out(tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "keep.txt").exists()  # only our own files are removed


def test_manifest_of_existing_shards_matches(digits_dir, tmp_path):
    written = Manifest.load(digits_dir)
    scanned, warnings = scan_shards(str(digits_dir / "*.tar"), tmp_path / "m")
    assert scanned.hash == written.hash and warnings == []
    for split in written.tables:
        assert scanned.table(split).equals(written.table(split))
    assert Manifest.load(tmp_path / "m").shard_root == digits_dir.resolve()


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def _rewrite(src, dst, change):
    with tarfile.open(src) as tin:
        members = [(m, tin.extractfile(m).read()) for m in tin.getmembers()]
    members = change(members)
    with tarfile.open(dst, "w") as tout:
        for m, data in members:
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))


@pytest.mark.parametrize("change, message", [
    (lambda ms: [(m, _flip_last_byte(d) if m.name.endswith(".png") and i in (6, 7) else d) for i, (m, d) in enumerate(ms)], "differs"),
    (lambda ms: ms[2:4] + ms[:2] + ms[4:], "reordered"),
    (lambda ms: ms[:-4], "truncated"),
])
def test_changed_shard_is_detected(digits_dir, tmp_path, change, message):
    m = Manifest.load(digits_dir)
    shard = m.shards("train")[1]
    (tmp_path / "shards").mkdir()
    for s in m.shards("train"):
        (tmp_path / "shards" / s).write_bytes(m.shard_path(s).read_bytes())
    _rewrite(m.shard_path(shard), tmp_path / "shards" / shard, change)
    moved = Manifest.load(digits_dir, shard_root=tmp_path / "shards")
    read_shard(moved, "train", m.shards("train")[0])  # untouched shards still read
    with pytest.raises(ShardMismatch, match=message) as err:
        read_shard(moved, "train", shard)
    assert shard in str(err.value)


def test_cut_tar_is_detected(digits_dir, tmp_path):
    m = Manifest.load(digits_dir)
    shard = m.shards("train")[0]
    data = m.shard_path(shard).read_bytes()
    (tmp_path / shard).write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardMismatch, match=shard):
        read_shard(Manifest.load(digits_dir, shard_root=tmp_path), "train", shard)


@pytest.mark.parametrize("fmt", ["pax", "gnu", "ustar"])
def test_the_tar_reader_agrees_with_webdataset(tmp_path, fmt):
    import webdataset as wds

    from replaykd.reader import iter_tar

    path = tmp_path / "s.tar"
    samples = [(f"c{i % 3}/{'deep/' * (i % 2) * 12}img_{i:04d}{'x' * (i * 7 % 60)}", _jpeg(i)) for i in range(30)]
    with tarfile.open(path, "w", format={"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT,
                                         "ustar": tarfile.USTAR_FORMAT}[fmt]) as tar:
        for key, data in samples:
            for ext, payload in (("jpg", data), ("cls", b"1")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(payload), 1.5 if fmt == "pax" else 0  # a float mtime: a pax header each
                tar.addfile(info, io.BytesIO(payload))
    ours = [(s.key, s.fields) for s in iter_tar(path)]
    theirs = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
              for s in wds.tariterators.tarfile_samples([{"url": str(path)}])]
    assert ours == theirs and len(ours) == 30 and max(len(k) for k, _ in ours) > 100


def test_written_shards_have_no_pax_headers(digits_dir):
    m = Manifest.load(digits_dir)
    with tarfile.open(m.shard_path(m.shards("train")[0])) as tar:
        assert not any(member.pax_headers for member in tar.getmembers())


def wds_layout(out, digits_dir, per_shard=100, class_sorted=False, limit=None):
    """Digits as shards in the public timm/imagenet-1k-wds layout: imagenet1k-{split}-NNNN.tar, members KEY.jpg,
    KEY.cls, KEY.json, and an _info.json at the root (`limit` training images, a quarter as many for validation)."""
    import json

    import webdataset as wds

    m = Manifest.load(digits_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = {"name": "imagenet-1k-digits", "splits": {}}
    for split, name in (("train", "train"), ("val", "validation")):
        records = [r for shard in m.shards(split) for r in read_shard(m, split, shard)]
        records = records[:None if limit is None else limit // (1 if split == "train" else 4)]
        if class_sorted:
            records.sort(key=lambda r: r.label)
        files, lengths = [], []
        for i in range(0, len(records), per_shard):
            f = f"imagenet1k-{name}-{i // per_shard:04d}.tar"
            with wds.TarWriter(str(out / f), mtime=0) as w:
                for r in records[i:i + per_shard]:
                    jpg = io.BytesIO()
                    Image.open(io.BytesIO(r.data)).convert("RGB").save(jpg, format="JPEG", quality=95)
                    w.write({"__key__": f"n{r.label:08d}_{r.index}", "jpg": jpg.getvalue(), "cls": str(r.label),
                             "json": json.dumps({"label": r.label, "filename": r.key})})
            files.append(f)
            lengths.append(len(records[i:i + per_shard]))
        info["splits"][name] = {"name": name, "filenames": files, "shard_lengths": lengths,
                                "num_samples": sum(lengths)}
    (out / "_info.json").write_text(json.dumps(info))
    return out


def test_the_imagenet_1k_wds_layout_is_indexed_with_its_splits(digits_dir, tmp_path):
    wds_dir = wds_layout(tmp_path / "wds", digits_dir)
    proc = run_cli("manifest", str(wds_dir / "imagenet1k-*.tar"), tmp_path / "m", "--num-classes", "1000")
    m = Manifest.load(tmp_path / "m")
    assert sorted(m.tables) == ["train", "validation"] and m.num_classes == 1000
    assert m.count("train") == Manifest.load(digits_dir).count("train") and "warning" not in proc.stderr
    assert m.eval_split("val") == "validation" and m.eval_split("none") is None
    with pytest.raises(ReplayKDError, match="no split 'test' to evaluate on .*train, validation.*--eval-split none"):
        m.eval_split("test")
    # _info.json's lengths are checked: a shard with fewer samples than it says is named
    info = json.loads((wds_dir / "_info.json").read_text())
    info["splits"]["train"]["shard_lengths"][1] += 1
    (wds_dir / "_info.json").write_text(json.dumps(info))
    proc = run_cli("manifest", str(wds_dir / "imagenet1k-*.tar"), tmp_path / "m2", check=False)
    assert proc.returncode == 2 and "imagenet1k-train-0001.tar holds 100 samples, its _info.json says 101" in proc.stderr


def test_duplicate_keys_are_refused(digits_dir, tmp_path):
    src = digits_dir / Manifest.load(digits_dir).shards("train")[0]
    (tmp_path / "a").mkdir()
    for name in ("train-000000.tar", "train-000001.tar"):
        (tmp_path / "a" / name).write_bytes(src.read_bytes())
    proc = run_cli("manifest", str(tmp_path / "a" / "*.tar"), tmp_path / "m", check=False)
    assert proc.returncode == 2 and "appears twice in split 'train' (train-000000.tar and train-000001.tar)" in proc.stderr


def test_class_sorted_shards_are_warned_about_and_reshuffled(digits_dir, tmp_path):
    wds_dir = wds_layout(tmp_path / "sorted", digits_dir, per_shard=40, class_sorted=True)
    proc = run_cli("manifest", str(wds_dir / "imagenet1k-*.tar"), tmp_path / "m")
    assert "shards of split 'train' hold a single class" in proc.stderr and "replaykd shards" in proc.stderr
    run_cli("shards", str(wds_dir / "imagenet1k-*.tar"), tmp_path / "mixed", "--shard-size", "200")
    mixed, before = Manifest.load(tmp_path / "mixed"), Manifest.load(tmp_path / "m")
    assert sorted(mixed.tables) == ["train", "validation"] and mixed.count("train") == before.count("train")
    for shard in mixed.shards("train"):
        assert len(set(mixed.shard_rows("train", shard).column("label").to_pylist())) >= 5
    # the images are carried over byte for byte
    old = {r.key: r.data for s in before.shards("train") for r in read_shard(before, "train", s)}
    assert all(old[r.key] == r.data for s in mixed.shards("train") for r in read_shard(mixed, "train", s))


def test_an_image_folder_with_names_in_another_encoding_and_an_empty_class(tmp_path):
    # a file name that is not UTF-8 (Latin-1 bytes) ended in a 40-line pyarrow UnicodeEncodeError traceback
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / cls / f"{i}.png")
    Image.new("RGB", (8, 8)).save(os.fsdecode(bytes(root / "a") + b"/caf\xe9.png"))  # "café" in Latin-1
    proc = run_cli("shards", root, tmp_path / "out", "--shard-size", 4, "--val-fraction", 0)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    keys = pq.read_table(tmp_path / "out" / "train.parquet").column("key").to_pylist()
    assert "a/caf\\xe9" in keys and len(keys) == 7  # the byte kept, written as an escape
    # an empty class folder is a mistake, not a class with no samples (as torchvision's ImageFolder says)
    (root / "c").mkdir()
    proc = run_cli("shards", root, tmp_path / "out2", check=False)
    assert proc.returncode == 2 and "1 class folders hold no image (" in proc.stderr and f"{root / 'c'}" in proc.stderr


def test_images_over_the_pixel_limit_are_refused_by_name(digits_dir, tmp_path):
    # a decompression bomb (a 144-megapixel PNG passed with Pillow's warnings and took 1.6 GB to decode) is refused
    # from its header; the limit, Pillow's own by default, is an option (here below the digits' 16 x 16)
    proc = run_cli("shards", "digits", tmp_path / "out", "--digits-size", 16, "--max-pixels", 200, check=False)
    assert proc.returncode == 2 and "16x16 = 256 pixels, over the limit of 200 (--max-pixels raises it)" in proc.stderr
    proc = run_cli("manifest", f"{digits_dir}/*.tar", tmp_path / "m", "--max-pixels", 200, check=False)
    assert proc.returncode == 2 and "images do not decode: train-000000.tar:" in proc.stderr, proc.stderr
    assert "(16x16 = 256 pixels, over the limit of 200" in proc.stderr
    assert "manifest of" in run_cli("manifest", f"{digits_dir}/*.tar", tmp_path / "m").stdout  # within the default
