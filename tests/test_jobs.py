"""Cluster use end to end: ``ray job submit --working-dir . -- python -m pipeline run jobs/X.yaml`` against a real
Ray head (``ray start --head --block`` on 127.0.0.1, token authentication on), with checkpoints in a real S3 server
and tracking on a real MLflow server; ``ray job stop`` leaves KILLED runs and a checkpoint the next submission
resumes; and ``revcol demo --services`` wiring the demo to its own S3 + MLflow servers.

One head serves the module (~15–70 s to start here). The demo recipe is cut to its pretrain stage: every stage costs
a Ray Train start-up (~1 min on a busy 2-core machine) and the chain itself is covered by ``tests/test_demo.py``.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load as load_safetensors

from pipeline.cluster import RayHead
from pipeline.demo import _overrides, prepare_digits
from pipeline.services import MLflowServer, S3Server

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
STOP_WAIT_S = 30
"""``RAY_JOB_STOP_WAIT_TIME_S`` of the jobs: how long ``ray job stop`` waits after SIGTERM before SIGKILL (Ray's
default, 3 s, is short for a busy machine to mark the MLflow runs KILLED)."""


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def head() -> Iterator[RayHead]:
    """A real single-node Ray head for the module; stopped by SIGTERM to its own PID, its processes checked gone."""
    ray_head = RayHead(num_cpus=4)
    ray_head.start()
    try:
        yield ray_head
    finally:
        import psutil

        family = psutil.Process(ray_head.pid).children(recursive=True) if ray_head.running else []
        ray_head.stop()
        assert not [p.pid for p in family if _alive(p)], "processes of the ray head outlived its stop()"


def _alive(proc: Any) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's image folders and shards (``pipeline.demo.prepare_digits``) in a module temp dir."""
    workdir = tmp_path_factory.mktemp("digits")
    prepare_digits(workdir, progress=False)
    return workdir


