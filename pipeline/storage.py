"""Every read and write of a local path or an ``s3://`` URL, for every part of the pipeline.

Shards, decode tasks, checkpoints and their retention, init weights, stage results and undelivered metrics all go
through the functions here, so retries, multipart uploads, credentials and error messages live in one place::

    from pipeline import storage

    storage.write_bytes("s3://bucket/run/result.json", data, s3=recipe.s3)
    data = storage.read_bytes("/local/run/result.json")        # FileNotFoundError when absent
    for entry in storage.list_dir("s3://bucket/run", s3=recipe.s3): ...
    storage.copy_tree("/tmp/ckpt", "s3://bucket/run/best_step000000100", s3=recipe.s3)

S3 goes through boto3 (one client per process and settings, reused; botocore retries each request with backoff,
and whole-object reads are retried here around the body). Ray Train wants a pyarrow filesystem for its
``storage_path``: :func:`ray_storage` builds it from the same settings.

Settings come, in priority order, from an explicit :class:`pipeline.config.S3Config` (the recipe's ``s3:``
section) and then the standard AWS variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` / ``AWS_REGION``, ``AWS_MAX_ATTEMPTS``); credentials left unset
fall through to botocore's own chain (shared config files, instance profiles). Credentials are never logged: only
the endpoint and the region are.

Local writes are atomic (a temporary ``.NAME.tmp`` beside the target, fsynced, then renamed), so a reader never
sees half a file.

Over 600 lines on purpose: being the one module that touches boto3 and pyarrow's S3 filesystem is its job
(``tests/test_layout.py`` checks that), so the file API and the S3 client's settings stay together.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import urlsplit

from pipeline.config import S3Config

__all__ = [
    "DEFAULT_REGION",
    "Entry",
    "S3AccessError",
    "StorageError",
    "check_access",
    "check_url",
    "client",
    "copy_tree",
    "exists",
    "file_sizes",
    "get_file",
    "is_s3_url",
    "join",
    "list_dir",
    "make_client",
    "open_read",
    "parent",
    "put_file",
    "ray_storage",
    "read_bytes",
    "remove",
    "remove_tree",
    "resolve_s3_config",
    "split_s3_url",
    "stat",
    "write_bytes",
]

logger = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"
"""Region used when neither the config nor the environment names one (needed to sign requests)."""

TMP_SUFFIX = ".tmp"
"""Suffix of a local file being written (``.NAME.tmp`` beside ``NAME``)."""

MULTIPART_BYTES = 64 * 1024 * 1024
"""Objects larger than this are uploaded in parts of this size (S3 allows 10,000 parts: up to 640 GB)."""


class S3AccessError(RuntimeError):
    """S3 cannot be used: the endpoint is unreachable, the credentials are rejected or the bucket is missing."""


class StorageError(OSError):
    """A stored object exists (or may) but cannot be read or written: denied, or failing after every retry."""


@dataclass(frozen=True)
class Entry:
    """One name directly under a folder or prefix."""

    name: str
    is_dir: bool
    size: int | None = None
    """Bytes (files only)."""
    metadata: dict[str, str] = field(default_factory=dict)
    """User metadata (S3 ``x-amz-meta-*``; only from :func:`stat`, empty for local files)."""


# ------------------------------------------------------------------------------------------------------ URLs


def is_s3_url(url: str | Path) -> bool:
    """Tells whether ``url`` is an ``s3://`` URL."""
    return str(url).startswith("s3://")


