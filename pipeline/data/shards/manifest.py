"""A shards destination (a local folder or an ``s3://`` prefix, through :mod:`pipeline.storage`), its
``manifest.json`` and its shard index ``shards.parquet``.

Since manifest version 2, ``manifest.json`` is a small header (counts, classes, fingerprint, the index file's name,
size and sha256) and the per-shard records are the rows of ``shards.parquet``: row ``i`` describes shard
``shard_name(i)`` in the columns of :data:`INDEX_COLUMNS`, so a reader takes only the columns it needs, as arrays,
and a 2 M-shard corpus is never a 2 M-entry JSON list that every process parses. Manifests of version 1 (every
record inline in ``manifest.json`` under ``shards``) are still read, through the same functions."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from pipeline import storage
from pipeline.config import S3Config

__all__ = ["FORMAT_VERSION", "INDEX_COLUMNS", "INDEX_NAME", "MANIFEST_NAME", "MANIFEST_VERSION", "PARTIAL_MANIFEST_NAME",
           "SHARD_RE", "Destination", "ShardIndex", "dump_json", "iter_records", "load_json",
           "index_table", "read_destination_manifest", "read_index", "read_manifest", "read_records", "shard_name", "shard_number",
           "shards_fingerprint",
           "write_index"]

FORMAT_VERSION = 1
"""Version of the shard layout (the tars and their samples); part of the dataset fingerprint, so it changes only
when the shards' bytes do."""
MANIFEST_VERSION = 2
"""Version of the manifest schema: 2 is a header plus ``shards.parquet``; 1 (no ``manifest_version`` key) listed
every shard inline."""
MANIFEST_NAME = "manifest.json"
PARTIAL_MANIFEST_NAME = "manifest.partial.json"
INDEX_NAME = "shards.parquet"
SHARD_RE = re.compile(r"^shard-(\d{6,})\.tar$")
INDEX_COLUMNS = ("samples", "bytes", "sha256", "source_start", "source_stop", "skipped")
"""Columns of ``shards.parquet``, one row per shard in shard order: samples, bytes (int64), sha256 (32 raw bytes),
the half-open range of the source items it was written from (int64) and its skipped files (JSON text, null when
none)."""


def shard_name(index: int) -> str:
    """Returns the file name of shard ``index`` (``shard-000000.tar``).

    Args:
        index: Zero-based shard number.

    Returns:
        The name.
    """
    return f"shard-{index:06d}.tar"


def shard_number(name: str) -> int | None:
    """The index ``i`` of a shard file named ``shard_name(i)``, else None.

    Args:
        name: A file name.

    Returns:
        The index, or None when ``name`` is not exactly a shard's name.
    """
    match = SHARD_RE.match(name)
    if match is None or shard_name(int(match.group(1))) != name:  # "shard-0000001.tar" is nobody's name
        return None
    return int(match.group(1))