def _api(head: RayHead, path: str, *, method: str = "GET", token: str | None = "cluster") -> tuple[int, Any]:
    """One Jobs API request; ``token`` "cluster" sends the head's token, None none, anything else that string."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {head.token if token == 'cluster' else token}"
    body = b"{}" if method == "POST" else None
    request = urllib.request.Request(f"{head.address}{path}", data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def _job_status(head: RayHead, submission_id: str) -> str:
    status, info = _api(head, f"/api/jobs/{submission_id}")
    assert status == 200, f"job {submission_id}: HTTP {status}: {info}"
    return str(info["status"])


def _ray(args: list[str], env: dict[str, str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    """``ray ARGS`` from the repository root, as a user runs it."""
    return subprocess.run([RAY, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _s3_keys(s3: S3Server, bucket: str, prefix: str) -> list[str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


# --------------------------------------------------------------------------------------------------------- tests
def test_jobs_api_refuses_requests_without_the_token(head: RayHead, tmp_path: Path) -> None:
    """Token authentication is on: no token → 401, a wrong one → 403, the cluster's → 200; the CLI without the
    token is refused and submits nothing."""
    assert _api(head, "/api/jobs/", method="POST", token=None)[0] == 401
    assert _api(head, "/api/jobs/", method="POST", token="not-the-token")[0] == 403
    assert _api(head, "/api/jobs/")[0] == 200
    env = head.client_env()
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key)
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    proc = _ray(["job", "submit", "--address", head.address, "--", "echo", "hi"], env, timeout=120)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Authentication required" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-2000:]
    status, jobs = _api(head, "/api/jobs/")
    assert status == 200 and not any(job.get("entrypoint") == "echo hi" for job in jobs)


def test_job_runs_the_venv_python_on_the_uploaded_checkout(head: RayHead) -> None:
    """``--working-dir .`` uploads the checkout without ``.venv/`` and local outputs; the job's ``python`` is the
    venv's (the head's PATH) and imports the uploaded ``pipeline``."""
    probe = "import sys, pipeline, ray; print('PROBE', sys.executable, pipeline.__file__, ray.__version__)"
    proc = _ray(["job", "submit", "--address", head.address, "--working-dir", ".", "--", "python", "-c",
                 probe], head.client_env(), timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    found = re.search(r"PROBE (\S+) (\S+) (\S+)", proc.stdout + proc.stderr)
    assert found, (proc.stdout + proc.stderr)[-3000:]
    executable, module, version = found.groups()
    assert Path(executable).parent == Path(sys.executable).parent and version == "2.60.0"
    upload = Path(module).parent.parent
    assert upload != REPO and (upload / "jobs" / "demo_digits.yaml").exists()
    assert not (upload / ".venv").exists() and not (upload / "runs").exists() and not (upload / ".git").exists()


def test_submit_stop_and_resume(
    head: RayHead, digits: Path, s3_server: S3Server, mlflow_server: MLflowServer
) -> None:
    """The user's command end to end: submit (the repo as working dir, S3 storage, MLflow server), watch progress,
    ``ray job stop`` after the first checkpoint (runs KILLED, checkpoint kept), submit again: it resumes the same
    runs from the checkpoint and finishes with the export in S3."""
    bucket = f"jobs-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(bucket)
    experiment = f"jobs-{uuid.uuid4().hex[:8]}"
    sets = [s for s in _overrides(digits) if not s.startswith(("storage_path=", "tracking.uri="))]
    sets += [f"storage_path=s3://{bucket}/runs", f"tracking.uri={mlflow_server.tracking_uri}",
             f"tracking.experiment={experiment}", "stages.pretrain.optim.epochs=2",
             "stages.pretrain.checkpoint.interval_steps=20"]
    entrypoint = ["python", "-m", "pipeline", "run", "jobs/demo_digits.yaml", "--stages", "pretrain", "--json"]
    for item in sets:
        entrypoint += ["--set", item]
    runtime_env = {"env_vars": {**s3_server.env(), "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S)}}
    env = head.client_env()

    def submit(submission_id: str, *, wait: bool) -> subprocess.CompletedProcess[str]:
        return _ray(["job", "submit", "--address", head.address, "--working-dir", ".", "--submission-id",
                     submission_id, "--runtime-env-json", json.dumps(runtime_env),
                     *([] if wait else ["--no-wait"]), "--", *entrypoint], env, timeout=900 if wait else 300)

    # 1. submit, wait for a resumable checkpoint (Ray Train's snapshot names it), stop
    first = f"stop-{uuid.uuid4().hex[:6]}"
    proc = submit(first, wait=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    run_dir = "runs/demo_digits-pretrain/"
    deadline = time.monotonic() + 600
    while not any(k.endswith("checkpoint_manager_snapshot.json") for k in _s3_keys(s3_server, bucket, run_dir)):
        status = _job_status(head, first)
        assert status in ("PENDING", "RUNNING"), f"job {first} is {status} before its first checkpoint: " \
            f"{_api(head, f'/api/jobs/{first}/logs')[1]['logs'][-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 600 s"
        time.sleep(1.0)
    stop = _ray(["job", "stop", "--address", head.address, first], env, timeout=300)
    assert stop.returncode == 0, (stop.stdout + stop.stderr)[-2000:]
    assert _job_status(head, first) == "STOPPED"
    logs = _api(head, f"/api/jobs/{first}/logs")[1]["logs"]
    assert re.search(r"pretrain step \d+/\d+ epoch", logs), logs[-3000:]  # progress reaches the job log
    assert any("/checkpoint_" in k for k in _s3_keys(s3_server, bucket, run_dir))

    client = MlflowClient(mlflow_server.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    stage_runs = [r for r in runs if r.data.tags.get("revcol.stage") == "pretrain"]
    parents = [r for r in runs if r.data.tags.get("revcol.role") == "pipeline"]
    assert len(stage_runs) == 1 and len(parents) == 1
    assert stage_runs[0].info.status == "KILLED" and parents[0].info.status == "KILLED"
    run_id = stage_runs[0].info.run_id

    # 2. the same submission again: resumes from the checkpoint, same MLflow runs, finishes
    second = f"resume-{uuid.uuid4().hex[:6]}"
    proc = submit(second, wait=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert _job_status(head, second) == "SUCCEEDED"
    resumed = re.search(r"pretrain resumed at step (\d+)", out)  # the console's line (rank 0's, in the log file)
    assert resumed and int(resumed.group(1)) >= 20, out[-4000:]
    steps = [(int(a), int(b)) for a, b in re.findall(r"pretrain step (\d+)/(\d+) epoch", out)]
    assert steps and steps[-1][0] == steps[-1][1], steps
    assert min(step for step, _ in steps) > int(resumed.group(1))  # nothing trained twice
    summary = json.loads(next(line for line in reversed(out.splitlines()) if line.startswith('{"recipe"')))
    outcome = summary["stages"]["pretrain"]
    assert outcome["status"] == "FINISHED" and outcome["run_id"] == run_id
    assert outcome["export_uri"].startswith(f"s3://{bucket}/{run_dir}checkpoint_")

    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2  # the parent and the stage, continued, not duplicated
    assert {r.info.status for r in runs} == {"FINISHED"}
    run = client.get_run(run_id)
    assert run.data.tags["revcol.export_uri"] == outcome["export_uri"]
    history = client.get_metric_history(run_id, "train/loss")
    assert max(m.step for m in history) == steps[-1][1]
    export_key = outcome["export_uri"].removeprefix(f"s3://{bucket}/")
    weights = load_safetensors(s3_server.client().get_object(Bucket=bucket, Key=export_key)["Body"].read())
    assert weights["cls_blocks.3.classifier.1.weight"].shape[0] == 40  # digit × rotation



def test_demo_services_runs_against_local_s3_and_mlflow(digits: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``revcol demo --services`` as a user runs it (its pretrain stage, a few steps): the recipe points at an S3
    server and an MLflow server started for the demo, the workers reach both (checkpoints and the export land in S3,
    metrics in MLflow), and both servers are stopped afterwards; the runs outlive the server in its SQLite store."""
    import psutil

    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_PROFILE")}
    cmd = [sys.executable, "-m", "pipeline", "demo", "--services", "--workdir", str(digits), "--stages", "pretrain",
           "--set", "stages.pretrain.optim.max_steps=6", "--set", "stages.pretrain.checkpoint.interval_steps=3",
           "--json"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])

    from pipeline import demo

    assert summary["storage_path"] == f"s3://{demo.SERVICES_BUCKET}/demo"
    assert summary["stages"]["pretrain"]["status"] == "FINISHED", summary
    found = re.findall(r"(s3 \(moto\)|mlflow) up at (http://127\.0\.0\.1:\d+) \(pid (\d+)\)", out)
    servers = {name: (url, int(pid)) for name, url, pid in found}
    assert set(servers) == {"s3 (moto)", "mlflow"}, out[-4000:]
    for url, pid in servers.values():  # both stopped
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(url, timeout=5)
    assert summary["tracking_uri"] == f"sqlite:///{digits / 'services' / 'mlflow.db'}"
    run = MlflowClient(summary["tracking_uri"]).get_run(summary["stages"]["pretrain"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["revcol.export_uri"].startswith(f"s3://{demo.SERVICES_BUCKET}/demo/")
    history = MlflowClient(summary["tracking_uri"]).get_metric_history(run.info.run_id, "train/loss")
    assert max(m.step for m in history) == 6 and all(math.isfinite(m.value) and m.value > 0 for m in history)

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    with pytest.raises(ValueError, match="RAY_ADDRESS"):
        demo.run_demo(workdir=digits, progress=False, services=True)