def split_s3_url(url: str) -> tuple[str, str]:
    """Splits ``s3://bucket/some/prefix`` into ``("bucket", "some/prefix")``.

    Args:
        url: An ``s3://`` URL; the key part may be empty (``s3://bucket`` or ``s3://bucket/``).

    Returns:
        The bucket name and the key (without a leading ``/``; a trailing ``/`` is kept).

    Raises:
        ValueError: ``url`` is not an ``s3://`` URL or names no bucket.
    """
    if not is_s3_url(url):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URL {url!r} names no bucket (expected s3://bucket/prefix)")
    return bucket, key


def join(base: str | Path, *names: str) -> str:
    """``base/name/...`` for a folder or an ``s3://`` prefix (empty names are dropped)."""
    parts = [str(base).rstrip("/")] + [n.strip("/") for n in names if n and n.strip("/")]
    return "/".join(parts)


def parent(url: str) -> tuple[str, str]:
    """Splits ``dir/name`` (local or ``s3://``) into ``(dir, name)``.

    Raises:
        ValueError: ``url`` has no parent folder.
    """
    head, _, tail = str(url).rstrip("/").rpartition("/")
    if not head or (is_s3_url(url) and head == "s3:/"):
        raise ValueError(f"{url!r} has no parent folder")
    return head, tail


# --------------------------------------------------------------------------------------------- S3 settings


def resolve_s3_config(config: S3Config | None = None, *, environ: Mapping[str, str] | None = None) -> S3Config:
    """Fills the unset fields of ``config`` from the standard AWS variables.

    Args:
        config: Explicit settings (e.g. the recipe's ``s3:`` section); its set fields win.
        environ: Environment to read (default ``os.environ``).

    Returns:
        A new :class:`S3Config`; fields set in neither place stay ``None`` (the region defaults to
        ``us-east-1``).
    """
    env = os.environ if environ is None else environ
    base = config if config is not None else S3Config()
    max_attempts = base.max_attempts
    if "max_attempts" not in base.model_fields_set and env.get("AWS_MAX_ATTEMPTS"):
        try:
            max_attempts = int(env["AWS_MAX_ATTEMPTS"])
        except ValueError:
            raise ValueError(f"AWS_MAX_ATTEMPTS must be an integer, got {env['AWS_MAX_ATTEMPTS']!r}") from None
    return S3Config(
        endpoint_url=base.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
        region=base.region or env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or DEFAULT_REGION,
        access_key_id=base.access_key_id or env.get("AWS_ACCESS_KEY_ID") or None,
        secret_access_key=base.secret_access_key or env.get("AWS_SECRET_ACCESS_KEY") or None,
        # a token belongs to its keys: the environment's only goes with the environment's keys
        session_token=base.session_token if base.access_key_id else (
            base.session_token or env.get("AWS_SESSION_TOKEN") or None
        ),
        max_attempts=max_attempts,
    )


def make_client(
    config: S3Config | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    retry_mode: Literal["standard", "adaptive"] = "standard",
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
) -> Any:
    """Builds a new boto3 S3 client (most callers want the shared one, :func:`client`).

    Args:
        config: Explicit settings; unset fields come from the AWS variables (see :func:`resolve_s3_config`).
        environ: Environment to read (default ``os.environ``).
        retry_mode: botocore retry mode; both back off exponentially between attempts.
        connect_timeout: Seconds to wait for a TCP connection.
        read_timeout: Seconds to wait for a response.

    Returns:
        A ``botocore`` S3 client. Custom endpoints use path-style addressing (``http://host/bucket/key``).

    Raises:
        ValueError: only one of the access key id and the secret key is set.
    """
    import boto3
    from botocore.config import Config

    resolved = resolve_s3_config(config, environ=environ)
    if (resolved.access_key_id is None) != (resolved.secret_access_key is None):
        missing = "secret_access_key" if resolved.secret_access_key is None else "access_key_id"
        raise ValueError(
            f"s3: {missing} is missing (set both the access key id and the secret key, or neither; "
            "see AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
        )
    botocore_config = Config(
        region_name=resolved.region,
        retries={"mode": retry_mode, "total_max_attempts": resolved.max_attempts},  # first try included
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        s3={"addressing_style": "path"} if resolved.endpoint_url else {},
    )
    session = boto3.session.Session(
        aws_access_key_id=resolved.access_key_id,
        aws_secret_access_key=resolved.secret_access_key,
        aws_session_token=resolved.session_token,
        region_name=resolved.region,
    )
    logger.debug(
        "s3 client: endpoint=%s region=%s retries=%s/%d",
        resolved.endpoint_url or "aws",
        resolved.region,
        retry_mode,
        resolved.max_attempts,
    )
    return session.client("s3", endpoint_url=resolved.endpoint_url, config=botocore_config)


_CLIENTS: dict[str, Any] = {}
_CLIENTS_LOCK = threading.Lock()


def client(config: S3Config | None = None) -> Any:
    """The process's boto3 client for these settings (built once, then reused: clients are thread-safe)."""
    resolved = resolve_s3_config(config)
    key = hashlib.sha256(resolved.model_dump_json().encode()).hexdigest()
    with _CLIENTS_LOCK:
        found = _CLIENTS.get(key)
        if found is None:
            found = _CLIENTS[key] = make_client(resolved, environ={})
    return found


def check_access(s3_client: Any, bucket: str, *, timeout: float = 3.0) -> None:
    """Fails fast, with a clear message, when ``bucket`` cannot be used through ``s3_client``.

    First opens a TCP connection to the client's endpoint (``timeout`` seconds, no retries), then asks for the
    bucket (``HeadBucket``), so an unreachable endpoint, rejected credentials and a missing bucket are told apart.

    Args:
        s3_client: A client from :func:`client` or :func:`make_client`.
        bucket: Bucket name.
        timeout: Seconds allowed for the TCP connection.

    Raises:
        S3AccessError: naming the endpoint and the bucket and what is wrong.
    """
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    endpoint = s3_client.meta.endpoint_url
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        raise S3AccessError(
            f"S3 endpoint {endpoint} is unreachable ({err.__class__.__name__}: {err}); "
            "check AWS_ENDPOINT_URL or the recipe's s3.endpoint_url"
        ) from None
    try:
        s3_client.head_bucket(Bucket=bucket)
    except NoCredentialsError:
        raise S3AccessError(
            f"no S3 credentials for {endpoint}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or the recipe's s3 section)"
        ) from None
    except ClientError as err:
        code, status = _error_code(err)
        if code in ("404", "NoSuchBucket") or status == 404:
            raise S3AccessError(f"S3 bucket {bucket!r} does not exist at {endpoint}") from None
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            raise S3AccessError(f"S3 at {endpoint} rejected the credentials ({code}) for bucket {bucket!r}") from None
        if code in ("403", "AccessDenied") or status == 403:
            raise S3AccessError(
                f"access to S3 bucket {bucket!r} at {endpoint} is denied (wrong credentials or no permission)"
            ) from None
        raise S3AccessError(f"S3 bucket {bucket!r} at {endpoint}: {code or status}: {err}") from None
    except BotoCoreError as err:
        raise S3AccessError(f"S3 at {endpoint} failed for bucket {bucket!r}: {err}") from None


def check_url(url: str, *, s3: S3Config | None = None) -> None:
    """:func:`check_access` for the bucket of an ``s3://`` URL (nothing to check for a local path)."""
    if is_s3_url(url):
        check_access(client(s3), split_s3_url(url)[0])


def ray_storage(storage_path: str, *, s3: S3Config | None = None) -> tuple[str, Any]:
    """``(path, pyarrow filesystem or None)`` for Ray Train's ``RunConfig``: a local folder made absolute (and
    created), or ``bucket/prefix`` with an S3 filesystem built from the same settings as :func:`client`."""
    if not is_s3_url(storage_path):
        path = Path(storage_path).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return str(path), None
    import pyarrow.fs

    resolved = resolve_s3_config(s3)
    endpoint = resolved.endpoint_url or ""
    filesystem = pyarrow.fs.S3FileSystem(
        access_key=resolved.access_key_id,
        secret_key=resolved.secret_access_key,
        session_token=resolved.session_token,
        region=resolved.region,
        endpoint_override=endpoint.split("://", 1)[-1] or None,
        scheme=endpoint.split("://", 1)[0] if "://" in endpoint else "https",
        retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=resolved.max_attempts),
    )
    return storage_path.removeprefix("s3://").rstrip("/"), filesystem


