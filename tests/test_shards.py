"""Foundation: shards, manifests and the checked reader, on real digits and real JPEG files."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import ReplayKDError, ShardMismatch
from pipeline.manifest import Manifest
from pipeline.reader import read_shard
from pipeline.shards import prepare_out, scan_shards, write_shards
from pipeline.sources import digits_source, folder_source
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
    scanned = scan_shards(str(digits_dir / "*.tar"), tmp_path / "m")
    assert scanned.hash == written.hash
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

    from pipeline.reader import iter_tar

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
