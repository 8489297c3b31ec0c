"""Shared pytest fixtures. Real components only: services run on 127.0.0.1, each fixture stops only what it started.

* ``s3_server`` (session): a ``moto_server`` S3 API (``pipeline.services.S3Server``, as ``infra/local`` uses).
* ``mlflow_server`` (session, started only when a test asks for it): ``mlflow server`` with artifacts in S3.
* ``s3_bucket``: a fresh bucket per test; ``s3_env``: the AWS variables pointing at ``s3_server`` for one test.
* ``as_version1``: rewrites a local corpus with the version-1 manifest (every shard inline in ``manifest.json``).

Ray Train's controller polls its workers every 0.5 s here instead of 2 s (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``,
inherited by every Ray cluster and command the tests start): a run's start and end wait on those polls. Measured
on ``tests/test_train.py -k "golden or fewer"`` (3 Ray Train runs), two pairs in both orders: 96.7 and 108.3 s
against 113.7 and 116.5 s, ~4 s per run.

Ray's log deduplication is off (``RAY_DEDUP_LOGS=0``): it treats lines that differ only in numbers as repeats, so of
``rank 0 resumed at step 22 …`` and ``rank 1 resumed at step 22 …`` only the first one logged reached the driver at
once, the other up to 5 s later, and a test reading the driver's output for rank 0's line failed whenever rank 1
logged first (seen once in a fresh-clone run).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.services import MLflowServer, S3Server

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A local S3 server for the whole session."""
    with S3Server(log_dir=tmp_path_factory.mktemp("s3-server")) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MLflowServer]:
    """A local MLflow tracking server (SQLite backend, artifacts proxied into ``s3://mlflow/``)."""
    with MLflowServer(s3_server, tmp_path_factory.mktemp("mlflow-server"), bucket="mlflow") as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A new, empty bucket on ``s3_server`` (unique name per test)."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    return name


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Exports the AWS variables of ``s3_server`` for one test; returns them (for subprocesses)."""
    env = s3_server.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(key, raising=False)
    return env


@pytest.fixture(scope="session")
def s3_auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A second local S3 server that checks credentials (moto's IAM auth): only its readiness probe goes
    through unauthenticated, every later request with unknown keys is rejected. For bad-credential tests."""
    server = S3Server(log_dir=tmp_path_factory.mktemp("s3-auth-server"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "1")  # read by moto_server at start
        server.start()
    try:
        yield server
    finally:
        server.stop()


def _rewrite_as_version1(dest: Path) -> dict[str, Any]:
    from pipeline.data.shards import INDEX_NAME, MANIFEST_NAME, read_manifest, read_records

    manifest = read_manifest(str(dest))
    records = list(read_records(str(dest)))
    old = {k: v for k, v in manifest.items() if k not in ("manifest_version", "num_shards", "index")}
    old["shards"] = records
    (dest / MANIFEST_NAME).write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    (dest / INDEX_NAME).unlink()
    return old


@pytest.fixture
def as_version1() -> Callable[[Path], dict[str, Any]]:
    """Rewrites a local corpus in the version-1 manifest layout, as writers before manifest version 2 left it:
    every shard record inline under ``shards`` in ``manifest.json``, no ``manifest_version``, no
    ``shards.parquet``. Returns that manifest."""
    return _rewrite_as_version1