# ------------------------------------------------------------------------------------------- files and objects


def _error_code(err: Any) -> tuple[str, int | None]:
    response = getattr(err, "response", {}) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(response.get("Error", {}).get("Code", "")), int(status) if status is not None else None


def _raise_for(err: Any, url: str) -> None:
    """Turns a final S3 ``ClientError`` into the matching Python error."""
    code, status = _error_code(err)
    if code in ("NoSuchKey", "404", "NotFound") or status == 404:
        raise FileNotFoundError(f"{url} does not exist") from None
    if code in ("AccessDenied", "403") or status == 403:
        raise PermissionError(f"{url}: access denied ({code or status})") from None
    raise StorageError(f"{url}: {code or status}: {err}") from None


def _retried(url: str, s3: S3Config | None, action: Any) -> Any:
    """Runs ``action(client, bucket, key)``, retrying what botocore cannot: a connection that drops while a body
    streams, timeouts, and server errors (5xx, 408, 429) that outlived botocore's own attempts."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_url(url)
    attempts = resolve_s3_config(s3).max_attempts
    last = ""
    for attempt in range(attempts):
        try:
            return action(client(s3), bucket, key)
        except ClientError as err:
            code, status = _error_code(err)
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                _raise_for(err, url)
            last = code or str(status)
        except (BotoCoreError, OSError) as err:
            last = f"{err.__class__.__name__}: {err}"
        if attempt + 1 < attempts:
            time.sleep(min(8.0, 0.2 * 2**attempt))
    raise StorageError(f"{url}: {last} (after {attempts} attempts)")


def read_bytes(url: str | Path, *, s3: S3Config | None = None) -> bytes:
    """The whole file or object.

    Raises:
        FileNotFoundError: it does not exist.
        PermissionError: access is denied.
        StorageError: any other failure (after retries, for S3).
    """
    url = str(url)
    if not is_s3_url(url):
        try:
            return Path(url).expanduser().read_bytes()
        except (FileNotFoundError, PermissionError):
            raise
        except IsADirectoryError:
            raise FileNotFoundError(f"{url} is a folder, not a file") from None
        except OSError as err:
            raise StorageError(f"{url}: {err.strerror or err}") from None
    return _retried(url, s3, lambda c, bucket, key: c.get_object(Bucket=bucket, Key=key)["Body"].read())


def write_bytes(
    url: str | Path, data: bytes, *, s3: S3Config | None = None, metadata: Mapping[str, str] | None = None
) -> None:
    """Writes a whole file or object (atomically for local files; parents are created).

    Args:
        url: Target path or ``s3://`` URL.
        data: Contents.
        s3: S3 settings.
        metadata: S3 user metadata (ignored for local files).
    """
    url = str(url)
    if not is_s3_url(url):
        path = Path(url).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return
    if len(data) > MULTIPART_BYTES:
        import io

        _upload(io.BytesIO(data), url, s3=s3, metadata=metadata)
        return
    extra = {"Metadata": dict(metadata)} if metadata else {}
    _retried(url, s3, lambda c, bucket, key: c.put_object(Bucket=bucket, Key=key, Body=data, **extra))


def _upload(source: Any, url: str, *, s3: S3Config | None, metadata: Mapping[str, str] | None) -> None:
    """Uploads a file name or file object, in parts above :data:`MULTIPART_BYTES` (parts retried by boto3)."""
    from boto3.s3.transfer import TransferConfig

    bucket, key = split_s3_url(url)
    transfer = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)
    extra = {"Metadata": dict(metadata)} if metadata else None
    s3_client = client(s3)
    if isinstance(source, (str, Path)):
        s3_client.upload_file(str(source), bucket, key, ExtraArgs=extra, Config=transfer)
    else:
        s3_client.upload_fileobj(source, bucket, key, ExtraArgs=extra, Config=transfer)


def put_file(
    local: str | Path,
    url: str | Path,
    *,
    s3: S3Config | None = None,
    metadata: Mapping[str, str] | None = None,
    move: bool = False,
) -> None:
    """Stores the local file ``local`` at ``url`` (multipart above :data:`MULTIPART_BYTES`).

    Args:
        local: An existing local file.
        url: Target path or ``s3://`` URL.
        s3: S3 settings.
        metadata: S3 user metadata (ignored for local targets).
        move: Remove ``local`` once stored (a rename for a local target on the same disk).
    """
    url = str(url)
    if not is_s3_url(url):
        target = Path(url).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        if move:
            shutil.move(str(local), target)
        else:
            tmp = target.with_name(f".{target.name}{TMP_SUFFIX}")
            shutil.copyfile(local, tmp)
            os.replace(tmp, target)
        return
    _upload(Path(local), url, s3=s3, metadata=metadata)
    if move:
        Path(local).unlink()


def open_read(url: str | Path, *, s3: S3Config | None = None) -> IO[bytes]:
    """A readable binary stream (the caller closes it); for large objects read once from start to end.

    Raises:
        FileNotFoundError: it does not exist.
    """
    url = str(url)
    if not is_s3_url(url):
        return open(Path(url).expanduser(), "rb")  # noqa: SIM115 - the caller closes it
    return _retried(url, s3, lambda c, bucket, key: c.get_object(Bucket=bucket, Key=key)["Body"])


def stat(url: str | Path, *, s3: S3Config | None = None) -> Entry | None:
    """Size (and S3 user metadata) of a file or object; None when it does not exist."""
    url = str(url)
    if not is_s3_url(url):
        path = Path(url).expanduser()
        if path.is_dir():
            return Entry(name=path.name, is_dir=True)
        try:
            return Entry(name=path.name, is_dir=False, size=path.stat().st_size)
        except FileNotFoundError:
            return None
    try:
        head = _retried(url, s3, lambda c, bucket, key: c.head_object(Bucket=bucket, Key=key))
    except FileNotFoundError:
        return None
    return Entry(name=parent(url)[1], is_dir=False, size=int(head["ContentLength"]),
                 metadata=dict(head.get("Metadata", {})))


def exists(url: str | Path, *, s3: S3Config | None = None) -> bool:
    """Whether a file (or local folder) exists at ``url``."""
    return stat(url, s3=s3) is not None


def _pages(url: str, s3: S3Config | None, *, delimiter: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(prefix, page)`` of a ListObjectsV2 listing under the folder ``url``."""
    bucket, key = split_s3_url(url)
    prefix = key.strip("/") + "/" if key.strip("/") else ""
    paginator = client(s3).get_paginator("list_objects_v2")
    kwargs = {"Delimiter": "/"} if delimiter else {}
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, **kwargs):
            yield prefix, page
    except Exception as err:  # noqa: BLE001 - botocore's ClientError, named below
        if hasattr(err, "response"):
            _raise_for(err, url)
        raise


