"""Driver side of a training stage: scaling, storage, failure policy, datasets → ``TorchTrainer.fit()``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.config import Recipe, StageConfig
from pipeline.train.loop import StageJob, train_func

__all__ = ["fit_stage", "keep_best", "read_storage", "run_name", "storage", "write_storage"]

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


def _storage_file(recipe: Recipe, stage: StageConfig, name: str) -> tuple[str, Any]:
    path, fs = storage(recipe)
    return f"{path}/{run_name(recipe, stage)}/{name}", fs


def write_storage(recipe: Recipe, stage: StageConfig, name: str, data: bytes) -> str:
    """Writes a small file into the stage's run folder in storage (local or S3); returns its URI."""
    path, fs = _storage_file(recipe, stage, name)
    if fs is None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
        return path
    with fs.open_output_stream(path) as f:
        f.write(data)
    return f"s3://{path}"


def read_storage(recipe: Recipe, stage: StageConfig, name: str, *, delete: bool = False) -> bytes | None:
    """Reads a file of the stage's run folder in storage; None when it does not exist."""
    path, fs = _storage_file(recipe, stage, name)
    try:
        if fs is None:
            data = Path(path).read_bytes()
            if delete:
                Path(path).unlink()
            return data
        with fs.open_input_stream(path) as f:
            data = f.read()
        if delete:
            fs.delete_file(path)
        return data
    except (FileNotFoundError, OSError):
        return None


def latest_checkpoint(recipe: Recipe, stage: StageConfig, *, into: Path) -> Path | None:
    """The newest complete checkpoint in the stage's run folder, copied to ``into`` when remote; None if none.

    Ray Train hands a restarted worker group the last checkpoint its controller registered; a worker killed right
    after reporting can take that registration with it. Complete means the trainer state and every rank's RNG
    file are there (each rank writes its RNG file after its DeepSpeed shard).
    """
    import json

    import pyarrow.fs

    path, fs = storage(recipe)
    folder = f"{path}/{run_name(recipe, stage)}"
    fs = fs or pyarrow.fs.LocalFileSystem()
    try:
        entries = fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
    except OSError:
        return None
    for entry in sorted((e for e in entries if e.base_name.startswith("checkpoint_")), key=lambda e: e.base_name,
                        reverse=True):
        names = {i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(entry.path))}
        if "trainer_state.json" not in names:
            continue
        with fs.open_input_stream(f"{entry.path}/trainer_state.json") as f:
            world = json.loads(f.read())["world_size"]
        if all(f"rng_rank{r}.pt" in names for r in range(world)):
            if isinstance(fs, pyarrow.fs.LocalFileSystem):
                return Path(entry.path)
            pyarrow.fs.copy_files(entry.path, str(into), source_filesystem=fs)
            return into
    return None


BEST_PREFIX = "best_step"


def keep_best(local: Path, *, fs: Any, run_folder: str, step: int) -> str:
    """Keeps this rank's part of the checkpoint just reported (the local folder ``local``) as the run's best:
    copies it to ``best_step<step>`` in the run folder and, once every rank has, deletes the earlier best.
    Collective: call on every rank. Returns the new best's path in ``fs``.

    Ray Train rotates the ``checkpoint_*`` folders (the last ``checkpoint.keep``); the best lives beside them
    because Ray cannot keep "last k plus best" itself, and deleting folders it lists would make it refuse to
    resume the run (its run snapshot must find every checkpoint it names). Until the new best is complete the
    old one stays, so a crash here leaves a complete best, and the ``checkpoint_*`` folders are never touched.
    """
    import pyarrow.fs
    import torch.distributed as dist

    name = f"{BEST_PREFIX}{step:09d}"
    pyarrow.fs.copy_files(str(local), f"{run_folder}/{name}", destination_filesystem=fs)
    dist.barrier()  # every rank's part is stored before the previous best goes
    if dist.get_rank() == 0:
        for entry in fs.get_file_info(pyarrow.fs.FileSelector(run_folder)):
            if entry.base_name.startswith(BEST_PREFIX) and entry.base_name != name:
                fs.delete_dir(entry.path)
    return f"{run_folder}/{name}"


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

    from pipeline.data.stream import train_data_config

    sc = recipe.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    if sc.memory_per_worker_gb:
        resources["memory"] = sc.memory_per_worker_gb * 2**30
        offered = ray.cluster_resources().get("memory", 0)
        if resources["memory"] * sc.num_workers > offered:  # Ray would wait for it forever
            raise ValueError(
                f"scaling.memory_per_worker_gb={sc.memory_per_worker_gb} x {sc.num_workers} workers, but the Ray "
                f"cluster offers {offered / 2**30:.1f} GiB of schedulable memory: lower it or add nodes"
            )
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
    data = read_storage(recipe, stage, name)
    if not data:
        return
    tracker = MLflowTracker(tracking_uri, run_id)
    rows = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    for row in rows:
        tracker.log_metrics({row["key"]: row["value"]}, step=row["step"])
    if tracker.close(timeout=30.0):
        read_storage(recipe, stage, name, delete=True)
        logger.info("delivered %d metric values saved during an MLflow outage", len(rows))
    else:
        logger.warning("MLflow still unreachable; undelivered metrics stay in storage: %s", name)
