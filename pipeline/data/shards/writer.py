"""Writing shards: :func:`write_shards`, deterministic and resumable (see the package docs for the guarantees)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from pipeline import __version__, storage
from pipeline.config import S3Config
from pipeline.data.shards.manifest import (
    FORMAT_VERSION,
    INDEX_NAME,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    PARTIAL_MANIFEST_NAME,
    SHARD_RE,
    Destination,
    dump_json,
    index_table,
    iter_records,
    load_json,
    shard_name,
    shards_fingerprint,
    write_index,
)
from pipeline.data.shards.sources import (
    DEFAULT_SPLITS,
    ENCODING,
    Encoded,
    Item,
    Source,
    Unreadable,
    open_source,
    parse_splits,
    select_split,
)

__all__ = ["ShardsExistError", "write_shards"]

logger = logging.getLogger(__name__)

PARTIAL_SAVE_S = 30.0
"""Least seconds between rewrites of ``manifest.partial.json`` (besides after the first shard and when the write
stops on an error). It lists every shard so far, so rewriting it after each shard would cost bytes quadratic in the
number of shards; a write killed outright loses at most this much work, redone byte-identically on resume."""

_TAR_MTIME = 0.0
_TAR_USER = "revcol"
_TAR_MODE = 0o444
_BLOCK = 512


class ShardsExistError(ValueError):
    """The destination holds a different dataset; writing needs ``force``."""


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what passes through to ``target``."""

    def __init__(self, target: IO[bytes]) -> None:
        super().__init__()
        self.target = target
        self.digest = hashlib.sha256()
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.target.write(view)
        self.digest.update(view)
        self.count += len(view)
        return len(view)


def _member_bytes(payload: int) -> int:
    return _BLOCK + -(-payload // _BLOCK) * _BLOCK


class _ShardWriter:
    """One shard being written to a temporary file with ``webdataset.TarWriter``."""

    def __init__(self, index: int, tmp_path: Path, *, start: int) -> None:
        from webdataset import TarWriter

        self.index = index
        self.name = shard_name(index)
        self.tmp_path = tmp_path
        self.start = start
        self.samples = 0
        self.payload = 0  # tar bytes of the members so far (headers + padded data)
        self.skipped: Counter[str] = Counter()
        self._file = open(tmp_path, "wb")  # noqa: SIM115 - closed in finish()/abort()
        self._hasher = _HashingWriter(self._file)
        self._tar = TarWriter(
            self._hasher,
            user=_TAR_USER,
            group=_TAR_USER,
            mode=_TAR_MODE,
            mtime=_TAR_MTIME,
            encoder=False,
            compress=False,
        )

    def write(self, key: str, sample: dict[str, bytes]) -> None:
        self._tar.write({"__key__": key, **sample})
        self.samples += 1
        self.payload += sum(_member_bytes(len(v)) for v in sample.values())

    def finish(self, *, stop: int) -> dict[str, Any]:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        record: dict[str, Any] = {
            "name": self.name,
            "samples": self.samples,
            "bytes": self._hasher.count,
            "sha256": self._hasher.digest.hexdigest(),
            "source_range": [self.start, stop],
        }
        if self.skipped:
            record["skipped"] = dict(sorted(self.skipped.items()))
        return record

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)


def _sample_fields(encoded: Encoded, *, label: int, class_name: str) -> dict[str, bytes]:
    meta = {"label": label, "class": class_name, **encoded.meta}
    return {
        encoded.ext: encoded.data,
        "cls": str(label).encode(),
        "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(),
    }