def list_dir(url: str | Path, *, s3: S3Config | None = None) -> list[Entry]:
    """Files and folders directly under a folder or prefix, sorted by name (empty when it does not exist)."""
    url = str(url)
    if not is_s3_url(url):
        path = Path(url).expanduser()
        if not path.is_dir():
            return []
        entries = []
        for child in path.iterdir():
            try:
                is_dir = child.is_dir()
                entries.append(Entry(name=child.name, is_dir=is_dir, size=None if is_dir else child.stat().st_size))
            except FileNotFoundError:  # removed meanwhile (Ray Train rotating its checkpoints): not listed
                continue
        return sorted(entries, key=lambda e: e.name)
    found: list[Entry] = []
    for prefix, page in _pages(url, s3, delimiter=True):
        found.extend(Entry(name=o["Key"][len(prefix) :], is_dir=False, size=int(o["Size"]))
                     for o in page.get("Contents", []) if o["Key"] != prefix)
        found.extend(Entry(name=p["Prefix"][len(prefix) :].rstrip("/"), is_dir=True)
                     for p in page.get("CommonPrefixes", []))
    return sorted(found, key=lambda e: e.name)


def file_sizes(url: str | Path, *, s3: S3Config | None = None) -> dict[str, int]:
    """Every file below a folder or prefix: relative name → size in bytes (empty when it does not exist)."""
    url = str(url)
    if not is_s3_url(url):
        root = Path(url).expanduser()
        if not root.is_dir():
            return {}
        sizes = {}
        for path in root.rglob("*"):
            try:
                if path.is_file():
                    sizes[str(path.relative_to(root))] = path.stat().st_size
            except FileNotFoundError:  # removed meanwhile: not listed
                continue
        return sizes
    return {o["Key"][len(prefix) :]: int(o["Size"]) for prefix, page in _pages(url, s3, delimiter=False)
            for o in page.get("Contents", [])}


