"""Verifying shards: :func:`verify_shards` re-reads every shard (streamed, hashed) and checks every sample."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import sys
import tarfile
from typing import IO, Any

from pipeline.config import S3Config
from pipeline.data.shards.manifest import MANIFEST_NAME, SHARD_RE, Destination, iter_records, read_destination_manifest
from pipeline.data.tar import iter_tar_samples

__all__ = ["SAMPLE_IMAGE_EXTENSIONS", "verify_shards"]

logger = logging.getLogger(__name__)

SAMPLE_IMAGE_EXTENSIONS = ("jpg", "png")
"""Image fields a sample may carry."""


class _HashingReader(io.RawIOBase):
    """A read-only file that hashes and counts what is read from ``source``."""

    def __init__(self, source: IO[bytes]) -> None:
        super().__init__()
        self.source = source
        self.digest = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.source.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.digest.update(data)
        self.count += n
        return n

    def drain(self) -> None:
        while chunk := self.source.read(1 << 20):
            self.digest.update(chunk)
            self.count += len(chunk)


def _check_sample(key: str, fields: dict[str, bytes], num_classes: int) -> str | None:
    """Returns what is wrong with one sample, or None."""
    from PIL import Image

    images = [ext for ext in fields if ext.lower() in SAMPLE_IMAGE_EXTENSIONS]
    if len(images) != 1:
        return f"sample {key!r}: expected one image field ({'/'.join(SAMPLE_IMAGE_EXTENSIONS)}), got {sorted(fields)}"
    try:
        with Image.open(io.BytesIO(fields[images[0]])) as image:
            image.load()
    except Exception as err:  # noqa: BLE001 - any decoder failure makes the sample bad
        return f"sample {key!r}: image does not decode ({err.__class__.__name__}: {err})"
    if "cls" not in fields:
        return f"sample {key!r}: no .cls label"
    try:
        label = int(fields["cls"].decode().strip())
    except (UnicodeDecodeError, ValueError):
        return f"sample {key!r}: .cls is not an integer ({fields['cls'][:20]!r})"
    if not 0 <= label < num_classes:
        return f"sample {key!r}: label {label} outside [0, {num_classes})"
    if "json" in fields:
        try:
            json.loads(fields["json"])
        except ValueError:
            return f"sample {key!r}: .json metadata is not valid JSON"
    return None


def _verify_one(store: Destination, record: dict[str, Any], num_classes: int) -> tuple[str | None, int]:
    """Checks one shard; returns (problem or None, samples read)."""
    name = record["name"]
    expected_bytes, expected_samples = int(record["bytes"]), int(record["samples"])
    size = store.size(name)
    if size is None:
        return "missing", 0
    problems: list[str] = []
    if size < expected_bytes:
        problems.append(f"truncated: {size} of {expected_bytes} bytes")
    elif size > expected_bytes:
        problems.append(f"size mismatch: {size} bytes, manifest says {expected_bytes}")
    samples = 0
    bad: list[str] = []
    stream = store.open_read(name)
    reader = _HashingReader(stream)
    try:
        try:
            with tarfile.open(fileobj=io.BufferedReader(reader, 1 << 16), mode="r|") as tar:
                for key, fields in iter_tar_samples(tar):
                    samples += 1
                    problem = _check_sample(key, fields, num_classes)
                    if problem is not None:
                        bad.append(problem)
        except (tarfile.TarError, EOFError, OSError) as err:
            if not problems:
                problems.append(f"unreadable tar after {samples} sample(s): {err}")
            else:
                problems[-1] += f" (tar unreadable after {samples} sample(s))"
        reader.drain()
    finally:
        stream.close()
    if bad:
        problems.append(f"{len(bad)} undecodable sample(s): {bad[0]}" + (" ..." if len(bad) > 1 else ""))
    if samples != expected_samples and not any(p.startswith(("truncated", "unreadable")) for p in problems):
        problems.append(f"{samples} samples, manifest says {expected_samples}")
    if size == expected_bytes and reader.digest.hexdigest() != record["sha256"]:
        problems.append("sha256 mismatch: content differs from the manifest")
    return ("; ".join(problems) or None), samples


def verify_shards(dest: str, *, progress: bool = True, s3_config: S3Config | None = None) -> dict[str, Any]:
    """Re-reads every shard at ``dest`` and checks it against its manifest (either version: the records of
    ``shards.parquet``, which must match the size and digest ``manifest.json`` records, or inline ones).

    Each shard must exist, have the recorded size, sample count and sha256, and every sample must hold one image
    that decodes and an integer label within the class count.

    Args:
        dest: A folder or ``s3://bucket/prefix`` holding ``manifest.json``.
        progress: Show a tqdm progress bar on stderr.
        s3_config: S3 settings; unset fields come from the AWS variables.

    Returns:
        A report: ``ok`` (bool), ``ok_shards`` (int), ``bad_shards`` (shard name -> problem), ``num_shards``,
        ``num_samples`` (per the manifest), ``samples_read``, ``extra_files`` (shard-like files the manifest does
        not list), ``dest``.

    Raises:
        FileNotFoundError: no ``manifest.json`` at ``dest``, or its ``shards.parquet`` is missing.
        ValueError: the manifest or its index is not valid (named).
    """
    from tqdm import tqdm

    store = Destination(dest, s3_config=s3_config)
    manifest = read_destination_manifest(store)
    num_classes = manifest.get("num_classes")
    if not isinstance(num_classes, int):
        raise ValueError(f"{store.where(MANIFEST_NAME)} is not a shards manifest (no 'num_classes')")
    records = iter_records(store, manifest)
    bad: dict[str, str] = {}
    listed: set[str] = set()
    samples_read = 0
    for record in tqdm(records, unit="shard", desc=f"verify {store.url}", file=sys.stderr, disable=not progress,
                       total=manifest.get("num_shards", len(manifest.get("shards") or ()))):
        listed.add(record["name"])
        problem, samples = _verify_one(store, record, num_classes)
        samples_read += samples
        if problem is not None:
            bad[record["name"]] = problem
            logger.warning("%s: %s", store.where(record["name"]), problem)
    extra = [n for n in store.list_names() if SHARD_RE.match(n) and n not in listed]
    if extra:
        logger.warning("%s: shard file(s) not in the manifest: %s", store.url, ", ".join(extra))
    return {
        "ok": not bad,
        "dest": store.url,
        "num_shards": len(listed),
        "ok_shards": len(listed) - len(bad),
        "bad_shards": bad,
        "num_samples": manifest.get("num_samples"),
        "samples_read": samples_read,
        "extra_files": extra,
    }