def write_shards(
    source: str,
    dest: str,
    *,
    shard_size: int = 1000,
    shard_bytes: int | None = None,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    split: str | None = None,
    splits: str | Mapping[str, float] | None = None,
    split_seed: int = 0,
    s3_config: S3Config | None = None,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Writes ``source`` as WebDataset shards plus ``shards.parquet`` and ``manifest.json`` to ``dest``; resumes an
    interrupted write (also one of an earlier version) and rewrites a version-1 manifest of the same dataset as
    version 2.

    Args:
        source: An image-folder path (one subfolder per class; class index = position in sorted order) or
            ``digits`` (scikit-learn's bundled digits).
        dest: A local folder or ``s3://bucket/prefix`` (S3 settings from ``s3_config`` or the AWS variables).
        shard_size: Most samples per shard.
        shard_bytes: Most bytes per shard (tar members plus end-of-archive blocks; a shard always holds at least
            one sample); None for no byte cap.
        seed: Seed of the sample order (one shuffle of the sorted inputs).
        force: Replace a different dataset found at ``dest``.
        progress: Show a tqdm progress bar on stderr.
        split: Write only this part of a deterministic stratified partition of the source (see module docs).
        splits: The partition's fractions (``"a=0.8,b=0.2"`` or a mapping); default :data:`DEFAULT_SPLITS`.
            Only used with ``split``.
        split_seed: Seed of the partition (independent of ``seed``).
        s3_config: S3 settings; unset fields come from the AWS variables.
        on_shard: Called with each shard's manifest record once the shard is stored. An exception it raises
            stops the write; calling again with the same arguments resumes it.

    Returns:
        The manifest, also stored as ``manifest.json``::

            {"manifest_version": 2, "format_version": 1, "complete": true,
             "fingerprint": "<sha256 of the settings below + source>",
             "source": {"kind": "digits" | "image_folder", "spec": "<SOURCE as given>", "path": "<folder>",
                        "items": <images found>, "split": {"name", "fractions", "seed"} | null},
             "seed": 0, "shard_size": 1000, "shard_bytes": null, "encoding": "<image encoding policy>",
             "classes": ["name of class 0", ...], "num_classes": 10, "num_samples": 1797,
             "skipped": {"<kind of unreadable file>": count}, "num_shards": 2,
             "shards_fingerprint": "<the stream's dataset fingerprint of all the shards (shards_fingerprint)>",
             "index": {"name": "shards.parquet", "bytes": <size>, "sha256": "<hex of the file>"},
             "sample_fields": {"jpg|png": "...", "cls": "...", "json": "..."}, "created_by": "revcol-pipeline X"}

        ``shards.parquet`` holds one row per shard (``shard-000000.tar``, ``shard-000001.tar``, ...): ``samples``,
        ``bytes``, ``sha256``, ``source_start``/``source_stop`` (its range of the shuffled source items) and
        ``skipped`` (JSON counts, null when none); :func:`pipeline.data.shards.manifest.iter_records` reads them
        back as records ``{"name", "samples", "bytes", "sha256", "source_range", "skipped" (only if any)}``.

    Raises:
        FileNotFoundError: ``source`` is neither ``digits`` nor an existing folder.
        ValueError: bad arguments or source (named in the message); :class:`ShardsExistError` when ``dest``
            holds a different dataset and ``force`` is not set.
        pipeline.storage.S3AccessError: the S3 destination cannot be used.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if shard_bytes is not None and shard_bytes < 1:
        raise ValueError(f"shard_bytes must be >= 1 (or None), got {shard_bytes}")
    split_fractions: dict[str, float] | None = None
    if split is not None:
        split_fractions = parse_splits(splits if splits is not None else DEFAULT_SPLITS)
        if split not in split_fractions:
            raise ValueError(f"split {split!r} is not one of the splits {list(split_fractions)} (set splits)")
    elif splits is not None:
        raise ValueError(f"splits={splits!r} given without split (name the part to write)")

    src = open_source(source)
    items = select_split(src.items, split=split, splits=split_fractions, split_seed=split_seed)
    if not items:
        raise ValueError(f"split {split!r} of source {source!r} is empty (fractions {split_fractions})")
    items.sort(key=lambda it: (it.label, it.ident))
    random.Random(seed).shuffle(items)

    split_info = None if split is None else {"name": split, "fractions": split_fractions, "seed": split_seed}
    settings = {
        "format_version": FORMAT_VERSION,
        "source": {"kind": src.kind, "digest": src.digest, "split": split_info},
        "seed": seed,
        "shard_size": shard_size,
        "shard_bytes": shard_bytes,
        "encoding": ENCODING,
    }
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    header: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "source": {**src.describe(), "spec": source, "split": split_info},
        "seed": seed,
        "shard_size": shard_size,
        "shard_bytes": shard_bytes,
        "encoding": ENCODING,
        "classes": list(src.classes),
        "num_classes": len(src.classes),
        "sample_fields": {
            "jpg|png": "RGB image",
            "cls": "integer class index as text",
            "json": "metadata: label, class, source, orig_format, orig_mode, orig_size",
        },
        "created_by": f"revcol-pipeline {__version__}",
    }

    store = Destination(dest, s3_config=s3_config)
    store.prepare()
    try:
        records = _reconcile_destination(store, fingerprint=fingerprint, force=force, source=source)
        manifest = _write_all(
            store, src, items, header, records, shard_size=shard_size, shard_bytes=shard_bytes,
            progress=progress, on_shard=on_shard,
        )
    finally:
        store.cleanup_scratch()
    return manifest


def _reconcile_destination(store: Destination, *, fingerprint: str, force: bool, source: str) -> list[dict[str, Any]]:
    """Decides what to keep at the destination; returns the shard records of a resumable earlier write."""
    existing = load_json(store, MANIFEST_NAME) or load_json(store, PARTIAL_MANIFEST_NAME)
    names = store.list_names()
    stray_shards = [n for n in names if SHARD_RE.match(n)]
    if existing is not None and existing.get("fingerprint") == fingerprint:
        try:
            records = list(iter_records(store, existing))
        except (FileNotFoundError, ValueError) as err:  # the index is gone or damaged: the shards are rechecked
            logger.warning("%s: %s; writing the shards again", store.url, err)
            return []
        if existing.get("complete"):
            logger.info("%s: already holds this dataset; checking its %d shard(s)", store.url, len(records))
        else:
            logger.info("%s: resuming an interrupted write (%d shard(s) done)", store.url, len(records))
        return records
    if existing is None and not stray_shards:
        return []
    if not force:
        if existing is not None:
            old = existing.get("source", {})
            what = (
                f"a different dataset (source {old.get('spec', old.get('kind'))!r}, seed {existing.get('seed')}, "
                f"shard_size {existing.get('shard_size')}, split {(old.get('split') or {}).get('name')})"
            )
        else:
            what = f"{len(stray_shards)} shard file(s) without a manifest"
        raise ShardsExistError(
            f"destination {store.url!r} already holds {what}; not overwriting it with {source!r} "
            "(use --force / force=True to replace it, or choose another destination)"
        )
    logger.warning("%s: --force: removing the dataset there (%d shard file(s))", store.url, len(stray_shards))
    store.delete(MANIFEST_NAME)  # first, so an interrupted cleanup never leaves a manifest naming missing shards
    store.delete(PARTIAL_MANIFEST_NAME)
    store.delete(INDEX_NAME)
    for name in stray_shards:
        store.delete(name)
    return []


class _PartialManifest:
    """``manifest.partial.json`` of a write in progress: ``records`` (a list the writer appends to) saved after the
    first shard, then at most every :data:`PARTIAL_SAVE_S` seconds, and never taking more than ~10 % of the time."""

    def __init__(self, store: Destination, header: dict[str, Any], records: list[dict[str, Any]]) -> None:
        self.store, self.header, self.records = store, header, records
        self.saved = len(records)
        self.next_save = time.monotonic() + PARTIAL_SAVE_S

    def shard_added(self) -> None:
        if self.saved == 0 or time.monotonic() >= self.next_save:
            self.save()

    def save(self) -> None:
        if len(self.records) == self.saved:
            return
        started = time.monotonic()
        self.store.write_bytes(
            PARTIAL_MANIFEST_NAME, dump_json({**self.header, "complete": False, "shards": self.records})
        )
        self.saved = len(self.records)
        took = time.monotonic() - started
        self.next_save = time.monotonic() + max(PARTIAL_SAVE_S, 10 * took)

    def save_quietly(self) -> None:
        """Saves on the way out of a failed write; a failure here (the store itself is down) only warns, so the
        original error is the one raised."""
        try:
            self.save()
        except Exception as exc:  # noqa: BLE001 - the caller re-raises the original error
            where = self.store.where(PARTIAL_MANIFEST_NAME)
            logger.warning("%s: could not record the shards written so far: %s", where, exc)


def _write_all(
    store: Destination,
    src: Source,
    items: list[Item],
    header: dict[str, Any],
    previous: list[dict[str, Any]],
    *,
    shard_size: int,
    shard_bytes: int | None,
    progress: bool,
    on_shard: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    from tqdm import tqdm

    records: list[dict[str, Any]] = []
    position = 0
    for expected_index, record in enumerate(previous):
        start, stop = (int(v) for v in record["source_range"])
        if record.get("name") != shard_name(expected_index) or start != position or stop > len(items):
            raise ValueError(
                f"{store.where(PARTIAL_MANIFEST_NAME)}: inconsistent shard record {record.get('name')!r}; "
                "write with --force to start over"
            )
        position = stop
        records.append(record)

    partial = _PartialManifest(store, header, records)
    skipped_examples: dict[str, str] = {}
    scratch = store.scratch_dir()
    bar = tqdm(total=len(items), unit="img", desc=f"shards -> {store.url}", file=sys.stderr, disable=not progress)
    try:
        # Shards recorded earlier: keep the good ones, rewrite damaged ones from their recorded range.
        for i, record in enumerate(records):
            if store.matches(record["name"], size=int(record["bytes"]), sha256=record["sha256"]):
                logger.debug("%s: kept", store.where(record["name"]))
            else:
                logger.warning("%s: missing or damaged; rewriting it", store.where(record["name"]))
                start, stop = record["source_range"]
                redo = _write_range(
                    store, src, items, i, start, scratch, shard_size=shard_size, shard_bytes=shard_bytes,
                    limit=stop, examples=skipped_examples,
                )
                if redo["sha256"] != record["sha256"] or redo["source_range"] != record["source_range"]:
                    raise ValueError(
                        f"{store.where(record['name'])}: rewriting it gave different bytes than recorded (the source "
                        "changed since the interrupted write?); write with --force to start over"
                    )
            bar.update(int(record["source_range"][1]) - int(record["source_range"][0]))

        index = len(records)
        while position < len(items):
            record = _write_range(
                store, src, items, index, position, scratch, shard_size=shard_size, shard_bytes=shard_bytes,
                limit=len(items), examples=skipped_examples, bar=bar,
            )
            if record["samples"] == 0:  # only unreadable files were left: account for them in the last shard
                if not records:
                    break
                last = records[-1]
                last["source_range"][1] = record["source_range"][1]
                merged = Counter(last.get("skipped", {})) + Counter(record.get("skipped", {}))
                last["skipped"] = dict(sorted(merged.items()))
                position = record["source_range"][1]
                break
            records.append(record)
            position = record["source_range"][1]
            index += 1
            partial.shard_added()
            if on_shard is not None:
                on_shard(dict(record))
    except BaseException:
        partial.save_quietly()  # the shards stored so far are kept by the next run
        raise
    finally:
        bar.close()

    skipped: Counter[str] = Counter()
    for record in records:
        skipped.update(record.get("skipped", {}))
    for kind, count in sorted(skipped.items()):
        example = skipped_examples.get(kind)
        logger.warning(
            "skipped %d image file(s): %s%s", count, kind, f" (e.g. {example})" if example else ""
        )
    num_samples = sum(int(r["samples"]) for r in records)
    if num_samples == 0:
        raise ValueError(f"source {header['source']['spec']!r}: no readable images (skipped: {dict(skipped)})")
    # The index first: a manifest.json names an index that is in place and matches it.
    table, fingerprint = _index_of(records)
    index = write_index(store, table)
    manifest = {
        **header,
        "complete": True,
        "num_samples": num_samples,
        "num_shards": len(records),
        "shards_fingerprint": fingerprint,
        "skipped": dict(sorted(skipped.items())),
        "index": index,
    }
    store.write_bytes(MANIFEST_NAME, dump_json(manifest))
    store.delete(PARTIAL_MANIFEST_NAME)
    logger.info("%s: %d samples in %d shard(s), %d class(es)", store.url, num_samples, len(records), len(src.classes))
    return manifest


def _index_of(records: list[dict[str, Any]]) -> tuple[Any, str]:
    """The shard index of the records (``shard_name(0)``, ``shard_name(1)``, ... in order) and the stream's
    fingerprint of them, recorded in the header so a reader of the whole corpus need not hash every shard's entry."""
    for i, record in enumerate(records):
        if record["name"] != shard_name(i):
            raise ValueError(f"shard record {i} is named {record['name']!r}, expected {shard_name(i)!r}")
    samples = np.array([int(r["samples"]) for r in records], dtype=np.int64)
    digests = np.frombuffer(b"".join(bytes.fromhex(r["sha256"]) for r in records), dtype=np.uint8).reshape(-1, 32)
    table = index_table(
        samples=samples,
        sizes=[int(r["bytes"]) for r in records],
        sha256=digests,
        source_start=[int(r["source_range"][0]) for r in records],
        source_stop=[int(r["source_range"][1]) for r in records],
        skipped=[json.dumps(r["skipped"], sort_keys=True) if r.get("skipped") else None for r in records],
    )
    return table, shards_fingerprint([(np.arange(len(records)), digests, samples)])


def _write_range(
    store: Destination,
    src: Source,
    items: list[Item],
    index: int,
    start: int,
    scratch: Path,
    *,
    shard_size: int,
    shard_bytes: int | None,
    limit: int,
    examples: dict[str, str],
    bar: Any = None,
) -> dict[str, Any]:
    """Writes shard ``index`` from ``items[start:]``, stopping when it holds ``shard_size`` samples, before a
    sample that would exceed ``shard_bytes``, or at ``limit``; stores it and returns its record (``samples`` 0 and
    nothing stored when only unreadable items were left)."""
    writer = _ShardWriter(index, scratch / f".{shard_name(index)}{storage.TMP_SUFFIX}", start=start)
    position = start
    try:
        while position < limit and writer.samples < shard_size:
            item = items[position]
            try:
                encoded = src.encode(item)
            except Unreadable as err:
                examples.setdefault(err.kind, err.detail)
                logger.debug("skipping %s", err)
                writer.skipped[err.kind] += 1
                position += 1
                if bar is not None:
                    bar.update(1)
                continue
            fields = _sample_fields(encoded, label=item.label, class_name=src.classes[item.label])
            size = sum(_member_bytes(len(v)) for v in fields.values())
            if shard_bytes is not None and writer.samples > 0 and writer.payload + size + 2 * _BLOCK > shard_bytes:
                break  # this item opens the next shard
            writer.write(f"{position:08d}", fields)
            position += 1
            if bar is not None:
                bar.update(1)
        record = writer.finish(stop=position)
    except BaseException:
        writer.abort()
        raise
    if record["samples"] == 0:
        writer.tmp_path.unlink(missing_ok=True)
        return record
    store.put_file(writer.tmp_path, record["name"], sha256=record["sha256"])
    return record
