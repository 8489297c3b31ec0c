"""MLflow 3's own objects after a reduced pipeline (pretrain → finetune → eval on the digits, a few steps each),
against an MLflow server with S3 artifacts and checkpoints in S3, read back through the server's REST API: the
experiment's kind, the datasets on each stage run, one external LoggedModel per export with its metrics (the weights
only in ``storage_path``), the registered candidate version, system metrics, and no credential anywhere.

The same objects in the local SQLite default are checked after the demo chain by ``tests/test_demo.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from pipeline.data.stream import resolve_shards
from pipeline.demo import _overrides, prepare_digits
from pipeline.services import MLflowServer, S3Server

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def _rest(server: MLflowServer, path: str, **query: str) -> dict[str, Any]:
    url = f"{server.tracking_uri}/api/2.0/mlflow/{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _tags(entries: list[dict[str, str]]) -> dict[str, str]:
    return {e["key"]: e["value"] for e in entries}


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server, mlflow_server: MLflowServer) -> dict:
    """``revcol run jobs/demo_digits.yaml --stages pretrain,finetune,eval`` cut to a few steps per stage, storage in
    a fresh bucket, tracking on the MLflow server, S3 keys given in the recipe (to check they go nowhere)."""
    workdir = tmp_path_factory.mktemp("lineage")
    prepare_digits(workdir, progress=False)
    bucket = f"lineage-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(bucket)
    name = f"lineage_{uuid.uuid4().hex[:8]}"
    secret = f"secret-{uuid.uuid4().hex}"
    sets = [s for s in _overrides(workdir) if not s.startswith(("storage_path=", "tracking.uri="))]
    sets += [f"name={name}", f"storage_path=s3://{bucket}/runs", f"tracking.uri={mlflow_server.tracking_uri}",
             "tracking.system_metrics_interval_s=1", "stages.pretrain.optim.max_steps=4",
             "stages.finetune.optim.max_steps=3", f"s3.access_key_id=key-{secret}", f"s3.secret_access_key={secret}"]
    cmd = [sys.executable, "-m", "pipeline", "run", "jobs/demo_digits.yaml", "--stages", "pretrain,finetune,eval",
           "--json"]
    for item in sets:
        cmd += ["--set", item]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **s3_server.env()}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"summary": summary, "name": name, "bucket": bucket, "secret": secret, "workdir": workdir,
            "runs": {stage: _rest(mlflow_server, "runs/get", run_id=s["run_id"])["run"]
                     for stage, s in summary["stages"].items()}}


def test_experiment_is_a_model_training_experiment(pipeline_run: dict, mlflow_server: MLflowServer) -> None:
    experiment = _rest(mlflow_server, "experiments/get-by-name", experiment_name=pipeline_run["name"])["experiment"]
    assert _tags(experiment["tags"])["mlflow.experimentKind"] == "custom_model_development"


def test_each_stage_run_records_its_datasets(pipeline_run: dict) -> None:
    shards = pipeline_run["workdir"] / "shards"
    expected = {  # stage: {dataset name: (context, shards folder)}
        "pretrain": {"pretrain": "training"},
        "finetune": {"finetune": "training", "val": "validation"},
        "eval": {"test": "evaluation"},
    }
    for stage, datasets in expected.items():
        inputs = pipeline_run["runs"][stage]["inputs"]["dataset_inputs"]
        assert {i["dataset"]["name"]: _tags(i["tags"])["mlflow.data.context"] for i in inputs} == datasets, stage
        for item in inputs:
            dataset = item["dataset"]
            resolved = resolve_shards(str(shards / dataset["name"]))
            assert dataset["digest"] == resolved.fingerprint  # the manifest's fingerprint
            assert json.loads(dataset["source"])["uri"] == str(shards / dataset["name"])
            assert dataset["source_type"] == "local"
            profile = json.loads(dataset["profile"])
            assert profile["num_samples"] == resolved.num_samples and profile["num_classes"] == resolved.num_classes
            assert _tags(item["tags"])["revcol.split"] == ("val" if dataset["name"] in ("val", "test") else "train")


def test_each_export_is_an_external_logged_model_with_its_metrics(pipeline_run: dict, mlflow_server: MLflowServer,
                                                                  s3_server: S3Server) -> None:
    runs, summary = pipeline_run["runs"], pipeline_run["summary"]["stages"]
    models = {}
    for stage in ("pretrain", "finetune"):
        outputs = runs[stage]["outputs"]["model_outputs"]
        assert len(outputs) == 1, outputs  # one export per training stage: its final checkpoint
        model = _rest(mlflow_server, f"logged-models/{outputs[0]['model_id']}")["model"]
        info, tags = model["info"], _tags(model["info"]["tags"])
        assert info["source_run_id"] == summary[stage]["run_id"] and info["status"] == "LOGGED_MODEL_READY"
        assert info["name"] == stage and info["model_type"] == "revcol"
        assert tags["mlflow.model.isExternal"] == "true"
        assert tags["revcol.weights_uri"] == summary[stage]["export_uri"]
        assert tags["revcol.weights_uri"].startswith(f"s3://{pipeline_run['bucket']}/runs/")
        assert int(outputs[0]["step"]) == int(summary[stage]["metrics"]["step"])
        models[stage] = model
    assert {p["key"]: p["value"] for p in models["finetune"]["data"]["params"]}["num_classes"] == "10"
    metrics = [(m["key"], int(m.get("step", 0)), m.get("dataset_name"), m["run_id"])
               for m in models["finetune"]["data"]["metrics"]]
    final_step = int(summary["finetune"]["metrics"]["step"])
    assert ("val/top1", final_step, "val", summary["finetune"]["run_id"]) in metrics  # its validation
    assert ("val/top1", 0, "test", summary["eval"]["run_id"]) in metrics  # the held-out eval of these weights
    assert ("train/loss", final_step, None, summary["finetune"]["run_id"]) in metrics
    assert not any(key.startswith("system/") for key, *_ in metrics)
    assert any(m["key"] == "train/loss" for m in models["pretrain"]["data"]["metrics"])
    # lineage: finetune started from pretrain's model, eval evaluated finetune's
    assert runs["finetune"]["inputs"]["model_inputs"] == [{"model_id": models["pretrain"]["info"]["model_id"]}]
    assert runs["eval"]["inputs"]["model_inputs"] == [{"model_id": models["finetune"]["info"]["model_id"]}]
    # the weights stay in storage_path: the artifact store holds no weights, only MLflow's small files
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=mlflow_server.bucket)
    artifacts = {obj["Key"]: obj["Size"] for page in pages for obj in page.get("Contents", [])}
    mine = {k: size for k, size in artifacts.items() if any(m["info"]["model_id"] in k for m in models.values())}
    assert mine and all(k.endswith("/MLmodel") and size < 4096 for k, size in mine.items()), mine
    assert not any(k.endswith(".safetensors") for k in artifacts)


def test_final_finetune_export_is_registered_with_the_alias(pipeline_run: dict, mlflow_server: MLflowServer) -> None:
    finetune = pipeline_run["runs"]["finetune"]
    model_id = finetune["outputs"]["model_outputs"][0]["model_id"]
    version = _rest(mlflow_server, "registered-models/alias", name=pipeline_run["name"],
                    alias="candidate")["model_version"]
    assert version["source"] == f"models:/{model_id}" and version["run_id"] == finetune["info"]["run_id"]
    assert _tags(version["tags"])["revcol.weights_uri"] == pipeline_run["summary"]["stages"]["finetune"]["export_uri"]
    model = _rest(mlflow_server, f"logged-models/{model_id}")["model"]
    linked = json.loads(_tags(model["info"]["tags"])["mlflow.modelVersions"])  # the version as the store typed it
    assert [(v["name"], str(v["version"])) for v in linked] == [(pipeline_run["name"], version["version"])]


def test_system_metrics_and_no_credentials(pipeline_run: dict, mlflow_server: MLflowServer, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    for stage in ("pretrain", "finetune"):
        keys = {m["key"] for m in pipeline_run["runs"][stage]["data"]["metrics"]}
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys, keys
    parent_id = _tags(pipeline_run["runs"]["pretrain"]["data"]["tags"])["mlflow.parentRunId"]
    recorded = [json.dumps(pipeline_run["runs"]), json.dumps(_rest(mlflow_server, "runs/get", run_id=parent_id))]
    for run in pipeline_run["runs"].values():
        for output in run["outputs"].get("model_outputs", []):
            recorded.append(json.dumps(_rest(mlflow_server, f"logged-models/{output['model_id']}")))
    recipe = MlflowClient(mlflow_server.tracking_uri).download_artifacts(parent_id, "recipe.json", str(tmp_path))
    recorded.append(Path(recipe).read_text())
    assert '"s3.secret_access_key", "value": "***"' in recorded[1]  # the key is there, its value redacted
    assert not [text for text in recorded if pipeline_run["secret"] in text]
