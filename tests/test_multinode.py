"""Several Ray nodes on this machine (``ray.cluster_utils.Cluster``: a head with no CPUs for tasks, labelled worker
nodes): placement by role, the shared-storage refusal, and a run that must survive the loss of any node but the
head (the stream's control actor; the demo's pretrain stage through ``revcol run`` losing a training node, and
with a replacement node the decode node with it)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import DataConfig
from pipeline.data.shards import write_shards

ROLE = "revcol/role"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.fail("a Ray session of another module is still up; this module needs its own cluster")
    temp = tempfile.mkdtemp(prefix="ray-multi-", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
    # Ray writes the cluster's address to RAY_TMPDIR/ray/ray_current_cluster: in this folder, not a machine-wide
    # /tmp/ray that a fresh machine lacks (and other Ray instances share)
    (Path(temp) / "ray").mkdir()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", temp)
        nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "labels": {ROLE: "head"},
                                                              "temp_dir": temp, "include_dashboard": False})
        try:
            ray.init(address=nodes.address, configure_logging=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            yield nodes
        finally:
            ray.shutdown()
            nodes.shutdown()


def _node_of(actor: Any) -> str:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()))


def test_stream_control_lives_on_the_driver_node_and_survives_a_data_node(cluster: Any, tmp_path: Path) -> None:
    import ray

    from pipeline.data.stream import StreamPosition, build_train_dataset, iter_train_batches
    from pipeline.data.stream.control import control_of

    data_node = cluster.add_node(num_cpus=2, labels={ROLE: "data"})
    cluster.wait_for_nodes()
    manifest = write_shards("digits", str(tmp_path), shard_size=40, split="small",
                            splits={"rest": 0.8, "small": 0.2}, progress=False)
    cfg = DataConfig(train=str(tmp_path), image_size=32, batch_size=16, shuffle_buffer=64, seed=7)
    dataset = build_train_dataset(cfg, model_name="revcol_test", data_cpus=2)
    control = control_of(dataset)
    head = ray.get_runtime_context().get_node_id()
    assert _node_of(control) == head  # not the data node, the only one with CPUs, where it could land
    position = StreamPosition()
    batches = len(list(iter_train_batches(dataset, batch_size=16, position=position)))
    assert batches == manifest["num_samples"] // 16 and position.epoch == 1
    # the data node goes away; another takes its place and the same stream runs its next epoch
    cluster.add_node(num_cpus=2, labels={ROLE: "data"})
    cluster.remove_node(data_node)
    cluster.wait_for_nodes()
    assert ray.get(control.info.remote())["total"] == manifest["num_samples"]
    assert len(list(iter_train_batches(dataset, batch_size=16, position=position))) == batches
    assert position.epoch == 2


def test_node_local_paths_are_refused_before_anything_starts(cluster: Any, tmp_path: Path) -> None:
    import ray

    from pipeline.cluster import check_shared_storage
    from pipeline.config import load_recipe
    from pipeline.stages import run_pipeline

    cluster.add_node(num_cpus=1, labels={ROLE: "train"})
    cluster.wait_for_nodes()
    recipe = load_recipe(Path(__file__).parent.parent / "jobs" / "demo_digits.yaml", [
        f"storage_path={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ])
    with pytest.raises(ValueError) as refused:
        run_pipeline(recipe)
    message = str(refused.value)
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    assert f"the Ray cluster has {nodes} nodes" in message
    assert f"storage_path: {str(tmp_path / 'runs')!r}" in message and "tracking.uri: 'sqlite:///" in message
    assert "stages.pretrain.data.train:" in message and "scaling.shared_paths" in message
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()  # no run was started
    # a mount every node has, and an MLflow server: accepted (the demo's shards live under the repository)
    shared = load_recipe(Path(__file__).parent.parent / "jobs" / "demo_digits.yaml", [
        f"storage_path={tmp_path / 'runs'}", "tracking.uri=http://127.0.0.1:5000",
        f"scaling.shared_paths=[{tmp_path}, {Path(__file__).parent.parent}]",
    ])
    check_shared_storage(shared)
    check_shared_storage(recipe, nodes=1)  # one node: the local default stays


def _nodes_of_role(role: str) -> dict[str, float]:
    """Node id → CPUs of the alive nodes labelled ``revcol/role: role``, as Ray lists them."""
    import ray

    return {node["NodeID"]: node["Resources"].get("CPU", 0.0) for node in ray.nodes()
            if node["Alive"] and (node.get("Labels") or {}).get(ROLE) == role}


def _ensure_nodes(cluster: Any, role: str, count: int, *, num_cpus: int) -> dict[str, float]:
    """At least ``count`` alive nodes of ``role`` (the tests above add and remove some; each may run alone)."""
    for _ in range(count - len(_nodes_of_role(role))):
        cluster.add_node(num_cpus=num_cpus, labels={ROLE: role})
    cluster.wait_for_nodes()
    return _nodes_of_role(role)


@pytest.mark.slow
def test_training_stage_places_workers_on_train_nodes_and_decode_on_data_nodes(
    cluster: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from pipeline.audit import recorded_nodes
    from pipeline.config import parse_recipe
    from pipeline.data.stream import build_eval_dataset, build_train_dataset
    from pipeline.placement import resolve_placement
    from pipeline.train.launch import fit_stage

    data_nodes = _ensure_nodes(cluster, "data", 1, num_cpus=2)
    train_nodes = _ensure_nodes(cluster, "train", 2, num_cpus=1)
    samples = {split: write_shards("digits", str(tmp_path / split), shard_size=200, split=split,
                                   progress=False)["num_samples"] for split in ("train", "test")}
    trace = tmp_path / "trace"
    recipe = parse_recipe({
        "name": "placed", "storage_path": str(tmp_path / "runs"),
        # one CPU per worker: each of the two 1-CPU training nodes must take one
        "scaling": {"num_workers": 2, "cpus_per_worker": 1, "data_cpus": "all"},
        "stages": [{
            "kind": "pretrain",
            "data": {"train": str(tmp_path / "train"), "val": str(tmp_path / "test"), "batch_size": 32,
                     "image_size": 32, "auto_augment": None, "random_erasing": 0.0, "shuffle_buffer": 64,
                     "trace_dir": str(trace)},
            "model": {"name": "revcol_test"},
            "optim": {"base_lr": 0.03, "epochs": 1, "max_steps": 4, "warmup_epochs": 0},
            "checkpoint": {"interval_steps": 100, "keep": 1},
        }],
    })
    stage = recipe.stages[0]
    with caplog.at_level(logging.INFO, logger="pipeline.placement"):
        placement = resolve_placement(recipe.scaling)
    assert placement.data_cpus == sum(data_nodes.values())  # data_cpus: all = the data nodes' CPUs
    assert (f"Ray Train workers on the {len(train_nodes)} node(s) labelled revcol/role=train; decode tasks "
            f"({placement.data_cpus:g} CPUs) on the {len(data_nodes)} node(s) labelled revcol/role=data") in caplog.text
    datasets = {
        "train": build_train_dataset(stage.data, model_name="revcol_test", data_cpus=placement.data_cpus,
                                     label_selector=placement.data_selector),
        "val": build_eval_dataset(stage.data, model_name="revcol_test", data_cpus=placement.data_cpus,
                                  label_selector=placement.data_selector),
    }
    result = fit_stage(recipe, stage, datasets=datasets, train_samples=samples["train"], num_classes=10,
                       placement=placement)
    assert result.error is None and result.metrics["step"] == 4 and "val/top1" in result.metrics

    records = recorded_nodes(trace)
    workers = [r for r in records if r["role"] == "train_worker"]
    decode = [r for r in records if r["role"] == "decode"]
    assert sorted(r["rank"] for r in workers) == [0, 1]
    assert {r["node"] for r in workers} == set(train_nodes)  # one per training node, none elsewhere
    assert decode and {r["node"] for r in decode} <= set(data_nodes)  # every decode task on a data node
    assert {r["split"] for r in decode} == {"train", "val"}


def test_placement_falls_back_without_the_label_and_by_role_names_it(cluster: Any) -> None:
    from pipeline.config import ScalingConfig
    from pipeline.placement import resolve_placement

    _ensure_nodes(cluster, "data", 1, num_cpus=2)
    unlabelled = ScalingConfig(role_label="revcol/pool")  # a label no node of this cluster carries
    placement = resolve_placement(unlabelled)
    assert placement.train_selector is None and placement.data_selector is None
    with pytest.raises(ValueError, match=r"carries the label revcol/pool=train \(scaling.train_role\)"):
        resolve_placement(unlabelled.model_copy(update={"placement": "by_role"}))


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's shards (``pipeline.demo.prepare_digits``) in a module folder, which every node sees."""
    from pipeline.demo import prepare_digits

    workdir = tmp_path_factory.mktemp("digits")
    prepare_digits(workdir, progress=False)
    return workdir


