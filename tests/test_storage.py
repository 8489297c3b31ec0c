"""pipeline.storage: URL helpers, S3 settings priority, fail-fast access checks, and the file API on a local
folder and on the real moto_server S3 API alike."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pipeline.config import S3Config
from pipeline import storage
from pipeline.storage import S3AccessError, check_access, make_client, resolve_s3_config, split_s3_url
from pipeline.services import S3Server, free_port


def test_split_and_join_s3_urls() -> None:
    assert split_s3_url("s3://bucket/some/prefix") == ("bucket", "some/prefix")
    assert split_s3_url("s3://bucket") == ("bucket", "")
    assert split_s3_url("s3://bucket/dir/") == ("bucket", "dir/")
    assert storage.join("s3://b", "x/", "/y", "") == "s3://b/x/y"
    assert storage.parent("s3://b/x/y.tar") == ("s3://b/x", "y.tar")
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


def test_session_token_goes_with_its_keys() -> None:
    env = {"AWS_ACCESS_KEY_ID": "env-id", "AWS_SECRET_ACCESS_KEY": "env-secret", "AWS_SESSION_TOKEN": "env-token"}
    assert resolve_s3_config(None, environ=env).session_token == "env-token"
    # keys from the recipe: the environment's token belongs to other keys
    explicit = S3Config(access_key_id="cfg-id", secret_access_key="cfg-secret")
    assert resolve_s3_config(explicit, environ=env).session_token is None
    with_token = resolve_s3_config(explicit.model_copy(update={"session_token": "cfg-token"}), environ=env)
    assert with_token.session_token == "cfg-token" and "cfg-token" not in repr(with_token)


def test_temporary_credentials_reach_s3(s3_server: S3Server, s3_bucket: str) -> None:
    """boto3 (files) and pyarrow (Ray Train's storage) both send the session token; the settings workers get
    carry it, the recipe dump that reaches params and artifacts does not."""
    from pipeline.config import S3_SECRETS, load_recipe

    token = "temporary-session-token-0123"
    s3 = S3Config(endpoint_url=s3_server.endpoint_url, access_key_id="ASIATEMPORARY", secret_access_key="s",
                  session_token=token)
    assert make_client(s3, environ={})._request_signer._credentials.token == token
    storage.write_bytes(f"s3://{s3_bucket}/a.txt", b"x", s3=s3)
    assert storage.read_bytes(f"s3://{s3_bucket}/a.txt", s3=s3) == b"x"
    path, filesystem = storage.ray_storage(f"s3://{s3_bucket}/runs", s3=s3)
    with filesystem.open_output_stream(f"{path}/b.txt") as out:
        out.write(b"y")
    assert storage.read_bytes(f"s3://{s3_bucket}/runs/b.txt", s3=s3) == b"y"
    recipe = load_recipe(Path(__file__).parent.parent / "jobs" / "demo_digits.yaml", [f"s3.session_token={token}"])
    assert recipe.s3.session_token == token
    assert token not in str(recipe.model_dump(mode="json", exclude={"s3": S3_SECRETS}))


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


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A folder to work in: a local path, or a prefix in a fresh bucket of the test S3 server (AWS variables set)."""
    if request.param == "local":
        return str(tmp_path / "root")
    bucket = request.getfixturevalue("s3_bucket")
    request.getfixturevalue("s3_env")
    return f"s3://{bucket}/some/prefix"


def test_write_read_stat_list_remove(root: str) -> None:
    url = storage.join(root, "dir", "a.json")
    with pytest.raises(FileNotFoundError, match="a.json"):
        storage.read_bytes(url)
    assert storage.stat(url) is None and not storage.exists(url)
    storage.write_bytes(url, b'{"a": 1}', metadata={"sha256": "abc"})
    storage.write_bytes(storage.join(root, "dir", "sub", "b.bin"), b"xyz")
    assert storage.read_bytes(url) == b'{"a": 1}'
    info = storage.stat(url)
    assert info is not None and info.size == 8 and not info.is_dir
    if storage.is_s3_url(root):
        assert info.metadata == {"sha256": "abc"}
    listed = storage.list_dir(storage.join(root, "dir"))
    assert [(e.name, e.is_dir, e.size) for e in listed] == [("a.json", False, 8), ("sub", True, None)]
    with storage.open_read(url) as stream:
        assert stream.read() == b'{"a": 1}'
    storage.remove(url)
    storage.remove(url)  # already gone: no error
    assert not storage.exists(url)
    assert storage.list_dir(storage.join(root, "nothing-here")) == []


def test_copy_tree_both_ways_and_remove_tree(root: str, tmp_path: Path) -> None:
    local = tmp_path / "tree"
    (local / "deepspeed" / "step").mkdir(parents=True)
    (local / "deepspeed" / "step" / "model.pt").write_bytes(b"weights")
    (local / "trainer_state.json").write_text("{}")
    target = storage.join(root, "best_step000000020")
    copied = storage.copy_tree(local, target)
    assert copied == ["deepspeed/step/model.pt", "trainer_state.json"]
    assert storage.read_bytes(storage.join(target, "deepspeed/step/model.pt")) == b"weights"
    back = tmp_path / "back"
    storage.copy_tree(target, back)
    assert (back / "deepspeed" / "step" / "model.pt").read_bytes() == b"weights"
    only = storage.copy_tree(target, tmp_path / "only", include=lambda name: not name.startswith("deepspeed/"))
    assert only == ["trainer_state.json"] and not (tmp_path / "only" / "deepspeed").exists()
    storage.remove_tree(target)
    assert storage.list_dir(root) == [] and storage.list_dir(target) == []


def test_put_file_multipart(root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the threshold an object is uploaded in parts (the S3 ETag of a multipart object ends in -N)."""
    monkeypatch.setattr(storage, "MULTIPART_BYTES", 5 * 2**20)  # S3's smallest part size
    data = os.urandom(12 * 2**20)
    local = tmp_path / "big.tar"
    local.write_bytes(data)
    url = storage.join(root, "big.tar")
    storage.put_file(local, url, move=True)
    assert not local.exists()
    assert storage.read_bytes(url) == data
    if storage.is_s3_url(root):
        bucket, key = split_s3_url(url)
        assert storage.client().head_object(Bucket=bucket, Key=key)["ETag"].strip('"').endswith("-3")
    storage.get_file(url, tmp_path / "down" / "big.tar")  # streamed to disk, in parts too
    assert (tmp_path / "down" / "big.tar").read_bytes() == data
    assert [p.name for p in (tmp_path / "down").iterdir()] == ["big.tar"]  # no temporary file left
    with pytest.raises(FileNotFoundError):
        storage.get_file(storage.join(root, "missing.tar"), tmp_path / "down" / "missing.tar")


def test_local_writes_are_atomic(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    storage.write_bytes(target, b"old")
    storage.write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # no temporary left behind


def test_one_client_per_settings(s3_env: dict[str, str]) -> None:
    assert storage.client() is storage.client()
    other = storage.client(S3Config(endpoint_url="http://127.0.0.1:9", access_key_id="a",
                                            secret_access_key="b"))
    assert other is not storage.client()


def test_rejected_credentials_are_not_a_missing_file(s3_auth_server: S3Server) -> None:
    s3 = S3Config(endpoint_url=s3_auth_server.endpoint_url, access_key_id="unknown", secret_access_key="bad",
                          max_attempts=1)
    with pytest.raises(PermissionError, match="any-bucket"):
        storage.read_bytes("s3://any-bucket/x", s3=s3)
