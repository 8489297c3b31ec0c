"""Driver side of a training stage: scaling, storage, failure policy, datasets → ``TorchTrainer.fit()``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.config import Recipe, StageConfig
from pipeline.train.loop import StageJob, train_func

__all__ = ["fit_stage", "run_name", "storage"]

logger = logging.getLogger(__name__)


def run_name(recipe: Recipe, stage: StageConfig) -> str:
    """The Ray Train run (and storage folder) of a stage: the same name resumes the same run."""
    return f"{recipe.name}-{stage.name}"


def storage(recipe: Recipe) -> tuple[str, Any]:
    """``(storage_path, pyarrow filesystem or None)`` for Ray Train: a local folder made absolute, or S3 with the
    recipe's / environment's endpoint and credentials (never logged)."""
    from pipeline.s3 import is_s3_url, resolve_s3_config

    if not is_s3_url(recipe.storage_path):
        path = Path(recipe.storage_path).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return str(path), None
    import pyarrow.fs

    s3 = resolve_s3_config(recipe.s3)
    endpoint = s3.endpoint_url or ""
    fs = pyarrow.fs.S3FileSystem(
        access_key=s3.access_key_id,
        secret_key=s3.secret_access_key,
        region=s3.region,
        endpoint_override=endpoint.split("://", 1)[-1] or None,
        scheme=endpoint.split("://", 1)[0] if "://" in endpoint else "https",
    )
    return recipe.storage_path.removeprefix("s3://"), fs


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
) -> Any:
    """Runs one training stage on the Ray cluster this process is connected to; returns the ``ray.train.Result``.

    Re-running with the same recipe name and stage resumes from the run's latest checkpoint in storage.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    sc = recipe.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    if sc.memory_per_worker_gb:
        resources["memory"] = sc.memory_per_worker_gb * 2**30
    path, filesystem = storage(recipe)
    job = StageJob(
        recipe=recipe.model_dump(mode="json", exclude={"s3": {"access_key_id", "secret_access_key"}}),
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
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name(recipe, stage),
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=sc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=stage.checkpoint.keep),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    return trainer.fit()