def _train_worker(trace: Path, rank: int) -> dict[str, Any] | None:
    """The latest audit record of the training worker of ``rank``."""
    from pipeline.audit import recorded_nodes

    workers = [r for r in recorded_nodes(trace) if r["role"] == "train_worker" and r["rank"] == rank]
    return workers[-1] if workers else None


INTERVAL = 10
"""Checkpoint interval (steps) of the node-loss runs."""


@pytest.mark.slow
@pytest.mark.parametrize("replacement", [True, False], ids=["replacement-node", "elastic-without"])
def test_losing_rank0s_training_node_mid_epoch(
    cluster: Any, digits: Path, s3_server: Any, mlflow_server: Any, tmp_path: Path, replacement: bool
) -> None:
    """The demo's pretrain stage (with a replacement node, the finetune stage after it: a few steps from the
    resumed pretrain's export) through ``revcol run`` on the cluster (S3 storage, an MLflow server): after its
    first checkpoint in S3, the training node of rank 0's worker goes (SIGKILL of its processes). With a
    replacement node (2 workers, ``max_failures``) the worker group restarts there; without one, with
    ``num_workers: 1..2`` (elastic) on the node that is left. With the replacement, the decode node is lost at the
    same moment (and replaced): decode goes on on the new one. The run finishes; no sample of the epoch is lost,
    at most one checkpoint interval repeats, no MLflow step is logged twice, and the S3 secrets appear nowhere."""
    import json
    import os
    import subprocess
    import sys
    import time
    import uuid
    from collections import Counter

    from mlflow.tracking import MlflowClient

    from pipeline.audit import recorded_nodes, recorded_samples
    from pipeline.demo import _overrides

    train_nodes = _ensure_nodes(cluster, "train", 2, num_cpus=1)
    extra = []
    if replacement:
        _ensure_nodes(cluster, "data", 1, num_cpus=2)
    else:
        # Ray 2.60's elastic policy counts the room for workers by resources alone, labels aside: a data node's
        # CPUs would count as room for a CPU worker, and the group would wait for a worker that can never be
        # placed there. Workers need memory (4 GiB, what revcol plan asks for) that the data node lacks (as they
        # need GPUs that data nodes lack on a real cluster).
        small = cluster.add_node(num_cpus=2, memory=2**30, labels={ROLE: "data"})
        for node in [n for n in cluster.worker_nodes if n.node_id in _nodes_of_role("data") and n is not small]:
            cluster.remove_node(node)
        cluster.wait_for_nodes()
        extra = ["scaling.memory_per_worker_gb=4"]
    bucket = f"nodeloss-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(bucket)
    experiment = f"nodeloss-{uuid.uuid4().hex[:8]}"
    trace = tmp_path / "trace"
    sets = [s for s in _overrides(digits) if not s.startswith(("storage_path=", "tracking.uri="))] + [
        f"storage_path=s3://{bucket}/runs", f"tracking.uri={mlflow_server.tracking_uri}",
        f"tracking.experiment={experiment}", f"scaling.num_workers={'2' if replacement else '1..2'}",
        "scaling.cpus_per_worker=1", "scaling.data_cpus=all", "scaling.max_failures=2",
        f"scaling.shared_paths=[{digits}, {tmp_path}]",  # one machine: every node sees these folders
        f"stages.pretrain.data.trace_dir={trace}", "stages.pretrain.optim.epochs=1",
        f"stages.pretrain.checkpoint.interval_steps={INTERVAL}", *extra,
    ]
    # credentials only this run has (moto accepts any): they must show up in no output
    secrets = {"AWS_SECRET_ACCESS_KEY": f"nodeloss-secret-{uuid.uuid4().hex}",
               "AWS_SESSION_TOKEN": f"nodeloss-token-{uuid.uuid4().hex}"}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **s3_server.env(), **secrets,
           "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
           # right after the loss Ray's elastic policy still counts the lost node and first tries the old size: that
           # try ends at this timeout (60 s by default), which bounds only the wait for the placement group's
           # resources (workers start after it); a try that times out is retried, not counted in max_failures
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "8"}
    # with a replacement node the finetune stage follows on the cluster the loss left (a few steps)
    stages = "pretrain,finetune" if replacement else "pretrain"
    if replacement:
        sets.append("stages.finetune.optim.max_steps=4")
    command = [sys.executable, "-m", "pipeline", "run", str(Path(__file__).parent.parent / "jobs" / "demo_digits.yaml"),
               "--stages", stages, "--json", *[arg for item in sets for arg in ("--set", item)]]
    run = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        s3 = s3_server.client()
        deadline = time.monotonic() + 600
        while not [key for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="runs/")
                   for key in (o["Key"] for o in page.get("Contents", [])) if key.endswith("trainer_state.json")]:
            assert run.poll() is None and time.monotonic() < deadline, "no checkpoint in S3 before the run ended"
            time.sleep(0.5)
        rank0 = _train_worker(trace, 0)
        victim = next(node for node in cluster.worker_nodes if node.node_id == rank0["node"])
        before = {name for name, lines in recorded_samples(trace).items() if lines}
        first_pids = {r["pid"] for r in recorded_nodes(trace) if r["role"] == "train_worker"}
        lost_data = []
        if replacement:  # the decode node goes too, both replaced: decode carries on on the new one
            lost_data = [n for n in cluster.worker_nodes if n.node_id in _nodes_of_role("data")]
            cluster.add_node(num_cpus=1, labels={ROLE: "train"})
            cluster.add_node(num_cpus=2, labels={ROLE: "data"})
        removed_at = time.monotonic()
        cluster.remove_node(victim, allow_graceful=False)
        for node in lost_data:
            cluster.remove_node(node, allow_graceful=False)
        restart_s = None
        while run.poll() is None and restart_s is None:  # the first sample a restarted worker trains on
            if any(lines for name, lines in recorded_samples(trace).items() if name not in before):
                restart_s = time.monotonic() - removed_at
            time.sleep(0.2)
        out, _ = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, out[-4000:]
    # stderr is merged in: the summary is the last line of stdout, not necessarily of the merged stream
    outcomes = json.loads(next(line for line in reversed(out.splitlines()) if line.startswith('{"recipe"')))["stages"]
    summary = outcomes["pretrain"]
    assert summary["status"] == "FINISHED"
    if replacement:
        assert outcomes["finetune"]["status"] == "FINISHED" and outcomes["finetune"]["metrics"]["step"] == 4
        finetune_tags = MlflowClient(mlflow_server.tracking_uri).get_run(outcomes["finetune"]["run_id"]).data.tags
        assert finetune_tags["revcol.init_from"] == summary["export_uri"]  # the weights the resumed pretrain exported

    # placement: every worker on a training node; after the loss, none on the removed one
    records = [r for r in recorded_nodes(trace) if r["role"] == "train_worker"]
    restarted = [r for r in records if r["pid"] not in first_pids]
    assert restarted and restart_s is not None and victim.node_id not in {r["node"] for r in restarted}
    assert {r["node"] for r in records} <= set(train_nodes) | set(_nodes_of_role("train"))
    assert {r["rank"] for r in restarted} == ({0, 1} if replacement else {0})
    if replacement:
        decode_nodes = {r["node"] for r in recorded_nodes(trace) if r["role"] == "decode"}
        assert decode_nodes - {n.node_id for n in lost_data} <= set(_nodes_of_role("data")), decode_nodes
        assert decode_nodes & set(_nodes_of_role("data")), "no decode task ran on the replacement data node"

    # the audit trail: every sample of the epoch trained (bar the last pass's drop-last), one interval repeated
    seen = Counter(line for lines in recorded_samples(trace).values() for line in lines)
    total = json.loads((digits / "shards" / "pretrain" / "manifest.json").read_text())["num_samples"]
    epoch0 = {(shard, index) for epoch, shard, index in seen if epoch == 0}
    batch = 32
    assert total - len(epoch0) < 2 * batch  # at most each rank's partial last batch of the resumed pass
    repeated = sum(n - 1 for n in seen.values())
    assert repeated <= INTERVAL * 2 * batch + 2 * 2 * batch  # since the checkpoint (+ batches in flight)

    # what storage keeps: Ray Train's last checkpoint.keep (2); neither the lost attempt's incomplete checkpoint nor
    # a complete one Ray never registered
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                            Prefix="runs/demo_digits-pretrain/")
            for o in page.get("Contents", [])]
    folders = {k.split("/")[2] for k in keys if k.count("/") > 2}
    assert len({f for f in folders if f.startswith("checkpoint_")}) == 2, sorted(folders)

    client = MlflowClient(mlflow_server.tracking_uri)
    steps = [m.step for m in client.get_metric_history(summary["run_id"], "train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == summary["metrics"]["step"]
    run_data = client.get_run(summary["run_id"]).data
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "runs" / "logs").glob("*"))
    for secret in secrets.values():
        assert secret not in out and secret not in logs and secret not in json.dumps([run_data.params, run_data.tags])
    print(f"\nnode loss ({'replacement node' if replacement else 'elastic, no replacement'}): first sample "
          f"trained {restart_s:.1f} s after remove_node; {repeated} samples repeated "
          f"({repeated / (2 * batch):.1f} steps of 2 x {batch}); {len(epoch0)}/{total} of the epoch trained")