class Destination:
    """A local folder or an S3 prefix holding shards; names are plain file names directly under it.

    Args:
        url: The folder or ``s3://bucket/prefix``.
        s3_config: S3 settings (unset fields from the AWS variables).
    """

    def __init__(self, url: str, *, s3_config: S3Config | None) -> None:
        self.is_s3 = storage.is_s3_url(url)
        self.url = url.rstrip("/") if self.is_s3 else str(Path(url).expanduser())
        self.s3 = s3_config
        self._scratch: Path | None = None

    def where(self, name: str) -> str:
        return storage.join(self.url, name)

    def prepare(self) -> None:
        """Checks (and for folders creates) the destination before writing: clear errors for an unreachable S3
        endpoint, rejected credentials or a missing bucket."""
        if self.is_s3:
            storage.check_url(self.url, s3=self.s3)
            return
        path = Path(self.url)
        if path.exists() and not path.is_dir():
            raise ValueError(f"destination {self.url!r} exists and is not a folder")
        path.mkdir(parents=True, exist_ok=True)
        for leftover in path.glob(f".*{storage.TMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)  # a shard or manifest interrupted mid-write

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return storage.read_bytes(self.where(name), s3=self.s3)
        except FileNotFoundError:
            return None

    def write_bytes(self, name: str, data: bytes) -> None:
        storage.write_bytes(self.where(name), data, s3=self.s3)

    def put_file(self, local: Path, name: str, *, sha256: str) -> None:
        """Moves a finished shard from the scratch folder into place (its digest kept as S3 metadata)."""
        storage.put_file(local, self.where(name), s3=self.s3, metadata={"sha256": sha256}, move=True)

    def size(self, name: str) -> int | None:
        entry = storage.stat(self.where(name), s3=self.s3)
        return None if entry is None else entry.size

    def matches(self, name: str, *, size: int, sha256: str) -> bool:
        """Cheap check that a stored shard is the recorded one: the size and the uploaded digest for S3, the size
        and the content's sha256 for a local file."""
        entry = storage.stat(self.where(name), s3=self.s3)
        if entry is None or entry.size != size:
            return False
        if self.is_s3:
            return entry.metadata.get("sha256") == sha256
        digest = hashlib.sha256()
        with storage.open_read(self.where(name)) as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest() == sha256

    def open_read(self, name: str) -> IO[bytes]:
        return storage.open_read(self.where(name), s3=self.s3)

    def delete(self, name: str) -> None:
        storage.remove(self.where(name), s3=self.s3)

    def list_names(self) -> list[str]:
        return [e.name for e in storage.list_dir(self.url, s3=self.s3) if not e.is_dir]

    def scratch_dir(self) -> Path:
        """Folder for shards being written: the destination itself for a folder (the final rename is atomic), a
        temporary folder for S3."""
        if not self.is_s3:
            return Path(self.url)
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="revcol-shards-"))
        return self._scratch

    def cleanup_scratch(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def load_json(store: Destination, name: str) -> dict[str, Any] | None:
    data = store.read_bytes(name)
    if data is None:
        return None
    try:
        obj = json.loads(data)
    except ValueError as err:
        raise ValueError(f"{store.where(name)} is not valid JSON ({err}); remove it or write with --force") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{store.where(name)} is not a shards manifest (not a JSON object)")
    return obj


def dump_json(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def read_manifest(dest: str, *, s3_config: S3Config | None = None) -> dict[str, Any]:
    """Reads ``manifest.json`` of a shards destination.

    Args:
        dest: A folder or ``s3://bucket/prefix``.
        s3_config: S3 settings (default: the AWS variables).

    Returns:
        The manifest (schema in :func:`write_shards`).

    Raises:
        FileNotFoundError: there is no ``manifest.json`` (the message says when a write is unfinished).
        pipeline.storage.S3AccessError: the S3 destination cannot be used.
    """
    return read_destination_manifest(Destination(dest, s3_config=s3_config))


def read_records(dest: str, *, s3_config: S3Config | None = None) -> Iterator[dict[str, Any]]:
    """The shard records of the manifest at ``dest`` (either version), as :func:`iter_records` yields them.

    Args:
        dest: A folder or ``s3://bucket/prefix``.
        s3_config: S3 settings (default: the AWS variables).

    Returns:
        An iterator of records, in shard order.
    """
    store = Destination(dest, s3_config=s3_config)
    return iter_records(store, read_destination_manifest(store))


def read_destination_manifest(store: Destination) -> dict[str, Any]:
    """:func:`read_manifest` of an opened destination (also checks that its schema version is one this code reads)."""
    if store.is_s3:
        store.prepare()  # clear errors for an unreachable endpoint, bad credentials, a missing bucket
    manifest = load_json(store, MANIFEST_NAME)
    if manifest is None:
        if store.read_bytes(PARTIAL_MANIFEST_NAME) is not None:
            raise FileNotFoundError(
                f"{store.where(MANIFEST_NAME)} does not exist: the write there is unfinished "
                f"({PARTIAL_MANIFEST_NAME} found); rerun the same 'revcol shards write' to resume it"
            )
        raise FileNotFoundError(f"no shards manifest at {store.where(MANIFEST_NAME)}")
    version = manifest.get("manifest_version", 1)
    if version not in (1, MANIFEST_VERSION):
        raise ValueError(
            f"{store.where(MANIFEST_NAME)}: manifest_version {version!r} is not one this revcol-pipeline reads "
            f"(1 or {MANIFEST_VERSION}); it was written by {manifest.get('created_by', 'another version')}"
        )
    return manifest


@dataclass(frozen=True, eq=False)
class ShardIndex:
    """The per-shard columns of one manifest as arrays; row ``i`` describes shard ``shard_name(i)``.

    Args:
        samples: ``(N,)`` int64, samples per shard.
        bytes: ``(N,)`` int64, size of each shard.
        sha256: ``(N, 32)`` uint8, each shard's digest; None when not read.
    """

    samples: np.ndarray
    bytes: np.ndarray
    sha256: np.ndarray | None

    def __len__(self) -> int:
        return int(self.samples.size)


_FINGERPRINT_CHUNK = 65536
"""Shards formatted at a time while hashing a fingerprint."""


def shards_fingerprint(parts: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> str:
    """The dataset fingerprint of a list of shards: the digest of ``json.dumps([[name, sha256 hex, samples],
    ...])``, as the stream has defined it since the first manifests (positions and MLflow datasets are keyed by
    it, so it stays the same whichever manifest version lists the shards). Written out a chunk at a time: no list
    of every shard is built.

    Args:
        parts: Consecutive runs of shards, each ``(shard numbers, (n, 32) uint8 digests, samples)``.

    Returns:
        32 hex digits.
    """
    digest = hashlib.sha256(b"[")
    separator = b""
    for numbers, digests, samples in parts:
        for lo in range(0, numbers.size, _FINGERPRINT_CHUNK):
            hi = lo + _FINGERPRINT_CHUNK
            hexes = digests[lo:hi].tobytes().hex()
            text = ", ".join(
                f'["{shard_name(n)}", "{hexes[64 * k:64 * k + 64]}", {count}]'
                for k, (n, count) in enumerate(zip(numbers[lo:hi].tolist(), samples[lo:hi].tolist(), strict=True))
            )
            digest.update(separator + text.encode())
            separator = b", "
    digest.update(b"]")
    return digest.hexdigest()[:32]


def index_table(
    *,
    samples: Any,
    sizes: Any,
    sha256: np.ndarray,
    source_start: Any,
    source_stop: Any,
    skipped: Sequence[str | None] | None = None,
) -> Any:
    """The shard index as a ``pyarrow.Table`` of :data:`INDEX_COLUMNS`, row ``i`` for ``shard_name(i)``.

    Args:
        samples: ``(N,)`` samples per shard.
        sizes: ``(N,)`` bytes per shard.
        sha256: ``(N, 32)`` uint8 digests.
        source_start: ``(N,)`` first source item of each shard.
        source_stop: ``(N,)`` end (exclusive) of each shard's source items.
        skipped: Per shard, its skipped-file counts as JSON text or None; None for no skips at all.

    Returns:
        The table.
    """
    import pyarrow as pa

    digests = np.ascontiguousarray(sha256, dtype=np.uint8)
    if digests.ndim != 2 or digests.shape[1] != 32:
        raise ValueError(f"sha256 must be (N, 32) bytes, got shape {digests.shape}")
    count = digests.shape[0]
    return pa.table({
        "samples": pa.array(np.asarray(samples, dtype=np.int64)),
        "bytes": pa.array(np.asarray(sizes, dtype=np.int64)),
        "sha256": pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), count, [None, pa.py_buffer(digests)]),
        "source_start": pa.array(np.asarray(source_start, dtype=np.int64)),
        "source_stop": pa.array(np.asarray(source_stop, dtype=np.int64)),
        "skipped": pa.array([None] * count if skipped is None else list(skipped), pa.string()),
    })


def write_index(store: Destination, table: Any) -> dict[str, Any]:
    """Stores ``shards.parquet`` (zstd-compressed Parquet of :func:`index_table`'s table).

    Args:
        store: The destination.
        table: The index.

    Returns:
        The header's ``index`` entry: ``{"name", "bytes", "sha256"}`` of the file written.
    """
    import pyarrow.parquet as pq

    if table.column_names != list(INDEX_COLUMNS):
        raise ValueError(f"a shard index has the columns {list(INDEX_COLUMNS)}, got {table.column_names}")
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    data = buffer.getvalue()
    store.write_bytes(INDEX_NAME, data)
    return {"name": INDEX_NAME, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _index_table(store: Destination, manifest: dict[str, Any], columns: Sequence[str]) -> Any:
    """The columns of a version-2 manifest's index, checked against the size and digest its header records."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    entry = manifest.get("index")
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or "/" in entry["name"]:
        raise ValueError(f"{store.where(MANIFEST_NAME)}: 'index' must name the shard index file, got {entry!r}")
    where = store.where(entry["name"])
    data = store.read_bytes(entry["name"])
    if data is None:
        raise FileNotFoundError(f"{where}: the shard index named by {store.where(MANIFEST_NAME)} is missing")
    if len(data) != entry.get("bytes") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise ValueError(
            f"{where} ({len(data)} bytes) is not the index {store.where(MANIFEST_NAME)} records "
            f"({entry.get('bytes')} bytes, sha256 {str(entry.get('sha256'))[:12]}...); rerunning the same "
            "'revcol shards write' rewrites it"
        )
    table = pq.read_table(pa.BufferReader(data), columns=list(columns))
    if table.num_rows != manifest.get("num_shards"):
        raise ValueError(f"{where} holds {table.num_rows} shards, {MANIFEST_NAME} says {manifest.get('num_shards')}")
    return table


def _inline_records(store: Destination, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of a version-1 (or partial) manifest, checked to be ``shard_name(0)``, ``shard_name(1)``, ..."""
    records = manifest.get("shards")
    if not isinstance(records, list):
        raise ValueError(f"{store.where(MANIFEST_NAME)} is not a shards manifest (no 'index' and no 'shards' list)")
    for i, record in enumerate(records):
        if not isinstance(record, dict) or record.get("name") != shard_name(i):
            name = record.get("name") if isinstance(record, dict) else record
            raise ValueError(
                f"{store.where(MANIFEST_NAME)}: shard record {i} is {name!r}, expected {shard_name(i)!r} "
                "(records list shard-000000.tar, shard-000001.tar, ... in order)"
            )
    return records


def read_index(store: Destination, manifest: dict[str, Any], *, sha256: bool = True) -> ShardIndex:
    """The per-shard sizes (and digests) of a manifest of either version, as arrays.

    Args:
        store: The destination the manifest was read from.
        manifest: Its header (:func:`read_destination_manifest`).
        sha256: Also read the digests (the largest column).

    Returns:
        The index.

    Raises:
        FileNotFoundError: the index file is missing.
        ValueError: the index does not match the manifest, or a record is malformed (named).
    """
    if "index" not in manifest:
        records = _inline_records(store, manifest)
        try:
            return ShardIndex(
                samples=np.array([int(r["samples"]) for r in records], dtype=np.int64),
                bytes=np.array([int(r["bytes"]) for r in records], dtype=np.int64),
                sha256=(np.frombuffer(b"".join(bytes.fromhex(r["sha256"]) for r in records), dtype=np.uint8)
                        .reshape(-1, 32) if sha256 else None),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{store.where(MANIFEST_NAME)}: a shard record is malformed ({err!r})") from None
    table = _index_table(store, manifest, ("samples", "bytes", "sha256") if sha256 else ("samples", "bytes"))
    digests = None
    if sha256:
        column = table.column("sha256").combine_chunks()
        raw = np.frombuffer(column.buffers()[1], dtype=np.uint8)
        digests = raw[column.offset * 32:(column.offset + len(column)) * 32].reshape(-1, 32)
    return ShardIndex(samples=table.column("samples").to_numpy(), bytes=table.column("bytes").to_numpy(),
                      sha256=digests)


def iter_records(store: Destination, manifest: dict[str, Any], *, batch: int = 65536) -> Iterator[dict[str, Any]]:
    """The shard records of a manifest of either version, as version 1 listed them (``name``, ``samples``,
    ``bytes``, ``sha256`` hex, ``source_range``, ``skipped`` when any), read ``batch`` rows at a time.

    Args:
        store: The destination the manifest was read from.
        manifest: Its header.
        batch: Rows turned into records at a time.

    Yields:
        One record per shard, in shard order.
    """
    if "index" not in manifest:
        yield from _inline_records(store, manifest)
        return
    table = _index_table(store, manifest, INDEX_COLUMNS)
    row = 0
    for chunk in table.to_batches(max_chunksize=batch):
        columns = chunk.to_pydict()
        for samples, size, digest, start, stop, skipped in zip(*(columns[c] for c in INDEX_COLUMNS), strict=True):
            record = {"name": shard_name(row), "samples": samples, "bytes": size, "sha256": digest.hex(),
                      "source_range": [start, stop]}
            if skipped is not None:
                record["skipped"] = json.loads(skipped)
            row += 1
            yield record
