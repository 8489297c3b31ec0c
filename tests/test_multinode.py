"""Several Ray nodes on this machine (``ray.cluster_utils.Cluster``: a head with no CPUs for tasks, labelled worker
nodes): what the stream keeps must survive the loss of any node but the head."""

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
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "labels": {ROLE: "head"}, "temp_dir": temp,
                                                          "include_dashboard": False})
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
        "val": build_eval_dataset(stage.data, model_name="revcol_test", num_splits=2, data_cpus=placement.data_cpus,
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