def _walk(url: str, s3: S3Config | None) -> list[str]:
    """Relative names of every file below a folder or prefix."""
    return sorted(file_sizes(url, s3=s3))


def remove(url: str | Path, *, s3: S3Config | None = None) -> None:
    """Removes a file or object (nothing happens when it does not exist)."""
    url = str(url)
    if not is_s3_url(url):
        Path(url).expanduser().unlink(missing_ok=True)
        return
    _retried(url, s3, lambda c, bucket, key: c.delete_object(Bucket=bucket, Key=key))


def remove_tree(url: str | Path, *, s3: S3Config | None = None) -> None:
    """Removes a folder or prefix with everything below it (nothing happens when it does not exist)."""
    url = str(url)
    if not is_s3_url(url):
        shutil.rmtree(Path(url).expanduser(), ignore_errors=True)
        return
    bucket, key = split_s3_url(url)
    prefix = key.strip("/") + "/" if key.strip("/") else ""
    names = _walk(url, s3)
    for start in range(0, len(names), 1000):  # DeleteObjects takes at most 1,000 keys
        batch = [{"Key": prefix + n} for n in names[start : start + 1000]]
        _retried(url, s3, lambda c, b, _: c.delete_objects(Bucket=b, Delete={"Objects": batch, "Quiet": True}))


