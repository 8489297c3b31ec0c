"""`revcol shards write | verify` against real files, a real S3 API (moto_server) and the real CLI."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline import storage
from pipeline.data.shards import (
    INDEX_NAME,
    MANIFEST_NAME,
    PARTIAL_MANIFEST_NAME,
    ShardsExistError,
    parse_splits,
    read_manifest,
    read_records,
    verify_shards,
    write_shards,
)
from pipeline.services import S3Server, free_port
from pipeline.storage import S3AccessError, make_client

REPO = Path(__file__).resolve().parents[1]

# The image folder below: 8 readable images in 3 classes, 2 unreadable image files, 1 non-image file.
FOLDER_CLASSES = ["bird", "cat", "dog"]
FOLDER_READABLE = 8


class Interrupted(Exception):
    """Raised by a test's on_shard hook to simulate a crash after some shards."""


def _noise(rng: np.random.RandomState, mode: str, size: tuple[int, int] = (20, 24)) -> Image.Image:
    h, w = size
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "CMYK": 4}[mode]
    arr = rng.randint(0, 256, size=(h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode)


def _make_image_folder(root: Path) -> Path:
    rng = np.random.RandomState(0)
    for name in FOLDER_CLASSES:
        (root / name).mkdir(parents=True)
    _noise(rng, "RGB").save(root / "bird" / "rgb.jpg", quality=90)
    _noise(rng, "RGBA").save(root / "bird" / "rgba.png")
    (root / "bird" / "notes.txt").write_text("not an image")
    _noise(rng, "L").save(root / "cat" / "gray.png")
    _noise(rng, "CMYK").save(root / "cat" / "cmyk.jpg", quality=90)
    (root / "cat" / "sub").mkdir()
    _noise(rng, "RGB").save(root / "cat" / "sub" / "nested.PNG")
    palette = _noise(rng, "RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(root / "cat" / "palette.gif", transparency=0)
    deep = Image.fromarray(rng.randint(0, 65536, size=(20, 24)).astype(np.uint16))
    deep.save(root / "dog" / "gray16.png")
    _noise(rng, "LA").save(root / "dog" / "la.png")
    (root / "dog" / "broken.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    buf = io.BytesIO()
    _noise(rng, "RGB", (64, 64)).save(buf, format="PNG")
    (root / "dog" / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_image_folder(tmp_path_factory.mktemp("images") / "src")


@pytest.fixture(scope="module")
def digits_local(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits, seed 0, 1000 samples per shard, written once for the module (tests copy it before damaging it)."""
    dest = tmp_path_factory.mktemp("digits") / "seed0"
    write_shards("digits", str(dest), shard_size=1000, seed=0, progress=False)
    return dest


def _shard_files(dest: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(dest.glob("shard-*.tar"))}


def _read_samples(tar_bytes: bytes) -> list[dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            handle = tar.extractfile(member)
            assert handle is not None
            samples.setdefault(key, {})[ext] = handle.read()
    return list(samples.values())


def _s3_objects(s3: S3Server, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
    client = s3.client()
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    return {obj["Key"].rsplit("/", 1)[-1]: obj for obj in listing.get("Contents", [])}


def _s3_get(s3: S3Server, bucket: str, key: str) -> bytes:
    return s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()


# ------------------------------------------------------------------------------------------------ local writing


def test_image_folder_local(image_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dest = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="pipeline.data.shards"):
        manifest = write_shards(str(image_folder), str(dest), shard_size=3, seed=0, progress=False)

    assert manifest["classes"] == FOLDER_CLASSES
    assert manifest["num_classes"] == 3
    assert manifest["num_samples"] == FOLDER_READABLE
    assert manifest["complete"] is True
    assert manifest["format_version"] == 1
    assert manifest["source"]["kind"] == "image_folder"
    assert manifest["skipped"] == {"not a recognisable image": 1, "truncated or corrupt image": 1}
    skip_warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skip_warnings) == 2, skip_warnings  # one per kind, with its count
    assert any("broken.jpg" in m for m in skip_warnings)
    records = list(read_records(str(dest)))
    assert [s["name"] for s in records] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s["samples"] for s in records] == [3, 3, 2]
    assert json.loads((dest / MANIFEST_NAME).read_text()) == manifest
    assert not (dest / PARTIAL_MANIFEST_NAME).exists()

    seen_sources = set()
    for record in records:
        data = (dest / record["name"]).read_bytes()
        assert len(data) == record["bytes"]
        assert hashlib.sha256(data).hexdigest() == record["sha256"]
        for sample in _read_samples(data):
            meta = json.loads(sample["json"])
            label = int(sample["cls"])
            assert FOLDER_CLASSES[label] == meta["class"] == meta["source"].split("/")[0]
            (ext,) = [e for e in sample if e in ("jpg", "png")]
            image = Image.open(io.BytesIO(sample[ext]))
            assert image.mode == "RGB"
            assert ext == ("jpg" if meta["orig_format"] == "JPEG" else "png")
            seen_sources.add(meta["source"])
    assert seen_sources == {
        "bird/rgb.jpg", "bird/rgba.png", "cat/gray.png", "cat/cmyk.jpg", "cat/sub/nested.PNG", "cat/palette.gif",
        "dog/gray16.png", "dog/la.png",
    }
    # an RGB JPEG is stored unchanged
    original = (image_folder / "bird" / "rgb.jpg").read_bytes()
    stored = [s for r in records for s in _read_samples((dest / r["name"]).read_bytes())]
    assert any(s.get("jpg") == original for s in stored)

    report = verify_shards(str(dest), progress=False)
    assert report["ok"] is True and report["ok_shards"] == 3 and report["bad_shards"] == {}
    assert report["samples_read"] == FOLDER_READABLE


def test_webdataset_reads_the_shards(image_folder: Path, tmp_path: Path) -> None:
    import webdataset as wds

    write_shards(str(image_folder), str(tmp_path), shard_size=4, progress=False)
    urls = [str(p) for p in sorted(tmp_path.glob("shard-*.tar"))]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg;png", "cls", "json")
    rows = list(dataset)
    assert len(rows) == FOLDER_READABLE
    for image, label, meta in rows:
        assert image.mode == "RGB" and label == FOLDER_CLASSES.index(meta["class"])


def test_shard_bytes_cap(image_folder: Path, tmp_path: Path) -> None:
    cap = 8 * 1024
    manifest = write_shards(str(image_folder), str(tmp_path), shard_size=100, shard_bytes=cap, progress=False)
    records = list(read_records(str(tmp_path)))
    assert manifest["num_shards"] == len(records) > 1
    for record in records:
        data = (tmp_path / record["name"]).read_bytes()
        payload = len(data.rstrip(b"\0"))  # the end-of-archive blocks and record padding are zeros
        assert record["samples"] == 1 or payload <= cap, record


def test_digits_deterministic(digits_local: Path, tmp_path: Path) -> None:
    manifest = read_manifest(str(digits_local))
    assert manifest["num_samples"] == 1797
    assert manifest["classes"] == [str(i) for i in range(10)]
    assert manifest["seed"] == 0 and manifest["shard_size"] == 1000 and manifest["shard_bytes"] is None
    assert [s["samples"] for s in read_records(str(digits_local))] == [1000, 797]
    assert manifest["source"]["kind"] == "digits" and manifest["source"]["split"] is None
    sample = _read_samples((digits_local / "shard-000000.tar").read_bytes())[0]
    image = Image.open(io.BytesIO(sample["png"]))
    assert image.size == (8, 8) and image.mode == "RGB"
    reference = _shard_files(digits_local)
    with tarfile.open(digits_local / "shard-000000.tar") as tar:
        member = tar.getmembers()[0]
        assert (member.mtime, member.uid, member.gid, member.uname, member.mode) == (0, 0, 0, "revcol", 0o444)

    write_shards("digits", str(tmp_path / "again"), shard_size=1000, seed=0, progress=False)
    assert _shard_files(tmp_path / "again") == reference
    assert (tmp_path / "again" / MANIFEST_NAME).read_bytes() == (digits_local / MANIFEST_NAME).read_bytes()

    other = write_shards("digits", str(tmp_path / "seed1"), shard_size=1000, seed=1, progress=False)
    assert [s["sha256"] for s in read_records(str(tmp_path / "seed1"))] != [
        s["sha256"] for s in read_records(str(digits_local))]
    assert other["fingerprint"] != manifest["fingerprint"]
    assert other["num_samples"] == 1797


def test_digits_splits(tmp_path: Path) -> None:
    fractions = "pretrain=0.6,finetune=0.2,test=0.2"
    sources: dict[str, list[str]] = {}
    for name in ("pretrain", "finetune", "test"):
        dest = tmp_path / name
        manifest = write_shards(
            "digits", str(dest), shard_size=2000, seed=3, split=name, splits=fractions, progress=False
        )
        assert manifest["source"]["split"] == {"name": name, "fractions": parse_splits(fractions), "seed": 0}
        samples = _read_samples((dest / "shard-000000.tar").read_bytes())
        sources[name] = [json.loads(s["json"])["source"] for s in samples]
        labels = [int(s["cls"]) for s in samples]
        assert set(labels) == set(range(10))  # stratified: every class in every split
    sizes = {k: len(v) for k, v in sources.items()}
    assert sum(sizes.values()) == 1797
    assert abs(sizes["pretrain"] - 0.6 * 1797) <= 10 and abs(sizes["test"] - 0.2 * 1797) <= 10
    all_sources = [s for v in sources.values() for s in v]
    assert len(set(all_sources)) == 1797  # disjoint and covering

    # the partition does not depend on the shuffle seed
    again = write_shards("digits", str(tmp_path / "t2"), shard_size=2000, seed=9, split="test", splits=fractions,
                         progress=False)
    samples = _read_samples((tmp_path / "t2" / "shard-000000.tar").read_bytes())
    assert sorted(json.loads(s["json"])["source"] for s in samples) == sorted(sources["test"])
    assert again["num_samples"] == sizes["test"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "val"}, "'val' is not one of the splits"),
        ({"split": "a", "splits": "a=0.5,b=0.2"}, "sum to 1"),
        ({"split": "a", "splits": "a=x,b=1"}, "'x'"),
        ({"splits": "a=0.5,b=0.5"}, "without split"),
        ({"shard_size": 0}, "shard_size"),
    ],
)
def test_bad_split_and_size_arguments(kwargs: dict[str, Any], match: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=match):
        write_shards("digits", str(tmp_path), progress=False, **kwargs)


def test_bad_sources(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        write_shards(str(missing), str(tmp_path / "o1"), progress=False)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no class subfolders"):
        write_shards(str(flat), str(tmp_path / "o2"), progress=False)
    tree = tmp_path / "tree"
    (tree / "good").mkdir(parents=True)
    (tree / "empty").mkdir()
    (tree / "textonly").mkdir()
    (tree / "textonly" / "a.txt").write_text("x")
    Image.new("RGB", (4, 4)).save(tree / "good" / "a.png")
    with pytest.raises(ValueError, match="'empty', 'textonly'"):
        write_shards(str(tree), str(tmp_path / "o3"), progress=False)
    allbad = tmp_path / "allbad"
    (allbad / "c").mkdir(parents=True)
    (allbad / "c" / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no readable images"):
        write_shards(str(allbad), str(tmp_path / "o4"), progress=False)


# -------------------------------------------------------------------------------------- verify, resume, force


def test_verify_detects_damage_local(image_folder: Path, tmp_path: Path) -> None:
    write_shards(str(image_folder), str(tmp_path), shard_size=2, progress=False)
    names = [s["name"] for s in read_records(str(tmp_path))]
    assert len(names) == 4
    data0 = (tmp_path / names[0]).read_bytes()
    (tmp_path / names[0]).write_bytes(data0[: len(data0) // 3])  # truncated
    data1 = bytearray((tmp_path / names[1]).read_bytes())
    data1[-1] ^= 0xFF  # same size, different content (in the end-of-archive padding)
    (tmp_path / names[1]).write_bytes(bytes(data1))
    (tmp_path / names[2]).unlink()  # missing
    # shard 3: a valid tar whose first image does not decode
    samples = _read_samples((tmp_path / names[3]).read_bytes())
    with tarfile.open(tmp_path / names[3], "w") as tar:
        for i, sample in enumerate(samples):
            for ext, value in sorted(sample.items()):
                if i == 0 and ext in ("jpg", "png"):
                    value = b"\x89PNG garbage" * 4
                info = tarfile.TarInfo(f"{i:08d}.{ext}")
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
    (tmp_path / "shard-000099.tar").write_bytes(b"")

    report = verify_shards(str(tmp_path), progress=False)
    assert report["ok"] is False
    assert report["ok_shards"] == 0
    bad = report["bad_shards"]
    assert set(bad) == set(names)
    assert bad[names[0]].startswith("truncated")
    assert "sha256 mismatch" in bad[names[1]]
    assert bad[names[2]] == "missing"
    assert "undecodable" in bad[names[3]] and "00000000" in bad[names[3]]
    assert report["extra_files"] == ["shard-000099.tar"]


def test_index_beside_a_small_header(image_folder: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    manifest = write_shards(str(image_folder), str(tmp_path), shard_size=3, progress=False)
    assert manifest["manifest_version"] == 2 and manifest["num_shards"] == 3 and "shards" not in manifest
    index = (tmp_path / INDEX_NAME).read_bytes()
    assert manifest["index"] == {"name": INDEX_NAME, "bytes": len(index), "sha256": hashlib.sha256(index).hexdigest()}
    table = pq.read_table(tmp_path / INDEX_NAME)
    assert table.column_names == ["samples", "bytes", "sha256", "source_start", "source_stop", "skipped"]
    assert table.column("samples").to_pylist() == [3, 3, 2]
    assert [d.hex() for d in table.column("sha256").to_pylist()] == [
        hashlib.sha256((tmp_path / f"shard-00000{i}.tar").read_bytes()).hexdigest() for i in range(3)]
    # The stream's dataset fingerprint, recorded once: the digest of every shard's name, sha256 and samples.
    listed = [[r["name"], r["sha256"], r["samples"]] for r in read_records(str(tmp_path))]
    assert manifest["shards_fingerprint"] == hashlib.sha256(json.dumps(listed).encode()).hexdigest()[:32]


def test_version1_manifest_still_read_and_upgraded(image_folder: Path, tmp_path: Path, as_version1: Any) -> None:
    write_shards(str(image_folder), str(tmp_path), shard_size=3, progress=False)
    records = list(read_records(str(tmp_path)))
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*.tar")}
    old = as_version1(tmp_path)
    assert list(read_records(str(tmp_path))) == records == old["shards"]
    report = verify_shards(str(tmp_path), progress=False)
    assert report["ok"] and report["ok_shards"] == 3 and report["samples_read"] == FOLDER_READABLE
    (tmp_path / "shard-000002.tar").write_bytes(b"damaged")
    assert verify_shards(str(tmp_path), progress=False)["bad_shards"]["shard-000002.tar"].startswith("truncated")

    # Rerunning the write that made it rewrites the damaged shard and the manifest as version 2; the rest stays.
    manifest = write_shards(str(image_folder), str(tmp_path), shard_size=3, progress=False)
    assert manifest["manifest_version"] == 2 and (tmp_path / INDEX_NAME).exists()
    assert manifest["fingerprint"] == old["fingerprint"] and list(read_records(str(tmp_path))) == records
    assert {n: s for n, s in stamps.items() if n != "shard-000002.tar"} == {
        p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*.tar") if p.name != "shard-000002.tar"}
    assert verify_shards(str(tmp_path), progress=False)["ok"]


def test_bad_index_or_version_named(image_folder: Path, tmp_path: Path) -> None:
    manifest = write_shards(str(image_folder), str(tmp_path), shard_size=3, progress=False)
    index = tmp_path / INDEX_NAME
    good = index.read_bytes()
    index.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(ValueError, match=f"{INDEX_NAME}.*is not the index"):
        verify_shards(str(tmp_path), progress=False)
    index.unlink()
    with pytest.raises(FileNotFoundError, match=f"{INDEX_NAME}.*missing"):
        list(read_records(str(tmp_path)))
    assert write_shards(str(image_folder), str(tmp_path), shard_size=3, progress=False) == manifest  # repaired
    assert index.read_bytes() == good

    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**manifest, "manifest_version": 3}))
    with pytest.raises(ValueError, match="manifest_version 3"):
        read_manifest(str(tmp_path))
    old = {k: v for k, v in manifest.items() if k not in ("manifest_version", "num_shards", "index")}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**old, "shards": [{"name": "shard-000007.tar"}]}))
    with pytest.raises(ValueError, match="shard record 0 is 'shard-000007.tar', expected 'shard-000000.tar'"):
        verify_shards(str(tmp_path), progress=False)


def test_partial_manifest_is_saved_first_then_throttled_and_on_error(tmp_path: Path) -> None:
    """The partial manifest lists every shard so far: saved after the first shard, then at most every 30 s (here
    never again: the write takes seconds), not after each shard; a write stopped by an error saves it on the way out."""
    dest = tmp_path / "throttled"
    listed: list[int] = []

    def crash_after_50(record: dict[str, Any]) -> None:
        listed.append(len(json.loads((dest / PARTIAL_MANIFEST_NAME).read_text())["shards"]))
        if len(listed) == 50:
            raise Interrupted

    with pytest.raises(Interrupted):
        write_shards("digits", str(dest), shard_size=10, seed=0, progress=False, on_shard=crash_after_50)
    assert set(listed) == {1}, listed  # written once in 50 shards
    assert len(json.loads((dest / PARTIAL_MANIFEST_NAME).read_text())["shards"]) == 50  # saved on the error
    manifest = write_shards("digits", str(dest), shard_size=10, seed=0, progress=False)
    assert manifest["num_shards"] == 180 and not (dest / PARTIAL_MANIFEST_NAME).exists()


def test_resume_local_keeps_finished_shards(digits_local: Path, tmp_path: Path) -> None:
    dest = tmp_path / "resumed"
    done: list[str] = []

    def crash_after_first(record: dict[str, Any]) -> None:
        done.append(record["name"])
        raise Interrupted

    with pytest.raises(Interrupted):
        write_shards("digits", str(dest), shard_size=1000, seed=0, progress=False, on_shard=crash_after_first)
    assert done == ["shard-000000.tar"]
    assert not (dest / MANIFEST_NAME).exists()
    partial = json.loads((dest / PARTIAL_MANIFEST_NAME).read_text())
    assert partial["complete"] is False and len(partial["shards"]) == 1
    first = dest / "shard-000000.tar"
    stamp = first.stat().st_mtime_ns
    inode = first.stat().st_ino

    written: list[str] = []
    manifest = write_shards("digits", str(dest), shard_size=1000, seed=0, progress=False,
                            on_shard=lambda r: written.append(r["name"]))
    assert written == ["shard-000001.tar"]  # the finished shard was not rewritten
    assert (first.stat().st_mtime_ns, first.stat().st_ino) == (stamp, inode)
    assert _shard_files(dest) == _shard_files(digits_local)
    assert manifest == read_manifest(str(digits_local))
    assert not (dest / PARTIAL_MANIFEST_NAME).exists()
    assert not list(dest.glob(".*"))  # no temporary files left

    # a damaged finished shard is rewritten (identically) by the next write; intact ones are kept
    (dest / "shard-000001.tar").write_bytes(b"damaged")
    rewritten = write_shards("digits", str(dest), shard_size=1000, seed=0, progress=False)
    assert rewritten == manifest
    assert _shard_files(dest) == _shard_files(digits_local)
    assert first.stat().st_mtime_ns == stamp


def test_refuses_to_overwrite_a_different_dataset(image_folder: Path, tmp_path: Path) -> None:
    write_shards(str(image_folder), str(tmp_path), shard_size=3, seed=0, progress=False)
    with pytest.raises(ShardsExistError, match=str(tmp_path)):
        write_shards(str(image_folder), str(tmp_path), shard_size=3, seed=1, progress=False)
    with pytest.raises(ShardsExistError, match="force"):
        write_shards(str(image_folder), str(tmp_path), shard_size=8, seed=0, progress=False)
    assert read_manifest(str(tmp_path))["seed"] == 0  # untouched

    manifest = write_shards(str(image_folder), str(tmp_path), shard_size=8, seed=1, force=True, progress=False)
    assert manifest["seed"] == 1
    assert sorted(p.name for p in tmp_path.glob("shard-*.tar")) == ["shard-000000.tar"]  # old shards removed
    assert verify_shards(str(tmp_path), progress=False)["ok"]

    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "shard-000000.tar").write_bytes(b"old")
    with pytest.raises(ShardsExistError, match="without a manifest"):
        write_shards(str(image_folder), str(stray), progress=False)


# ----------------------------------------------------------------------------------------------------------- S3


def test_s3_write_verify_multipart(
    digits_local: Path, s3_server: S3Server, s3_bucket: str, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "MULTIPART_BYTES", 5 * 1024 * 1024)  # S3's smallest part size
    url = f"s3://{s3_bucket}/datasets/digits"
    manifest = write_shards("digits", url, shard_size=1000, seed=0, progress=False)
    assert manifest == read_manifest(str(digits_local))
    objects = _s3_objects(s3_server, s3_bucket, "datasets/digits")
    assert sorted(objects) == [MANIFEST_NAME, "shard-000000.tar", "shard-000001.tar", INDEX_NAME]
    assert "-" in objects["shard-000000.tar"]["ETag"]  # 6 MB shard: uploaded in parts
    for name, data in _shard_files(digits_local).items():
        assert _s3_get(s3_server, s3_bucket, f"datasets/digits/{name}") == data

    report = verify_shards(url, progress=False)
    assert report["ok"] and report["ok_shards"] == 2 and report["samples_read"] == 1797


def test_s3_verify_detects_damage(image_folder: Path, s3_server: S3Server, s3_bucket: str, s3_env: dict[str, str]) -> None:
    url = f"s3://{s3_bucket}/imgs"
    write_shards(str(image_folder), url, shard_size=3, progress=False)
    names = [s["name"] for s in read_records(url)]
    client = s3_server.client()
    data0 = _s3_get(s3_server, s3_bucket, f"imgs/{names[0]}")
    client.put_object(Bucket=s3_bucket, Key=f"imgs/{names[0]}", Body=data0[:1000])
    data1 = bytearray(_s3_get(s3_server, s3_bucket, f"imgs/{names[1]}"))
    data1[-1] ^= 0x01
    client.put_object(Bucket=s3_bucket, Key=f"imgs/{names[1]}", Body=bytes(data1))
    client.delete_object(Bucket=s3_bucket, Key=f"imgs/{names[2]}")

    report = verify_shards(url, progress=False)
    assert report["ok"] is False and report["ok_shards"] == 0
    assert report["bad_shards"][names[0]].startswith("truncated")
    assert "sha256 mismatch" in report["bad_shards"][names[1]]
    assert report["bad_shards"][names[2]] == "missing"


def test_s3_resume_keeps_finished_shards(
    image_folder: Path, tmp_path: Path, s3_server: S3Server, s3_bucket: str, s3_env: dict[str, str]
) -> None:
    url = f"s3://{s3_bucket}/resume"
    calls = 0

    def crash_after_two(record: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        write_shards(str(image_folder), url, shard_size=2, progress=False, on_shard=crash_after_two)
    before = _s3_objects(s3_server, s3_bucket, "resume")
    assert sorted(before) == [PARTIAL_MANIFEST_NAME, "shard-000000.tar", "shard-000001.tar"]
    time.sleep(1.1)  # LastModified has one-second resolution: a rewrite would show

    written: list[str] = []
    write_shards(str(image_folder), url, shard_size=2, progress=False, on_shard=lambda r: written.append(r["name"]))
    assert written == ["shard-000002.tar", "shard-000003.tar"]
    after = _s3_objects(s3_server, s3_bucket, "resume")
    assert sorted(after) == [MANIFEST_NAME] + [f"shard-00000{i}.tar" for i in range(4)] + [INDEX_NAME]
    for name in ("shard-000000.tar", "shard-000001.tar"):
        assert after[name]["LastModified"] == before[name]["LastModified"]
        assert after[name]["ETag"] == before[name]["ETag"]

    write_shards(str(image_folder), str(tmp_path), shard_size=2, progress=False)
    assert list(read_records(url)) == list(read_records(str(tmp_path)))
    for name, data in _shard_files(tmp_path).items():
        assert _s3_get(s3_server, s3_bucket, f"resume/{name}") == data


def test_s3_refuses_different_dataset(image_folder: Path, s3_bucket: str, s3_env: dict[str, str]) -> None:
    url = f"s3://{s3_bucket}/x"
    write_shards(str(image_folder), url, shard_size=4, seed=0, progress=False)
    with pytest.raises(ShardsExistError, match=url):
        write_shards(str(image_folder), url, shard_size=4, seed=5, progress=False)
    assert write_shards(str(image_folder), url, shard_size=4, seed=5, force=True, progress=False)["seed"] == 5


def test_s3_access_errors(s3_server: S3Server, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(S3AccessError, match="does not exist"):
        write_shards("digits", "s3://no-such-bucket-here/x", progress=False)
    s3_server.create_bucket("empty-bucket")
    with pytest.raises(FileNotFoundError, match="no shards manifest"):
        verify_shards("s3://empty-bucket/nothing", progress=False)

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(S3AccessError, match="unreachable"):
        verify_shards("s3://bucket/x", progress=False)
    assert time.monotonic() - started < 10
    with pytest.raises(ValueError, match="secret"):
        make_client(environ={"AWS_ACCESS_KEY_ID": "only-the-id"})


# ----------------------------------------------------------------------------------------------------------- CLI


def _revcol(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=REPO, env=full_env, capture_output=True, text=True,
        timeout=180,
    )


def test_cli_end_to_end(image_folder: Path, tmp_path: Path) -> None:
    dest = tmp_path / "cli"
    done = _revcol("shards", "write", str(image_folder), str(dest), "--shard-size", "3", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["shards"] == 3 and summary["samples"] == FOLDER_READABLE and summary["num_classes"] == 3

    checked = _revcol("shards", "verify", str(dest), "--json")
    assert checked.returncode == 0, checked.stderr
    report = json.loads(checked.stdout.strip().splitlines()[-1])
    assert report["ok"] is True and report["ok_shards"] == 3

    (dest / "shard-000001.tar").unlink()
    failed = _revcol("shards", "verify", str(dest))
    assert failed.returncode == 1
    assert "BAD shard-000001.tar: missing" in failed.stderr

    refused = _revcol("shards", "write", str(image_folder), str(dest), "--seed", "7", "--json")
    assert refused.returncode == 2
    assert str(dest) in refused.stderr and "--force" in refused.stderr


def test_cli_split_to_s3(s3_bucket: str, s3_env: dict[str, str]) -> None:
    url = f"s3://{s3_bucket}/digits-test"
    done = _revcol(
        "shards", "write", "digits", url, "--split", "test", "--splits", "pretrain=0.6,finetune=0.2,test=0.2",
        "--json", env=s3_env,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["split"] == "test" and 340 <= summary["samples"] <= 380
    checked = _revcol("shards", "verify", url, "--json", env=s3_env)
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout.strip().splitlines()[-1])["samples_read"] == summary["samples"]


def test_cli_bad_input_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main

    assert main(["shards", "write", str(tmp_path / "missing-folder"), str(tmp_path / "o")]) == 2
    assert "missing-folder" in capsys.readouterr().err
    assert main(["shards", "verify", str(tmp_path / "nothing-here")]) == 2
    assert "no shards manifest" in capsys.readouterr().err


def test_source_ranges_cover_every_item(image_folder: Path, tmp_path: Path) -> None:
    write_shards(str(image_folder), str(tmp_path), shard_size=1, seed=4, progress=False)
    records = list(read_records(str(tmp_path)))
    ranges = [s["source_range"] for s in records]
    assert [s["samples"] for s in records] == [1] * FOLDER_READABLE
    assert ranges[0][0] == 0 and ranges[-1][1] == FOLDER_READABLE + 2  # the 2 unreadable files count too
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert sum(sum(s.get("skipped", {}).values()) for s in records) == 2
