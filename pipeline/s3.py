"""One place that builds S3 clients, and small helpers around ``s3://`` URLs.

Settings come, in priority order, from an explicit :class:`pipeline.config.S3Config` (the recipe's ``s3:`` section)
and then from the standard AWS variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION`` / ``AWS_REGION``, ``AWS_MAX_ATTEMPTS``); credentials left unset fall through to botocore's
own chain (shared config files, instance profiles). Requests are retried with backoff (botocore's ``standard`` or
``adaptive`` retry mode). Credentials are never logged: only the endpoint and the region are.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

from pipeline.config import S3Config

__all__ = [
    "S3AccessError",
    "check_access",
    "is_s3_url",
    "join_s3_url",
    "make_client",
    "resolve_s3_config",
    "split_s3_url",
]

logger = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"
"""Region used when neither the config nor the environment names one (needed to sign requests)."""


class S3AccessError(RuntimeError):
    """S3 cannot be used: the endpoint is unreachable, the credentials are rejected or the bucket is missing."""


def is_s3_url(url: str) -> bool:
    """Tells whether ``url`` is an ``s3://`` URL.

    Args:
        url: Any path or URL.

    Returns:
        True for ``s3://...``.
    """
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


def join_s3_url(bucket: str, *parts: str) -> str:
    """Builds ``s3://bucket/a/b`` from a bucket and key parts (empty parts are dropped).

    Args:
        bucket: Bucket name.
        *parts: Key parts, joined with ``/``.

    Returns:
        The URL.
    """
    key = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
    return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"


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
    """Builds a boto3 S3 client.

    Args:
        config: Explicit settings; unset fields come from the AWS variables (see :func:`resolve_s3_config`).
        environ: Environment to read (default ``os.environ``).
        retry_mode: botocore retry mode; both back off exponentially between attempts.
        connect_timeout: Seconds to wait for a TCP connection.
        read_timeout: Seconds to wait for a response.

    Returns:
        A ``botocore`` S3 client. Custom endpoints use path-style addressing (``http://host/bucket/key``).
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


def check_access(client: Any, bucket: str, *, timeout: float = 3.0) -> None:
    """Fails fast, with a clear message, when ``bucket`` cannot be used through ``client``.

    First opens a TCP connection to the client's endpoint (``timeout`` seconds, no retries), then asks for the
    bucket (``HeadBucket``), so an unreachable endpoint, rejected credentials and a missing bucket are told apart.

    Args:
        client: A client from :func:`make_client`.
        bucket: Bucket name.
        timeout: Seconds allowed for the TCP connection.

    Raises:
        S3AccessError: naming the endpoint and the bucket and what is wrong.
    """
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    endpoint = client.meta.endpoint_url
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
        client.head_bucket(Bucket=bucket)
    except NoCredentialsError:
        raise S3AccessError(
            f"no S3 credentials for {endpoint}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or the recipe's s3 section)"
        ) from None
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
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
