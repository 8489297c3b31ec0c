"""The Ray Data input stream against a real local Ray cluster, real shards and a real S3 API (moto_server).

One Ray cluster for the module (4 logical CPUs, private temp dir); small digits shards at 32 px keep it fast.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig, S3Config
from pipeline.data.shards import read_records, write_shards
from pipeline.data.stream import (
    DataSkipError,
    StreamPosition,
    build_eval_dataset,
    build_train_dataset,
    check_inputs,
    iter_eval_batches,
    iter_train_batches,
    ShardRef,
    resolve_shards,
    skipped_counts,
    train_data_config,
)
from pipeline.data.tar import tar_files, tar_files_by_tarfile
from pipeline.data.transforms import (
    build_train_transform,
    mix_seed,
    resolve_image_config,
    sample_erase_box,
    seed_sample,
)
from pipeline.storage import S3AccessError, split_s3_url
from pipeline.services import S3Server, free_port

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

MODEL = "revcol_test"
SIZE = 32
SPLITS = {"rest": 0.8, "small": 0.2}  # a ~360-sample stratified part of digits keeps every pass short
JOIN_TIMEOUT = 180.0


def _write_digits(dest: str, *, s3_cfg: S3Config | None = None) -> dict[str, Any]:
    """Writes the test corpus; returns its manifest with the shard records added under ``shards`` (for the tests)."""
    manifest = write_shards("digits", dest, shard_size=40, split="small", splits=SPLITS, progress=False,
                            s3_config=s3_cfg)
    return {**manifest, "shards": list(read_records(dest, s3_config=s3_cfg))}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Path]:
    import ray

    started = False
    temp = tempfile.mkdtemp(prefix="ray-stream-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, _temp_dir=temp, configure_logging=False)
        started = True
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield Path(temp)
    finally:
        if started:
            ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    dest = tmp_path_factory.mktemp("digits-shards")
    return dest, _write_digits(str(dest))


def _cfg(train: Any = None, val: Any = None, **kw: Any) -> DataConfig:
    base: dict[str, Any] = {"image_size": SIZE, "batch_size": 16, "shuffle_buffer": 64, "seed": 7}
    base.update(kw)
    return DataConfig(train=train, val=val, **base)


def _keys(batch: dict[str, Any]) -> list[tuple[int, int]]:
    return list(zip(batch["shard"].tolist(), batch["index"].tolist(), strict=True))


def _all_keys(manifest: dict[str, Any]) -> set[tuple[int, int]]:
    return {(s, i) for s, rec in enumerate(manifest["shards"]) for i in range(rec["samples"])}


def _run_threads(fns: list[Any]) -> list[Any]:
    """Runs one callable per consumer in threads; fails (instead of hanging) when one does not finish."""
    results: list[Any] = [None] * len(fns)

    def wrap(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            results[i] = err

    threads = [threading.Thread(target=wrap, args=(i,), daemon=True) for i in range(len(fns))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + JOIN_TIMEOUT
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a consumer hung"
    return results


def _consume(source: Any, position: StreamPosition, *, batch_size: int = 16, stop_after: int | None = None,
             checkpoint_after: int | None = None, drop_last: bool = True) -> dict[str, Any]:
    """Iterates one pass; records keys, optionally snapshots the position after N batches and stops after M."""
    out: dict[str, Any] = {"keys": [], "batches": 0, "state": None, "after_checkpoint": []}
    for batch in iter_train_batches(source, batch_size=batch_size, position=position, drop_last=drop_last):
        out["batches"] += 1
        keys = _keys(batch)
        out["keys"].extend(keys)
        if out["state"] is not None:
            out["after_checkpoint"].extend(keys)
        if checkpoint_after is not None and out["batches"] == checkpoint_after:
            out["state"] = json.loads(json.dumps(position.state_dict()))  # must survive JSON
        if stop_after is not None and out["batches"] == stop_after:
            break
    return out


# ------------------------------------------------------------------------------------------------------ unit


def test_position_state_merge_and_checks() -> None:
    a, b = StreamPosition(), StreamPosition()
    for p in (a, b):
        p.bind(dataset="d1", seed=3, shard_samples=[5, 7], epoch=2)
    assert a.mark({"shard": np.array([0, 0, 1]), "index": np.array([1, 4, 6]), "epoch": np.array([2, 2, 2])}) == 3
    b.mark({"shard": torch.tensor([1, 1]), "index": torch.tensor([6, 0]), "epoch": 2})
    state = json.loads(json.dumps(a.state_dict()))
    restored = StreamPosition.from_state_dict(state)
    assert restored.epoch == 2 and restored.num_consumed == 3 and restored.is_consumed(0, 4)
    merged = StreamPosition.merged([a, b.state_dict()])
    assert merged.num_consumed == 4 and merged.is_consumed(1, 0) and merged.is_consumed(1, 6)
    ahead = StreamPosition.from_state_dict(b.state_dict())
    ahead.next_epoch()
    assert StreamPosition.merged([a, ahead]).epoch == 3  # a later epoch supersedes
    with pytest.raises(ValueError, match="epoch"):
        a.mark({"shard": np.array([0]), "index": np.array([0]), "epoch": np.array([5])})
    with pytest.raises(ValueError, match="outside shard 0"):
        a.mark({"shard": np.array([0]), "index": np.array([9]), "epoch": np.array([2])})
    other = StreamPosition()
    other.bind(dataset="d2", seed=3, shard_samples=[5, 7], epoch=0)
    with pytest.raises(ValueError, match="different streams"):
        StreamPosition.merged([a, other])
    with pytest.raises(ValueError, match="belongs to dataset d1"):
        a.bind(dataset="d2", seed=3, shard_samples=[5, 7], epoch=0)
    with pytest.raises(ValueError, match="not a stream position state"):
        StreamPosition.from_state_dict({"epoch": 1})


def _tar_of(names: list[str], fmt: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                payload = name.encode() * 3
                info.size, info.mtime = len(payload), 1.5  # a fractional mtime: a pax record per member
                tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def test_tar_reader_agrees_with_tarfile(local_shards: tuple[Path, dict[str, Any]]) -> None:
    """Our ustar/pax header walk finds what tarfile finds, in webdataset's shards and every tar dialect, and
    reaches tarfile's verdict on truncated or damaged archives."""
    folder, manifest = local_shards
    shard = (folder / manifest["shards"][0]["name"]).read_bytes()
    files, broken = tar_files(shard)
    assert not broken and len({name.split(".")[0] for name, *_ in files}) == manifest["shards"][0]["samples"]
    assert (files, broken) == tar_files_by_tarfile(shard)
    for cut in [*range(0, 4096, 61), len(shard) // 2, len(shard) - 1024, len(shard) - 10]:
        assert tar_files(shard[:cut]) == tar_files_by_tarfile(shard[:cut]), cut
    rng = np.random.default_rng(0)
    for _ in range(200):  # single bit flips in the first members' headers and data
        damaged = bytearray(shard[:8192])
        i = int(rng.integers(len(damaged)))
        damaged[i] ^= 1 << int(rng.integers(8))
        assert tar_files(bytes(damaged)) == tar_files_by_tarfile(bytes(damaged)), i
    long_names = ["a" * 150 + "/x.jpg", "p" * 120 + ".cls"]
    for fmt, extra in ((tarfile.PAX_FORMAT, long_names), (tarfile.GNU_FORMAT, long_names), (tarfile.USTAR_FORMAT, [])):
        data = _tar_of(["d/", "q" * 90 + "/" + "r" * 90 + ".jpg", "é/y.cls", "s.cls", *extra], fmt)
        files, broken = tar_files(data)
        assert (files, broken) == tar_files_by_tarfile(data) and not broken
        assert [data[a:b] for _, a, b in files] == [n.encode() * 3 for n, *_ in files]
        assert len(files) == 3 + len(extra)


def test_resolve_shards_forms(local_shards: tuple[Path, dict[str, Any]]) -> None:
    dest, manifest = local_shards
    by_folder = resolve_shards(str(dest))
    by_manifest = resolve_shards(str(dest / "manifest.json"))
    assert by_folder.fingerprint == by_manifest.fingerprint and by_folder.folders == by_manifest.folders == (str(dest),)
    assert by_folder.num_samples == manifest["num_samples"] and by_folder.num_classes == 10
    assert by_folder.samples.tolist() == [r["samples"] for r in manifest["shards"]]
    assert by_folder.bytes.tolist() == [r["bytes"] for r in manifest["shards"]]
    # The fingerprint's definition from the first manifests on: positions saved before keep their dataset.
    listed = [[r["name"], r["sha256"], r["samples"]] for r in manifest["shards"]]
    assert by_folder.fingerprint == hashlib.sha256(json.dumps(listed).encode()).hexdigest()[:32]
    picked = resolve_shards([str(dest / "shard-000002.tar"), str(dest / "shard-000000.tar")])
    assert [picked.name(i) for i in range(2)] == ["shard-000002.tar", "shard-000000.tar"]
    assert picked.ref(1) == ShardRef(index=1, name="shard-000000.tar", url=str(dest / "shard-000000.tar"),
                                     samples=manifest["shards"][0]["samples"], bytes=manifest["shards"][0]["bytes"])
    assert picked.fingerprint == hashlib.sha256(json.dumps([listed[2], listed[0]]).encode()).hexdigest()[:32]
    with pytest.raises(ValueError, match="not listed"):
        resolve_shards(str(dest / "shard-999999.tar"))
    with pytest.raises(FileNotFoundError):
        resolve_shards(str(dest / "nowhere"))


# ------------------------------------------------------------------------------------------------ with Ray


def test_local_batches_shapes_and_normalization(ray_cluster: Path, local_shards: tuple[Path, dict[str, Any]]) -> None:
    dest, manifest = local_shards
    cfg = _cfg(str(dest), shuffle_buffer=0)
    ds = build_train_dataset(cfg, model_name=MODEL, data_cpus=2)
    position = StreamPosition()
    batches = list(iter_train_batches(ds, batch_size=16, position=position))
    n = manifest["num_samples"]
    assert len(batches) == n // 16 and position.epoch == 1  # drop_last; the pass moved the position on
    batch = batches[0]
    assert batch["image"].shape == (16, 3, SIZE, SIZE) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64 and 0 <= int(batch["label"].min()) <= int(batch["label"].max()) < 10
    keys = [k for b in batches for k in _keys(b)]
    assert len(set(keys)) == len(keys) == (n // 16) * 16

    # Rebuild one sample by hand: seeded timm transform, then normalization with the model's mean/std.
    image_cfg = resolve_image_config(cfg, model_name=MODEL)
    transform = build_train_transform(image_cfg, cfg)
    mean = torch.tensor(image_cfg.mean).view(3, 1, 1)
    std = torch.tensor(image_cfg.std).view(3, 1, 1)
    checked = 0
    for row in range(16):
        shard, index = int(batch["shard"][row]), int(batch["index"][row])
        with tarfile.open(dest / manifest["shards"][shard]["name"]) as tar:
            members = [m for m in tar.getmembers() if m.name.endswith(".png")]
            raw = tar.extractfile(members[index]).read()  # type: ignore[union-attr]
            label = int(tar.extractfile(members[index].name[:-4] + ".cls").read())  # type: ignore[union-attr]
        assert int(batch["label"][row]) == label
        rng = seed_sample(mix_seed(cfg.seed, 0, shard, index))
        expected = (torch.as_tensor(np.asarray(transform(Image.open(io.BytesIO(raw)).convert("RGB")))) / 255.0
                    - mean) / std
        if sample_erase_box(rng, SIZE, SIZE, prob=cfg.random_erasing)[2] == 0:
            torch.testing.assert_close(batch["image"][row], expected, atol=1e-5, rtol=0)
            checked += 1
    assert checked >= 4
    assert skipped_counts(ds)["total"] == 0


def test_determinism_and_epochs(ray_cluster: Path, local_shards: tuple[Path, dict[str, Any]]) -> None:
    dest, _ = local_shards
    cfg = _cfg(str(dest))
    first = build_train_dataset(cfg, model_name=MODEL, data_cpus=2)
    position = StreamPosition()
    epoch0 = list(iter_train_batches(first, batch_size=16, position=position))
    epoch1 = list(iter_train_batches(first, batch_size=16, position=position))  # second pass: epoch 1
    again = list(iter_train_batches(build_train_dataset(cfg, model_name=MODEL, data_cpus=2), batch_size=16,
                                    position=StreamPosition()))
    assert [_keys(b) for b in again] == [_keys(b) for b in epoch0]
    for x, y in zip(again, epoch0, strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    assert {b["epoch"] for b in epoch1} == {1}
    assert [_keys(b) for b in epoch1] != [_keys(b) for b in epoch0]
    # A dataset started at epoch 1 replays the second pass exactly.
    at1 = list(iter_train_batches(build_train_dataset(cfg, model_name=MODEL, epoch=1, data_cpus=2),
                                  batch_size=16, position=StreamPosition()))
    assert [_keys(b) for b in at1] == [_keys(b) for b in epoch1]
    assert torch.equal(at1[0]["image"], epoch1[0]["image"])


def test_two_consumers_equal_batches(ray_cluster: Path, local_shards: tuple[Path, dict[str, Any]]) -> None:
    dest, manifest = local_shards
    cfg = _cfg(str(dest))
    its = build_train_dataset(cfg, model_name=MODEL, data_cpus=2).streaming_split(2, equal=True)
    positions = [StreamPosition(), StreamPosition()]

    def two_epochs(rank: int) -> list[dict[str, Any]]:
        return [_consume(its[rank], positions[rank]) for _ in range(2)]

    ranks = _run_threads([lambda r=r: two_epochs(r) for r in range(2)])
    for r in ranks:
        assert not isinstance(r, BaseException), r
    n = manifest["num_samples"]
    for epoch in range(2):
        counts = [ranks[r][epoch]["batches"] for r in range(2)]
        assert counts[0] == counts[1] == (n // 2) // 16
        keys = ranks[0][epoch]["keys"] + ranks[1][epoch]["keys"]
        assert len(set(keys)) == len(keys)
    assert all(p.epoch == 2 for p in positions)

    # Same seed and epoch, same number of consumers: the same batches on each rank (preserve_order).
    its2 = build_train_dataset(cfg, model_name=MODEL, data_cpus=2).streaming_split(2, equal=True)
    again = _run_threads([lambda r=r: _consume(its2[r], StreamPosition()) for r in range(2)])
    assert [a["keys"] for a in again] == [ranks[r][0]["keys"] for r in range(2)]


def test_eval_covers_every_sample_once(ray_cluster: Path, local_shards: tuple[Path, dict[str, Any]]) -> None:
    dest, manifest = local_shards
    n = manifest["num_samples"]
    dataset = build_eval_dataset(_cfg(val=str(dest)), model_name=MODEL, batch_size=16, data_cpus=2)
    # the same stream split another number of ways, as an elastic run's worker group changes size: each pass is
    # padded for the consumers reading it
    for splits in (2, 3):
        its = dataset.streaming_split(splits, equal=True)
        ranks = _run_threads([lambda r=r: list(iter_eval_batches(its[r])) for r in range(splits)])
        assert len({len(batches) for batches in ranks}) == 1 and len(ranks[0]) > 0
        valid_keys: list[tuple[int, int]] = []
        padding = 0
        for batches in ranks:
            for b in batches:
                assert b["image"].shape == (16, 3, SIZE, SIZE) and b["valid"].dtype == torch.bool
                valid = b["valid"]
                valid_keys.extend(k for k, v in zip(_keys(b), valid.tolist(), strict=True) if v)
                padding += int((~valid).sum())
                assert bool((b["label"][~valid] == -1).all()) and bool((b["label"][valid] >= 0).all())
        assert len(valid_keys) == len(set(valid_keys)) == n and set(valid_keys) == _all_keys(manifest)
        assert padding == splits * 16 * len(ranks[0]) - n < splits * 16


@pytest.mark.parametrize("resume_workers", [1, 2])
def test_resume_no_sample_lost(ray_cluster: Path, local_shards: tuple[Path, dict[str, Any]],
                               resume_workers: int) -> None:
    """2 consumers checkpoint after 3 batches, run 2 more and 'crash'; the merged position resumes the epoch on
    ``resume_workers`` consumers (1: a new run; 2: the same dataset again, like a worker-group restart)."""
    dest, manifest = local_shards
    cfg = _cfg(str(dest))
    ds = build_train_dataset(cfg, model_name=MODEL, data_cpus=2)
    its = ds.streaming_split(2, equal=True)
    crashed = _run_threads(
        [lambda r=r: _consume(its[r], StreamPosition(), checkpoint_after=3, stop_after=5, drop_last=False)
         for r in range(2)]
    )
    merged = StreamPosition.merged([c["state"] for c in crashed])
    assert merged.epoch == 0 and merged.num_consumed == 2 * 3 * 16
    before = {k for c in crashed for k in c["keys"][: 3 * 16]}
    after_checkpoint = [k for c in crashed for k in c["after_checkpoint"]]

    if resume_workers == 1:
        fresh = build_train_dataset(cfg, model_name=MODEL, data_cpus=2, position=merged.state_dict())
        positions = [StreamPosition.from_state_dict(merged.state_dict())]
        resumed = [_consume(fresh, positions[0], drop_last=False)]
    else:
        positions = [StreamPosition.from_state_dict(merged.state_dict()) for _ in range(2)]
        resumed = _run_threads([lambda r=r: _consume(its[r], positions[r], drop_last=False) for r in range(2)])
    resumed_keys = [k for r in resumed for k in r["keys"]]
    everything = _all_keys(manifest)
    dropped_by_equal_split = resume_workers - 1  # an equal split may drop up to n-1 rows of a pass
    assert not before & set(resumed_keys), "a sample consumed before the checkpoint came again"
    assert len(resumed_keys) == len(set(resumed_keys))
    assert len(everything - before - set(resumed_keys)) <= dropped_by_equal_split, "samples lost"
    repeated = set(after_checkpoint) & set(resumed_keys)
    assert len(repeated) <= 2 * 2 * 16  # at most the interval since the checkpoint
    assert all(p.epoch == 1 for p in positions)
    if resume_workers == 2:
        assert resumed[0]["batches"] == resumed[1]["batches"]


def test_mixture_stream_draws_maps_labels_and_resumes(ray_cluster: Path, local_shards: tuple[Path, dict[str, Any]],
                                                      tmp_path: Path) -> None:
    """A mixture of the digits (2 of their shards an epoch) and a 20-image folder read 4 times over (replacement):
    every row of the epoch's draw once, labels through the renames, the rows' sources; a pass stopped after a
    checkpoint resumes on a rebuilt dataset from the position alone (which carries the mixture)."""
    from pipeline.data.stream import MixtureOrder, resolve_split
    from pipeline.data.stream.position import epoch_order

    dest, _ = local_shards
    for k, name in enumerate(("x", "y")):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (12, 12), (200 * k, 20 * i, 90)).save(tmp_path / "images" / name / f"{i}.png")
    write_shards(str(tmp_path / "images"), str(tmp_path / "other"), shard_size=5, progress=False)
    sources = [{"name": "digits", "shards": str(dest), "weight": 1},
               {"name": "other", "shards": str(tmp_path / "other"), "weight": 1, "classes": {"x": "3", "y": "7"}}]
    cfg = _cfg(sources, epoch_samples=160, replacement=True, shuffle_buffer=0)
    shards = resolve_split(cfg, "train")
    assert shards.mixture == MixtureOrder(sizes=(9, 4), draws=(2, 16), copies=(1, 4))
    read = epoch_order(cfg.seed, 0, shards.num_shards, shards.mixture)[: shards.num_slots]
    drawn = {(int(s), i) for s in read for i in range(int(shards.samples[s]))}

    position = StreamPosition()
    batches = list(iter_train_batches(build_train_dataset(cfg, model_name=MODEL, data_cpus=2), batch_size=16,
                                      position=position, drop_last=False))
    keys = [k for b in batches for k in _keys(b)]
    assert len(keys) == len(set(keys)) and set(keys) == drawn
    sources_of = torch.cat([b["source"] for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    assert torch.bincount(sources_of).tolist() == [int(shards.samples[read[read < 9]].sum()), 80]
    assert set(labels[sources_of == 1].tolist()) == {3, 7} and set(labels[sources_of == 0].tolist()) <= set(range(10))

    first = _consume(build_train_dataset(cfg, model_name=MODEL, data_cpus=2), StreamPosition(), checkpoint_after=3,
                     stop_after=5, drop_last=False)
    assert first["state"]["mixture"] == shards.mixture.state() and len(json.dumps(first["state"])) < 1000
    resumed = _consume(build_train_dataset(cfg, model_name=MODEL, data_cpus=2, position=first["state"]),
                       StreamPosition.from_state_dict(first["state"]), drop_last=False)
    assert set(first["keys"][: 3 * 16]) | set(resumed["keys"]) == drawn
    assert not set(first["keys"][: 3 * 16]) & set(resumed["keys"])


def test_version1_corpus_streams_the_same(ray_cluster: Path, local_shards: tuple[Path, dict[str, Any]],
                                          tmp_path: Path, as_version1: Any) -> None:
    """A corpus whose manifest lists its shards inline (version 1) is the same dataset as its version-2 form: the
    same fingerprint, the same batches, and a position saved on one resumes on the other."""
    dest, manifest = local_shards
    old = tmp_path / "v1"
    shutil.copytree(dest, old)
    as_version1(old)
    assert resolve_shards(str(old)).fingerprint == resolve_shards(str(dest)).fingerprint
    cfg_new = _cfg(str(dest), val=str(dest), shuffle_buffer=0)
    cfg_old = _cfg(str(old), val=str(old), shuffle_buffer=0)
    new_batches = list(iter_train_batches(build_train_dataset(cfg_new, model_name=MODEL, data_cpus=2), batch_size=16,
                                          position=StreamPosition()))
    position = StreamPosition()
    old_stream = _consume(build_train_dataset(cfg_old, model_name=MODEL, data_cpus=2), position,
                          checkpoint_after=2, stop_after=2)
    assert old_stream["keys"] == [k for b in new_batches[:2] for k in _keys(b)]
    resumed = _consume(build_train_dataset(cfg_new, model_name=MODEL, data_cpus=2, position=old_stream["state"]),
                       StreamPosition.from_state_dict(old_stream["state"]))
    assert not set(resumed["keys"]) & set(old_stream["keys"])
    assert len(set(resumed["keys"]) | set(old_stream["keys"])) >= manifest["num_samples"] - 16
    evals = [list(iter_eval_batches(build_eval_dataset(c, model_name=MODEL, data_cpus=2)))
             for c in (cfg_new, cfg_old)]
    for x, y in zip(*evals, strict=True):
        assert _keys(x) == _keys(y) and torch.equal(x["image"], y["image"]) and torch.equal(x["valid"], y["valid"])


def _rewrite_tar(data: bytes, edit: Any) -> bytes:
    """Rebuilds a tar, passing each (name, bytes) through ``edit`` (returns new bytes)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data)) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for member in src.getmembers():
            payload = edit(member.name, src.extractfile(member).read())  # type: ignore[union-attr]
            info = tarfile.TarInfo(member.name)
            info.size = len(payload)
            dst.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def _corrupt_s3_shards(client: Any, url: str, manifest: dict[str, Any]) -> dict[str, str]:
    """Truncates shard 0, garbles an image of shard 1, breaks a label of shard 2, deletes shard 3."""
    bucket, prefix = split_s3_url(url)
    names = [r["name"] for r in manifest["shards"]]

    def get(name: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read()

    def put(name: str, data: bytes) -> None:
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)

    put(names[0], get(names[0])[: len(get(names[0])) // 2])
    first_png = {"done": False}

    def garble(name: str, data: bytes) -> bytes:
        if name.endswith(".png") and not first_png["done"]:
            first_png["done"] = True
            return b"\x89PNG but not really" * 10
        return data

    put(names[1], _rewrite_tar(get(names[1]), garble))
    first_cls = {"done": False}

    def bad_label(name: str, data: bytes) -> bytes:
        if name.endswith(".cls") and not first_cls["done"]:
            first_cls["done"] = True
            return b"seven"
        return data

    put(names[2], _rewrite_tar(get(names[2]), bad_label))
    client.delete_object(Bucket=bucket, Key=f"{prefix}/{names[3]}")
    return {"truncated": names[0], "image": names[1], "label": names[2], "missing": names[3]}


def _warning_lines(ray_temp: Path, kind: str) -> int:
    """How many times the stream warned about ``kind`` in this Ray session's worker logs."""
    logs = ray_temp / "session_latest" / "logs"
    text = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.err"))
    return text.count(f"skipping samples: {kind} ")


def test_s3_stream_bad_input_and_threshold(ray_cluster: Path, s3_server: S3Server, s3_bucket: str) -> None:
    s3_cfg = s3_server.s3_config()
    url = f"s3://{s3_bucket}/digits"
    manifest = _write_digits(url, s3_cfg=s3_cfg)
    n = manifest["num_samples"]

    # Healthy first: the S3 path streams every sample.
    ok = check_inputs(_cfg(url, url), s3_cfg)
    assert ok["train"].num_samples == ok["val"].num_samples == n
    its = build_eval_dataset(_cfg(val=url), model_name=MODEL, batch_size=16, s3_cfg=s3_cfg,
                             data_cpus=2)
    assert sum(int(b["valid"].sum()) for b in iter_eval_batches(its)) == n

    bad = _corrupt_s3_shards(s3_server.client(), url, manifest)
    samples = {r["name"]: r["samples"] for r in manifest["shards"]}
    with pytest.raises(DataSkipError, match=bad["missing"]):
        check_inputs(_cfg(url, max_skipped_frac=0.05), s3_cfg)
    check_inputs(_cfg(url, max_skipped_frac=0.5), s3_cfg)  # tolerated: a warning

    # Tolerated: skipped and counted per kind, one warning per kind.
    ds = build_train_dataset(_cfg(url, max_skipped_frac=0.5), model_name=MODEL, s3_cfg=s3_cfg, data_cpus=2)
    rows = sum(len(b["label"]) for b in iter_train_batches(ds, batch_size=16, position=StreamPosition(),
                                                               drop_last=False))
    stats = skipped_counts(ds)
    kinds = stats["by_kind"]
    assert kinds["missing shard"] == samples[bad["missing"]]
    assert kinds["undecodable image"] == 1 and kinds["bad label"] == 1
    assert 0 < kinds["truncated tar"] < samples[bad["truncated"]]
    assert rows == n - stats["total"]
    assert set(stats["by_shard"]) == set(bad.values())
    time.sleep(2.0)  # worker logs reach the session folder asynchronously
    assert _warning_lines(ray_cluster, "undecodable image") == 1 and _warning_lines(ray_cluster, "missing shard") == 1

    # Eval keeps every row: bad samples are rows with valid=False.
    ev = build_eval_dataset(_cfg(val=url, max_skipped_frac=0.5), model_name=MODEL, batch_size=16,
                            s3_cfg=s3_cfg, data_cpus=2)
    evb = list(iter_eval_batches(ev))
    assert sum(int(b["valid"].sum()) for b in evb) == n - stats["total"]
    assert sum(len(b["valid"]) for b in evb) == -(-n // 16) * 16

    # Over the threshold: both consumers stop with an error naming the shards, neither hangs.
    strict = build_train_dataset(_cfg(url, max_skipped_frac=0.05), model_name=MODEL, s3_cfg=s3_cfg, data_cpus=2)
    split = strict.streaming_split(2, equal=True)
    errors = _run_threads([lambda r=r: _consume(split[r], StreamPosition()) for r in range(2)])
    for err in errors:
        assert isinstance(err, DataSkipError), err
        assert "max_skipped_frac=0.05" in str(err)
        assert any(name in str(err) for name in bad.values())


def test_s3_fail_fast(s3_server: S3Server, s3_auth_server: S3Server, s3_bucket: str) -> None:
    dead = S3Config(endpoint_url=f"http://127.0.0.1:{free_port()}", access_key_id="a", secret_access_key="b",
                    max_attempts=5)
    started = time.monotonic()
    with pytest.raises(S3AccessError, match="unreachable"):
        check_inputs(_cfg(f"s3://{s3_bucket}/digits"), dead)
    assert time.monotonic() - started < 10
    wrong = S3Config(endpoint_url=s3_auth_server.endpoint_url, access_key_id="AKIAWRONGWRONG",
                     secret_access_key="not-the-secret")
    with pytest.raises(S3AccessError, match="denied|rejected") as info:
        check_inputs(_cfg(f"s3://{s3_bucket}/digits"), wrong)
    assert "not-the-secret" not in str(info.value)
    with pytest.raises(S3AccessError):
        build_train_dataset(_cfg(f"s3://{s3_bucket}/digits"), model_name=MODEL, s3_cfg=wrong)


def test_s3_reads_retry_then_give_up_quickly() -> None:
    from pipeline.data.stream.decode import read_shard
    from pipeline.data.stream.skips import Unavailable

    dead = S3Config(endpoint_url=f"http://127.0.0.1:{free_port()}", access_key_id="a", secret_access_key="b",
                    max_attempts=3)
    started = time.monotonic()
    with pytest.raises(Unavailable) as info:
        read_shard("s3://bucket/shard-000000.tar", dead)
    assert info.value.kind == "unreadable shard" and "after 3 attempts" in info.value.detail
    assert time.monotonic() - started < 30


def _ray_train_func(config: dict[str, Any]) -> None:
    """Two epochs and an eval pass on each rank; writes what the rank saw to ``config["out"]``."""
    import ray.train
    import torch.distributed as dist

    rank = ray.train.get_context().get_world_rank()
    train, val = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    position = StreamPosition()
    first = [k for b in iter_train_batches(train, batch_size=16, position=position) for k in _keys(b)]
    counts = [len(first) // 16, sum(1 for _ in iter_train_batches(train, batch_size=16, position=position))]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, position.state_dict())
    evals = list(iter_eval_batches(val))
    valid = [k for b in evals for k, v in zip(_keys(b), b["valid"].tolist(), strict=True) if v]
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({
        "counts": counts, "first_epoch": first, "eval_batches": len(evals), "valid": valid,
        "merged_epoch": StreamPosition.merged(states).epoch, "skipped": skipped_counts(train)["total"],
    }))


def test_ray_train_workers(ray_cluster: Path, local_shards: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """The contract with the training loop: get_dataset_shard iterators inside a real TorchTrainer."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    dest, manifest = local_shards
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the test module
    cfg = _cfg(str(dest), str(dest))
    out = tmp_path / "ranks"
    out.mkdir()
    datasets = {"train": build_train_dataset(cfg, model_name=MODEL, data_cpus=2),
                "val": build_eval_dataset(cfg, model_name=MODEL, batch_size=16, data_cpus=2)}
    trainer = TorchTrainer(
        _ray_train_func,
        train_loop_config={"out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "runs"), name="stream"),
        datasets=datasets,
        dataset_config=train_data_config(datasets),
    )
    assert trainer.fit().error is None
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    n = manifest["num_samples"]
    assert ranks[0]["counts"] == ranks[1]["counts"] == [(n // 2) // 16] * 2
    assert ranks[0]["eval_batches"] == ranks[1]["eval_batches"]
    valid = [tuple(k) for r in ranks for k in r["valid"]]
    assert len(valid) == len(set(valid)) == n
    assert all(r["merged_epoch"] == 2 and r["skipped"] == 0 for r in ranks)
    # The order survives Ray Train: the same per-rank batches as two local consumers of the same stream.
    its = build_train_dataset(cfg, model_name=MODEL, data_cpus=2).streaming_split(2, equal=True)
    local = _run_threads([lambda r=r: _consume(its[r], StreamPosition()) for r in range(2)])
    assert [[tuple(k) for k in r["first_epoch"]] for r in ranks] == [c["keys"] for c in local]
