"""A shards destination (a local folder or an ``s3://`` prefix, through :mod:`pipeline.storage`) and its
``manifest.json``."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any

from pipeline import storage
from pipeline.config import S3Config

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "PARTIAL_MANIFEST_NAME", "SHARD_RE", "Destination", "dump_json",
           "load_json", "read_destination_manifest", "read_manifest", "shard_name"]

FORMAT_VERSION = 1
"""Version of the shard layout and manifest schema."""
MANIFEST_NAME = "manifest.json"
PARTIAL_MANIFEST_NAME = "manifest.partial.json"
SHARD_RE = re.compile(r"^shard-\d{6,}\.tar$")


def shard_name(index: int) -> str:
    """Returns the file name of shard ``index`` (``shard-000000.tar``).

    Args:
        index: Zero-based shard number.

    Returns:
        The name.
    """
    return f"shard-{index:06d}.tar"


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


def read_destination_manifest(store: Destination) -> dict[str, Any]:
    """:func:`read_manifest` of an opened destination."""
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
    return manifest