def get_file(url: str | Path, local: str | Path, *, s3: S3Config | None = None) -> None:
    """Stores the file or object ``url`` as the local file ``local``, streamed to disk (in parallel parts above
    :data:`MULTIPART_BYTES`, so a multi-GiB checkpoint shard never sits in memory) and atomically.

    Raises:
        FileNotFoundError: it does not exist.
    """
    url, target = str(url), Path(local).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}{TMP_SUFFIX}")
    if not is_s3_url(url):
        shutil.copyfile(Path(url).expanduser(), tmp)
    else:
        from boto3.s3.transfer import TransferConfig

        transfer = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)
        _retried(url, s3, lambda c, bucket, key: c.download_file(bucket, key, str(tmp), Config=transfer))
    os.replace(tmp, target)


def copy_tree(
    source: str | Path, target: str | Path, *, s3: S3Config | None = None, include: Callable[[str], bool] | None = None
) -> list[str]:
    """Copies every file below the folder ``source`` to below ``target`` (either side local or ``s3://``).

    Args:
        source: The folder or prefix to copy.
        target: Where its files go.
        s3: S3 settings.
        include: Copy only the relative names it accepts (every file when None).

    Returns:
        The relative names copied.
    """
    source, target = str(source), str(target)
    # "folder/" keys are the empty markers some S3 clients (pyarrow's, under Ray Train) create for folders
    names = [n for n in _walk(source, s3) if n and not n.endswith("/") and (include is None or include(n))]
    for name in names:
        src, dst = join(source, name), join(target, name)
        if not is_s3_url(src):
            put_file(src, dst, s3=s3)
        elif not is_s3_url(dst):
            get_file(src, dst, s3=s3)
        else:
            bucket, key = split_s3_url(src)
            _retried(dst, s3, lambda c, b, k: c.copy({"Bucket": bucket, "Key": key}, b, k))  # multipart when large
    return names
