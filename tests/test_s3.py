"""pipeline.s3: URL helpers, settings priority, fail-fast access checks (against the real moto_server)."""

from __future__ import annotations

import time

import pytest

from pipeline.config import S3Config
from pipeline.s3 import S3AccessError, check_access, join_s3_url, make_client, resolve_s3_config, split_s3_url
from pipeline.services import S3Server, free_port


def test_split_and_join_s3_urls() -> None:
    assert split_s3_url("s3://bucket/some/prefix") == ("bucket", "some/prefix")
    assert split_s3_url("s3://bucket") == ("bucket", "")
    assert split_s3_url("s3://bucket/dir/") == ("bucket", "dir/")
    assert join_s3_url("b", "x/", "/y", "") == "s3://b/x/y"
    with pytest.raises(ValueError, match="'/tmp/x'"):
        split_s3_url("/tmp/x")
    with pytest.raises(ValueError, match="names no bucket"):
        split_s3_url("s3:///key")


def test_explicit_config_wins_over_environment() -> None:
    env = {
        "AWS_ENDPOINT_URL": "http://env:1",
        "AWS_ACCESS_KEY_ID": "env-id",
        "AWS_SECRET_ACCESS_KEY": "env-secret",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_MAX_ATTEMPTS": "7",
    }
    from_env = resolve_s3_config(None, environ=env)
    assert (from_env.endpoint_url, from_env.access_key_id, from_env.region, from_env.max_attempts) == (
        "http://env:1", "env-id", "eu-west-1", 7
    )
    explicit = resolve_s3_config(S3Config(endpoint_url="http://cfg:2", access_key_id="cfg-id",
                                          secret_access_key="cfg-secret", max_attempts=2), environ=env)
    assert (explicit.endpoint_url, explicit.access_key_id, explicit.secret_access_key, explicit.max_attempts) == (
        "http://cfg:2", "cfg-id", "cfg-secret", 2
    )
    assert explicit.region == "eu-west-1"
    assert "cfg-secret" not in repr(explicit) and "env-secret" not in repr(from_env)
    assert resolve_s3_config(None, environ={}).region == "us-east-1"
    with pytest.raises(ValueError, match="AWS_MAX_ATTEMPTS"):
        resolve_s3_config(None, environ={"AWS_MAX_ATTEMPTS": "many"})


def test_client_settings() -> None:
    client = make_client(S3Config(endpoint_url="http://127.0.0.1:9", access_key_id="a", secret_access_key="b",
                                  max_attempts=4), environ={}, retry_mode="adaptive")
    assert client.meta.endpoint_url == "http://127.0.0.1:9"
    assert client.meta.config.retries == {"mode": "adaptive", "total_max_attempts": 4}
    assert client.meta.config.s3 == {"addressing_style": "path"}


def test_check_access(s3_server: S3Server, s3_bucket: str) -> None:
    client = s3_server.client()
    check_access(client, s3_bucket)
    with pytest.raises(S3AccessError, match="'missing-bucket' does not exist"):
        check_access(client, "missing-bucket")
    dead = make_client(S3Config(endpoint_url=f"http://127.0.0.1:{free_port()}", access_key_id="a",
                                secret_access_key="b"), environ={})
    started = time.monotonic()
    with pytest.raises(S3AccessError, match="unreachable"):
        check_access(dead, s3_bucket)
    assert time.monotonic() - started < 5
