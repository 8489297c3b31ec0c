"""Local services (pipeline.services): real moto_server and mlflow server processes on 127.0.0.1."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from pipeline.services import MLflowServer, S3Server, ServiceError

REPO = Path(__file__).resolve().parents[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _pids_with_args(*args: str) -> list[int]:
    """PIDs whose command line holds ``args`` consecutively."""
    needle = "\0".join(args).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(entry.name))
    return found


def test_s3_server_start_stop(tmp_path: Path) -> None:
    server = S3Server(log_dir=tmp_path)
    with pytest.raises(ServiceError, match="not running"):
        _ = server.endpoint_url
    server.start()
    try:
        pid, port = server.pid, server.port
        assert pid is not None and port is not None and _pid_alive(pid) and _port_open(port)
        assert server.endpoint_url == f"http://127.0.0.1:{port}"
        env = server.env()
        assert sorted(env) == ["AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_SECRET_ACCESS_KEY"]
        assert env["AWS_ENDPOINT_URL"] == server.endpoint_url
        server.create_bucket("made-here")
        server.create_bucket("made-here")  # idempotent
        assert "made-here" in [b["Name"] for b in server.client().list_buckets()["Buckets"]]
    finally:
        server.stop()
    assert server.pid is None
    assert not _pid_alive(pid)
    assert not _port_open(port)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))  # the port is free again
    assert (tmp_path / "s3.log").exists()
    server.stop()  # stopping twice is harmless


def test_s3_server_port_in_use_fails_clearly(s3_server: S3Server, tmp_path: Path) -> None:
    assert s3_server.port is not None
    second = S3Server(port=s3_server.port, log_dir=tmp_path, startup_timeout=15)
    try:
        with pytest.raises(ServiceError, match=f"port 127.0.0.1:{s3_server.port} is already in use"):
            second.start()
    finally:
        second.stop()
    assert _port_open(s3_server.port)  # the running server was left alone


def test_mlflow_run_with_artifact_lands_in_s3(
    mlflow_server: MLflowServer, s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)  # clients need no AWS variables: the server proxies artifacts
    with urllib.request.urlopen(f"{mlflow_server.tracking_uri}/health", timeout=10) as response:
        assert response.status == 200
    client = MlflowClient(tracking_uri=mlflow_server.tracking_uri)
    experiment_id = client.create_experiment(f"services-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id)
    run_id = run.info.run_id
    client.log_metric(run_id, "train/loss", 0.25, step=3)
    artifact = tmp_path / "hello.txt"
    artifact.write_text("artifact body\n")
    client.log_artifact(run_id, str(artifact))
    client.set_terminated(run_id)

    assert [m.value for m in client.get_metric_history(run_id, "train/loss")] == [0.25]
    assert [a.path for a in client.list_artifacts(run_id)] == ["hello.txt"]
    s3 = s3_server.client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=mlflow_server.bucket).get("Contents", [])]
    (key,) = [k for k in keys if k.endswith(f"{run_id}/artifacts/hello.txt")]
    assert s3.get_object(Bucket=mlflow_server.bucket, Key=key)["Body"].read() == b"artifact body\n"


def test_services_up_prints_exports_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = dict(os.environ)
    for key in ("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    stderr = open(tmp_path / "up.stderr", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.services", "up", "--dir", str(tmp_path / "svc"), "--bucket", "data"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    exports: dict[str, str] = {}
    try:
        deadline = time.monotonic() + 240
        while "MLFLOW_TRACKING_URI" not in exports:
            line = lines.get(timeout=max(1.0, deadline - time.monotonic()))
            assert line is not None, f"services exited early: {(tmp_path / 'up.stderr').read_text()}"
            if line.startswith("export "):
                key, _, value = line[len("export ") :].partition("=")
                exports[key] = value
        assert exports["AWS_ACCESS_KEY_ID"] == exports["AWS_SECRET_ACCESS_KEY"] == "testing"
        s3_port = int(exports["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
        mlflow_port = int(exports["MLFLOW_TRACKING_URI"].rsplit(":", 1)[1])
        with urllib.request.urlopen(f"{exports['MLFLOW_TRACKING_URI']}/health", timeout=10) as response:
            assert response.status == 200
        from pipeline.config import S3Config
        from pipeline.storage import make_client

        s3 = make_client(
            S3Config(endpoint_url=exports["AWS_ENDPOINT_URL"], access_key_id="testing", secret_access_key="testing"),
            environ={},
        )
        assert {"data", "mlflow"} <= {b["Name"] for b in s3.list_buckets()["Buckets"]}
        children = _pids_with_args("--port", str(mlflow_port)) + _pids_with_args("-p", str(s3_port))
        assert len(children) >= 3  # moto_server, mlflow, uvicorn

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not _port_open(s3_port) and not _port_open(mlflow_port)
        assert [pid for pid in children if _pid_alive(pid)] == []
        assert (tmp_path / "svc" / "mlflow.db").exists()
        assert "stopped" in (tmp_path / "up.stderr").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()
