"""Driver side of a training stage: scaling, storage, failure policy, datasets → ``TorchTrainer.fit()``."""

from __future__ import annotations

import logging
from typing import Any

from pipeline import storage
from pipeline.config import S3_SECRETS, Recipe, StageConfig
from pipeline.placement import Placement, resolve_placement
from pipeline.train.loop import StageJob, train_func
from pipeline.train.run_folder import read_file, run_name, run_url

__all__ = ["fit_stage", "run_name", "scaling_config"]

logger = logging.getLogger(__name__)


def scaling_config(recipe: Recipe, placement: Placement | None = None) -> Any:
    """The ``ray.train.ScalingConfig`` of the recipe's ``scaling`` section: training and evaluation runs alike.

    Args:
        recipe: The pipeline.
        placement: Where the workers go (their label selector); default: resolved from the recipe on the
            connected cluster.

    Raises:
        ValueError: the memory asked for per worker exceeds what the cluster can schedule (Ray would wait forever),
            or the placement cannot be resolved (:func:`pipeline.placement.resolve_placement`).
    """
    import ray
    import ray.train

    sc = recipe.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    if sc.memory_per_worker_gb:
        resources["memory"] = sc.memory_per_worker_gb * 2**30
        offered = ray.cluster_resources().get("memory", 0)
        if resources["memory"] * sc.min_workers > offered:  # an elastic run starts once its minimum fits
            raise ValueError(
                f"scaling.memory_per_worker_gb={sc.memory_per_worker_gb} x {sc.min_workers} workers, but the Ray "
                f"cluster offers {offered / 2**30:.1f} GiB of schedulable memory: lower it or add nodes"
            )
    placement = placement or resolve_placement(sc)
    if sc.elastic and placement.data_selector is not None and not sc.use_gpu and not sc.memory_per_worker_gb:
        # seen on a labelled cluster: after the loss of a training node the group waited for ever
        logger.warning(
            "scaling.num_workers=%d..%d (elastic) with workers that ask for CPUs only: Ray's elastic mode counts "
            "the room for workers by resources, not node labels, so the data nodes' CPUs look like room for "
            "training workers, and after a node loss the worker group waits for workers it cannot place; give them "
            "a resource data nodes lack (use_gpu, or scaling.memory_per_worker_gb above a data node's memory)",
            sc.min_workers, sc.max_workers,
        )
    return ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources,
                                   label_selector=placement.train_selector)


def fit_stage(
    recipe: Recipe,
    stage: StageConfig,
    *,
    datasets: dict[str, Any],
    train_samples: int,
    num_classes: int,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    init_weights: str | None = None,
    log_every: int = 10,
    placement: Placement | None = None,
) -> Any:
    """Runs one training stage on the Ray cluster this process is connected to; returns the ``ray.train.Result``.

    Re-running with the same recipe name and stage resumes from the run's latest checkpoint in storage.
    ``placement``: where the workers go (the one the stage's datasets were built for); default: resolved from the
    recipe.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.data.stream import train_data_config

    sc = recipe.scaling
    path, filesystem = storage.ray_storage(recipe.storage_path, s3=recipe.s3)
    job = StageJob(
        recipe=recipe.model_dump(mode="json", exclude={"s3": S3_SECRETS}),
        # the driver's S3 settings, credentials included (recipe or environment): on a cluster, the workers'
        # nodes need not have them (checkpoints, init weights)
        s3=storage.resolve_s3_config(recipe.s3),
        stage=stage.name,
        num_classes=num_classes,
        train_samples=train_samples,
        run_id=run_id,
        tracking_uri=tracking_uri,
        init_weights=init_weights,
        log_every=log_every,
    )
    trainer = TorchTrainer(
        train_func,
        train_loop_config=job.to_dict(),
        scaling_config=scaling_config(recipe, placement),
        run_config=ray.train.RunConfig(
            name=run_name(recipe, stage),
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=sc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=stage.checkpoint.keep),
        ),
        datasets=datasets,
        dataset_config=train_data_config(datasets),
    )
    result = trainer.fit()
    if run_id and tracking_uri:
        _deliver_undelivered_metrics(recipe, stage, run_id, tracking_uri)
    return result


def _deliver_undelivered_metrics(recipe: Recipe, stage: StageConfig, run_id: str, tracking_uri: str) -> None:
    """Replays metrics a worker could not deliver during an MLflow outage (saved to storage) into the run."""
    import json

    from pipeline.tracking import MLflowTracker

    name = f"mlflow-undelivered-{run_id}.jsonl"
    data = read_file(recipe, stage, name)
    if not data:
        return
    tracker = MLflowTracker(tracking_uri, run_id)
    rows = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    for row in rows:
        tracker.log_metrics({row["key"]: row["value"]}, step=row["step"])
    if tracker.close(timeout=30.0):
        storage.remove(run_url(recipe, stage, name), s3=recipe.s3)
        logger.info("delivered %d metric values saved during an MLflow outage", len(rows))
    else:
        logger.warning("MLflow still unreachable; undelivered metrics stay in storage: %s", name)
